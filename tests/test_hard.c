/*
 * test_hard.c - adversarial data, against the float64 reference on the same (rounded) inputs:
 *   - large mean, tiny variance (1e4 + N(0,1), 1e5 + 0.01 N(0,1), ... in float32): the variance from
 *     save_invstd (eps = 0) and from the running_var update (momentum 1, factor m/(m-1)) within a
 *     relative 1e-6, for several shapes, both layouts, 1..4 threads and every instruction-set variant;
 *   - constant channels: y = bias, no NaN; eps = 0: invstd = 0 and y = bias (PyTorch's rule);
 *   - NaN and Inf inputs: no crash, NaN where the reference has NaN, other channels unaffected;
 *   - bitwise reproducibility of forward and backward for a given thread count;
 *   - float16/bfloat16: activations whose sum overflows float16, values at the float16 limits.
 */
#include "harness.h"
#include "ref.h"

typedef struct shape {
    int rank;
    int64_t dims[5];
} shape;

/* What one training forward (+ optional backward) produced, as doubles. */
typedef struct run {
    ref_shape sh;
    bnorm_desc d;
    int64_t numel;
    double *y, *mean, *invstd, *rm, *rv, *dx, *dw, *db;
    /* raw bytes of every output, for the reproducibility check */
    unsigned char *bytes;
    size_t nbytes;
} run;

static void run_free(run *r) {
    free(r->y); free(r->mean); free(r->invstd); free(r->rm); free(r->rv); free(r->dx); free(r->dw); free(r->db);
    free(r->bytes);
    memset(r, 0, sizeof *r);
}

static int64_t shape_S(const shape *s) {
    int64_t S = 1;
    for (int i = 2; i < s->rank; i++) S *= s->dims[i];
    return S;
}

/* Training forward of x (doubles already rounded to dt) with running stats (initialised to rm0/rv0,
 * momentum) and, if dy != NULL, the training backward. w/b may be NULL. Returns 0 on a library error. */
static int run_train(bnorm_dtype dt, const shape *s, int layout, const double *x, const double *w, const double *b,
                     double eps, double momentum, int relu, const double *dy, run *r) {
    memset(r, 0, sizeof *r);
    bnorm_desc d = {.dtype = dt, .layout = (bnorm_layout)layout, .rank = s->rank};
    for (int i = 0; i < s->rank; i++) d.dims[i] = s->dims[i];
    const int64_t N = s->dims[0], C = s->dims[1], S = shape_S(s), numel = N * C * S;
    const bnorm_dtype pd = bnorm_param_dtype(dt);
    r->sh = (ref_shape){N, C, S, layout == 1};
    r->d = d;
    r->numel = numel;
    th_buf X = th_alloc(dt, numel, 0), Y = th_alloc(dt, numel, 0), DY = th_alloc(dt, numel, 0), DX = th_alloc(dt, numel, 0);
    th_buf W = th_alloc(pd, C, 0), B = th_alloc(pd, C, 0), RM = th_alloc(pd, C, 0), RV = th_alloc(pd, C, 0);
    th_buf SM = th_alloc(pd, C, 0), SI = th_alloc(pd, C, 0), DW = th_alloc(pd, C, 0), DB = th_alloc(pd, C, 0);
    th_buf MASK = th_alloc(BNORM_DTYPE_BF16, (int64_t)bnorm_relu_mask_size(&d) / 2 + 1, 0);
    double *tmp = malloc(sizeof(double) * (size_t)(C > numel ? C : numel) + 8);
    th_store(&X, x);
    if (w) th_store(&W, w);
    if (b) th_store(&B, b);
    for (int64_t c = 0; c < C; c++) tmp[c] = 5.0; /* running stats start away from the batch's */
    th_store(&RM, tmp);
    th_store(&RV, tmp);
    int ok = 1;
    bnorm_forward_args fa = {.desc = d, .x = X.p, .y = Y.p, .weight = w ? W.p : NULL, .bias = b ? B.p : NULL,
                             .eps = eps, .training = 1, .running_mean = RM.p, .running_var = RV.p,
                             .momentum = momentum, .save_mean = SM.p, .save_invstd = SI.p, .relu = relu,
                             .relu_mask = relu ? MASK.p : NULL};
    bnorm_status st = bnorm_forward(&fa);
    CHECK(st == BNORM_STATUS_OK, "forward: %s", bnorm_last_error());
    if (st) { ok = 0; goto out; }
    if (dy) {
        th_store(&DY, dy);
        bnorm_backward_args ba = {.desc = d, .x = X.p, .dy = DY.p, .dx = DX.p, .weight = w ? W.p : NULL,
                                  .mean = SM.p, .invstd = SI.p, .relu_mask = relu ? MASK.p : NULL,
                                  .dweight = DW.p, .dbias = DB.p};
        st = bnorm_backward(&ba);
        CHECK(st == BNORM_STATUS_OK, "backward: %s", bnorm_last_error());
        if (st) { ok = 0; goto out; }
    }
    r->y = malloc(sizeof(double) * (size_t)numel + 8);
    th_load(&Y, r->y);
#define TAKE(field, buf, n)                                  \
    do {                                                     \
        r->field = malloc(sizeof(double) * (size_t)(n) + 8); \
        th_load(&buf, r->field);                             \
    } while (0)
    TAKE(mean, SM, C); TAKE(invstd, SI, C); TAKE(rm, RM, C); TAKE(rv, RV, C);
    if (dy) { TAKE(dx, DX, numel); TAKE(dw, DW, C); TAKE(db, DB, C); }
#undef TAKE
    {
        const size_t es = bnorm_dtype_size(dt), ps = bnorm_dtype_size(pd);
        r->nbytes = (size_t)numel * es * 2 + (size_t)C * ps * 6 + bnorm_relu_mask_size(&d);
        r->bytes = malloc(r->nbytes);
        unsigned char *p = r->bytes;
#define COPY(buf, n) do { memcpy(p, buf.p, (size_t)(n)); p += (n); } while (0)
        COPY(Y, (size_t)numel * es); COPY(SM, C * ps); COPY(SI, C * ps); COPY(RM, C * ps); COPY(RV, C * ps);
        if (relu) COPY(MASK, bnorm_relu_mask_size(&d));
        if (dy) { COPY(DX, (size_t)numel * es); COPY(DW, C * ps); COPY(DB, C * ps); }
#undef COPY
        r->nbytes = (size_t)(p - r->bytes);
    }
out:
    th_free(&X); th_free(&Y); th_free(&DY); th_free(&DX); th_free(&W); th_free(&B); th_free(&RM); th_free(&RV);
    th_free(&SM); th_free(&SI); th_free(&DW); th_free(&DB); th_free(&MASK);
    free(tmp);
    return ok;
}

