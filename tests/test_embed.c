/*
 * test_embed.c - what a host runtime embedding bnorm relies on (issue 16, and items 4, 5, 7 of
 * issue 18): plans equal to the functional calls and checked against their configuration, threads
 * under the caller's control (OpenMP's count, calls from a parallel region, a caller's pool giving
 * bitwise OpenMP's results, a count changed by another thread while calls run), workspaces that stay
 * valid, saved contexts for several forwards in flight, mutable hyper-parameters, per-parameter
 * gradients, full-precision backwards on hard data against a long double reference, and sizes that
 * cannot wrap.
 *
 * Modes (argv[1]): none = all tests; "omp-env N" = bnorm_get_num_threads() must be N (run by ctest
 * with OMP_NUM_THREADS=N); "verbose" = one forward for the BNORM_VERBOSE check; "race" = only the
 * thread-count race (the ThreadSanitizer stage).
 */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include "harness.h"
#include "ref.h"

#include <limits.h>
#include <pthread.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static bnorm_desc mkdesc(bnorm_dtype dt, int layout, int rank, const int64_t *dims) {
    bnorm_desc d;
    memset(&d, 0, sizeof d);
    d.dtype = dt;
    d.layout = (bnorm_layout)layout;
    d.rank = rank;
    for (int i = 0; i < rank; i++) d.dims[i] = dims[i];
    return d;
}

static ref_shape shape_of(const bnorm_desc *d) {
    ref_shape sh = {d->dims[0], d->dims[1], 1, d->layout == BNORM_LAYOUT_CHANNELS_LAST};
    for (int i = 2; i < d->rank; i++) sh.S *= d->dims[i];
    return sh;
}

static void *xmalloc(size_t n) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) abort();
    return p;
}

/* A buffer of n values of dtype filled from v (doubles rounded to the dtype). */
static th_buf filled(bnorm_dtype dt, int64_t n, const double *v) {
    th_buf b = th_alloc(dt, n, 0);
    th_store(&b, v);
    return b;
}

static double *randn(int64_t n, double mean, double sd) {
    double *v = (double *)xmalloc(sizeof(double) * (size_t)(n ? n : 1));
    for (int64_t i = 0; i < n; i++) v[i] = mean + sd * th_normal();
    return v;
}

/* ---------------------------------------------------------------------------------------------
 * A caller's thread pools: one that runs the tasks backwards on the calling thread, one that starts
 * a pthread per task.
 * ------------------------------------------------------------------------------------------- */
static int pool_calls;

static void pool_backwards(void *ctx, int n, bnorm_task_fn task, void *task_ctx) {
    (void)ctx;
    __atomic_add_fetch(&pool_calls, 1, __ATOMIC_RELAXED);
    for (int i = n - 1; i >= 0; i--) task(task_ctx, i);
}

typedef struct pt_job {
    bnorm_task_fn task;
    void *task_ctx;
    int index;
} pt_job;

static void *pt_main(void *p) {
    pt_job *j = (pt_job *)p;
    j->task(j->task_ctx, j->index);
    return NULL;
}

static void pool_pthreads(void *ctx, int n, bnorm_task_fn task, void *task_ctx) {
    (void)ctx;
    __atomic_add_fetch(&pool_calls, 1, __ATOMIC_RELAXED);
    pthread_t th[64];
    pt_job jobs[64];
    for (int i = 0; i < n; i++) {
        jobs[i] = (pt_job){task, task_ctx, i};
        if (i == 0 || pthread_create(&th[i], NULL, pt_main, &jobs[i]) != 0) th[i] = 0;
    }
    task(task_ctx, 0);
    for (int i = 1; i < n; i++) {
        if (th[i]) pthread_join(th[i], NULL);
        else task(task_ctx, i);
    }
}

/* ---------------------------------------------------------------------------------------------
 * One forward + backward of a configuration, into byte buffers, for bitwise comparisons.
 * ------------------------------------------------------------------------------------------- */
typedef struct fb_case {
    bnorm_desc d;
    int training, relu;
} fb_case;

typedef struct fb_out {
    th_buf y, dx, dadd;
    unsigned char *mask, *pbuf; /* parameter-dtype outputs: mean, invstd, rm, rv, dw, db */
    size_t mask_bytes, pbytes;
} fb_out;

typedef struct fb_in {
    th_buf x, dy, add;
    double *w, *b;
} fb_in;

static fb_in fb_inputs(const bnorm_desc *d) {
    int64_t n = bnorm_desc_numel(d), C = d->dims[1];
    fb_in in;
    double *x = randn(n, 0.5, 2), *dy = randn(n, 0, 1), *ad = randn(n, 0, 1);
    in.x = filled(d->dtype, n, x);
    in.dy = filled(d->dtype, n, dy);
    in.add = filled(d->dtype, n, ad);
    in.w = randn(C, 1, 0.3);
    in.b = randn(C, 0, 0.3);
    free(x), free(dy), free(ad);
    return in;
}

static void fb_in_free(fb_in *in) {
    th_free(&in->x), th_free(&in->dy), th_free(&in->add);
    free(in->w), free(in->b);
}

/* mode: 0 functional calls, 1 plans, 2 functional calls with a caller workspace of exactly
 * bnorm_workspace_size bytes that starts ws_off bytes past a 64-byte line and ends where its allocation
 * ends (the library aligns its pieces inside it: ASan sees any byte used past the end) */
