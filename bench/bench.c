/*
 * bench.c - bnorm_bench: speed of every bnorm op against the memory-bandwidth bound, side by side
 * with oneDNN (same process, when built with it) and PyTorch (bench/torch_bench.py in a second process
 * that times each case right after bnorm and oneDNN, in an order that rotates from round to round).
 * See docs/performance.md.
 *
 *   bnorm_bench [--quick | --full] [--threads 1,2] [--dtypes f32,bf16,f16] [--layouts cf,cl]
 *               [--sets resnet,bn1d,large] [--shape N,C[,d...]]... [--reps R] [--no-dnnl] [--no-torch]
 *               [--out PREFIX] [--offset BYTES] [--ws-offset BYTES]
 *
 * Minimum traffic (bytes that must cross the memory bus): forward training and inference read x and
 * write y; backward reads x and dy and writes dx; the fused forward also reads the addend and writes
 * the 1-bit ReLU mask, the fused backward also reads the mask and writes d_addend. GB/s is that
 * traffic over the median time; "bound" is the fraction of the non-temporal copy bandwidth (bytes
 * read + written) measured in the same run with the same thread count.
 */
#include <bnorm/bnorm.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BENCH_X86 1
#endif
#ifdef BNORM_BENCH_HAVE_DNNL
#include <dnnl.h>
#endif

#ifndef BNORM_BENCH_SOURCE_DIR
#define BNORM_BENCH_SOURCE_DIR "bench"
#endif

/* ---------------------------------------------------------------------------------------------- */

static double now(void) {
#ifdef _OPENMP
    return omp_get_wtime();
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
#endif
}

static void set_threads(int t) {
    bnorm_set_num_threads(t);
#ifdef _OPENMP
    omp_set_num_threads(t); /* oneDNN (OpenMP runtime) and the copy */
#endif
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Median of the finite values among v[0..n) (NAN when none); v is left unchanged. */
static double median_finite(const double *v, int n) {
    double w[64];
    int k = 0;
    for (int i = 0; i < n && k < 64; i++)
        if (isfinite(v[i])) w[k++] = v[i];
    return k ? median(w, k) : NAN;
}

static void pause_ms(int ms) {
    struct timespec ts = {0, ms * 1000000L};
    nanosleep(&ts, NULL);
}

/* PyTorch in a second process (torch_bench.py --serve), asked for one case at a time over a pipe so
   that it is timed beside bnorm and oneDNN on each case, not minutes later in a batch of its own: the
   machine's bandwidth moves by half within a run (docs/performance.md, "Method"). */
typedef struct torch_proc {
    FILE *to, *from;
    pid_t pid;
    char version[64];
} torch_proc;

static void torch_stop(torch_proc *tp) {
    if (tp->to) fclose(tp->to); /* end of input: the server returns */
    if (tp->from) fclose(tp->from);
    if (tp->pid > 0) waitpid(tp->pid, NULL, 0);
    memset(tp, 0, sizeof *tp);
}

static int torch_start(torch_proc *tp, const char *script) {
    int in[2], out[2];
    memset(tp, 0, sizeof *tp);
    tp->pid = -1;
    if (pipe(in)) return 0;
    if (pipe(out)) { close(in[0]); close(in[1]); return 0; }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) { close(in[0]); close(in[1]); close(out[0]); close(out[1]); return 0; }
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        FILE *nul = freopen("/dev/null", "w", stderr);
        (void)nul;
        close(in[0]); close(in[1]); close(out[0]); close(out[1]);
        execl("/usr/bin/python3", "python3", script, "--serve", (char *)NULL);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    signal(SIGPIPE, SIG_IGN); /* a PyTorch process that died shows as a failed write, not a kill */
    tp->pid = pid;
    tp->to = fdopen(in[1], "w");
    tp->from = fdopen(out[0], "r");
    char line[256] = "";
    if (tp->to && tp->from && fgets(line, sizeof line, tp->from) && sscanf(line, "READY torch %63s", tp->version) == 1)
        return 1;
    line[strcspn(line, "\n")] = 0;
    printf("PyTorch: not available (%s)\n", line[0] ? line : "/usr/bin/python3 exited before it was ready");
    torch_stop(tp);
    return 0;
}

/* One case's median time in seconds, NAN when PyTorch skipped it or failed. */
static double torch_time(torch_proc *tp, size_t idx, const char *request) {
    if (!tp->to) return NAN;
    if (fprintf(tp->to, "%zu %s\n", idx, request) < 0 || fflush(tp->to)) return NAN;
    char line[256];
    if (!fgets(line, sizeof line, tp->from)) return NAN;
    size_t got;
    double sec;
    if (sscanf(line, "RESULT %zu %lf", &got, &sec) == 2 && got == idx) return sec;
    return NAN;
}

/* The CPU's model name (/proc/cpuinfo), for the record of every table. */
static void cpu_model(char *buf, size_t cap) {
    snprintf(buf, cap, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f)) {
        char *c = strchr(line, ':');
        if (!strncmp(line, "model name", 10) && c) {
            c += 1 + (c[1] == ' ');
            c[strcspn(c, "\n")] = 0;
            for (char *q = c; *q; q++) if (*q == '"' || *q == '\\') *q = '\'';
            snprintf(buf, cap, "%s", c);
            break;
        }
    }
    if (f) fclose(f);
}

static void *xalloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64)) {
        fprintf(stderr, "bnorm_bench: cannot allocate %zu bytes\n", bytes);
        exit(2);
    }
    return p;
}

/* ---------------------------------------------------------------------------------------------- */
/* Copy bandwidth: non-temporal stores, bytes read + written                                      */

#ifdef BENCH_X86
__attribute__((target("avx512f"))) static void nt_copy_512(float *d, const float *s, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(d + i, _mm512_loadu_ps(s + i));
    for (; i < n; i++) d[i] = s[i];
}
__attribute__((target("avx"))) static void nt_copy_256(float *d, const float *s, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(d + i, _mm256_loadu_ps(s + i));
    for (; i < n; i++) d[i] = s[i];
}
#endif
static void plain_copy(float *d, const float *s, size_t n) { memcpy(d, s, n * sizeof *d); }

static void (*copy_fn)(float *, const float *, size_t) = plain_copy;
static const char *copy_how = "memcpy";
static void copy_select(void) {
#ifdef BENCH_X86
    if (__builtin_cpu_supports("avx512f")) { copy_fn = nt_copy_512; copy_how = "_mm512_stream_ps"; }
    else if (__builtin_cpu_supports("avx")) { copy_fn = nt_copy_256; copy_how = "_mm256_stream_ps"; }
#endif
}

/* One threaded non-temporal copy of n floats (64-byte-aligned chunks per thread). */
static void nt_copy(float *d, const float *s, size_t n, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int id = 0, nt = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        size_t blocks = n / 16;
        size_t lo = blocks * id / nt * 16, hi = (id == nt - 1) ? n : blocks * (id + 1) / nt * 16;
        copy_fn(d + lo, s + lo, hi - lo);
#ifdef BENCH_X86
        _mm_sfence();
#endif
    }
}