static double relerr(double got, double want) { return fabs(got - want) / fabs(want); }

static const shape hard_shapes[] = {
    {2, {3000, 3}},          {3, {16, 5, 70}},        {4, {4, 2, 12, 13}},
    {5, {2, 17, 3, 5, 7}},   {4, {3, 1, 40, 41}},     {3, {600, 16, 2}},
};
enum { N_HARD_SHAPES = sizeof hard_shapes / sizeof hard_shapes[0] };

/* Large mean, tiny variance. Each channel gets one of several centres and spreads. */
static void test_large_mean(bnorm_dtype dt, double tol_var) {
    static const double centre[] = {1e4, 1e5, -3e4, 1e6, 1e4, 2.5e3};
    static const double spread[] = {1.0, 0.01, 0.1, 1.0, 1e-2, 1e-3};
    for (int si = 0; si < N_HARD_SHAPES; si++) {
        const shape *s = &hard_shapes[si];
        const int64_t N = s->dims[0], C = s->dims[1], S = shape_S(s), numel = N * C * S, m = N * S;
        for (int layout = 0; layout < 2; layout++) {
            ref_shape sh = {N, C, S, layout};
            double *x = malloc(sizeof(double) * (size_t)numel), *yr = malloc(sizeof(double) * (size_t)numel);
            double *mean = malloc(sizeof(double) * (size_t)C), *var = malloc(sizeof(double) * (size_t)C);
            double *inv = malloc(sizeof(double) * (size_t)C);
            for (int64_t c = 0; c < C; c++) {
                int k = (int)((c + si) % 6);
                double ce = centre[k];
                for (int64_t n = 0; n < N; n++)
                    for (int64_t i = 0; i < S; i++) x[ref_index(&sh, n, c, i)] = ce + spread[k] * th_normal();
            }
            th_round(dt, x, numel);
            ref_forward_train(&sh, x, NULL, NULL, NULL, 0, 0.0, yr, mean, var, inv);
            for (int threads = 1; threads <= 4; threads++) {
                bnorm_set_num_threads(threads);
                run r;
                if (!run_train(dt, s, layout, x, NULL, NULL, 0.0, 1.0, 0, NULL, &r)) continue;
                double worst_inv = 0, worst_rv = 0, worst_mean = 0;
                for (int64_t c = 0; c < C; c++) {
                    double v_inv = 1.0 / (r.invstd[c] * r.invstd[c]);
                    double v_rv = r.rv[c] * (double)(m - 1) / (double)m;
                    worst_inv = fmax(worst_inv, relerr(v_inv, var[c]));
                    worst_rv = fmax(worst_rv, relerr(v_rv, var[c]));
                    worst_mean = fmax(worst_mean, fmax(relerr(r.mean[c], mean[c]), relerr(r.rm[c], mean[c])));
                }
                const char *isa = bnorm_isa_name(bnorm_get_isa());
                CHECK(worst_inv <= tol_var, "%s %s shape %d layout %d threads %d: variance from save_invstd rel err %.3g",
                      isa, bnorm_dtype_name(dt), si, layout, threads, worst_inv);
                CHECK(worst_rv <= tol_var, "%s %s shape %d layout %d threads %d: variance from running_var rel err %.3g",
                      isa, bnorm_dtype_name(dt), si, layout, threads, worst_rv);
                CHECK(worst_mean <= (dt == BNORM_DTYPE_F64 ? 1e-13 : 1.2e-7),
                      "%s %s shape %d layout %d threads %d: mean rel err %.3g", isa, bnorm_dtype_name(dt), si, layout,
                      threads, worst_mean);
                /* the output too: x - mean must not lose the mean's low bits. Were the mean rounded to
                 * float32, y would be off by up to ulp(1e5)/0.01 ~ 0.8; with float64 data the inputs
                 * themselves carry a relative 1e-16 * |mean| / spread ~ 1e-9 */
                const double ytol = dt == BNORM_DTYPE_F64 ? 1e-7 : 1e-5;
                double e = th_err(r.y, yr, numel, ytol, ytol);
                CHECK(e <= 1, "%s %s shape %d layout %d threads %d: y err %.3g", isa, bnorm_dtype_name(dt), si, layout,
                      threads, e);
                run_free(&r);
            }
            free(x); free(yr); free(mean); free(var); free(inv);
        }
    }
}