static size_t ws_off = 8;
static bnorm_status fb_run(const fb_case *k, const fb_in *in, int nt, const bnorm_threadpool *pool, int mode,
                           fb_out *o) {
    const bnorm_desc *d = &k->d;
    const int64_t n = bnorm_desc_numel(d), C = d->dims[1];
    const bnorm_dtype pd = bnorm_param_dtype(d->dtype);
    const size_t ps = bnorm_dtype_size(pd);
    o->y = th_alloc(d->dtype, n, 0);
    o->dx = th_alloc(d->dtype, n, 0);
    o->dadd = th_alloc(d->dtype, n, 0);
    o->mask_bytes = bnorm_relu_mask_size(d);
    o->mask = (unsigned char *)xmalloc(o->mask_bytes);
    o->pbytes = 7 * (size_t)C * ps;
    o->pbuf = (unsigned char *)xmalloc(o->pbytes);
    unsigned char *mean = o->pbuf, *invstd = mean + C * ps, *rm = invstd + C * ps, *rv = rm + C * ps;
    unsigned char *dw = rv + C * ps, *db = dw + C * ps, *lo = db + C * ps;
    th_buf W = th_alloc(pd, C, 0), B = th_alloc(pd, C, 0);
    th_store(&W, in->w);
    th_store(&B, in->b);
    double *ones = (double *)xmalloc(8 * (size_t)C);
    for (int64_t c = 0; c < C; c++) ones[c] = 1 + 0.1 * (double)c;
    th_buf RV = th_alloc(pd, C, 0);
    th_store(&RV, ones);
    memcpy(rv, RV.p, (size_t)C * ps);
    th_free(&RV);
    free(ones);
    bnorm_forward_args fa = {.struct_size = sizeof fa, .desc = *d, .x = in->x.p, .y = o->y.p, .weight = W.p,
                             .bias = B.p, .eps = 1e-5, .training = k->training, .running_mean = rm,
                             .running_var = rv, .momentum = 0.1, .save_mean = k->training ? mean : NULL,
                             .save_invstd = k->training ? invstd : NULL, .save_mean_lo = k->training ? lo : NULL,
                             .addend = k->relu ? in->add.p : NULL, .relu = k->relu,
                             .relu_mask = k->relu ? o->mask : NULL, .num_threads = nt, .threadpool = pool};
    bnorm_backward_args ba = {.struct_size = sizeof ba, .desc = *d, .x = in->x.p, .dy = in->dy.p, .dx = o->dx.p,
                              .weight = W.p, .mean = k->training ? (void *)mean : (void *)rm,
                              .mean_lo = k->training ? lo : NULL, .invstd = k->training ? invstd : NULL,
                              .var = k->training ? NULL : rv, .eps = 1e-5, .use_global_stats = !k->training,
                              .relu_mask = k->relu ? o->mask : NULL, .daddend = k->relu ? o->dadd.p : NULL,
                              .dweight = dw, .dbias = db, .num_threads = nt, .threadpool = pool};
    bnorm_status st;
    if (mode == 0) {
        st = bnorm_forward(&fa);
        if (!st) st = bnorm_backward(&ba);
    } else if (mode == 2) {
        const int nt0 = bnorm_get_num_threads();
        bnorm_set_num_threads(nt);
        const size_t wsz = bnorm_workspace_size(d, 1);
        bnorm_set_num_threads(nt0);
        void *blk = NULL;
        if (posix_memalign(&blk, 64, ws_off + wsz)) abort();
        fa.workspace = ba.workspace = (char *)blk + ws_off;
        fa.workspace_size = ba.workspace_size = wsz;
        st = bnorm_forward(&fa);
        if (!st) st = bnorm_backward(&ba);
        free(blk);
    } else {
        bnorm_plan *pf = NULL, *pb = NULL;
        st = bnorm_plan_create_forward(&fa, &pf);
        if (!st) st = bnorm_plan_create_backward(&ba, &pb);
        if (!st) st = bnorm_plan_forward(pf, &fa);
        if (!st) st = bnorm_plan_backward(pb, &ba);
        bnorm_plan_destroy(pf);
        bnorm_plan_destroy(pb);
    }
    th_free(&W), th_free(&B);
    return st;
}

static void fb_free(fb_out *o) {
    th_free(&o->y), th_free(&o->dx), th_free(&o->dadd);
    free(o->mask), free(o->pbuf);
}

static int fb_same(const fb_out *a, const fb_out *b, int64_t n, size_t es) {
    return memcmp(a->y.p, b->y.p, (size_t)n * es) == 0 && memcmp(a->dx.p, b->dx.p, (size_t)n * es) == 0 &&
           memcmp(a->dadd.p, b->dadd.p, (size_t)n * es) == 0 && memcmp(a->mask, b->mask, a->mask_bytes) == 0 &&
           memcmp(a->pbuf, b->pbuf, a->pbytes) == 0;
}

/* Shapes that reach every schedule: channel (large planes), run (small planes), split (rows, C < threads),
 * inference flat and run (mask on small planes). */
static const struct {
    int rank;
    int64_t dims[5];
} shapes[] = {{4, {3, 8, 40, 41}}, {4, {5, 6, 7, 7}}, {2, {33, 17}}, {3, {4, 2, 300}}, {5, {2, 5, 3, 4, 5}},
              {4, {2, 3, 1, 1}}};
enum { NSHAPES = sizeof shapes / sizeof shapes[0] };

static void test_plans_and_pools(void) {
    const bnorm_dtype dts[] = {BNORM_DTYPE_F32, BNORM_DTYPE_F64, BNORM_DTYPE_BF16};
    const bnorm_threadpool pools[] = {{sizeof(bnorm_threadpool), pool_backwards, NULL},
                                      {sizeof(bnorm_threadpool), pool_pthreads, NULL}};
    for (int s = 0; s < NSHAPES; s++)
        for (int di = 0; di < 3; di++)
            for (int layout = 0; layout < 2; layout++)
                for (int training = 0; training < 2; training++)
                    for (int relu = 0; relu < 2; relu++) {
                        fb_case k = {mkdesc(dts[di], layout, shapes[s].rank, shapes[s].dims), training, relu};
                        const int64_t n = bnorm_desc_numel(&k.d);
                        const size_t es = bnorm_dtype_size(k.d.dtype);
                        fb_in in = fb_inputs(&k.d);
                        for (int nt = 1; nt <= 3; nt += 2) {
                            fb_out f, p, q, r;
                            CHECK_STATUS(fb_run(&k, &in, nt, NULL, 0, &f), BNORM_STATUS_OK);
                            CHECK_STATUS(fb_run(&k, &in, nt, NULL, 1, &p), BNORM_STATUS_OK);
                            CHECK(fb_same(&f, &p, n, es), "plan != functional: shape %d %s layout %d train %d relu %d nt %d",
                                  s, bnorm_dtype_name(k.d.dtype), layout, training, relu, nt);
                            pool_calls = 0;
                            CHECK_STATUS(fb_run(&k, &in, nt, &pools[0], 0, &q), BNORM_STATUS_OK);
                            CHECK(fb_same(&f, &q, n, es), "backwards pool != OpenMP: shape %d %s layout %d train %d relu %d nt %d",
                                  s, bnorm_dtype_name(k.d.dtype), layout, training, relu, nt);
                            CHECK_STATUS(fb_run(&k, &in, nt, &pools[1], 1, &r), BNORM_STATUS_OK);
                            CHECK(fb_same(&f, &r, n, es), "pthread pool plan != OpenMP: shape %d %s layout %d train %d relu %d nt %d",
                                  s, bnorm_dtype_name(k.d.dtype), layout, training, relu, nt);
                            if (nt > 1 && n > 0) CHECK(pool_calls > 0, "the pool was never called (nt %d)", nt);
                            fb_free(&p), fb_free(&q), fb_free(&r);
                            for (ws_off = 8; ws_off < 64; ws_off += 24) { /* 8, 32, 56 bytes past a line */
                                CHECK_STATUS(fb_run(&k, &in, nt, NULL, 2, &p), BNORM_STATUS_OK);
                                CHECK(fb_same(&f, &p, n, es), "caller workspace %zu bytes past a line != own: shape %d %s layout %d train %d relu %d nt %d",
                                      ws_off, s, bnorm_dtype_name(k.d.dtype), layout, training, relu, nt);
                                fb_free(&p);
                            }
                            fb_free(&f);
                        }
                        fb_in_free(&in);
                    }
}