/* Copy buffers for the per-case reference copy (same traffic as the case), grown on demand. */
static float *ref_src, *ref_dst;
static size_t ref_cap;
static double ref_copy_time(double bytes, int threads) {
    size_t n = (size_t)(bytes / 2 / sizeof(float));
    if (n < 16) n = 16;
    if (n > ref_cap) {
        free(ref_src);
        free(ref_dst);
        ref_src = xalloc(n * sizeof(float));
        ref_dst = xalloc(n * sizeof(float));
        memset(ref_src, 1, n * sizeof(float));
        memset(ref_dst, 0, n * sizeof(float));
        ref_cap = n;
    }
    double t0 = now();
    nt_copy(ref_dst, ref_src, n, threads);
    return now() - t0;
}

static double copy_bandwidth(int threads, size_t bytes, int reps) {
    size_t n = bytes / sizeof(float);
    float *src = xalloc(n * sizeof(float)), *dst = xalloc(n * sizeof(float));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < n; i++) { src[i] = (float)i; dst[i] = 0; }
    double *t = malloc(sizeof(double) * (size_t)(reps + 1));
    for (int r = -1; r < reps; r++) {
        double t0 = now();
        nt_copy(dst, src, n, threads);
        if (r >= 0) t[r] = now() - t0;
    }
    double med = median(t, reps);
    free(t);
    free(src);
    free(dst);
    return 2.0 * (double)bytes / med;
}

/* ---------------------------------------------------------------------------------------------- */
/* Cases                                                                                          */

enum { OP_FWD_TRAIN, OP_FWD_INFER, OP_BWD_TRAIN, OP_BWD_EVAL, OP_FUSED_FWD, OP_FUSED_BWD, OP_COUNT };
static const char *op_name[OP_COUNT] = {"fwd_train", "fwd_infer", "bwd_train", "bwd_eval", "fused_fwd", "fused_bwd"};

typedef struct shape {
    int rank;
    int64_t dims[BNORM_MAX_RANK];
    const char *set;
} shape;

enum { MAX_ROUNDS = 15 };
typedef struct result {
    int shape_idx, layout, dtype, threads, op;
    double bytes;
    double t_bnorm, t_dnnl, t_torch; /* median over rounds of the per-round medians; NAN when not measured */
    double t_copy;                    /* the same for a non-temporal copy moving the same bytes */
    double rb[MAX_ROUNDS], rd[MAX_ROUNDS], rt[MAX_ROUNDS], rc[MAX_ROUNDS]; /* per round */
} result;

/* Same-round comparison: each round's faster peer time over bnorm's in that round (the three were
   timed within seconds of each other); the median over rounds, and in how many rounds bnorm was at
   least as fast. Less moved by the machine's slow phases than the ratio of the medians. */
static double paired_ratio(const result *r, int rounds, int *won, int *of) {
    double v[MAX_ROUNDS];
    int n = 0;
    *won = 0;
    for (int k = 0; k < rounds; k++) {
        double p = isfinite(r->rd[k]) && (!isfinite(r->rt[k]) || r->rd[k] < r->rt[k]) ? r->rd[k] : r->rt[k];
        if (!isfinite(p) || !isfinite(r->rb[k])) continue;
        v[n] = p / r->rb[k];
        *won += v[n] >= 1;
        n++;
    }
    *of = n;
    return n ? median(v, n) : NAN;
}

static const char *dtype_tag(int dt) {
    switch (dt) {
    case BNORM_DTYPE_F32: return "f32";
    case BNORM_DTYPE_F16: return "f16";
    case BNORM_DTYPE_BF16: return "bf16";
    case BNORM_DTYPE_F64: return "f64";
    }
    return "?";
}

static void shape_str(const shape *s, char *buf, size_t cap) {
    size_t k = 0;
    buf[0] = 0;
    for (int i = 0; i < s->rank && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%lld", i ? "x" : "", (long long)s->dims[i]);
}

static int64_t numel(const shape *s) {
    int64_t n = 1;
    for (int i = 0; i < s->rank; i++) n *= s->dims[i];
    return n;
}

/* Minimum traffic in bytes. */
static double min_bytes(int op, int64_t n, size_t es) {
    double t = (double)n * (double)es, mask = (double)n / 8.0;
    switch (op) {
    case OP_FWD_TRAIN:
    case OP_FWD_INFER: return 2 * t;
    case OP_BWD_TRAIN:
    case OP_BWD_EVAL: return 3 * t;
    case OP_FUSED_FWD: return 3 * t + mask;
    case OP_FUSED_BWD: return 4 * t + mask;
    }
    return 0;
}

/* Tensors start g_offset bytes past a 64-byte boundary (--offset: e.g. 16, what malloc gives). */
static size_t g_offset = 0;
static void *talloc(size_t bytes) { return (char *)xalloc(bytes + 64) + g_offset; }
static void tfree(void *p) { free((char *)p - g_offset); }
/* The caller workspace starts g_ws_offset bytes past a 4 KiB page (--ws-offset; default 0). */
static size_t g_ws_offset = 0;

/* Buffers of one (shape, dtype): allocated once, reused by every op and thread count. */
typedef struct bufs {
    void *x, *y, *dy, *dx, *add, *dadd, *mask;
    float *w, *b, *rm, *rv, *sm, *si, *dw, *db, *var;
    void *ws, *ws_base;
    size_t ws_size;
} bufs;

static uint32_t rng_state = 12345u;
static float frand(void) {
    rng_state = rng_state * 1664525u + 1013904223u;
    return (float)(rng_state >> 8) * (1.0f / 16777216.0f);
}

static void fill(void *p, int64_t n, int dt, float lo, float hi, uint32_t seed) {
    /* deterministic, parallel first touch */
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
        float v = lo + (hi - lo) * (float)(h >> 8) * (1.0f / 16777216.0f);
        if (dt == BNORM_DTYPE_F32) ((float *)p)[i] = v;
        else {
            uint32_t u;
            memcpy(&u, &v, 4);
            if (dt == BNORM_DTYPE_BF16) ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
            else { /* f16 of a value in a small range: via the exponent rebias, good enough for data */
                uint32_t sgn = (u >> 16) & 0x8000u;
                int e = (int)((u >> 23) & 0xff) - 127 + 15;
                uint16_t h16 = e <= 0 ? (uint16_t)sgn : (uint16_t)(sgn | ((uint32_t)e << 10) | ((u >> 13) & 0x3ff));
                ((uint16_t *)p)[i] = h16;
            }
        }
    }
}

