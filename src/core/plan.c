/*
 * plan.c - plans and the functional calls built on them: argument conversion (the ABI's struct_size),
 * validation split into what a plan fixes and what each execution brings, thread count and pool,
 * workspace sizing and ownership, and BNORM_VERBOSE. Backend-free: the CPU backend only chooses its
 * schedule (bn_cpu_plan_*) and runs it (bn_cpu_forward/backward).
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "plan.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- ABI: caller structs ------------------------------------------------------------------ */

bnorm_status bn_struct_in(const char *func, const char *what, const void *src, void *dst, size_t lib_size,
                          size_t v1_size) {
    size_t user;
    memcpy(&user, src, sizeof user);
    if (user == 0) user = v1_size;
    if (user < sizeof(size_t))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "%s->struct_size = %zu: too small (set it to sizeof)",
                       what, user);
    if (user > ((size_t)1 << 20))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "%s->struct_size = %zu: not a struct size", what, user);
    if (user > lib_size) {
        const unsigned char *tail = (const unsigned char *)src + lib_size;
        for (size_t i = 0; i < user - lib_size; i++)
            if (tail[i])
                return bn_fail(BNORM_STATUS_UNSUPPORTED, func,
                               "%s sets fields this library (bnorm %s) does not know (struct_size %zu > %zu)", what,
                               bnorm_version_string(), user, lib_size);
        user = lib_size;
    }
    memcpy(dst, src, user);
    memset((char *)dst + user, 0, lib_size - user);
    ((size_t *)dst)[0] = lib_size;
    return BNORM_STATUS_OK;
}

#define BN_POOL_V1 BN_V1_SIZE(bnorm_threadpool, pool_ctx)

/* ---- threads ------------------------------------------------------------------------------ */

void bn_exec_run(const bn_exec *ex, void (*fn)(void *ctx, int t), void *ctx) {
    const int nt = ex->nt;
    if (nt <= 1) {
        fn(ctx, 0);
        return;
    }
    if (ex->pool.parallel_for) {
        ex->pool.parallel_for(ex->pool.pool_ctx, nt, fn, ctx);
        return;
    }
#ifdef _OPENMP
    /* logical thread t gets the same work whatever OpenMP grants (fewer threads inside a caller's
       parallel region run several t each), so results depend on nt only */
#pragma omp parallel for schedule(static, 1) num_threads(nt)
    for (int t = 0; t < nt; t++) fn(ctx, t);
#else
    for (int t = 0; t < nt; t++) fn(ctx, t);
#endif
}

enum { BN_MAX_THREADS = 4096 };

int bn_default_threads(const bn_geom *g) {
    int nt = bnorm_get_num_threads();
    const int64_t share = g->numel / BN_GRAIN + 1;
    return share < nt ? (int)share : nt;
}

static bnorm_status bn_exec_init(const char *func, bn_exec *ex, int num_threads, const bnorm_threadpool *pool,
                                 const bn_geom *g) {
    if (num_threads < 0 || num_threads > BN_MAX_THREADS)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "num_threads = %d: must be in [0, %d]", num_threads,
                       BN_MAX_THREADS);
    ex->nt = num_threads > 0 ? num_threads : bn_default_threads(g);
    if (ex->nt > BN_MAX_THREADS) ex->nt = BN_MAX_THREADS;
    memset(&ex->pool, 0, sizeof ex->pool);
    if (pool) {
        bnorm_status st = bn_struct_in(func, "threadpool", pool, &ex->pool, sizeof ex->pool, BN_POOL_V1);
        if (st) return st;
        if (!ex->pool.parallel_for) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "threadpool->parallel_for is NULL");
    }
    return BNORM_STATUS_OK;
}

/* ---- workspace ---------------------------------------------------------------------------- */

size_t bn_plan_ws_for(const bnorm_plan *p, int nt) {
    if (p->ws_per_thread && (size_t)nt > (SIZE_MAX / sizeof(double) - p->ws_fixed) / p->ws_per_thread) return 0;
    return p->ws_fixed + (size_t)nt * p->ws_per_thread;
}

/* ---- validation ---------------------------------------------------------------------------- */

static int bn_flag(int v) { return v != 0; }