/* Constant channels (every third one), with eps > 0 and eps = 0, forward and backward. */
static void test_constant(void) {
    static const double value[] = {1e4, 0.1, -7.5, 0.0, 3e-30};
    const shape shapes[] = {{3, {9, 6, 25}}, {2, {500, 4}}, {4, {2, 3, 5, 5}}, {4, {5, 7, 4, 4}}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const shape *s = &shapes[si];
        const int64_t N = s->dims[0], C = s->dims[1], S = shape_S(s), numel = N * C * S, m = N * S;
        for (int layout = 0; layout < 2; layout++)
            for (int ei = 0; ei < 2; ei++) {
                const double eps = ei ? 0.0 : 1e-5;
                ref_shape sh = {N, C, S, layout};
                double *x = malloc(sizeof(double) * (size_t)numel), *dy = malloc(sizeof(double) * (size_t)numel);
                double *yr = malloc(sizeof(double) * (size_t)numel), *dxr = malloc(sizeof(double) * (size_t)numel);
                double *w = malloc(sizeof(double) * (size_t)C), *b = malloc(sizeof(double) * (size_t)C);
                double *mean = malloc(sizeof(double) * (size_t)C), *var = malloc(sizeof(double) * (size_t)C);
                double *inv = malloc(sizeof(double) * (size_t)C), *dwr = malloc(sizeof(double) * (size_t)C);
                double *dbr = malloc(sizeof(double) * (size_t)C);
                for (int64_t c = 0; c < C; c++) {
                    w[c] = 0.5 + th_uniform();
                    b[c] = th_normal();
                    for (int64_t n = 0; n < N; n++)
                        for (int64_t i = 0; i < S; i++)
                            x[ref_index(&sh, n, c, i)] = c % 3 == 0 ? value[(c / 3 + si) % 5] : 2 + th_normal();
                }
                for (int64_t i = 0; i < numel; i++) dy[i] = th_normal();
                th_round(BNORM_DTYPE_F32, x, numel);
                th_round(BNORM_DTYPE_F32, dy, numel);
                th_round(BNORM_DTYPE_F32, w, C);
                th_round(BNORM_DTYPE_F32, b, C);
                ref_forward_train(&sh, x, w, b, NULL, 0, eps, yr, mean, var, inv);
                ref_backward(&sh, x, dy, w, mean, inv, 0, NULL, dxr, NULL, dwr, dbr);
                for (int threads = 1; threads <= 4; threads += 3) {
                    bnorm_set_num_threads(threads);
                    run r;
                    if (!run_train(BNORM_DTYPE_F32, s, layout, x, w, b, eps, 1.0, 0, dy, &r)) continue;
                    const char *isa = bnorm_isa_name(bnorm_get_isa());
                    long bad_y = 0, nan = 0;
                    for (int64_t i = 0; i < numel; i++) nan += isnan(r.y[i]) || isnan(r.dx[i]) ? 1 : 0;
                    for (int64_t c = 0; c < C; c += 3) {
                        for (int64_t n = 0; n < N; n++)
                            for (int64_t i = 0; i < S; i++) bad_y += r.y[ref_index(&sh, n, c, i)] != b[c];
                        CHECK(r.mean[c] == x[ref_index(&sh, 0, c, 0)], "%s constant channel %lld: mean %.9g", isa,
                              (long long)c, r.mean[c]);
                        CHECK(r.rv[c] == 0, "%s constant channel %lld: running_var %.9g, want 0", isa, (long long)c, r.rv[c]);
                        if (eps == 0)
                            CHECK(r.invstd[c] == 0, "%s eps=0 constant channel %lld: invstd %g, want 0", isa, (long long)c,
                                  r.invstd[c]);
                        else
                            CHECK(relerr(r.invstd[c], 1 / sqrt(eps)) < 1e-6, "%s constant channel: invstd %g", isa,
                                  r.invstd[c]);
                    }
                    CHECK(nan == 0, "%s shape %zu layout %d eps %g: %ld NaN in y/dx", isa, si, layout, eps, nan);
                    CHECK(bad_y == 0, "%s shape %zu layout %d eps %g threads %d: %ld outputs of constant channels != bias",
                          isa, si, layout, eps, threads, bad_y);
                    CHECK(th_err(r.y, yr, numel, 1e-5, 1e-5) <= 1, "%s shape %zu layout %d eps %g: y", isa, si, layout, eps);
                    /* dx: scaled by its largest terms (invstd = 316 for a constant channel with eps 1e-5) */
                    double big = 0;
                    for (int64_t i = 0; i < numel; i++) big = fmax(big, fabs(dxr[i]));
                    CHECK(th_err(r.dx, dxr, numel, 1e-5 * (1 + big), 1e-5) <= 1, "%s shape %zu layout %d eps %g: dx", isa,
                          si, layout, eps);
                    CHECK(th_err(r.dw, dwr, C, 1e-4, 1e-5) <= 1, "%s shape %zu eps %g: dweight", isa, si, eps);
                    CHECK(th_err(r.db, dbr, C, 1e-4, 1e-5) <= 1, "%s shape %zu eps %g: dbias", isa, si, eps);
                    run_free(&r);
                }
                (void)m;
                free(x); free(dy); free(yr); free(dxr); free(w); free(b); free(mean); free(var); free(inv);
                free(dwr); free(dbr);
            }
    }
}