/* A plan checks each execution against its configuration, and its workspace stays valid. */
static void test_plan_rules(void) {
    const int64_t dims[4] = {4, 6, 5, 5};
    bnorm_desc d = mkdesc(BNORM_DTYPE_F32, 0, 4, dims);
    fb_in in = fb_inputs(&d);
    const int64_t n = bnorm_desc_numel(&d);
    float y[600], mean[6], invstd[6], rm[6] = {0}, rv[6] = {1, 1, 1, 1, 1, 1};
    bnorm_forward_args fa = {.desc = d, .x = in.x.p, .y = y, .eps = 1e-5, .training = 1, .running_mean = rm,
                             .running_var = rv, .momentum = 0.1, .save_mean = mean, .save_invstd = invstd};
    bnorm_plan *p = NULL;
    CHECK_STATUS(bnorm_plan_create_forward(NULL, &p), BNORM_STATUS_NULL_POINTER);
    CHECK_STATUS(bnorm_plan_create_forward(&fa, NULL), BNORM_STATUS_NULL_POINTER);
    CHECK_STATUS(bnorm_plan_create_forward(&fa, &p), BNORM_STATUS_OK);
    CHECK(bnorm_plan_workspace_size(p) > 0 && bnorm_plan_num_threads(p) >= 1, "plan sizes");
    CHECK(strlen(bnorm_plan_schedule(p)) > 0, "schedule name");
    /* the default count changes: the plan keeps its own */
    int nt0 = bnorm_plan_num_threads(p);
    bnorm_set_num_threads(nt0 + 3);
    CHECK(bnorm_plan_num_threads(p) == nt0, "a plan's thread count is fixed at creation");
    CHECK_STATUS(bnorm_plan_forward(p, &fa), BNORM_STATUS_OK);
    /* a workspace of exactly the plan's size works whatever the default count is now */
    size_t wsz = bnorm_plan_workspace_size(p);
    double *ws = (double *)xmalloc(wsz);
    bnorm_forward_args e = fa;
    e.workspace = ws;
    e.workspace_size = wsz;
    CHECK_STATUS(bnorm_plan_forward(p, &e), BNORM_STATUS_OK);
    e.workspace_size = wsz - 8;
    CHECK_STATUS(bnorm_plan_forward(p, &e), BNORM_STATUS_INVALID_ARGUMENT);
    bnorm_set_num_threads(0);
    /* configuration fields must match */
    e = fa;
    e.desc.dims[0] = 3;
    CHECK_STATUS(bnorm_plan_forward(p, &e), BNORM_STATUS_INVALID_ARGUMENT);
    e = fa;
    e.training = 0;
    CHECK_STATUS(bnorm_plan_forward(p, &e), BNORM_STATUS_INVALID_ARGUMENT);
    e = fa;
    e.running_mean = e.running_var = NULL;
    CHECK_STATUS(bnorm_plan_forward(p, &e), BNORM_STATUS_INVALID_ARGUMENT);
    e = fa;
    e.num_threads = 7;
    CHECK_STATUS(bnorm_plan_forward(p, &e), BNORM_STATUS_INVALID_ARGUMENT);
    /* data checks still run */
    e = fa;
    e.x = NULL;
    CHECK_STATUS(bnorm_plan_forward(p, &e), BNORM_STATUS_NULL_POINTER);
    e = fa;
    e.momentum = 2;
    CHECK_STATUS(bnorm_plan_forward(p, &e), BNORM_STATUS_INVALID_ARGUMENT);
    bnorm_backward_args ba = {.desc = d, .x = in.x.p, .dy = in.dy.p, .dx = y, .mean = mean, .invstd = invstd};
    CHECK_STATUS(bnorm_plan_backward(p, &ba), BNORM_STATUS_INVALID_ARGUMENT); /* a forward plan */
    /* one value per channel cannot train: refused at creation */
    const int64_t one[2] = {1, 4};
    bnorm_plan *q = NULL;
    e = fa;
    e.desc = mkdesc(BNORM_DTYPE_F32, 0, 2, one);
    CHECK_STATUS(bnorm_plan_create_forward(&e, &q), BNORM_STATUS_BATCH_TOO_SMALL);
    CHECK(q == NULL, "no plan on failure");
    /* several threads executing one plan at once (the plan's workspace is taken by one of them) */
    bnorm_plan_destroy(p);
    bnorm_plan_destroy(NULL);
    free(ws);
    (void)n;
    fb_in_free(&in);
}

typedef struct conc_arg {
    bnorm_plan *plan;
    bnorm_forward_args a;
    int ok;
} conc_arg;

static void *conc_main(void *p) {
    conc_arg *c = (conc_arg *)p;
    c->ok = 1;
    for (int i = 0; i < 50; i++)
        if (bnorm_plan_forward(c->plan, &c->a) != BNORM_STATUS_OK) c->ok = 0;
    return NULL;
}

static void test_plan_concurrent(void) {
    const int64_t dims[4] = {4, 6, 9, 9};
    bnorm_desc d = mkdesc(BNORM_DTYPE_F32, 1, 4, dims);
    const int64_t n = bnorm_desc_numel(&d);
    enum { K = 4 };
    fb_in in[K];
    float *y[K], *yref[K];
    bnorm_forward_args base = {.desc = d, .eps = 1e-3, .training = 1, .num_threads = 2};
    bnorm_plan *p = NULL;
    base.x = (const void *)1;
    CHECK_STATUS(bnorm_plan_create_forward(&base, &p), BNORM_STATUS_OK);
    conc_arg args[K];
    pthread_t th[K];
    for (int i = 0; i < K; i++) {
        in[i] = fb_inputs(&d);
        y[i] = (float *)xmalloc(sizeof(float) * (size_t)n);
        yref[i] = (float *)xmalloc(sizeof(float) * (size_t)n);
        bnorm_forward_args r = base;
        r.x = in[i].x.p;
        r.y = yref[i];
        CHECK_STATUS(bnorm_forward(&r), BNORM_STATUS_OK);
        args[i].plan = p;
        args[i].a = r;
        args[i].a.y = y[i];
        pthread_create(&th[i], NULL, conc_main, &args[i]);
    }
    for (int i = 0; i < K; i++) {
        pthread_join(th[i], NULL);
        CHECK(args[i].ok, "concurrent executions of one plan failed");
        CHECK(memcmp(y[i], yref[i], sizeof(float) * (size_t)n) == 0, "concurrent execution %d differs", i);
        free(y[i]), free(yref[i]);
        fb_in_free(&in[i]);
    }
    bnorm_plan_destroy(p);
}

/* ---------------------------------------------------------------------------------------------
 * Threads: OpenMP's count, parallel regions, a count changed while calls run.
 * ------------------------------------------------------------------------------------------- */
