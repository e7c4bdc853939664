/*
 * plan.h - the plan: a validated configuration with its backend choices settled. Backend-free parts
 * (validation, the communicator exchange, the per-channel finalisation: running statistics, saved
 * statistics, parameter gradients, coefficients) live in src/core; a backend (src/cpu/driver.c) fills
 * in its choices at plan time (bn_cpu_plan_*) and executes the phases (bn_cpu_forward/backward).
 */
#ifndef BNORM_CORE_PLAN_H
#define BNORM_CORE_PLAN_H

#include "internal.h"

#include <stdatomic.h>

enum { BN_OP_FORWARD = 1, BN_OP_BACKWARD = 2 };

/* Who runs the parallel work: nt logical threads, on OpenMP or on the caller's pool. */
typedef struct bn_exec {
    int nt;
    bnorm_threadpool pool; /* pool.parallel_for NULL: OpenMP */
} bn_exec;

/* The default thread count of a call on g: bnorm_get_num_threads(), but no more than one thread per
 * BN_GRAIN elements (a parallel region costs microseconds, more on a busy machine, which tensors of a
 * few thousand values do not repay; PyTorch's grain is 32768 elements too). An explicit count is
 * honoured as given. */
enum { BN_GRAIN = 32768 };
int bn_default_threads(const bn_geom *g);

/* Runs fn(ctx, t) for t in [0, ex->nt). */
void bn_exec_run(const bn_exec *ex, void (*fn)(void *ctx, int t), void *ctx);

struct bn_kernels;

struct bnorm_plan {
    int op;
    bnorm_forward_args fa;  /* op == BN_OP_FORWARD: the configuration (pointers as given at creation) */
    bnorm_backward_args ba; /* op == BN_OP_BACKWARD */
    bn_geom g;
    bnorm_dtype pd;
    bn_exec ex;
    const bnorm_comm *comm; /* the communicator the operation uses (NULL: none) */
    /* backend choices */
    const struct bn_kernels *k;
    bnorm_isa isa;
    int sched;
    const char *sched_name;
    size_t ws_per_thread, ws_fixed; /* workspace in doubles: ws_fixed + nt * ws_per_thread */
    size_t ws_doubles;
    /* the plan's own workspace (heap plans) and whether an execution holds it */
    double *ws;
    atomic_flag ws_busy;
    int verbose_created;
};

/* Workspace bytes of any forward/backward of desc with nt threads (0: invalid or overflow). */
size_t bn_workspace_bytes(const bnorm_desc *desc, int comm_size, int nt);
/* Workspace doubles for nt threads, or 0 on overflow. */
size_t bn_plan_ws_for(const bnorm_plan *p, int nt);

/* Plan initialisation without allocation (the functional calls make one on the stack). nt_req: the
 * requested count (0: the default). */
bnorm_status bn_plan_init_forward(const char *func, bnorm_plan *p, const bnorm_forward_args *a);
bnorm_status bn_plan_init_backward(const char *func, bnorm_plan *p, const bnorm_backward_args *a);
/* Execution of an initialised plan with already converted args (struct_size handled). ws: doubles of
 * at least p->ws_doubles. */
bnorm_status bn_plan_exec_forward(const char *func, bnorm_plan *p, const bnorm_forward_args *a, double *ws);
bnorm_status bn_plan_exec_backward(const char *func, bnorm_plan *p, const bnorm_backward_args *a, double *ws);

/* The CPU backend (src/cpu/driver.c). */
/* The CPU backend's parameters of plan p (the row walk, what tuning.c derived from the CPU), for
 * BNORM_VERBOSE. */
void bn_cpu_plan_detail(const bnorm_plan *p, char *buf, size_t cap);
void bn_cpu_plan_forward(bnorm_plan *p);
void bn_cpu_plan_backward(bnorm_plan *p);
bnorm_status bn_cpu_forward(const bnorm_plan *p, const bnorm_forward_args *a, double *ws);
bnorm_status bn_cpu_backward(const bnorm_plan *p, const bnorm_backward_args *a, double *ws);

/* --- backend-free pieces shared by the backends: the communicator protocol (comm.c, declared in
   internal.h with the payload layout) and the per-channel finalisation below --- */


/* Per-channel finalisation shared by every backend (inline: called once per channel, which matters
 * on tiny tensors). Statistics of channel c are final (n values, mean, m2): writes the saved statistics
 * (save_mean, save_mean_lo, save_invstd) and the running update, returns scale and shift. */
static inline void bn_fwd_finalize(const bnorm_forward_args *a, bnorm_dtype pd, int64_t c, double n, double mean, double m2,
                     double *scale, double *shift) {
    double var = m2 / n;
    double invstd = bn_invstd(var, a->eps);
    if (a->save_mean) {
        bn_param_set(a->save_mean, pd, c, mean);
        if (a->save_mean_lo) /* what the rounding to the parameter dtype dropped */
            bn_param_set(a->save_mean_lo, pd, c, mean - bn_param_get(a->save_mean, pd, c));
    }
    if (a->save_invstd) bn_param_set(a->save_invstd, pd, c, invstd);
    if (a->running_mean) {
        double al = a->momentum;
        double rm = bn_param_get(a->running_mean, pd, c), rv = bn_param_get(a->running_var, pd, c);
        bn_param_set(a->running_mean, pd, c, (1 - al) * rm + al * mean);
        bn_param_set(a->running_var, pd, c, (1 - al) * rv + al * (m2 / (n - 1)));
    }
    double w = a->weight ? bn_param_get(a->weight, pd, c) : 1.0;
    *scale = w * invstd;
    *shift = a->bias ? bn_param_get(a->bias, pd, c) : 0.0;
}

/* The mean a backward uses for channel c (mean + mean_lo) and its invstd. */
static inline double bn_bwd_mean_of(const bnorm_backward_args *a, bnorm_dtype pd, int64_t c) {
    double m = bn_param_get(a->mean, pd, c);
    return a->mean_lo ? m + bn_param_get(a->mean_lo, pd, c) : m;
}

static inline double bn_bwd_invstd_of(const bnorm_backward_args *a, bnorm_dtype pd, int64_t c) {
    return a->invstd ? bn_param_get(a->invstd, pd, c) : bn_invstd(bn_param_get(a->var, pd, c), a->eps);
}

static inline void bn_bwd_param_grads_of(const bnorm_backward_args *a, bnorm_dtype pd, int64_t c, double sg, double sgx,
                           double invstd) {
    if (a->dweight)
        bn_param_set(a->dweight, pd, c, (a->accumulate ? bn_param_get(a->dweight, pd, c) : 0) + sgx * invstd);
    if (a->dbias) bn_param_set(a->dbias, pd, c, (a->accumulate ? bn_param_get(a->dbias, pd, c) : 0) + sg);
}

static inline void bn_bwd_coefs_of(const bnorm_backward_args *a, bnorm_dtype pd, int64_t c, double n_total, double sg,
                     double sgx, double invstd, double *k1, double *k2, double *k3) {
    double w = a->weight ? bn_param_get(a->weight, pd, c) : 1.0;
    *k1 = w * invstd;
    if (a->use_global_stats || n_total <= 0) {
        *k2 = *k3 = 0;
    } else {
        *k2 = *k1 * sg / n_total;
        *k3 = *k1 * invstd * invstd * sgx / n_total;
    }
}


/* BNORM_VERBOSE level (read once). */
int bn_verbose(void);

#endif