/* NaN and Inf inputs: channel 1 holds a NaN, channel 2 two +Inf (one its first value), channel 3 both infinities, channels
 * 0 and 4 are ordinary. Training forward (with and without ReLU), training backward, inference. */
static void test_nan_inf(bnorm_dtype dt) {
    long inf_mean_bad = 0;
    char inf_mean_what[400] = "";
    /* the last: planes of 600 values, the channel schedule (lane sums) rather than the small-plane runs */
    const shape shapes[] = {{3, {8, 5, 7}}, {2, {40, 5}}, {4, {3, 5, 4, 5}}, {3, {4, 5, 600}}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const shape *s = &shapes[si];
        const int64_t N = s->dims[0], C = s->dims[1], S = shape_S(s), numel = N * C * S;
        for (int layout = 0; layout < 2; layout++)
            for (int relu = 0; relu < 2; relu++) {
                ref_shape sh = {N, C, S, layout};
                double *x = malloc(sizeof(double) * (size_t)numel), *dy = malloc(sizeof(double) * (size_t)numel);
                double *yr = malloc(sizeof(double) * (size_t)numel), *dxr = malloc(sizeof(double) * (size_t)numel);
                unsigned char *mask = malloc((size_t)numel);
                double mean[5], var[5], inv[5], dwr[5], dbr[5], w[5], b[5], rm[5], rv[5];
                for (int64_t i = 0; i < numel; i++) {
                    x[i] = 1 + th_normal();
                    dy[i] = th_normal();
                }
                for (int c = 0; c < 5; c++) {
                    w[c] = 0.5 + th_uniform();
                    b[c] = th_normal();
                }
                x[ref_index(&sh, N - 1, 1, S / 2)] = NAN;
                x[ref_index(&sh, N / 2, 2, 0)] = INFINITY;
                x[ref_index(&sh, 0, 2, 0)] = INFINITY; /* the channel's first value: the one-pass shift */
                x[ref_index(&sh, 0, 3, S - 1)] = INFINITY;
                x[ref_index(&sh, N - 1, 3, 0)] = -INFINITY;
                th_round(dt, x, numel);
                th_round(dt, dy, numel);
                th_round(bnorm_param_dtype(dt), w, 5);
                th_round(bnorm_param_dtype(dt), b, 5);
                ref_forward_train(&sh, x, w, b, NULL, relu, 1e-5, yr, mean, var, inv);
                for (int64_t i = 0; i < numel; i++) mask[i] = yr[i] > 0;
                ref_backward(&sh, x, dy, w, mean, inv, 0, relu ? mask : NULL, dxr, NULL, dwr, dbr);
                /* the reference's running statistics after one update with momentum 0.5 from 5.0 */
                for (int c = 0; c < 5; c++) {
                    rm[c] = 0.5 * 5.0 + 0.5 * mean[c];
                    rv[c] = 0.5 * 5.0 + 0.5 * var[c] * (double)(N * S) / (double)(N * S - 1);
                }
                const double tol = dt == BNORM_DTYPE_F64 ? 1e-10 : 2e-5;
                for (int threads = 1; threads <= 4; threads += 3) {
                    bnorm_set_num_threads(threads);
                    run r;
                    if (!run_train(dt, s, layout, x, w, b, 1e-5, 0.5, relu, dy, &r)) continue;
                    const char *isa = bnorm_isa_name(bnorm_get_isa());
                    char what[160];
                    snprintf(what, sizeof what, "%s %s shape %zu layout %d relu %d threads %d", isa,
                             bnorm_dtype_name(dt), si, layout, relu, threads);
                    CHECK(th_err(r.y, yr, numel, tol * 4, tol) <= 1, "%s: y (NaN positions or values)", what);
                    /* channels 0, 1, 3, 4: as the reference (NaN for the NaN and the +-Inf channels) */
                    for (int c = 0; c < 5; c++) {
                        if (c == 2) continue;
                        CHECK(th_err(&r.mean[c], &mean[c], 1, tol, tol) <= 1, "%s: save_mean[%d] = %g, want %g", what, c,
                              r.mean[c], mean[c]);
                        CHECK(th_err(&r.rm[c], &rm[c], 1, tol, tol) <= 1, "%s: running_mean[%d] = %g, want %g", what, c,
                              r.rm[c], rm[c]);
                    }
                    /* CORE BUG (reported): channel 2 holds +Inf values; its mean is +Inf in PyTorch and in the
                     * reference (sum / m), and running_mean becomes +Inf. The library's corrected two-pass
                     * mean r + s1/n gives NaN (s1 = Inf - Inf). */
                    if (!(r.mean[2] == INFINITY && r.rm[2] == INFINITY) && inf_mean_bad++ == 0)
                        snprintf(inf_mean_what, sizeof inf_mean_what, "%s: save_mean %g, running_mean %g", what,
                                 r.mean[2], r.rm[2]);
                    CHECK(th_err(r.rv, rv, C, tol, tol * 10) <= 1, "%s: running_var", what);
                    /* With the ReLU, the gradients go through the mask the library computed: where its z is
                       within rounding of 0 (|reference z| within y's tolerance) its bit may differ from the
                       reference's, legitimately, and one flipped bit moves dweight, dbias and the whole
                       channel's dx. Such a bit is taken from the library (y > 0 <=> z > 0) and the reference
                       backward redone; a flip anywhere else is an error. */
                    const double *gx = dxr, *gw = dwr, *gb = dbr;
                    double *dx2 = NULL, dw2[5], db2[5];
                    if (relu) {
                        unsigned char *m2 = malloc((size_t)numel);
                        long flips = 0, bad_flips = 0;
                        for (int64_t i = 0; i < numel; i++) {
                            m2[i] = r.y[i] > 0;
                            if (m2[i] != mask[i]) {
                                flips++;
                                if (!(yr[i] <= tol * 4 && fabs(r.y[i]) <= tol * 4)) bad_flips++;
                            }
                        }
                        CHECK(bad_flips == 0, "%s: %ld ReLU mask bits differ from the reference away from 0", what,
                              bad_flips);
                        if (flips) {
                            dx2 = malloc(sizeof(double) * (size_t)numel);
                            ref_backward(&sh, x, dy, w, mean, inv, 0, m2, dx2, NULL, dw2, db2);
                            gx = dx2;
                            gw = dw2;
                            gb = db2;
                        }
                        free(m2);
                    }
                    CHECK(th_err(r.dx, gx, numel, tol * 50, tol * 5) <= 1, "%s: dx", what);
                    CHECK(th_err(r.dw, gw, C, tol * 50, tol * 5) <= 1, "%s: dweight", what);
                    CHECK(th_err(r.db, gb, C, tol * 50, tol * 5) <= 1, "%s: dbias", what);
                    free(dx2);
                    /* the ordinary channels have no NaN at all */
                    long nan = 0;
                    for (int64_t n = 0; n < N; n++)
                        for (int64_t i = 0; i < S; i++)
                            for (int c = 0; c < 5; c += 4) {
                                int64_t k = ref_index(&sh, n, c, i);
                                nan += isnan(r.y[k]) || isnan(r.dx[k]);
                            }
                    CHECK(nan == 0, "%s: %ld NaN in ordinary channels", what, nan);
                    run_free(&r);
                }
                /* inference: only the NaN/Inf elements themselves are affected (Inf stays Inf, scaled) */
                {
                    bnorm_desc d = {.dtype = dt, .layout = (bnorm_layout)layout, .rank = s->rank};
                    for (int i = 0; i < s->rank; i++) d.dims[i] = s->dims[i];
                    const bnorm_dtype pd = bnorm_param_dtype(dt);
                    double erm[5] = {0.5, -1, 2, 0, 1}, erv[5] = {1, 2, 0.5, NAN, 3};
                    th_buf X = th_alloc(dt, numel, 0), Y = th_alloc(dt, numel, 0), RM = th_alloc(pd, C, 0);
                    th_buf RV = th_alloc(pd, C, 0), W = th_alloc(pd, C, 0), B = th_alloc(pd, C, 0);
                    th_store(&X, x); th_store(&RM, erm); th_store(&RV, erv); th_store(&W, w); th_store(&B, b);
                    bnorm_forward_args fa = {.desc = d, .x = X.p, .y = Y.p, .weight = W.p, .bias = B.p, .eps = 1e-5,
                                             .running_mean = RM.p, .running_var = RV.p, .relu = relu};
                    CHECK_STATUS(bnorm_forward(&fa), BNORM_STATUS_OK);
                    ref_forward_eval(&sh, x, w, b, erm, erv, 1e-5, NULL, relu, yr);
                    th_load(&Y, dxr);
                    CHECK(th_err(dxr, yr, numel, tol * 4, tol) <= 1, "%s shape %zu layout %d relu %d: inference y",
                          bnorm_dtype_name(dt), si, layout, relu);
                    th_free(&X); th_free(&Y); th_free(&RM); th_free(&RV); th_free(&W); th_free(&B);
                }
                /* backward with global statistics: dx = dy * w * invstd does not involve x, so a NaN or Inf in
                 * x leaves dx finite (PyTorch's eval backward is that product); dweight is NaN in those
                 * channels, as the reference's sum of dy * (x - mean) * invstd */
                {
                    bnorm_desc d = {.dtype = dt, .layout = (bnorm_layout)layout, .rank = s->rank};
                    for (int i = 0; i < s->rank; i++) d.dims[i] = s->dims[i];
                    const bnorm_dtype pd = bnorm_param_dtype(dt);
                    double erm[5] = {0.5, -1, 2, 0, 1}, erv[5] = {1, 2, 0.5, 4, 3}, einv[5], dw[5], db[5];
                    for (int c = 0; c < 5; c++) einv[c] = 1 / sqrt(erv[c] + 1e-5);
                    th_buf X = th_alloc(dt, numel, 0), DY = th_alloc(dt, numel, 0), DX = th_alloc(dt, numel, 0);
                    th_buf RM = th_alloc(pd, C, 0), RV = th_alloc(pd, C, 0), W = th_alloc(pd, C, 0);
                    th_buf DW = th_alloc(pd, C, 0), DB = th_alloc(pd, C, 0);
                    th_store(&X, x); th_store(&DY, dy); th_store(&RM, erm); th_store(&RV, erv); th_store(&W, w);
                    bnorm_backward_args ba = {.desc = d, .x = X.p, .dy = DY.p, .dx = DX.p, .weight = W.p, .mean = RM.p,
                                              .var = RV.p, .eps = 1e-5, .use_global_stats = 1, .dweight = DW.p,
                                              .dbias = DB.p};
                    CHECK_STATUS(bnorm_backward(&ba), BNORM_STATUS_OK);
                    ref_backward(&sh, x, dy, w, erm, einv, 1, NULL, dxr, NULL, dwr, dbr);
                    th_load(&DX, yr);
                    th_load(&DW, dw);
                    th_load(&DB, db);
                    long nonfinite = 0;
                    for (int64_t i = 0; i < numel; i++) nonfinite += !isfinite(yr[i]);
                    CHECK(nonfinite == 0, "%s shape %zu layout %d: eval backward, %ld non-finite dx",
                          bnorm_dtype_name(dt), si, layout, nonfinite);
                    CHECK(th_err(yr, dxr, numel, tol * 4, tol) <= 1, "%s shape %zu layout %d: eval backward dx",
                          bnorm_dtype_name(dt), si, layout);
                    CHECK(th_err(dw, dwr, C, tol * 50, tol * 5) <= 1 && isnan(dw[1]) && !isfinite(dw[2]) &&
                              isfinite(dw[0]) && isfinite(dw[4]),
                          "%s shape %zu layout %d: eval backward dweight", bnorm_dtype_name(dt), si, layout);
                    CHECK(th_err(db, dbr, C, tol * 50, tol * 5) <= 1, "%s shape %zu layout %d: eval backward dbias",
                          bnorm_dtype_name(dt), si, layout);
                    th_free(&X); th_free(&DY); th_free(&DX); th_free(&RM); th_free(&RV); th_free(&W);
                    th_free(&DW); th_free(&DB);
                }
                free(x); free(dy); free(yr); free(dxr); free(mask);
            }
    }
    CHECK(inf_mean_bad == 0, "[CORE BUG] %ld cases: the mean of a channel holding one +Inf must be +Inf (PyTorch, "
          "reference), first: %s", inf_mean_bad, inf_mean_what);
}