static void test_thread_defaults(void) {
    bnorm_set_num_threads(0);
#ifdef _OPENMP
    int saved = omp_get_max_threads();
    omp_set_num_threads(3);
    CHECK(bnorm_get_num_threads() == 3, "omp_set_num_threads(3): bnorm uses %d", bnorm_get_num_threads());
    omp_set_num_threads(1);
    CHECK(bnorm_get_num_threads() == 1, "omp_set_num_threads(1): bnorm uses %d", bnorm_get_num_threads());
    omp_set_num_threads(2);
    int inside[2] = {-1, -1};
#pragma omp parallel num_threads(2)
    inside[omp_get_thread_num()] = bnorm_get_num_threads();
    CHECK(inside[0] == 1 && (inside[1] == 1 || inside[1] == -1), "inside a parallel region: %d %d", inside[0], inside[1]);
    /* calls from the threads of a caller's parallel region give the one-thread results */
    const int64_t dims[4] = {3, 5, 11, 13};
    bnorm_desc d = mkdesc(BNORM_DTYPE_F32, 0, 4, dims);
    const int64_t n = bnorm_desc_numel(&d);
    fb_in in = fb_inputs(&d);
    float *y1 = (float *)xmalloc(4 * (size_t)n), *yp[2];
    bnorm_forward_args a = {.desc = d, .x = in.x.p, .y = y1, .eps = 1e-5, .training = 1, .num_threads = 1};
    CHECK_STATUS(bnorm_forward(&a), BNORM_STATUS_OK);
    int st[2] = {0, 0};
    yp[0] = (float *)xmalloc(4 * (size_t)n);
    yp[1] = (float *)xmalloc(4 * (size_t)n);
#pragma omp parallel num_threads(2)
    {
        int t = omp_get_thread_num();
        bnorm_forward_args b = a;
        b.num_threads = 0;
        b.y = yp[t];
        st[t] = (int)bnorm_forward(&b);
    }
    CHECK(st[0] == 0 && st[1] == 0, "forwards inside a parallel region failed");
    CHECK(memcmp(yp[0], y1, 4 * (size_t)n) == 0, "a call inside a parallel region differs from one thread");
    free(y1), free(yp[0]), free(yp[1]);
    fb_in_free(&in);
    omp_set_num_threads(saved);
#endif
    bnorm_set_num_threads(5);
    CHECK(bnorm_get_num_threads() == 5, "set_num_threads(5)");
    bnorm_set_num_threads(-1);
    CHECK(bnorm_get_num_threads() >= 1, "default restored");
}

typedef struct race_arg {
    int failures, calls;
} race_arg;
static volatile int race_stop;

static void *race_worker(void *p) {
    race_arg *r = (race_arg *)p;
    const int64_t dims[4] = {6, 12, 5, 5};
    bnorm_desc d = mkdesc(BNORM_DTYPE_F32, 0, 4, dims);
    const int64_t n = bnorm_desc_numel(&d);
    float *x = (float *)xmalloc(4 * (size_t)n), *y = (float *)xmalloc(4 * (size_t)n);
    for (int64_t i = 0; i < n; i++) x[i] = (float)(i % 7) - 3.0f;
    bnorm_layer_options o = bnorm_layer_options_default(12);
    bnorm_layer *l = NULL;
    if (bnorm_layer_create(&o, &l)) {
        r->failures++;
        return NULL;
    }
    while (!__atomic_load_n(&race_stop, __ATOMIC_RELAXED) || r->calls < 20) {
        if (bnorm_layer_forward(l, &d, x, y, NULL) != BNORM_STATUS_OK) r->failures++;
        if (bnorm_layer_backward(l, &d, x, y, y, NULL) != BNORM_STATUS_OK) r->failures++;
        r->calls++;
        if (r->calls > 100000) break;
    }
    bnorm_layer_destroy(l);
    free(x), free(y);
    return NULL;
}

/* Issue 18 item 4: the thread count changed by another thread while layer calls run. */
static void test_thread_race(void) {
    enum { W = 3 };
    pthread_t th[W];
    race_arg args[W];
    race_stop = 0;
    for (int i = 0; i < W; i++) {
        args[i].failures = args[i].calls = 0;
        pthread_create(&th[i], NULL, race_worker, &args[i]);
    }
    for (int i = 0; i < 400; i++) bnorm_set_num_threads(1 + i % 8);
    __atomic_store_n(&race_stop, 1, __ATOMIC_RELAXED);
    int failures = 0, calls = 0;
    for (int i = 0; i < W; i++) {
        pthread_join(th[i], NULL);
        failures += args[i].failures;
        calls += args[i].calls;
    }
    bnorm_set_num_threads(0);
    CHECK(failures == 0, "%d of %d layer calls failed while another thread changed the thread count", failures,
          2 * calls);
    /* a forward at one count, the backward at another: the layer sizes its workspace per call */
    const int64_t dims[4] = {4, 40, 6, 6};
    bnorm_desc d = mkdesc(BNORM_DTYPE_F32, 1, 4, dims);
    const int64_t n = bnorm_desc_numel(&d);
    fb_in in = fb_inputs(&d);
    float *y = (float *)xmalloc(4 * (size_t)n);
    bnorm_layer_options o = bnorm_layer_options_default(40);
    bnorm_layer *l = NULL;
    CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
    bnorm_set_num_threads(1);
    CHECK_STATUS(bnorm_layer_forward(l, &d, in.x.p, y, NULL), BNORM_STATUS_OK);
    bnorm_set_num_threads(8);
    CHECK_STATUS(bnorm_layer_backward(l, &d, in.x.p, in.dy.p, y, NULL), BNORM_STATUS_OK);
    bnorm_set_num_threads(0);
    bnorm_layer_destroy(l);
    free(y);
    fb_in_free(&in);
}

/* ---------------------------------------------------------------------------------------------
 * The layer: contexts, hyper-parameters, per-parameter gradients.
 * ------------------------------------------------------------------------------------------- */
static void layer_ref(const bnorm_desc *d, const double *x, const double *dy, const double *w, double *dx,
                      double *dw, double *db) {
    ref_shape sh = shape_of(d);
    int64_t n = bnorm_desc_numel(d), C = d->dims[1];
    double *y = (double *)xmalloc(sizeof(double) * (size_t)n), *mean = (double *)xmalloc(8 * (size_t)C),
           *inv = (double *)xmalloc(8 * (size_t)C);
    ref_forward_train(&sh, x, w, NULL, NULL, 0, 1e-5, y, mean, NULL, inv);
    ref_backward(&sh, x, dy, w, mean, inv, 0, NULL, dx, NULL, dw, db);
    free(y), free(mean), free(inv);
}