/* What a forward plan fixes: the shape and the mode. */
static bnorm_status bn_fwd_check_config(const char *F, const bnorm_forward_args *a, bn_geom *g) {
    bnorm_status st = bn_geom_init(F, "args->desc", &a->desc, g);
    if (st) return st;
    if (a->training) {
        if (!a->running_mean != !a->running_var)
            return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F,
                           "running_mean is %s but running_var is %s: pass both or neither",
                           a->running_mean ? "set" : "NULL", a->running_var ? "set" : "NULL");
        if (a->comm) {
            st = bn_comm_check(F, a->comm);
            if (st) return st;
        }
    } else {
        if (!a->running_mean || !a->running_var)
            return bn_fail(BNORM_STATUS_NULL_POINTER, F, "inference (training = 0) needs running_mean and running_var");
        if (a->save_mean || a->save_invstd || a->save_mean_lo)
            return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F,
                           "save_mean/save_invstd/save_mean_lo are training outputs; pass NULL in inference");
    }
    if (a->save_mean_lo && !a->save_mean)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "save_mean_lo needs save_mean");
    if (a->relu_mask && !a->relu) return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "relu_mask is set but relu = 0");
    if (a->training && !a->comm && g->m == 1)
        return bn_fail(BNORM_STATUS_BATCH_TOO_SMALL, F,
                       "expected more than 1 value per channel when training, got input of 1 value per channel "
                       "(N * spatial)");
    return BNORM_STATUS_OK;
}

/* What each execution brings: pointers and scalars. */
static bnorm_status bn_fwd_check_data(const char *F, const bnorm_forward_args *a, const bn_geom *g) {
    if (g->numel > 0 && !a->x) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args->x is NULL");
    if (g->numel > 0 && !a->y) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args->y is NULL");
    if (!(a->eps >= 0) || isinf(a->eps))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "args->eps = %g: must be finite and >= 0", a->eps);
    if (a->training && a->running_mean && !(a->momentum >= 0 && a->momentum <= 1))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "args->momentum = %g: must be in [0, 1]", a->momentum);
    return BNORM_STATUS_OK;
}

static bnorm_status bn_bwd_check_config(const char *F, const bnorm_backward_args *a, bn_geom *g) {
    bnorm_status st = bn_geom_init(F, "args->desc", &a->desc, g);
    if (st) return st;
    if (a->daddend && !a->relu_mask)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F,
                       "daddend needs relu_mask (without a ReLU the addend's gradient is dy itself)");
    if (a->comm && !a->use_global_stats) {
        st = bn_comm_check(F, a->comm);
        if (st) return st;
    }
    return BNORM_STATUS_OK;
}

static bnorm_status bn_bwd_check_data(const char *F, const bnorm_backward_args *a, const bn_geom *g) {
    if (g->numel > 0 && !a->x) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args->x is NULL");
    if (g->numel > 0 && !a->dy) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args->dy is NULL");
    if (!a->mean) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args->mean is NULL");
    if (!a->invstd == !a->var)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "pass exactly one of args->invstd and args->var (got %s)",
                       a->invstd ? "both" : "neither");
    if (a->var && (!(a->eps >= 0) || isinf(a->eps)))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "args->eps = %g: must be finite and >= 0", a->eps);
    return BNORM_STATUS_OK;
}

static int bn_desc_same(const bnorm_desc *a, const bnorm_desc *b) {
    if (a->dtype != b->dtype || a->layout != b->layout || a->rank != b->rank) return 0;
    for (int i = 0; i < a->rank && i < BNORM_MAX_RANK; i++)
        if (a->dims[i] != b->dims[i]) return 0;
    return 1;
}

bnorm_status bn_forward_check(const char *F, const bnorm_forward_args *a, bn_geom *g) {
    if (!a) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args is NULL");
    bnorm_status st = bn_fwd_check_config(F, a, g);
    return st ? st : bn_fwd_check_data(F, a, g);
}

bnorm_status bn_backward_check(const char *F, const bnorm_backward_args *a, bn_geom *g) {
    if (!a) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args is NULL");
    bnorm_status st = bn_bwd_check_config(F, a, g);
    return st ? st : bn_bwd_check_data(F, a, g);
}

/* ---- plan initialisation ------------------------------------------------------------------- */