static void bufs_alloc(bufs *B, const bnorm_desc *d, int maxthreads) {
    int64_t n = bnorm_desc_numel(d), C = d->dims[1];
    size_t es = bnorm_dtype_size(d->dtype), bytes = (size_t)n * es;
    B->x = talloc(bytes); B->y = talloc(bytes); B->dy = talloc(bytes); B->dx = talloc(bytes);
    B->add = talloc(bytes); B->dadd = talloc(bytes);
    B->mask = xalloc(bnorm_relu_mask_size(d));
    fill(B->x, n, d->dtype, -1.0f, 3.0f, 1u);
    fill(B->dy, n, d->dtype, -1.0f, 1.0f, 2u);
    fill(B->add, n, d->dtype, -1.0f, 1.0f, 3u);
    memset(B->y, 0, bytes); memset(B->dx, 0, bytes); memset(B->dadd, 0, bytes);
    float **arrs[] = {&B->w, &B->b, &B->rm, &B->rv, &B->sm, &B->si, &B->dw, &B->db, &B->var};
    for (size_t i = 0; i < sizeof arrs / sizeof *arrs; i++) *arrs[i] = xalloc((size_t)C * sizeof(float));
    for (int64_t c = 0; c < C; c++) {
        B->w[c] = 0.5f + frand(); B->b[c] = frand() - 0.5f;
        B->rm[c] = 1.0f; B->rv[c] = 1.0f + frand();
        B->sm[c] = 1.0f; B->si[c] = 1.0f; B->dw[c] = B->db[c] = 0; B->var[c] = B->rv[c];
    }
    bnorm_set_num_threads(maxthreads);
    B->ws_size = bnorm_workspace_size(d, 1);
    B->ws_base = xalloc(B->ws_size + 4096 + g_ws_offset);
    B->ws = (char *)B->ws_base + ((4096 - (uintptr_t)B->ws_base % 4096) % 4096) + g_ws_offset;
}

static void bufs_free(bufs *B) {
    void *t[] = {B->x, B->y, B->dy, B->dx, B->add, B->dadd};
    for (size_t i = 0; i < sizeof t / sizeof *t; i++) tfree(t[i]);
    void *p[] = {B->mask, B->w, B->b, B->rm, B->rv, B->sm, B->si, B->dw, B->db, B->var, B->ws_base};
    for (size_t i = 0; i < sizeof p / sizeof *p; i++) free(p[i]);
}

static int bnorm_run(int op, const bnorm_desc *d, bufs *B) {
    if (op == OP_FWD_TRAIN || op == OP_FWD_INFER || op == OP_FUSED_FWD) {
        bnorm_forward_args a = {.desc = *d, .x = B->x, .y = B->y, .weight = B->w, .bias = B->b, .eps = 1e-5,
                                .training = op != OP_FWD_INFER, .running_mean = B->rm, .running_var = B->rv,
                                .momentum = 0.1, .workspace = B->ws, .workspace_size = B->ws_size};
        if (op != OP_FWD_INFER) { a.save_mean = B->sm; a.save_invstd = B->si; }
        if (op == OP_FUSED_FWD) { a.addend = B->add; a.relu = 1; a.relu_mask = B->mask; }
        return bnorm_forward(&a);
    }
    bnorm_backward_args a = {.desc = *d, .x = B->x, .dy = B->dy, .dx = B->dx, .weight = B->w, .mean = B->sm,
                             .invstd = B->si, .dweight = B->dw, .dbias = B->db,
                             .workspace = B->ws, .workspace_size = B->ws_size};
    if (op == OP_BWD_EVAL) { a.use_global_stats = 1; a.mean = B->rm; a.invstd = NULL; a.var = B->rv; a.eps = 1e-5; }
    if (op == OP_FUSED_BWD) { a.relu_mask = B->mask; a.daddend = B->dadd; }
    return bnorm_backward(&a);
}

/* ---------------------------------------------------------------------------------------------- */
/* oneDNN                                                                                         */

#ifdef BNORM_BENCH_HAVE_DNNL
static dnnl_engine_t dn_eng;
static dnnl_stream_t dn_strm;
static int dn_ok;

typedef struct dn_job {
    dnnl_primitive_t prim;
    dnnl_primitive_desc_t pd, hint;
    dnnl_memory_t mem[12];
    dnnl_exec_arg_t args[12];
    int nargs;
} dn_job;

static void dn_init(void) {
    dn_ok = dnnl_engine_create(&dn_eng, dnnl_cpu, 0) == dnnl_success &&
            dnnl_stream_create(&dn_strm, dn_eng, dnnl_stream_default_flags) == dnnl_success;
}

static int dn_arg(dn_job *j, int arg, const dnnl_memory_desc_t *md, void *ptr) {
    if (dnnl_memory_create(&j->mem[j->nargs], md, dn_eng, ptr) != dnnl_success) return 0;
    j->args[j->nargs].arg = arg;
    j->args[j->nargs].memory = j->mem[j->nargs];
    j->nargs++;
    return 1;
}

static void dn_free(dn_job *j) {
    for (int i = 0; i < j->nargs; i++) dnnl_memory_destroy(j->mem[i]);
    if (j->prim) dnnl_primitive_destroy(j->prim);
    if (j->pd) dnnl_primitive_desc_destroy(j->pd);
    if (j->hint) dnnl_primitive_desc_destroy(j->hint);
    memset(j, 0, sizeof *j);
}

/* Builds the oneDNN primitive for op; 0 when oneDNN does not offer it (fused add+ReLU, some dtypes). */
static int dn_build(dn_job *j, int op, const bnorm_desc *d, bufs *B) {
    memset(j, 0, sizeof *j);
    if (!dn_ok || op == OP_FUSED_FWD || op == OP_FUSED_BWD) return 0;
    dnnl_dims_t dims;
    int rank = d->rank;
    for (int i = 0; i < d->rank; i++) dims[i] = d->dims[i];
    int cl = d->layout == BNORM_LAYOUT_CHANNELS_LAST;
    /* ranks 2 and 3 are given to oneDNN as the same memory in 4-D (N,C,1,1) nhwc and (N,C,1,W): its
       1-D and 2-D tensors take a reference implementation (40-200x slower here), its 4-D ones the JIT */
    if (rank == 2) { dims[2] = dims[3] = 1; rank = 4; cl = 1; }
    else if (rank == 3) { dims[3] = dims[2]; dims[2] = 1; rank = 4; }
    dnnl_format_tag_t tag;
    switch (rank) {
    case 4: tag = cl ? dnnl_nhwc : dnnl_nchw; break;
    case 5: tag = cl ? dnnl_ndhwc : dnnl_ncdhw; break;
    default: return 0;
    }
    dnnl_data_type_t dt = d->dtype == BNORM_DTYPE_F32 ? dnnl_f32 : d->dtype == BNORM_DTYPE_BF16 ? dnnl_bf16
                        : dnnl_f16;
    dnnl_memory_desc_t md, cmd;
    dnnl_dims_t cd = {d->dims[1]};
    if (dnnl_memory_desc_init_by_tag(&md, rank, dims, dt, tag) != dnnl_success) return 0;
    if (dnnl_memory_desc_init_by_tag(&cmd, 1, cd, dnnl_f32, dnnl_a) != dnnl_success) return 0;
    unsigned flags = dnnl_use_scale | dnnl_use_shift;
    if (op == OP_FWD_INFER || op == OP_BWD_EVAL) flags |= dnnl_use_global_stats;
    dnnl_batch_normalization_desc_t fd;
    dnnl_prop_kind_t prop = op == OP_FWD_INFER ? dnnl_forward_inference : dnnl_forward_training;
    if (dnnl_batch_normalization_forward_desc_init(&fd, prop, &md, 1e-5f, flags) != dnnl_success) return 0;
    int ok;
    if (op == OP_FWD_TRAIN || op == OP_FWD_INFER) {
        if (dnnl_primitive_desc_create(&j->pd, &fd, NULL, dn_eng, NULL) != dnnl_success) return 0;
        ok = dn_arg(j, DNNL_ARG_SRC, &md, B->x) && dn_arg(j, DNNL_ARG_DST, &md, B->y) &&
             dn_arg(j, DNNL_ARG_SCALE, &cmd, B->w) && dn_arg(j, DNNL_ARG_SHIFT, &cmd, B->b) &&
             dn_arg(j, DNNL_ARG_MEAN, &cmd, op == OP_FWD_INFER ? B->rm : B->sm) &&
             dn_arg(j, DNNL_ARG_VARIANCE, &cmd, op == OP_FWD_INFER ? B->rv : B->var);
    } else {
        if (dnnl_primitive_desc_create(&j->hint, &fd, NULL, dn_eng, NULL) != dnnl_success) return 0;
        dnnl_batch_normalization_desc_t bd;
        if (dnnl_batch_normalization_backward_desc_init(&bd, dnnl_backward, &md, &md, 1e-5f, flags) != dnnl_success) {
            dn_free(j);
            return 0;
        }
        if (dnnl_primitive_desc_create(&j->pd, &bd, NULL, dn_eng, j->hint) != dnnl_success) { dn_free(j); return 0; }
        ok = dn_arg(j, DNNL_ARG_SRC, &md, B->x) && dn_arg(j, DNNL_ARG_DIFF_DST, &md, B->dy) &&
             dn_arg(j, DNNL_ARG_DIFF_SRC, &md, B->dx) && dn_arg(j, DNNL_ARG_SCALE, &cmd, B->w) &&
             dn_arg(j, DNNL_ARG_SHIFT, &cmd, B->b) &&
             dn_arg(j, DNNL_ARG_MEAN, &cmd, op == OP_BWD_EVAL ? B->rm : B->sm) &&
             dn_arg(j, DNNL_ARG_VARIANCE, &cmd, op == OP_BWD_EVAL ? B->rv : B->var) &&
             dn_arg(j, DNNL_ARG_DIFF_SCALE, &cmd, B->dw) && dn_arg(j, DNNL_ARG_DIFF_SHIFT, &cmd, B->db);
    }
    if (!ok || dnnl_primitive_create(&j->prim, j->pd) != dnnl_success) { dn_free(j); return 0; }
    return 1;
}