static void test_layer_contexts(void) {
    for (int dt = 0; dt < 2; dt++) {
        const int64_t dims[4] = {3, 4, 5, 6};
        bnorm_desc d = mkdesc(dt ? BNORM_DTYPE_F64 : BNORM_DTYPE_F32, dt, 4, dims);
        const int64_t n = bnorm_desc_numel(&d), C = 4;
        const double tol = dt ? 1e-12 : 1e-5;
        bnorm_layer_options o = bnorm_layer_options_default(C);
        o.param_dtype = bnorm_param_dtype(d.dtype);
        bnorm_layer *l = NULL, *other = NULL;
        CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_create(&o, &other), BNORM_STATUS_OK);
        double *xa = randn(n, 1, 2), *xb = randn(n, -3, 0.5), *dya = randn(n, 0, 1), *dyb = randn(n, 0, 1);
        th_round(d.dtype, xa, n), th_round(d.dtype, xb, n), th_round(d.dtype, dya, n), th_round(d.dtype, dyb, n);
        th_buf XA = filled(d.dtype, n, xa), XB = filled(d.dtype, n, xb), DYA = filled(d.dtype, n, dya),
               DYB = filled(d.dtype, n, dyb), Y = th_alloc(d.dtype, n, 0), DX = th_alloc(d.dtype, n, 0);
        double w[4] = {1, 1, 1, 1}, dxr[2][360], dwr[2][4], dbr[2][4], got[360], gw[4], gb[4];
        layer_ref(&d, xa, dya, w, dxr[0], dwr[0], dbr[0]);
        layer_ref(&d, xb, dyb, w, dxr[1], dwr[1], dbr[1]);
        /* the plain forward/backward refuse a backward of an older forward */
        CHECK_STATUS(bnorm_layer_forward(l, &d, XA.p, Y.p, NULL), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_forward(l, &d, XB.p, Y.p, NULL), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_backward(l, &d, XA.p, DYA.p, DX.p, NULL), BNORM_STATUS_STATE);
        /* a fresh copy of the same input is accepted */
        th_buf XB2 = filled(d.dtype, n, xb);
        CHECK_STATUS(bnorm_layer_backward(l, &d, XB2.p, DYB.p, DX.p, NULL), BNORM_STATUS_OK);
        th_free(&XB2);
        CHECK_STATUS(bnorm_layer_zero_grad(l), BNORM_STATUS_OK);
        /* contexts: A, B, backward B, backward A */
        bnorm_layer_context *ca = NULL, *cb = NULL, *cx = NULL;
        CHECK_STATUS(bnorm_layer_context_create(l, &ca), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_context_create(l, &cb), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_context_create(other, &cx), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_backward_ctx(l, ca, &d, XA.p, DYA.p, DX.p, NULL), BNORM_STATUS_STATE);
        CHECK_STATUS(bnorm_layer_forward_ctx(l, cx, &d, XA.p, Y.p, NULL), BNORM_STATUS_INVALID_ARGUMENT);
        CHECK_STATUS(bnorm_layer_forward_ctx(l, ca, &d, XA.p, Y.p, NULL), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_forward_ctx(l, cb, &d, XB.p, Y.p, NULL), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_backward_ctx(l, cb, &d, XB.p, DYB.p, DX.p, NULL), BNORM_STATUS_OK);
        th_load(&DX, got);
        CHECK(th_err(got, dxr[1], n, tol, tol) <= 1, "%s: dx of B via its context", bnorm_dtype_name(d.dtype));
        CHECK_STATUS(bnorm_layer_backward_ctx(l, ca, &d, XA.p, DYA.p, DX.p, NULL), BNORM_STATUS_OK);
        th_load(&DX, got);
        CHECK(th_err(got, dxr[0], n, tol, tol) <= 1, "%s: dx of A via its context after B", bnorm_dtype_name(d.dtype));
        CHECK_STATUS(bnorm_layer_backward_ctx(l, ca, &d, XB.p, DYA.p, DX.p, NULL), BNORM_STATUS_STATE);
        void *pw, *pb;
        bnorm_layer_tensor(l, BNORM_TENSOR_WEIGHT_GRAD, &pw);
        bnorm_layer_tensor(l, BNORM_TENSOR_BIAS_GRAD, &pb);
        for (int c = 0; c < C; c++) {
            gw[c] = dt ? ((double *)pw)[c] : ((float *)pw)[c];
            gb[c] = dt ? ((double *)pb)[c] : ((float *)pb)[c];
            got[c] = dwr[0][c] + dwr[1][c];
            got[4 + c] = dbr[0][c] + dbr[1][c];
        }
        CHECK(th_err(gw, got, C, tol * 10, tol) <= 1 && th_err(gb, got + 4, C, tol * 10, tol) <= 1,
              "%s: parameter gradients of both backwards accumulated", bnorm_dtype_name(d.dtype));
        /* requires_grad: bias off */
        CHECK_STATUS(bnorm_layer_zero_grad(l), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_set_requires_grad(l, 1, 0), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_backward_ctx(l, ca, &d, XA.p, DYA.p, DX.p, NULL), BNORM_STATUS_OK);
        int bias_zero = 1, weight_set = 0;
        for (int c = 0; c < C; c++) {
            bias_zero &= (dt ? ((double *)pb)[c] : ((float *)pb)[c]) == 0;
            weight_set |= (dt ? ((double *)pw)[c] : ((float *)pw)[c]) != 0;
        }
        CHECK(bias_zero && weight_set, "requires_grad(1, 0): bias.grad untouched, weight.grad accumulated");
        CHECK_STATUS(bnorm_layer_set_requires_grad(NULL, 1, 1), BNORM_STATUS_NULL_POINTER);
        bnorm_layer_context_destroy(ca), bnorm_layer_context_destroy(cb), bnorm_layer_context_destroy(cx);
        bnorm_layer_context_destroy(NULL);
        o.affine = 0;
        bnorm_layer *na = NULL;
        CHECK_STATUS(bnorm_layer_create(&o, &na), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_set_requires_grad(na, 1, 0), BNORM_STATUS_UNSUPPORTED);
        CHECK_STATUS(bnorm_layer_set_requires_grad(na, 0, 0), BNORM_STATUS_OK);
        bnorm_layer_destroy(na);
        bnorm_layer_destroy(l), bnorm_layer_destroy(other);
        th_free(&XA), th_free(&XB), th_free(&DYA), th_free(&DYB), th_free(&Y), th_free(&DX);
        free(xa), free(xb), free(dya), free(dyb);
    }
}