static bnorm_status bn_plan_finish(const char *F, bnorm_plan *p) {
    p->ws_doubles = bn_plan_ws_for(p, p->ex.nt);
    if (!p->ws_doubles)
        return bn_fail(BNORM_STATUS_OVERFLOW, F, "the workspace for C = %lld and %d threads overflows size_t",
                       (long long)p->g.C, p->ex.nt);
    p->ws = NULL;
    atomic_flag_clear(&p->ws_busy);
    p->verbose_created = 0;
    return BNORM_STATUS_OK;
}

/* Per-channel and per-thread sizes must fit before any schedule computes with them: C * 64 doubles and
 * the communicator's size * C. */
static bnorm_status bn_check_channel_sizes(const char *F, const bn_geom *g, int comm_size) {
    const uint64_t lim = (uint64_t)(SIZE_MAX / 8 / 64);
    if ((uint64_t)g->C > lim / (uint64_t)(comm_size + 1))
        return bn_fail(BNORM_STATUS_OVERFLOW, F, "C = %lld%s: per-channel buffers overflow size_t", (long long)g->C,
                       comm_size > 1 ? " with this communicator size" : "");
    return BNORM_STATUS_OK;
}

bnorm_status bn_plan_init_forward(const char *F, bnorm_plan *p, const bnorm_forward_args *a) {
    memset(p, 0, sizeof *p);
    bnorm_status st = bn_fwd_check_config(F, a, &p->g);
    if (st) return st;
    st = bn_exec_init(F, &p->ex, a->num_threads, a->threadpool, &p->g);
    if (st) return st;
    p->op = BN_OP_FORWARD;
    p->fa = *a;
    p->pd = bnorm_param_dtype(a->desc.dtype);
    p->comm = a->training ? a->comm : NULL;
    st = bn_check_channel_sizes(F, &p->g, p->comm ? p->comm->size : 1);
    if (st) return st;
    bn_cpu_plan_forward(p);
    return bn_plan_finish(F, p);
}

bnorm_status bn_plan_init_backward(const char *F, bnorm_plan *p, const bnorm_backward_args *a) {
    memset(p, 0, sizeof *p);
    bnorm_status st = bn_bwd_check_config(F, a, &p->g);
    if (st) return st;
    st = bn_exec_init(F, &p->ex, a->num_threads, a->threadpool, &p->g);
    if (st) return st;
    p->op = BN_OP_BACKWARD;
    p->ba = *a;
    p->pd = bnorm_param_dtype(a->desc.dtype);
    p->comm = a->use_global_stats ? NULL : a->comm;
    st = bn_check_channel_sizes(F, &p->g, p->comm ? p->comm->size : 1);
    if (st) return st;
    bn_cpu_plan_backward(p);
    return bn_plan_finish(F, p);
}

/* ---- verbose -------------------------------------------------------------------------------- */

static atomic_int bn_verbose_level = -1;

int bn_verbose(void) {
    int v = atomic_load_explicit(&bn_verbose_level, memory_order_relaxed);
    if (v < 0) {
        const char *e = getenv("BNORM_VERBOSE");
        v = e ? atoi(e) : 0;
        if (v < 0) v = 0;
        atomic_store_explicit(&bn_verbose_level, v, memory_order_relaxed);
    }
    return v;
}

static double bn_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static void bn_verbose_line(const bnorm_plan *p, const char *what, double us) {
    const bnorm_desc *d = p->op == BN_OP_FORWARD ? &p->fa.desc : &p->ba.desc;
    char shape[160];
    int k = 0;
    for (int i = 0; i < d->rank && k < (int)sizeof shape - 24; i++)
        k += snprintf(shape + k, sizeof shape - (size_t)k, "%s%lld", i ? "x" : "", (long long)d->dims[i]);
    const char *op;
    if (p->op == BN_OP_FORWARD)
        op = p->fa.training ? (p->fa.relu ? "forward_training_add_relu" : "forward_training")
                            : (p->fa.relu ? "forward_inference_add_relu" : "forward_inference");
    else
        op = p->ba.use_global_stats ? "backward_global_stats" : "backward";
    /* then the backend's parameters for this plan (the CPU's: which row walk, what it derived from the CPU) */
    char detail[448];
    bn_cpu_plan_detail(p, detail, sizeof detail);
    fprintf(stderr, "bnorm_verbose,%s,%s,%s,%s,%s,schedule=%s,isa=%s,threads=%d%s,comm=%d,%.3f us,%s\n", what, op,
            shape, d->layout == BNORM_LAYOUT_CHANNELS_LAST ? "channels_last" : "channels_first",
            bnorm_dtype_name(d->dtype), p->sched_name, bnorm_isa_name(p->isa), p->ex.nt,
            p->ex.pool.parallel_for ? "(pool)" : "", p->comm ? p->comm->size : 0, us, detail);
}