static int dn_run(dn_job *j) {
    if (dnnl_primitive_execute(j->prim, dn_strm, j->nargs, j->args) != dnnl_success) return 0;
    return dnnl_stream_wait(dn_strm) == dnnl_success;
}
#endif

/* ---------------------------------------------------------------------------------------------- */
/* Options                                                                                        */

typedef struct opts {
    int quick, reps, warmup, dnnl, torch, latency, rounds;
    unsigned ops; /* bit per op */
    int threads[8], nthreads;
    int dtypes[4], ndtypes;
    int layouts[2], nlayouts;
    char sets[128];
    shape user[64];
    int nuser;
    const char *out, *torch_script;
} opts;

static void usage(void) {
    fprintf(stderr,
            "usage: bnorm_bench [--quick|--full] [--threads 1,2] [--dtypes f32,bf16,f16] [--layouts cf,cl]\n"
            "                   [--sets resnet,bn1d,large] [--shape N,C[,d...]]... [--reps R] [--rounds K]\n"
            "                   [--ops fwd_train,fwd_infer,bwd_train,bwd_eval,fused_fwd,fused_bwd]\n"
            "                   [--no-dnnl] [--no-torch] [--torch-script PATH] [--out PREFIX] [--offset BYTES] [--ws-offset BYTES]\n"
            "       bnorm_bench --latency [--reps R] [--no-dnnl]   per-call overhead on tiny tensors, 1 thread\n");
}

static int parse_ints(const char *s, int *out, int cap) {
    int n = 0;
    while (*s && n < cap) {
        char *e;
        long v = strtol(s, &e, 10);
        if (e == s || v <= 0) return -1;
        out[n++] = (int)v;
        s = *e == ',' ? e + 1 : e;
        if (*e && *e != ',') return -1;
    }
    return n;
}

static int parse_shape(const char *s, shape *sh) {
    sh->rank = 0;
    while (*s) {
        char *e;
        long long v = strtoll(s, &e, 10);
        if (e == s || v < 1 || sh->rank >= BNORM_MAX_RANK) return 0;
        sh->dims[sh->rank++] = v;
        if (*e && *e != ',' && *e != 'x') return 0;
        s = *e ? e + 1 : e;
    }
    sh->set = "user";
    return sh->rank >= 2;
}

static int parse_opts(int argc, char **argv, opts *o) {
    memset(o, 0, sizeof *o);
    o->reps = 7; o->warmup = 1; o->dnnl = 1; o->torch = 1; o->rounds = 1; o->ops = (1u << OP_COUNT) - 1;
    o->threads[0] = 1; o->threads[1] = 2; o->nthreads = 2;
    o->dtypes[0] = BNORM_DTYPE_F32; o->dtypes[1] = BNORM_DTYPE_BF16; o->dtypes[2] = BNORM_DTYPE_F16; o->ndtypes = 3;
    o->layouts[0] = BNORM_LAYOUT_CHANNELS_FIRST; o->layouts[1] = BNORM_LAYOUT_CHANNELS_LAST; o->nlayouts = 2;
    strcpy(o->sets, "resnet,bn1d,large");
    o->out = "bnorm_bench";
    o->torch_script = BNORM_BENCH_SOURCE_DIR "/torch_bench.py";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--quick")) { o->quick = 1; o->reps = 3; o->warmup = 1; strcpy(o->sets, "tiny"); }
        else if (!strcmp(a, "--full")) { o->quick = 0; }
        else if (!strcmp(a, "--no-dnnl")) o->dnnl = 0;
        else if (!strcmp(a, "--latency")) o->latency = 1;
        else if (!strcmp(a, "--no-torch")) o->torch = 0;
        else if (!v) { usage(); return 0; }
        else if (!strcmp(a, "--threads")) { if ((o->nthreads = parse_ints(v, o->threads, 8)) <= 0) return 0; i++; }
        else if (!strcmp(a, "--reps")) { o->reps = atoi(v); if (o->reps < 1) return 0; i++; }
        else if (!strcmp(a, "--rounds")) { o->rounds = atoi(v); if (o->rounds < 1 || o->rounds > MAX_ROUNDS) return 0; i++; }
        else if (!strcmp(a, "--ops")) {
            o->ops = 0;
            char buf[128];
            snprintf(buf, sizeof buf, "%s", v);
            for (char *t = strtok(buf, ","); t; t = strtok(NULL, ",")) {
                int k = 0;
                while (k < OP_COUNT && strcmp(t, op_name[k])) k++;
                if (k == OP_COUNT) return 0;
                o->ops |= 1u << k;
            }
            i++;
        }
        else if (!strcmp(a, "--sets")) { snprintf(o->sets, sizeof o->sets, "%s", v); i++; }
        else if (!strcmp(a, "--out")) { o->out = v; i++; }
        else if (!strcmp(a, "--offset")) {
            int b = atoi(v);
            if (b < 0 || b >= 64 || b % 4) { fprintf(stderr, "--offset %s: need 0, 4, ..., 60\n", v); return 0; }
            g_offset = (size_t)b; i++;
        }
        else if (!strcmp(a, "--ws-offset")) {
            long b = atol(v);
            if (b < 0 || b >= 4096 || b % 8) { fprintf(stderr, "--ws-offset %s: need 0, 8, ..., 4088\n", v); return 0; }
            g_ws_offset = (size_t)b; i++;
        }
        else if (!strcmp(a, "--torch-script")) { o->torch_script = v; i++; }
        else if (!strcmp(a, "--shape")) {
            if (o->nuser >= 64 || !parse_shape(v, &o->user[o->nuser])) { fprintf(stderr, "bad --shape %s\n", v); return 0; }
            o->nuser++; i++;
        } else if (!strcmp(a, "--dtypes")) {
            o->ndtypes = 0;
            char buf[64];
            snprintf(buf, sizeof buf, "%s", v);
            for (char *t = strtok(buf, ","); t && o->ndtypes < 4; t = strtok(NULL, ",")) {
                if (!strcmp(t, "f32")) o->dtypes[o->ndtypes++] = BNORM_DTYPE_F32;
                else if (!strcmp(t, "bf16")) o->dtypes[o->ndtypes++] = BNORM_DTYPE_BF16;
                else if (!strcmp(t, "f16")) o->dtypes[o->ndtypes++] = BNORM_DTYPE_F16;
                else return 0;
            }
            i++;
        } else if (!strcmp(a, "--layouts")) {
            o->nlayouts = 0;
            if (strstr(v, "cf")) o->layouts[o->nlayouts++] = BNORM_LAYOUT_CHANNELS_FIRST;
            if (strstr(v, "cl")) o->layouts[o->nlayouts++] = BNORM_LAYOUT_CHANNELS_LAST;
            if (!o->nlayouts) return 0;
            i++;
        } else { usage(); return 0; }
    }
    return 1;
}