/* Hyper-parameters changed between steps give PyTorch's running statistics and outputs. */
static void test_layer_set_options(void) {
    const int64_t dims[3] = {6, 3, 7};
    bnorm_desc d = mkdesc(BNORM_DTYPE_F64, 0, 3, dims);
    const int64_t n = bnorm_desc_numel(&d), C = 3, m = 42;
    ref_shape sh = shape_of(&d);
    bnorm_layer_options o = bnorm_layer_options_default(C);
    o.param_dtype = BNORM_DTYPE_F64;
    bnorm_layer *l = NULL;
    CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
    double rm[3] = {0, 0, 0}, rv[3] = {1, 1, 1}, y[126], yr[126], mean[3], var[3];
    struct {
        double momentum;
        bnorm_momentum_mode mode;
        double eps;
    } steps[] = {{0.1, BNORM_MOMENTUM_NEW_WEIGHT, 1e-5}, {0.01, BNORM_MOMENTUM_NEW_WEIGHT, 1e-3},
                 {0.9, BNORM_MOMENTUM_KEPT_WEIGHT, 1e-5}, {0, BNORM_MOMENTUM_CUMULATIVE, 0.5}};
    for (int s = 0; s < 4; s++) {
        o.momentum = steps[s].momentum;
        o.momentum_mode = steps[s].mode;
        o.eps = steps[s].eps;
        CHECK_STATUS(bnorm_layer_set_options(l, &o), BNORM_STATUS_OK);
        double *x = randn(n, s, 1 + s);
        CHECK_STATUS(bnorm_layer_forward(l, &d, x, y, NULL), BNORM_STATUS_OK);
        ref_forward_train(&sh, x, NULL, NULL, NULL, 0, steps[s].eps, yr, mean, var, NULL);
        CHECK(th_err(y, yr, n, 1e-12, 1e-12) <= 1, "step %d: y with eps %g", s, steps[s].eps);
        double al = steps[s].mode == BNORM_MOMENTUM_NEW_WEIGHT    ? steps[s].momentum
                    : steps[s].mode == BNORM_MOMENTUM_KEPT_WEIGHT ? 1 - steps[s].momentum
                                                                  : 1.0 / (s + 1);
        for (int c = 0; c < C; c++) {
            rm[c] = (1 - al) * rm[c] + al * mean[c];
            rv[c] = (1 - al) * rv[c] + al * var[c] * m / (m - 1);
        }
        void *p;
        bnorm_layer_tensor(l, BNORM_TENSOR_RUNNING_MEAN, &p);
        CHECK(th_err((double *)p, rm, C, 1e-12, 1e-12) <= 1, "step %d: running_mean", s);
        bnorm_layer_tensor(l, BNORM_TENSOR_RUNNING_VAR, &p);
        CHECK(th_err((double *)p, rv, C, 1e-12, 1e-12) <= 1, "step %d: running_var", s);
        free(x);
    }
    /* freeze: running statistics used and kept, even in training */
    o.freeze = 1;
    CHECK_STATUS(bnorm_layer_set_options(l, &o), BNORM_STATUS_OK);
    double before[3];
    void *p;
    bnorm_layer_tensor(l, BNORM_TENSOR_RUNNING_MEAN, &p);
    memcpy(before, p, sizeof before);
    double *x = randn(n, 3, 2);
    CHECK_STATUS(bnorm_layer_forward(l, &d, x, y, NULL), BNORM_STATUS_OK);
    ref_forward_eval(&sh, x, NULL, NULL, rm, rv, o.eps, NULL, 0, yr);
    CHECK(th_err(y, yr, n, 1e-12, 1e-12) <= 1, "freeze: normalized with the running statistics");
    CHECK(memcmp(p, before, sizeof before) == 0, "freeze: running_mean kept");
    free(x);
    /* the structure cannot change; bad values are refused with nothing changed */
    bnorm_layer_options bad = o;
    bad.affine = 0;
    CHECK_STATUS(bnorm_layer_set_options(l, &bad), BNORM_STATUS_SHAPE_MISMATCH);
    bad = o;
    bad.num_features = 4;
    CHECK_STATUS(bnorm_layer_set_options(l, &bad), BNORM_STATUS_SHAPE_MISMATCH);
    bad = o;
    bad.eps = -1;
    CHECK_STATUS(bnorm_layer_set_options(l, &bad), BNORM_STATUS_INVALID_ARGUMENT);
    bnorm_layer_options now;
    bnorm_layer_get_options(l, &now);
    CHECK(now.eps == o.eps && now.freeze == 1 && now.momentum_mode == BNORM_MOMENTUM_CUMULATIVE,
          "options after refused changes");
    CHECK_STATUS(bnorm_layer_set_options(NULL, &o), BNORM_STATUS_NULL_POINTER);
    CHECK_STATUS(bnorm_layer_set_threads(l, -1, NULL), BNORM_STATUS_INVALID_ARGUMENT);
    bnorm_threadpool pool = {sizeof pool, pool_backwards, NULL};
    CHECK_STATUS(bnorm_layer_set_threads(l, 3, &pool), BNORM_STATUS_OK);
    pool_calls = 0;
    o.freeze = 0;
    bnorm_layer_set_options(l, &o);
    x = randn(n, 0, 1);
    CHECK_STATUS(bnorm_layer_forward(l, &d, x, y, NULL), BNORM_STATUS_OK);
    CHECK(pool_calls > 0, "the layer's pool runs its work");
    free(x);
    bnorm_layer_destroy(l);
}

/* ---------------------------------------------------------------------------------------------
 * Full precision (issue 16 item 4): dx, daddend, dweight, dbias against a long double reference, on
 * data whose mean dwarfs the spread, constant channels, 2-3 values per channel, eps = 0.
 * ------------------------------------------------------------------------------------------- */
typedef long double ld;

static void ld_ref(const ref_shape *sh, const double *x, const double *dy, const double *w, const double *b,
                   const double *add, int relu, double eps, double *dx, double *da, double *dw, double *db,
                   double *scale) {
    for (int64_t c = 0; c < sh->C; c++) {
        ld s = 0, ss = 0, m = (ld)(sh->N * sh->S);
        for (int64_t nn = 0; nn < sh->N; nn++)
            for (int64_t t = 0; t < sh->S; t++) s += x[ref_index(sh, nn, c, t)];
        ld mean = s / m;
        for (int64_t nn = 0; nn < sh->N; nn++)
            for (int64_t t = 0; t < sh->S; t++) {
                ld dd = x[ref_index(sh, nn, c, t)] - mean;
                ss += dd * dd;
            }
        ld v = ss / m + (ld)eps, inv = v == 0 ? 0 : 1 / sqrtl(v);
        ld sg = 0, sgx = 0;
        for (int64_t nn = 0; nn < sh->N; nn++)
            for (int64_t t = 0; t < sh->S; t++) {
                int64_t i = ref_index(sh, nn, c, t);
                ld xh = (x[i] - mean) * inv, z = xh * w[c] + b[c] + (add ? add[i] : 0);
                ld g = relu && !(z > 0) ? 0 : dy[i];
                sg += g;
                sgx += g * xh;
            }
        dw[c] = (double)sgx;
        db[c] = (double)sg;
        scale[c] = (double)(w[c] * inv);
        for (int64_t nn = 0; nn < sh->N; nn++)
            for (int64_t t = 0; t < sh->S; t++) {
                int64_t i = ref_index(sh, nn, c, t);
                ld xh = (x[i] - mean) * inv, z = xh * w[c] + b[c] + (add ? add[i] : 0);
                ld g = relu && !(z > 0) ? 0 : dy[i];
                dx[i] = (double)(w[c] * inv * (g - sg / m - xh * sgx / m));
                if (da) da[i] = (double)g;
            }
    }
}

/* ||got - want|| / max(||want||, floor). floor: the norm of the terms that cancel in the quantity
 * (for dx, dy * w * invstd): with 2 values per channel and eps = 0 the exact dx is 0, and a relative
 * error against 0 means nothing; everywhere else ||want|| is of the floor's size or larger. */
static double nrel(const double *got, const double *want, int64_t n, double floor) {
    ld e = 0, r = 0;
    for (int64_t i = 0; i < n; i++) {
        ld d = (ld)got[i] - want[i];
        e += d * d;
        r += (ld)want[i] * want[i];
    }
    ld den = sqrtl(r) > floor ? sqrtl(r) : floor;
    return den == 0 ? (double)sqrtl(e) : (double)(sqrtl(e) / den);
}

/* Whether long double arithmetic is wider than double at run time (valgrind runs x87 code at double
 * precision: the float64 bound then cannot be checked against this reference). */