/* ---- execution -------------------------------------------------------------------------------- */

bnorm_status bn_plan_exec_forward(const char *F, bnorm_plan *p, const bnorm_forward_args *a, double *ws) {
    bnorm_status st = bn_fwd_check_data(F, a, &p->g);
    if (st) return st;
    const int v = bn_verbose();
    const double t0 = v ? bn_now_us() : 0;
    st = bn_cpu_forward(p, a, ws);
    if (v) bn_verbose_line(p, "exec", bn_now_us() - t0);
    return st;
}

bnorm_status bn_plan_exec_backward(const char *F, bnorm_plan *p, const bnorm_backward_args *a, double *ws) {
    bnorm_status st = bn_bwd_check_data(F, a, &p->g);
    if (st) return st;
    const int v = bn_verbose();
    const double t0 = v ? bn_now_us() : 0;
    st = bn_cpu_backward(p, a, ws);
    if (v) bn_verbose_line(p, "exec", bn_now_us() - t0);
    return st;
}

/* A caller's workspace: the same checks on every shape and path. */
static bnorm_status bn_ws_check(const char *F, const void *ws, size_t size, size_t need_doubles) {
    if ((uintptr_t)ws % sizeof(double))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "workspace must be 8-byte aligned");
    if (size < need_doubles * sizeof(double))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "workspace_size = %zu: must be >= %zu (bnorm_workspace_size)",
                       size, need_doubles * sizeof(double));
    return BNORM_STATUS_OK;
}

/* The functional calls' thread rule: with num_threads = 0 a caller workspace sized for fewer threads
 * than the default lowers the count to what it holds (it stays valid whatever the default becomes). */
static void bn_fit_threads(bnorm_plan *p, int requested, const void *ws, size_t ws_size) {
    if (!ws || requested > 0 || ws_size >= p->ws_doubles * sizeof(double) || !p->ws_per_thread) return;
    size_t have = ws_size / sizeof(double);
    if (have < p->ws_fixed + p->ws_per_thread) return; /* not even one thread: reported by bn_ws_check */
    size_t fit = (have - p->ws_fixed) / p->ws_per_thread;
    if (fit < (size_t)p->ex.nt) {
        p->ex.nt = (int)fit;
        if (p->op == BN_OP_FORWARD) bn_cpu_plan_forward(p);
        else bn_cpu_plan_backward(p);
        p->ws_doubles = bn_plan_ws_for(p, p->ex.nt);
    }
}

/* Runs an initialised plan with args' workspace, the plan's own, or a temporary one. */
static bnorm_status bn_plan_run(const char *F, bnorm_plan *p, const void *args, void *ws, size_t ws_size) {
    double *use = NULL, *tmp = NULL;
    int held = 0;
    bnorm_status st;
    if (ws) {
        st = bn_ws_check(F, ws, ws_size, p->ws_doubles);
        if (st) return st;
        use = (double *)ws;
    } else if (p->ws && !atomic_flag_test_and_set(&p->ws_busy)) {
        use = p->ws;
        held = 1;
    } else {
        tmp = (double *)malloc(p->ws_doubles * sizeof(double));
        if (!tmp)
            return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate %zu bytes of workspace",
                           p->ws_doubles * sizeof(double));
        use = tmp;
    }
    st = p->op == BN_OP_FORWARD ? bn_plan_exec_forward(F, p, (const bnorm_forward_args *)args, use)
                                : bn_plan_exec_backward(F, p, (const bnorm_backward_args *)args, use);
    if (held) atomic_flag_clear(&p->ws_busy);
    free(tmp);
    return st;
}

/* ---- the functional level --------------------------------------------------------------------- */