/* Same input, same thread count: identical bytes from forward and backward over repeated runs. */
static void test_reproducible(void) {
    const shape shapes[] = {{3, {64, 3, 200}}, {2, {5000, 7}}, {4, {8, 20, 9, 9}}, {4, {16, 2, 17, 19}}};
    const bnorm_dtype dts[] = {BNORM_DTYPE_F32, BNORM_DTYPE_F64, BNORM_DTYPE_F16, BNORM_DTYPE_BF16};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const shape *s = &shapes[si];
        const int64_t N = s->dims[0], C = s->dims[1], S = shape_S(s), numel = N * C * S;
        double *x = malloc(sizeof(double) * (size_t)numel), *dy = malloc(sizeof(double) * (size_t)numel);
        double *w = malloc(sizeof(double) * (size_t)C), *b = malloc(sizeof(double) * (size_t)C);
        for (int64_t i = 0; i < numel; i++) {
            x[i] = 100 + 3 * th_normal();
            dy[i] = th_normal();
        }
        for (int64_t c = 0; c < C; c++) {
            w[c] = th_normal();
            b[c] = th_normal();
        }
        bnorm_dtype dt = dts[si % 4];
        th_round(dt, x, numel);
        th_round(dt, dy, numel);
        for (int layout = 0; layout < 2; layout++)
            for (int threads = 1; threads <= 4; threads++) {
                bnorm_set_num_threads(threads);
                int relu = (threads + layout) % 2;
                run first;
                if (!run_train(dt, s, layout, x, w, b, 1e-5, 0.1, relu, dy, &first)) continue;
                for (int rep = 0; rep < 3; rep++) {
                    run again;
                    if (!run_train(dt, s, layout, x, w, b, 1e-5, 0.1, relu, dy, &again)) break;
                    CHECK(again.nbytes == first.nbytes && memcmp(again.bytes, first.bytes, first.nbytes) == 0,
                          "%s %s shape %zu layout %d threads %d: run %d differs from the first",
                          bnorm_isa_name(bnorm_get_isa()), bnorm_dtype_name(dt), si, layout, threads, rep + 2);
                    run_free(&again);
                }
                run_free(&first);
            }
        free(x); free(dy); free(w); free(b);
    }
}