static int ld_is_wide(void) {
    volatile long double one = 1.0L, tiny = 1.0L / 1099511627776.0L / 1048576.0L; /* 2^-60 */
    volatile long double sum = one + tiny;
    return sum != one;
}

static void test_precision(void) {
    const int wide = ld_is_wide();
    if (!wide) printf("full precision: long double is not wider than double here (valgrind?): float64 bound relaxed to 1e-8\n");
    const struct {
        int rank;
        int64_t dims[4];
        double mean, sd, eps;
        int constant;
    } cases[] = {{4, {4, 3, 5, 7}, 1e4, 1, 1e-5, 0}, {4, {4, 3, 5, 7}, 1e5, 1, 0, 0}, {2, {2, 5}, 1e5, 1, 0, 0},
                 {2, {3, 5}, 1e4, 1, 1e-5, 0},      {3, {3, 4, 1}, 1e5, 1, 0, 0},    {4, {3, 2, 4, 4}, 7, 0, 1e-5, 1},
                 {4, {5, 6, 9, 9}, -3e4, 2, 0, 0}};
    const int ncases = sizeof cases / sizeof cases[0];
    bnorm_isa isas[3] = {BNORM_ISA_SCALAR, BNORM_ISA_AVX2, BNORM_ISA_AVX512};
    bnorm_isa isa0 = bnorm_get_isa();
    double worst[2] = {0, 0};
    for (int ii = 0; ii < 3; ii++) {
        if (bnorm_set_isa(isas[ii]) != BNORM_STATUS_OK) continue;
        for (int k = 0; k < ncases; k++)
            for (int dt = 0; dt < 2; dt++)
                for (int layout = 0; layout < 2; layout++)
                    for (int fused = 0; fused < 2; fused++)
                        for (int nt = 1; nt <= 4; nt++) {
                            bnorm_dtype dtype = dt ? BNORM_DTYPE_F64 : BNORM_DTYPE_F32;
                            bnorm_desc d = mkdesc(dtype, layout, cases[k].rank, cases[k].dims);
                            const int64_t n = bnorm_desc_numel(&d), C = d.dims[1];
                            ref_shape sh = shape_of(&d);
                            double *x = randn(n, cases[k].mean, cases[k].sd), *dy = randn(n, 0, 1);
                            double *ad = randn(n, 0, 1), w[8], b[8];
                            for (int c = 0; c < C; c++) {
                                w[c] = 0.5 + 0.25 * c;
                                b[c] = 0.1 * c - 0.2;
                            }
                            if (cases[k].constant)
                                for (int64_t i = 0; i < n; i++) x[i] = cases[k].mean;
                            if (sh.N * sh.S <= 3) /* 2-3 values per channel of unit spread (the issue's
                                                     case): evenly spaced with noise, since two raw draws can
                                                     nearly coincide and then condition dx far beyond it */
                                for (int64_t nn = 0; nn < sh.N; nn++)
                                    for (int c = 0; c < C; c++)
                                        for (int64_t t = 0; t < sh.S; t++)
                                            x[ref_index(&sh, nn, c, t)] =
                                                cases[k].mean + cases[k].sd * ((double)(nn * sh.S + t) + 0.1 * th_normal());
                            th_round(dtype, x, n), th_round(dtype, dy, n), th_round(dtype, ad, n);
                            double *dxr = (double *)xmalloc(8 * (size_t)n), *dar = (double *)xmalloc(8 * (size_t)n);
                            double dwr[8], dbr[8], sc[8];
                            ld_ref(&sh, x, dy, w, b, fused ? ad : NULL, fused, cases[k].eps, dxr, dar, dwr, dbr, sc);
                            /* the size of the terms that cancel in dx: |dy| * w * invstd */
                            ld fl = 0;
                            for (int64_t nn = 0; nn < sh.N; nn++)
                                for (int c = 0; c < C; c++)
                                    for (int64_t t = 0; t < sh.S; t++) {
                                        ld v = dy[ref_index(&sh, nn, c, t)] * (ld)sc[c];
                                        fl += v * v;
                                    }
                            const double floor = (double)sqrtl(fl);
                            /* through the layer (its contexts keep the mean as hi + lo) */
                            bnorm_layer_options o = bnorm_layer_options_default(C);
                            o.param_dtype = bnorm_param_dtype(dtype);
                            o.eps = cases[k].eps;
                            o.fused_relu = fused;
                            bnorm_layer *l = NULL;
                            bnorm_layer_create(&o, &l);
                            bnorm_layer_set_threads(l, nt, NULL);
                            void *pw, *pb, *gw, *gb;
                            bnorm_layer_tensor(l, BNORM_TENSOR_WEIGHT, &pw);
                            bnorm_layer_tensor(l, BNORM_TENSOR_BIAS, &pb);
                            for (int c = 0; c < C; c++) {
                                if (dt) ((double *)pw)[c] = w[c], ((double *)pb)[c] = b[c];
                                else ((float *)pw)[c] = (float)w[c], ((float *)pb)[c] = (float)b[c];
                            }
                            th_buf X = filled(dtype, n, x), DY = filled(dtype, n, dy), AD = filled(dtype, n, ad);
                            th_buf Y = th_alloc(dtype, n, 0), DX = th_alloc(dtype, n, 0), DA = th_alloc(dtype, n, 0);
                            CHECK_STATUS(bnorm_layer_forward(l, &d, X.p, Y.p, fused ? AD.p : NULL), BNORM_STATUS_OK);
                            CHECK_STATUS(bnorm_layer_backward(l, &d, X.p, DY.p, DX.p, fused ? DA.p : NULL),
                                         BNORM_STATUS_OK);
                            double *dx = (double *)xmalloc(8 * (size_t)n), *da = (double *)xmalloc(8 * (size_t)n);
                            double dw[8], db[8];
                            th_load(&DX, dx);
                            th_load(&DA, da);
                            bnorm_layer_tensor(l, BNORM_TENSOR_WEIGHT_GRAD, &gw);
                            bnorm_layer_tensor(l, BNORM_TENSOR_BIAS_GRAD, &gb);
                            for (int c = 0; c < C; c++) {
                                dw[c] = dt ? ((double *)gw)[c] : ((float *)gw)[c];
                                db[c] = dt ? ((double *)gb)[c] : ((float *)gb)[c];
                            }
                            /* dweight's terms: |g| * |xhat| summed; dbias's: |g| */
                            double fdw = 0, fdb = 0;
                            for (int64_t i = 0; i < n; i++) fdb += fabs(dy[i]);
                            fdw = fdb;
                            const double bound = dt ? (wide ? 1e-10 : 1e-8) : 1e-5;
                            double e1 = nrel(dx, dxr, n, floor), e2 = fused ? nrel(da, dar, n, 0) : 0;
                            double e3 = nrel(dw, dwr, C, fdw), e4 = nrel(db, dbr, C, fdb);
                            double e = e1 > e2 ? e1 : e2;
                            e = e > e3 ? e : e3;
                            e = e > e4 ? e : e4;
                            if (e > worst[dt]) worst[dt] = e;
                            CHECK(e <= bound,
                                  "%s %s case %d layout %d fused %d nt %d: normwise errors dx %.3g da %.3g dw %.3g db %.3g "
                                  "> %g",
                                  bnorm_isa_name(isas[ii]), bnorm_dtype_name(dtype), k, layout, fused, nt, e1, e2, e3, e4,
                                  bound);
                            /* the functional level with save_mean_lo / mean_lo gives the same */
                            if (nt == 2 && !fused) {
                                const bnorm_dtype pd = bnorm_param_dtype(dtype);
                                th_buf W = filled(pd, C, w), B = filled(pd, C, b), M = th_alloc(pd, C, 0),
                                       ML = th_alloc(pd, C, 0), IV = th_alloc(pd, C, 0), DW = th_alloc(pd, C, 0),
                                       DB = th_alloc(pd, C, 0);
                                bnorm_forward_args fa = {.desc = d, .x = X.p, .y = Y.p, .weight = W.p, .bias = B.p,
                                                         .eps = cases[k].eps, .training = 1, .save_mean = M.p,
                                                         .save_invstd = IV.p, .save_mean_lo = ML.p, .num_threads = nt};
                                bnorm_backward_args ba = {.desc = d, .x = X.p, .dy = DY.p, .dx = DX.p, .weight = W.p,
                                                          .mean = M.p, .mean_lo = ML.p, .invstd = IV.p, .dweight = DW.p,
                                                          .dbias = DB.p, .num_threads = nt};
                                CHECK_STATUS(bnorm_forward(&fa), BNORM_STATUS_OK);
                                CHECK_STATUS(bnorm_backward(&ba), BNORM_STATUS_OK);
                                th_load(&DX, dx);
                                CHECK(nrel(dx, dxr, n, floor) <= bound, "functional %s case %d: dx %.3g",
                                      bnorm_dtype_name(dtype), k, nrel(dx, dxr, n, floor));
                                th_free(&W), th_free(&B), th_free(&M), th_free(&ML), th_free(&IV), th_free(&DW),
                                    th_free(&DB);
                            }
                            bnorm_layer_destroy(l);
                            th_free(&X), th_free(&DY), th_free(&AD), th_free(&Y), th_free(&DX), th_free(&DA);
                            free(x), free(dy), free(ad), free(dxr), free(dar), free(dx), free(da);
                        }
    }
    bnorm_set_isa(isa0);
    printf("full precision: worst normwise error float32 %.3g (bound 1e-5), float64 %.3g (bound 1e-10)\n", worst[0],
           worst[1]);
}