bnorm_status bnorm_forward(const bnorm_forward_args *args) {
    static const char *F = "bnorm_forward";
    bn_clear_error();
    if (!args) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args is NULL");
    bnorm_forward_args a;
    bnorm_status st = bn_struct_in(F, "args", args, &a, sizeof a, BN_FWD_V1);
    if (st) return st;
#ifdef BNORM_ABI_TEST_APPEND /* tests/abi: the appended field must read as zero for older callers */
    if (a.abi_test_appended) return bn_fail(BNORM_STATUS_UNSUPPORTED, F, "abi_test_appended = %lld", (long long)a.abi_test_appended);
#endif
    bnorm_plan p;
    st = bn_plan_init_forward(F, &p, &a);
    if (st) return st;
    bn_fit_threads(&p, a.num_threads, a.workspace, a.workspace_size);
    return bn_plan_run(F, &p, &a, a.workspace, a.workspace_size);
}

bnorm_status bnorm_backward(const bnorm_backward_args *args) {
    static const char *F = "bnorm_backward";
    bn_clear_error();
    if (!args) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args is NULL");
    bnorm_backward_args a;
    bnorm_status st = bn_struct_in(F, "args", args, &a, sizeof a, BN_BWD_V1);
    if (st) return st;
    bnorm_plan p;
    st = bn_plan_init_backward(F, &p, &a);
    if (st) return st;
    bn_fit_threads(&p, a.num_threads, a.workspace, a.workspace_size);
    return bn_plan_run(F, &p, &a, a.workspace, a.workspace_size);
}

size_t bn_workspace_bytes(const bnorm_desc *desc, int comm_size, int nt) {
    if (comm_size < 1) comm_size = 1;
    if (comm_size > (1 << 20) || nt < 1) return 0;
    bnorm_plan p;
    memset(&p, 0, sizeof p);
    if (!desc || bn_geom_init("bnorm_workspace_size", "desc", desc, &p.g) != BNORM_STATUS_OK) return 0;
    if (bn_check_channel_sizes("bnorm_workspace_size", &p.g, comm_size) != BNORM_STATUS_OK) return 0;
    /* the larger of a forward's and a backward's need (they lay out the same workspace) */
    bnorm_comm c = {.rank = 0, .size = comm_size};
    p.ex.nt = nt;
    p.comm = comm_size > 1 ? &c : NULL;
    p.op = BN_OP_FORWARD;
    p.fa.desc = *desc;
    p.fa.training = 1;
    bn_cpu_plan_forward(&p);
    size_t need = bn_plan_ws_for(&p, nt);
    p.op = BN_OP_BACKWARD;
    p.ba.desc = *desc;
    bn_cpu_plan_backward(&p);
    size_t nb = bn_plan_ws_for(&p, nt);
    if (!need || !nb) return 0;
    if (nb > need) need = nb;
    return need * sizeof(double);
}

size_t bnorm_workspace_size(const bnorm_desc *desc, int comm_size) {
    bn_clear_error();
    return bn_workspace_bytes(desc, comm_size, bnorm_get_num_threads());
}

/* ---- public plans ------------------------------------------------------------------------------ */

static bnorm_status bn_plan_alloc(const char *F, bnorm_plan *tmp, bnorm_plan **out) {
    bnorm_plan *p = (bnorm_plan *)malloc(sizeof *p);
    double *ws = p ? (double *)malloc(tmp->ws_doubles * sizeof(double)) : NULL;
    if (!ws) {
        free(p);
        return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate a plan with %zu bytes of workspace",
                       tmp->ws_doubles * sizeof(double));
    }
    memcpy(p, tmp, sizeof *p);
    p->ws = ws;
    atomic_flag_clear(&p->ws_busy);
    if (bn_verbose() >= 2) bn_verbose_line(p, "create", 0);
    *out = p;
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_plan_create_forward(const bnorm_forward_args *tmpl, bnorm_plan **out) {
    static const char *F = "bnorm_plan_create_forward";
    bn_clear_error();
    if (!out) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "out is NULL");
    *out = NULL;
    if (!tmpl) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "tmpl is NULL");
    bnorm_forward_args a;
    bnorm_status st = bn_struct_in(F, "tmpl", tmpl, &a, sizeof a, BN_FWD_V1);
    if (st) return st;
    bnorm_plan p;
    st = bn_plan_init_forward(F, &p, &a);
    if (st) return st;
    return bn_plan_alloc(F, &p, out);
}