static int has_set(const opts *o, const char *name) {
    char buf[128];
    snprintf(buf, sizeof buf, "%s", o->sets);
    for (char *t = strtok(buf, ","); t; t = strtok(NULL, ","))
        if (!strcmp(t, name)) return 1;
    return 0;
}

#define SH(setname, r, ...) {.rank = r, .dims = {__VA_ARGS__}, .set = setname}
static const shape builtin[] = {
    /* ResNet-50's batch-norm shapes, N = 32 */
    SH("resnet", 4, 32, 64, 112, 112), SH("resnet", 4, 32, 64, 56, 56), SH("resnet", 4, 32, 256, 56, 56),
    SH("resnet", 4, 32, 128, 28, 28), SH("resnet", 4, 32, 512, 28, 28), SH("resnet", 4, 32, 256, 14, 14),
    SH("resnet", 4, 32, 1024, 14, 14), SH("resnet", 4, 32, 512, 7, 7), SH("resnet", 4, 32, 2048, 7, 7),
    /* BatchNorm1d */
    SH("bn1d", 2, 4096, 1024), SH("bn1d", 3, 64, 256, 1024),
    /* large: minimum traffic >= 128 MiB for every op, where caches cannot hide DRAM */
    SH("large", 4, 128, 64, 56, 56), SH("large", 4, 64, 512, 28, 28), SH("large", 4, 128, 1024, 14, 14),
    SH("large", 4, 256, 2048, 7, 7), SH("large", 2, 16384, 1024),
    /* tiny: --quick smoke test */
    SH("tiny", 4, 4, 16, 8, 8), SH("tiny", 2, 64, 32), SH("tiny", 3, 4, 8, 33),
};

/* ---------------------------------------------------------------------------------------------- */

/* ---------------------------------------------------------------------------------------------- */
/* --latency: the cost of one call on tiny tensors (issue 16), one thread, every library the same way:
 * the median over R samples of the mean time of K back-to-back calls on the same buffers. "loop" is
 * the data work alone: a plain C loop computing the same outputs (inference: y = x * scale + shift;
 * training: two passes for mean/var, then the apply; backward: the two sums, then dx). */

static double lat_sample(int (*fn)(void *), void *ctx, int reps) {
    enum { K = 2000 };
    double *t = xalloc(sizeof(double) * (size_t)reps);
    for (int w = 0; w < K; w++) fn(ctx);
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        for (int k = 0; k < K; k++) fn(ctx);
        t[r] = (now() - t0) / K;
    }
    double m = median(t, reps);
    free(t);
    return m * 1e6;
}

typedef struct lat_ctx {
    int op;
    bnorm_desc d;
    bufs *B;
    bnorm_plan *plan;
    bnorm_forward_args fa;
    bnorm_backward_args ba;
#ifdef BNORM_BENCH_HAVE_DNNL
    dn_job dj;
#endif
} lat_ctx;

static int lat_functional(void *p) {
    lat_ctx *c = p;
    return c->op == OP_BWD_TRAIN ? bnorm_backward(&c->ba) : bnorm_forward(&c->fa);
}
static int lat_plan(void *p) {
    lat_ctx *c = p;
    return c->op == OP_BWD_TRAIN ? bnorm_plan_backward(c->plan, &c->ba) : bnorm_plan_forward(c->plan, &c->fa);
}
#ifdef BNORM_BENCH_HAVE_DNNL
static int lat_dnnl(void *p) { return !dn_run(&((lat_ctx *)p)->dj); }
#endif
static int lat_loop(void *p) {
    lat_ctx *c = p;
    const int64_t C = c->d.dims[1], m = bnorm_desc_numel(&c->d) / C; /* rank 2 or 1x1 spatial: rows of C */
    const float *x = c->B->x, *dy = c->B->dy;
    float *y = c->B->y, *dx = c->B->dx;
    float *mean = c->B->sm, *inv = c->B->si;
    if (c->op == OP_FWD_INFER) {
        for (int64_t r = 0; r < m; r++)
            for (int64_t ch = 0; ch < C; ch++) y[r * C + ch] = (x[r * C + ch] - c->B->rm[ch]) * c->B->var[ch] * c->B->w[ch] + c->B->b[ch];
        return 0;
    }
    float s1[4096], s2[4096];
    for (int64_t ch = 0; ch < C; ch++) s1[ch] = s2[ch] = 0;
    if (c->op == OP_FWD_TRAIN) {
        for (int64_t r = 0; r < m; r++)
            for (int64_t ch = 0; ch < C; ch++) s1[ch] += x[r * C + ch];
        for (int64_t ch = 0; ch < C; ch++) mean[ch] = s1[ch] / (float)m;
        for (int64_t r = 0; r < m; r++)
            for (int64_t ch = 0; ch < C; ch++) {
                float dd = x[r * C + ch] - mean[ch];
                s2[ch] += dd * dd;
            }
        for (int64_t ch = 0; ch < C; ch++) inv[ch] = 1.0f / sqrtf(s2[ch] / (float)m + 1e-5f);
        for (int64_t r = 0; r < m; r++)
            for (int64_t ch = 0; ch < C; ch++) y[r * C + ch] = (x[r * C + ch] - mean[ch]) * inv[ch] * c->B->w[ch] + c->B->b[ch];
        return 0;
    }
    for (int64_t r = 0; r < m; r++)
        for (int64_t ch = 0; ch < C; ch++) {
            s1[ch] += dy[r * C + ch];
            s2[ch] += dy[r * C + ch] * (x[r * C + ch] - mean[ch]);
        }
    for (int64_t r = 0; r < m; r++)
        for (int64_t ch = 0; ch < C; ch++) {
            float k1 = c->B->w[ch] * inv[ch];
            dx[r * C + ch] = k1 * (dy[r * C + ch] - s1[ch] / (float)m - (x[r * C + ch] - mean[ch]) * inv[ch] * inv[ch] * s2[ch] / (float)m);
        }
    return 0;
}