/* ---------------------------------------------------------------------------------------------
 * Sizes that cannot wrap (issue 18 item 5), ABI struct sizes.
 * ------------------------------------------------------------------------------------------- */
static int fake_gather(void *ctx, const double *send, int64_t count, double *recv, char *msg, size_t cap) {
    (void)ctx, (void)msg, (void)cap;
    memcpy(recv, send, sizeof(double) * (size_t)count);
    return 0;
}

static void test_sizes(void) {
    const int64_t huge[2] = {0, (int64_t)1 << 59};
    bnorm_desc d = mkdesc(BNORM_DTYPE_F32, 0, 2, huge);
    CHECK(bnorm_desc_check(&d) == BNORM_STATUS_OK, "an empty tensor of 2^59 channels is a valid descriptor");
    CHECK(bnorm_workspace_size(&d, 1) == 0, "workspace_size of 2^59 channels must be 0 (overflow)");
    bnorm_comm comm = {.rank = 0, .size = 1, .allgather = fake_gather};
    float dummy[4];
    bnorm_forward_args fa = {.desc = d, .x = dummy, .y = dummy, .training = 1, .comm = &comm};
    CHECK_STATUS(bnorm_forward(&fa), BNORM_STATUS_OVERFLOW);
    bnorm_backward_args ba = {.desc = d, .x = dummy, .dy = dummy, .mean = dummy, .invstd = dummy};
    CHECK_STATUS(bnorm_backward(&ba), BNORM_STATUS_OVERFLOW);
    const int64_t ok[4] = {2, 3, 4, 4};
    bnorm_desc e = mkdesc(BNORM_DTYPE_F32, 0, 4, ok);
    CHECK(bnorm_workspace_size(&e, INT_MAX) == 0, "workspace_size with comm_size INT_MAX must be 0");
    CHECK(bnorm_workspace_size(&e, 1) > 0, "workspace_size of a small tensor");
    /* struct_size: a larger struct with a zero tail is accepted, a nonzero tail refused */
    struct {
        bnorm_forward_args a;
        int64_t future;
    } big;
    memset(&big, 0, sizeof big);
    const int64_t small[2] = {4, 3};
    float x[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, y[12];
    big.a.struct_size = sizeof big;
    big.a.desc = mkdesc(BNORM_DTYPE_F32, 0, 2, small);
    big.a.x = x;
    big.a.y = y;
    big.a.training = 1;
    CHECK_STATUS(bnorm_forward(&big.a), BNORM_STATUS_OK);
    big.future = 1;
    CHECK_STATUS(bnorm_forward(&big.a), BNORM_STATUS_UNSUPPORTED);
    big.a.struct_size = 3;
    CHECK_STATUS(bnorm_forward(&big.a), BNORM_STATUS_INVALID_ARGUMENT);
    bnorm_threadpool bad = {sizeof bad, NULL, NULL};
    big.a.struct_size = 0;
    big.a.threadpool = &bad;
    CHECK_STATUS(bnorm_forward(&big.a), BNORM_STATUS_NULL_POINTER);
    big.a.threadpool = NULL;
    big.a.num_threads = -2;
    CHECK_STATUS(bnorm_forward(&big.a), BNORM_STATUS_INVALID_ARGUMENT);
}

int main(int argc, char **argv) {
    if (argc > 2 && !strcmp(argv[1], "omp-env")) {
        int want = atoi(argv[2]), got = bnorm_get_num_threads();
        printf("OMP_NUM_THREADS=%s: bnorm_get_num_threads() = %d\n", getenv("OMP_NUM_THREADS") ? getenv("OMP_NUM_THREADS") : "(unset)", got);
        CHECK(got == want, "bnorm_get_num_threads() = %d, want %d", got, want);
        return th_finish("test_embed omp-env");
    }
    if (argc > 1 && !strcmp(argv[1], "verbose")) {
        const int64_t dims[2] = {4, 3};
        float x[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, y[12];
        bnorm_forward_args a = {.desc = mkdesc(BNORM_DTYPE_F32, 0, 2, dims), .x = x, .y = y, .training = 1, .num_threads = 1};
        CHECK_STATUS(bnorm_forward(&a), BNORM_STATUS_OK);
        return th_finish("test_embed verbose");
    }
    th_seed(16);
    if (argc > 1 && !strcmp(argv[1], "race")) {
        test_thread_race();
        return th_finish("test_embed race");
    }
    test_sizes();
    test_plan_rules();
    test_plan_concurrent();
    test_thread_defaults();
    test_thread_race();
    test_layer_contexts();
    test_layer_set_options();
    test_plans_and_pools();
    test_precision();
    return th_finish("test_embed");
}