bnorm_status bnorm_plan_create_backward(const bnorm_backward_args *tmpl, bnorm_plan **out) {
    static const char *F = "bnorm_plan_create_backward";
    bn_clear_error();
    if (!out) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "out is NULL");
    *out = NULL;
    if (!tmpl) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "tmpl is NULL");
    bnorm_backward_args a;
    bnorm_status st = bn_struct_in(F, "tmpl", tmpl, &a, sizeof a, BN_BWD_V1);
    if (st) return st;
    bnorm_plan p;
    st = bn_plan_init_backward(F, &p, &a);
    if (st) return st;
    return bn_plan_alloc(F, &p, out);
}

static bnorm_status bn_mismatch(const char *F, const char *what) {
    return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "args->%s differs from the plan's (create another plan)", what);
}

bnorm_status bnorm_plan_forward(bnorm_plan *p, const bnorm_forward_args *args) {
    static const char *F = "bnorm_plan_forward";
    bn_clear_error();
    if (!p || !args) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", p ? "args" : "plan");
    if (p->op != BN_OP_FORWARD) return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "plan is a backward plan");
    bnorm_forward_args a;
    bnorm_status st = bn_struct_in(F, "args", args, &a, sizeof a, BN_FWD_V1);
    if (st) return st;
    const bnorm_forward_args *c = &p->fa;
    if (!bn_desc_same(&a.desc, &c->desc)) return bn_mismatch(F, "desc");
    if (bn_flag(a.training) != bn_flag(c->training)) return bn_mismatch(F, "training");
    if (bn_flag(a.relu) != bn_flag(c->relu)) return bn_mismatch(F, "relu");
    if (!a.relu_mask != !c->relu_mask) return bn_mismatch(F, "relu_mask (given or not)");
    if (!a.running_mean != !c->running_mean || !a.running_var != !c->running_var)
        return bn_mismatch(F, "running_mean/running_var (given or not)");
    if (!a.save_mean_lo != !c->save_mean_lo || (a.save_mean_lo && !a.save_mean))
        return bn_mismatch(F, "save_mean_lo (given or not)");
    if (a.comm != c->comm) return bn_mismatch(F, "comm");
    if (a.num_threads != c->num_threads) return bn_mismatch(F, "num_threads");
    if (a.threadpool != c->threadpool) return bn_mismatch(F, "threadpool");
    return bn_plan_run(F, p, &a, a.workspace, a.workspace_size);
}

bnorm_status bnorm_plan_backward(bnorm_plan *p, const bnorm_backward_args *args) {
    static const char *F = "bnorm_plan_backward";
    bn_clear_error();
    if (!p || !args) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", p ? "args" : "plan");
    if (p->op != BN_OP_BACKWARD) return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "plan is a forward plan");
    bnorm_backward_args a;
    bnorm_status st = bn_struct_in(F, "args", args, &a, sizeof a, BN_BWD_V1);
    if (st) return st;
    const bnorm_backward_args *c = &p->ba;
    if (!bn_desc_same(&a.desc, &c->desc)) return bn_mismatch(F, "desc");
    if (bn_flag(a.use_global_stats) != bn_flag(c->use_global_stats)) return bn_mismatch(F, "use_global_stats");
    if (!a.relu_mask != !c->relu_mask) return bn_mismatch(F, "relu_mask (given or not)");
    if (a.daddend && !a.relu_mask) return bn_mismatch(F, "daddend");
    if (a.comm != c->comm) return bn_mismatch(F, "comm");
    if (a.num_threads != c->num_threads) return bn_mismatch(F, "num_threads");
    if (a.threadpool != c->threadpool) return bn_mismatch(F, "threadpool");
    return bn_plan_run(F, p, &a, a.workspace, a.workspace_size);
}

size_t bnorm_plan_workspace_size(const bnorm_plan *p) { return p ? p->ws_doubles * sizeof(double) : 0; }
int bnorm_plan_num_threads(const bnorm_plan *p) { return p ? p->ex.nt : 0; }
const char *bnorm_plan_schedule(const bnorm_plan *p) { return p ? p->sched_name : "none"; }

void bnorm_plan_destroy(bnorm_plan *p) {
    if (!p) return;
    free(p->ws);
    free(p);
}