static int run_latency(const opts *o) {
    static const int64_t shp[][4] = {{2, 1, 64, 0}, {2, 8, 64, 0}, {2, 2, 64, 0}, {4, 1, 64, 1}, {4, 32, 64, 1}, {2, 64, 256, 0}};
    const int ops[] = {OP_FWD_INFER, OP_FWD_TRAIN, OP_BWD_TRAIN};
    const int reps = o->reps > 3 ? o->reps : 15;
    set_threads(1);
    printf("latency: one call, float32, 1 thread, median of %d samples of 2000 calls (us per call)\n", reps);
    printf("%-12s %-9s %9s %9s %9s %9s %12s %12s\n", "shape", "op", "loop", "plan", "function", "oneDNN",
           "plan-loop", "plan/oneDNN");
    int fails = 0;
    for (size_t si = 0; si < sizeof shp / sizeof *shp; si++) {
        bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = (int)shp[si][0]};
        d.dims[0] = shp[si][1];
        d.dims[1] = shp[si][2];
        for (int k = 2; k < d.rank; k++) d.dims[k] = 1;
        char name[32];
        if (d.rank == 2) snprintf(name, sizeof name, "%lldx%lld", (long long)d.dims[0], (long long)d.dims[1]);
        else snprintf(name, sizeof name, "%lldx%lldx1x1", (long long)d.dims[0], (long long)d.dims[1]);
        if (d.dims[0] == 1 && d.rank == 2) { /* (1, C) cannot train: inference only */ }
        bufs B;
        bufs_alloc(&B, &d, 1);
        for (size_t oi = 0; oi < sizeof ops / sizeof *ops; oi++) {
            int op = ops[oi];
            if (op != OP_FWD_INFER && d.dims[0] == 1) continue; /* one value per channel cannot train */
            lat_ctx c = {.op = op, .d = d, .B = &B};
            c.fa = (bnorm_forward_args){.struct_size = sizeof c.fa, .desc = d, .x = B.x, .y = B.y, .weight = B.w,
                                        .bias = B.b, .eps = 1e-5, .training = op == OP_FWD_TRAIN, .running_mean = B.rm,
                                        .running_var = B.rv, .momentum = 0.1, .num_threads = 1};
            if (op == OP_FWD_TRAIN) { c.fa.save_mean = B.sm; c.fa.save_invstd = B.si; }
            c.ba = (bnorm_backward_args){.struct_size = sizeof c.ba, .desc = d, .x = B.x, .dy = B.dy, .dx = B.dx,
                                         .weight = B.w, .mean = B.sm, .invstd = B.si, .dweight = B.dw, .dbias = B.db,
                                         .num_threads = 1};
            int st = op == OP_BWD_TRAIN ? bnorm_plan_create_backward(&c.ba, &c.plan) : bnorm_plan_create_forward(&c.fa, &c.plan);
            if (st) { printf("%s: plan failed: %s\n", name, bnorm_last_error()); fails++; continue; }
            double tl = lat_sample(lat_loop, &c, reps), tp = lat_sample(lat_plan, &c, reps), tf = lat_sample(lat_functional, &c, reps);
            double td = -1;
#ifdef BNORM_BENCH_HAVE_DNNL
            if (o->dnnl && dn_ok && dn_build(&c.dj, op, &d, &B)) {
                td = lat_sample(lat_dnnl, &c, reps);
                dn_free(&c.dj);
            }
#endif
            char dn[16] = "-", ratio[16] = "-";
            if (td > 0) {
                snprintf(dn, sizeof dn, "%.3f", td);
                snprintf(ratio, sizeof ratio, "%.2f", tp / td);
            }
            printf("%-12s %-9s %9.3f %9.3f %9.3f %9s %12.3f %12s\n", name, op_name[op], tl, tp, tf, dn, tp - tl, ratio);
            bnorm_plan_destroy(c.plan);
        }
        bufs_free(&B);
    }
    return fails ? 1 : 0;
}