/* float16: a batch whose sum overflows float16 (3e4 + ...), and values at the float16 limits;
 * bfloat16: a large mean with a comparatively small spread. Statistics within 1e-6 of the reference. */
static void test_low_precision(void) {
    /* 1. large activations */
    for (int bf = 0; bf < 2; bf++) {
        const bnorm_dtype dt = bf ? BNORM_DTYPE_BF16 : BNORM_DTYPE_F16;
        const shape s = {3, {64, 4, 33}};
        const int64_t N = 64, C = 4, S = 33, numel = N * C * S, m = N * S;
        for (int layout = 0; layout < 2; layout++) {
            ref_shape sh = {N, C, S, layout};
            double *x = malloc(sizeof(double) * (size_t)numel), *yr = malloc(sizeof(double) * (size_t)numel);
            double mean[4], var[4], inv[4];
            for (int64_t c = 0; c < C; c++)
                for (int64_t n = 0; n < N; n++)
                    for (int64_t i = 0; i < S; i++)
                        x[ref_index(&sh, n, c, i)] = (c % 2 ? -3e4 : 3e4) + (bf ? 500.0 : 100.0 * (double)(c + 1)) * th_normal();
            th_round(dt, x, numel);
            ref_forward_train(&sh, x, NULL, NULL, NULL, 0, 0.0, yr, mean, var, inv);
            th_round(dt, yr, numel);
            for (int threads = 1; threads <= 4; threads += 3) {
                bnorm_set_num_threads(threads);
                run r;
                if (!run_train(dt, &s, layout, x, NULL, NULL, 0.0, 1.0, 0, NULL, &r)) continue;
                double wm = 0, wv = 0, wr = 0;
                for (int c = 0; c < 4; c++) {
                    wm = fmax(wm, relerr(r.mean[c], mean[c]));
                    wv = fmax(wv, relerr(1 / (r.invstd[c] * r.invstd[c]), var[c]));
                    wr = fmax(wr, relerr(r.rv[c] * (double)(m - 1) / (double)m, var[c]));
                }
                const char *isa = bnorm_isa_name(bnorm_get_isa());
                CHECK(wm <= 1.2e-7, "%s %s layout %d threads %d: mean rel err %.3g", isa, bnorm_dtype_name(dt), layout,
                      threads, wm);
                CHECK(wv <= 1e-6 && wr <= 1e-6, "%s %s layout %d threads %d: var rel err %.3g / %.3g", isa,
                      bnorm_dtype_name(dt), layout, threads, wv, wr);
                double tol = bf ? 2e-2 : 4e-3;
                CHECK(th_err(r.y, yr, numel, tol * 4, tol) <= 1, "%s %s layout %d: y", isa, bnorm_dtype_name(dt), layout);
                run_free(&r);
            }
            free(x); free(yr);
        }
    }
    /* 2. float16 limits: +-65504, values just below 65504, subnormals (eps = 0), and outputs that
     *    overflow to Inf (weight 3e4) */
    {
        const bnorm_dtype dt = BNORM_DTYPE_F16;
        const shape s = {3, {32, 5, 9}};
        const int64_t N = 32, C = 5, S = 9, numel = N * C * S, m = N * S;
        for (int layout = 0; layout < 2; layout++) {
            ref_shape sh = {N, C, S, layout};
            double *x = malloc(sizeof(double) * (size_t)numel), *yr = malloc(sizeof(double) * (size_t)numel);
            double mean[5], var[5], inv[5], w[5] = {1, 0.5, 2, 1, 3e4}, b[5] = {0, 1, -1, 0.25, 0};
            for (int64_t n = 0; n < N; n++)
                for (int64_t i = 0; i < S; i++) {
                    x[ref_index(&sh, n, 0, i)] = th_uniform() < 0.5 ? 65504.0 : -65504.0;
                    x[ref_index(&sh, n, 1, i)] = 65504.0 - 32.0 * (double)th_randint(0, 15);
                    x[ref_index(&sh, n, 2, i)] = ldexp((double)th_randint(1, 1023), -24);
                    x[ref_index(&sh, n, 3, i)] = th_uniform() < 0.3 ? -65504.0 : ldexp(1.0, -14) * th_uniform();
                    x[ref_index(&sh, n, 4, i)] = th_normal();
                }
            x[ref_index(&sh, 0, 2, 0)] = ldexp(1.0, -24); /* ensure not constant */
            x[ref_index(&sh, 1, 2, 0)] = ldexp(1023.0, -24);
            th_round(dt, x, numel);
            ref_forward_train(&sh, x, w, b, NULL, 0, 0.0, yr, mean, var, inv);
            th_round(dt, yr, numel);
            for (int threads = 1; threads <= 4; threads += 3) {
                bnorm_set_num_threads(threads);
                run r;
                if (!run_train(dt, &s, layout, x, w, b, 0.0, 1.0, 0, NULL, &r)) continue;
                const char *isa = bnorm_isa_name(bnorm_get_isa());
                for (int c = 0; c < 5; c++) {
                    double vm = relerr(1 / (r.invstd[c] * r.invstd[c]), var[c]);
                    double vr = relerr(r.rv[c] * (double)(m - 1) / (double)m, var[c]);
                    double em = fabs(r.mean[c] - mean[c]) / fmax(fabs(mean[c]), sqrt(var[c]));
                    CHECK(vm <= 1e-6 && vr <= 1e-6 && em <= 1.2e-7,
                          "%s float16 limits layout %d threads %d channel %d: mean err %.3g var rel err %.3g / %.3g", isa,
                          layout, threads, c, em, vm, vr);
                }
                long infs = 0;
                for (int64_t i = 0; i < numel; i++) infs += isinf(r.y[i]) != 0; /* glibc's isinf gives -1 for -Inf */
                double ymax = 0;
                for (int64_t i = 0; i < numel; i++) if (isfinite(r.y[i])) ymax = fmax(ymax, fabs(r.y[i]));
                CHECK(infs > 0, "float16 limits layout %d: expected some outputs to overflow to Inf (largest finite %g)",
                      layout, ymax);
                CHECK(th_err(r.y, yr, numel, 4e-3 * 4, 4e-3) <= 1, "%s float16 limits layout %d threads %d: y", isa, layout,
                      threads);
                run_free(&r);
            }
            free(x); free(yr);
        }
    }
}

int main(void) {
    th_seed(3);
    const int isa_max = (int)bnorm_get_isa();
    for (int isa = 0; isa <= isa_max; isa++) {
        if (bnorm_set_isa((bnorm_isa)isa) != BNORM_STATUS_OK) continue;
        test_large_mean(BNORM_DTYPE_F32, 1e-6);
        test_large_mean(BNORM_DTYPE_F64, 1e-8);
        test_constant();
        test_nan_inf(BNORM_DTYPE_F32);
        test_nan_inf(BNORM_DTYPE_F64);
        test_reproducible();
        test_low_precision();
    }
    bnorm_set_isa((bnorm_isa)isa_max);
    bnorm_set_num_threads(0);
    return th_finish("test_hard");
}