int main(int argc, char **argv) {
    opts o;
    if (!parse_opts(argc, argv, &o)) { usage(); return 2; }
    if (o.latency) {
#ifdef BNORM_BENCH_HAVE_DNNL
        if (o.dnnl) dn_init();
#endif
        printf("bnorm_bench --latency: bnorm %s, isa %s\n", bnorm_version_string(), bnorm_isa_name(bnorm_get_isa()));
        return run_latency(&o);
    }
    shape shapes[128];
    int nshapes = 0;
    for (size_t i = 0; i < sizeof builtin / sizeof *builtin; i++)
        if (has_set(&o, builtin[i].set)) shapes[nshapes++] = builtin[i];
    for (int i = 0; i < o.nuser; i++) shapes[nshapes++] = o.user[i];
    int maxthr = 1;
    for (int i = 0; i < o.nthreads; i++) if (o.threads[i] > maxthr) maxthr = o.threads[i];

#ifdef BNORM_BENCH_HAVE_DNNL
    if (o.dnnl) dn_init();
#else
    o.dnnl = 0;
#endif

    char cpu[128];
    cpu_model(cpu, sizeof cpu);
    printf("bnorm_bench: %s\n", cpu);
    printf("bnorm_bench: bnorm %s, isa %s, %d processors, reps %d (median), rounds %d%s\n", bnorm_version_string(),
           bnorm_isa_name(bnorm_get_isa()),
#ifdef _OPENMP
           omp_get_num_procs(),
#else
           1,
#endif
           o.reps, o.rounds, o.quick ? ", quick" : "");

    /* copy bound per thread count */
    double copy_bw[9] = {0}, copy_bw_end[9] = {0};
    copy_select();
    size_t copy_bytes = o.quick ? ((size_t)8 << 20) : ((size_t)256 << 20);
    for (int i = 0; i < o.nthreads; i++) {
        int t = o.threads[i];
        copy_bw[t < 8 ? t : 8] = copy_bandwidth(t, copy_bytes, o.quick ? 3 : 9);
        printf("copy bandwidth, %d thread(s): %.2f GB/s (%s, %zu MiB copied, bytes read + written)\n", t,
               copy_bw[t < 8 ? t : 8] * 1e-9, copy_how, copy_bytes >> 20);
    }

    /* The cases, in a fixed order; every round measures all of them, each case by bnorm, oneDNN (in this
       process) and PyTorch (in its own) one after the other, in an order that rotates from round to round. */
    torch_proc tp = {0};
    if (o.torch && torch_start(&tp, o.torch_script)) printf("PyTorch %s: %s --serve\n", tp.version, o.torch_script);
    size_t cap = (size_t)nshapes * 2 * 4 * 8 * OP_COUNT, nres = 0;
    result *res = calloc(cap, sizeof *res);
    int failures = 0;
    for (int si = 0; si < nshapes; si++) {
        const shape *s = &shapes[si];
        for (int di = 0; di < o.ndtypes; di++) {
            int dt = o.dtypes[di];
            /* low precision: the largest thread count only, and not on the large set (time) */
            if (dt != BNORM_DTYPE_F32 && !strcmp(s->set, "large")) continue;
            for (int li = 0; li < o.nlayouts; li++) {
                int ly = o.layouts[li];
                if (s->rank == 2 && ly == BNORM_LAYOUT_CHANNELS_LAST) continue; /* same memory as (N,C) */
                for (int ti = 0; ti < o.nthreads; ti++) {
                    int th = o.threads[ti];
                    if (dt != BNORM_DTYPE_F32 && th != maxthr) continue;
                    for (int op = 0; op < OP_COUNT; op++) {
                        if (!(o.ops >> op & 1)) continue;
                        result *r = &res[nres++];
                        r->shape_idx = si; r->layout = ly; r->dtype = dt; r->threads = th; r->op = op;
                        r->bytes = min_bytes(op, numel(s), bnorm_dtype_size((bnorm_dtype)dt));
                        for (int k = 0; k < MAX_ROUNDS; k++) r->rb[k] = r->rd[k] = r->rt[k] = r->rc[k] = NAN;
                    }
                }
            }
        }
    }
    printf("%-16s %-9s %-2s %-4s %2s %2s %9s %9s %9s %9s %7s %6s\n", "shape", "op", "ly", "dt", "th", "rd", "MiB", "bnorm_ms",
           "dnnl_ms", "torch_ms", "GB/s", "bound");
    for (int round = 0; round < o.rounds; round++) {
        for (size_t i0 = 0; i0 < nres;) {
            /* the results of one (shape, dtype, layout) share buffers */
            size_t i1 = i0;
            while (i1 < nres && res[i1].shape_idx == res[i0].shape_idx && res[i1].dtype == res[i0].dtype &&
                   res[i1].layout == res[i0].layout)
                i1++;
            const shape *s = &shapes[res[i0].shape_idx];
            char sname[64];
            shape_str(s, sname, sizeof sname);
            bnorm_desc d = {.dtype = (bnorm_dtype)res[i0].dtype, .layout = (bnorm_layout)res[i0].layout, .rank = s->rank};
            memcpy(d.dims, s->dims, sizeof d.dims);
            bufs B;
            bufs_alloc(&B, &d, maxthr);
            for (size_t i = i0; i < i1; i++) {
                result *r = &res[i];
                int op = r->op, th = r->threads;
                set_threads(th);
                if (B.ws_size < bnorm_workspace_size(&d, 1)) { fprintf(stderr, "workspace grew\n"); return 2; }
                double *t = malloc(sizeof(double) * (size_t)o.reps), *tc = malloc(sizeof(double) * (size_t)o.reps);
                for (int side = 0; side < 3; side++) {
                    int lib = (side + round) % 3; /* 0: bnorm, 1: oneDNN, 2: PyTorch; who goes first rotates */
                    if ((lib == 1 && !o.dnnl) || (lib == 2 && !tp.to)) continue;
                    /* the previous library's OpenMP threads (either process) may still spin: let them sleep */
                    pause_ms(2);
                    if (lib == 2) {
                        char req[256];
                        int n = snprintf(req, sizeof req, "%s %s %s %d %d %d ", op_name[op], r->layout ? "cl" : "cf",
                                         dtype_tag(r->dtype), th, o.reps, o.warmup);
                        for (int k = 0; k < s->rank; k++)
                            n += snprintf(req + n, sizeof req - (size_t)n, "%s%lld", k ? "," : "", (long long)s->dims[k]);
                        snprintf(req + n, sizeof req - (size_t)n, " %.0f", r->bytes); /* the copy after each call */
                        r->rt[round] = torch_time(&tp, i, req);
                    }
                    if (lib == 0) {
                        /* the backward needs the statistics (and mask) of a forward */
                        if (op == OP_BWD_TRAIN) bnorm_run(OP_FWD_TRAIN, &d, &B);
                        if (op == OP_FUSED_BWD) bnorm_run(OP_FUSED_FWD, &d, &B);
                        int st = 0;
                        /* each repetition is followed by the reference copy of the same traffic, so every
                           library starts each call in the same cache state and sees the same load */
                        for (int k = -o.warmup; k < o.reps; k++) {
                            double t0 = now();
                            st |= bnorm_run(op, &d, &B);
                            double t1 = now();
                            double tcopy = ref_copy_time(r->bytes, th);
                            if (k >= 0) { t[k] = t1 - t0; tc[k] = tcopy; }
                        }
                        r->rc[round] = median(tc, o.reps);
                        if (st) {
                            fprintf(stderr, "bnorm %s %s failed: %s\n", op_name[op], sname, bnorm_last_error());
                            failures++;
                        } else {
                            r->rb[round] = median(t, o.reps);
                        }
                    }
#ifdef BNORM_BENCH_HAVE_DNNL
                    if (lib == 1 && o.dnnl) {
                        dn_job j;
                        if (dn_build(&j, op, &d, &B)) {
                            int okr = 1;
                            for (int k = -o.warmup; k < o.reps && okr; k++) {
                                double t0 = now();
                                okr = dn_run(&j);
                                if (k >= 0) t[k] = now() - t0;
                                (void)ref_copy_time(r->bytes, th);
                            }
                            if (okr) r->rd[round] = median(t, o.reps);
                            dn_free(&j);
                        }
                    }
#endif
                }
                free(t);
                free(tc);
                printf("%-16s %-9s %-2s %-4s %2d %2d %9.1f %9.3f %9.3f %9.3f %7.2f %6.3f\n", sname, op_name[op],
                       r->layout ? "cl" : "cf", dtype_tag(r->dtype), th, round, r->bytes / 1048576.0,
                       r->rb[round] * 1e3, r->rd[round] * 1e3, r->rt[round] * 1e3, r->bytes / r->rb[round] * 1e-9,
                       r->rc[round] / r->rb[round]);
                fflush(stdout);
            }
            bufs_free(&B);
            i0 = i1;
        }

    }
    torch_stop(&tp);
    for (size_t i = 0; i < nres; i++) {
        result *r = &res[i];
        r->t_bnorm = median_finite(r->rb, o.rounds);
        r->t_dnnl = median_finite(r->rd, o.rounds);
        r->t_torch = median_finite(r->rt, o.rounds);
        r->t_copy = median_finite(r->rc, o.rounds);
        if (isnan(r->t_bnorm)) failures += 0;
    }
    for (int i = 0; i < o.nthreads; i++) {
        int t = o.threads[i];
        copy_bw_end[t < 8 ? t : 8] = copy_bandwidth(t, copy_bytes, o.quick ? 3 : 9);
        printf("copy bandwidth at the end, %d thread(s): %.2f GB/s (start: %.2f)\n", t,
               copy_bw_end[t < 8 ? t : 8] * 1e-9, copy_bw[t < 8 ? t : 8] * 1e-9);
    }

    /* table, CSV, JSON */
    char path[512];
    snprintf(path, sizeof path, "%s.csv", o.out);
    FILE *fc = fopen(path, "w");
    snprintf(path, sizeof path, "%s.json", o.out);
    FILE *fj = fopen(path, "w");
    if (fc)
        fprintf(fc, "shape,set,op,layout,dtype,threads,min_bytes,copy_gbs,bnorm_ms,bnorm_gbs,bnorm_bound,"
                    "dnnl_ms,dnnl_bound,torch_ms,torch_bound,speedup_vs_dnnl,speedup_vs_torch,speedup_paired,"
                    "rounds_won,rounds_compared\n");
    if (fj) fprintf(fj, "{\n \"copy_gbs\": {");
    for (int i = 0; fj && i < o.nthreads; i++)
        fprintf(fj, "%s\"%d\": %.3f", i ? ", " : "", o.threads[i], copy_bw[o.threads[i] < 8 ? o.threads[i] : 8] * 1e-9);
    if (fj) fprintf(fj, "},\n \"copy_gbs_end\": {");
    for (int i = 0; fj && i < o.nthreads; i++)
        fprintf(fj, "%s\"%d\": %.3f", i ? ", " : "", o.threads[i], copy_bw_end[o.threads[i] < 8 ? o.threads[i] : 8] * 1e-9);
    if (fj)
        fprintf(fj, "},\n \"cpu\": \"%s\",\n \"rounds\": %d,\n \"reps\": %d,\n \"isa\": \"%s\",\n \"results\": [\n", cpu,
                o.rounds, o.reps, bnorm_isa_name(bnorm_get_isa()));
    printf("\n%s; medians of %d round(s) of %d calls each\n", cpu, o.rounds, o.reps);
    printf("speedup = peer time / bnorm time (> 1: bnorm faster); x_best against the faster peer; bound = fraction of the copy bandwidth\n"
           "x_pair = median over rounds of the same round's faster peer time / bnorm's; won = rounds where that is >= 1\n");
    printf("%-16s %-9s %-2s %-4s %2s %8s %6s %8s %6s %8s %6s %7s %7s %7s %7s %5s\n", "shape", "op", "ly", "dt", "th",
           "bnorm_ms", "bound", "dnnl_ms", "bound", "torch_ms", "bound", "x_dnnl", "x_torch", "x_best", "x_pair", "won");
    for (size_t i = 0; i < nres; i++) {
        const result *r = &res[i];
        char sname[64];
        shape_str(&shapes[r->shape_idx], sname, sizeof sname);
        double cb = r->bytes / r->t_copy; /* the case's own reference copy */
        double fb = r->bytes / r->t_bnorm / cb, fd = r->bytes / r->t_dnnl / cb, ft = r->bytes / r->t_torch / cb;
        double xd = r->t_dnnl / r->t_bnorm, xt = r->t_torch / r->t_bnorm;
        double xb = isnan(xd) ? xt : isnan(xt) ? xd : xd < xt ? xd : xt;
        int won, of;
        double xp = paired_ratio(r, o.rounds, &won, &of);
        char wons[32] = "-";
        if (of) snprintf(wons, sizeof wons, "%d/%d", won, of);
        printf("%-16s %-9s %-2s %-4s %2d %8.3f %6.3f %8.3f %6.3f %8.3f %6.3f %7.2f %7.2f %7.2f %7.2f %5s%s\n", sname,
               op_name[r->op], r->layout ? "cl" : "cf", dtype_tag(r->dtype), r->threads, r->t_bnorm * 1e3, fb,
               r->t_dnnl * 1e3, fd, r->t_torch * 1e3, ft, xd, xt, xb, xp, wons, xb < 1 || xp < 1 ? " <" : "");
        if (fc)
            fprintf(fc, "%s,%s,%s,%s,%s,%d,%.0f,%.3f,%.4f,%.3f,%.4f,%.4f,%.4f,%.4f,%.4f,%.3f,%.3f,%.3f,%d,%d\n", sname,
                    shapes[r->shape_idx].set, op_name[r->op], r->layout ? "cl" : "cf", dtype_tag(r->dtype), r->threads,
                    r->bytes, cb * 1e-9, r->t_bnorm * 1e3, r->bytes / r->t_bnorm * 1e-9, fb, r->t_dnnl * 1e3, fd,
                    r->t_torch * 1e3, ft, xd, xt, xp, won, of);
        if (fj) {
#define JNUM(v) (isfinite(v) ? (v) : -1.0)
            fprintf(fj,
                    "  {\"shape\": \"%s\", \"set\": \"%s\", \"op\": \"%s\", \"layout\": \"%s\", \"dtype\": \"%s\", "
                    "\"threads\": %d, \"min_bytes\": %.0f, \"bnorm_ms\": %.4f, \"bnorm_bound\": %.4f, "
                    "\"dnnl_ms\": %.4f, \"torch_ms\": %.4f, \"speedup_paired\": %.4f, \"rounds_won\": %d, "
                    "\"rounds_compared\": %d}%s\n",
                    sname, shapes[r->shape_idx].set, op_name[r->op], r->layout ? "cl" : "cf", dtype_tag(r->dtype),
                    r->threads, r->bytes, JNUM(r->t_bnorm * 1e3), JNUM(fb), JNUM(r->t_dnnl * 1e3),
                    JNUM(r->t_torch * 1e3), JNUM(xp), won, of, i + 1 < nres ? "," : "");
        }
    }
    if (fj) { fprintf(fj, " ],\n \"missing_value\": -1\n}\n"); fclose(fj); }
    if (fc) fclose(fc);
    printf("wrote %s.csv and %s.json\n", o.out, o.out);

    /* chart: fraction of the copy bound, float32 at the largest thread count */
    snprintf(path, sizeof path, "%s_chart.dat", o.out);
    FILE *fd = fopen(path, "w");
    int rows = 0;
    for (size_t i = 0; fd && i < nres; i++) {
        const result *r = &res[i];
        if (r->dtype != BNORM_DTYPE_F32 || r->threads != maxthr) continue;
        char sname[64];
        shape_str(&shapes[r->shape_idx], sname, sizeof sname);
        double cb = r->bytes / r->t_copy;
        fprintf(fd, "\"%s %s %s\" %.4f %.4f %.4f\n", op_name[r->op], r->layout ? "cl" : "cf", sname,
                JNUM(r->bytes / r->t_bnorm / cb), JNUM(r->bytes / r->t_dnnl / cb), JNUM(r->bytes / r->t_torch / cb));
        rows++;
    }
    if (fd) fclose(fd);
    if (rows && !o.quick && system("command -v gnuplot >/dev/null 2>&1") == 0) {
        char gp[512];
        snprintf(gp, sizeof gp, "%s_chart.gp", o.out);
        FILE *g = fopen(gp, "w");
        if (g) {
            fprintf(g, "set terminal png size %d,700\nset output '%s.png'\n", rows * 14 + 200, o.out);
            fprintf(g, "set title 'fraction of the copy bound, float32, %d threads (higher is better)'\n", maxthr);
            fprintf(g, "set style data histograms\nset style histogram clustered gap 1\nset style fill solid\n"
                       "set yrange [0:1.1]\nset xtics rotate by 90 right font ',7'\nset grid y\nset datafile missing '-1.0000'\n"
                       "plot '%s' using 2:xtic(1) title 'bnorm', '' using 3 title 'oneDNN', '' using 4 title 'PyTorch'\n",
                    path);
            fclose(g);
            char cmd[600];
            snprintf(cmd, sizeof cmd, "gnuplot '%s'", gp);
            if (system(cmd) == 0) printf("wrote %s.png\n", o.out);
        }
    }
    free(res);
    return failures ? 1 : 0;
}
