/*
 * test_large.c - the streaming-store paths (outputs of 16 MiB or more are written with non-temporal
 * stores from a staging buffer) against the float64 reference. The other tests use small tensors, so
 * they never reach these paths. float32, 2 threads, the best ISA of the machine; shapes: NCHW with a
 * large odd plane (staging chunk tails), NCHW with 7x7 planes (runs of planes staged and streamed
 * whole), NHWC with an odd C, and rank 2. Each case runs a forward and the matching backward: the
 * training pair (plain, or fused add + ReLU with its mask and d_addend) or inference with the eval
 * backward; between them the shapes cover both layouts for each.
 * Pointers are misaligned by 4 bytes in some cases so the unaligned heads and tails are used.
 * Also (small tensors): the one-pass statistics' worst case, an outlier as the first value of each
 * plane / row block, against the reference variance.
 */
#include "harness.h"
#include "ref.h"

static const double tol = 2e-5; /* float32: about one unit in the last place, as test_functional */

typedef struct lcase {
    int layout, rank;
    int64_t dims[4];
    int misalign;
} lcase;

enum { MODE_TRAIN, MODE_FUSED, MODE_INFER };

static void run_case(const lcase *t, int mode, const double *x, const double *add, const double *dy,
                     const double *w, const double *b, const double *rm, const double *rv, double *work[5]) {
    char name[160];
    snprintf(name, sizeof name, "%s rank %d dims (%lld,%lld,%lld,%lld) misalign %d mode %s", t->layout ? "NHWC" : "NCHW",
             t->rank, (long long)t->dims[0], (long long)t->dims[1], (long long)t->dims[2], (long long)t->dims[3],
             t->misalign, mode == MODE_TRAIN ? "train" : mode == MODE_FUSED ? "fused" : "infer");
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = (bnorm_layout)t->layout, .rank = t->rank};
    int64_t S = 1;
    for (int i = 0; i < t->rank; i++) d.dims[i] = t->dims[i];
    for (int i = 2; i < t->rank; i++) S *= t->dims[i];
    const int64_t N = t->dims[0], C = t->dims[1], numel = N * C * S;
    ref_shape sh = {N, C, S, t->layout == 1};
    const int training = mode != MODE_INFER, fused = mode == MODE_FUSED;
    double *yr = work[0], *got = work[1], *dxr = work[2], *dar = work[3];
    unsigned char *mask = (unsigned char *)work[4];
    double *mean = malloc(sizeof(double) * (size_t)C * 6), *var = mean + C, *inv = var + C, *tmp = inv + C;
    double *dwr = tmp + C, *dbr = dwr + C;
    const double eps = 1e-5;

    th_buf X = th_alloc(BNORM_DTYPE_F32, numel, t->misalign), Y = th_alloc(BNORM_DTYPE_F32, numel, t->misalign);
    th_buf A = th_alloc(BNORM_DTYPE_F32, numel, t->misalign), DY = th_alloc(BNORM_DTYPE_F32, numel, t->misalign);
    th_buf DX = th_alloc(BNORM_DTYPE_F32, numel, t->misalign), DA = th_alloc(BNORM_DTYPE_F32, numel, t->misalign);
    th_buf W = th_alloc(BNORM_DTYPE_F32, C, 0), B = th_alloc(BNORM_DTYPE_F32, C, 0);
    th_buf RM = th_alloc(BNORM_DTYPE_F32, C, 0), RV = th_alloc(BNORM_DTYPE_F32, C, 0);
    th_buf SM = th_alloc(BNORM_DTYPE_F32, C, 0), SI = th_alloc(BNORM_DTYPE_F32, C, 0);
    th_buf DW = th_alloc(BNORM_DTYPE_F32, C, 0), DB = th_alloc(BNORM_DTYPE_F32, C, 0);
    th_buf MASK = th_alloc(BNORM_DTYPE_BF16, (int64_t)bnorm_relu_mask_size(&d) / 2 + 1, 0);
    th_store(&X, x);
    th_store(&DY, dy);
    if (fused) th_store(&A, add);
    th_store(&W, w);
    th_store(&B, b);
    th_store(&RM, rm);
    th_store(&RV, rv);

    bnorm_forward_args fa = {.desc = d, .x = X.p, .y = Y.p, .weight = W.p, .bias = B.p, .eps = eps,
                             .training = training, .running_mean = RM.p, .running_var = RV.p, .momentum = 0.1,
                             .save_mean = training ? SM.p : NULL, .save_invstd = training ? SI.p : NULL,
                             .addend = fused ? A.p : NULL, .relu = fused, .relu_mask = fused ? MASK.p : NULL};
    bnorm_status st = bnorm_forward(&fa);
    CHECK(st == BNORM_STATUS_OK, "%s: forward: %s", name, bnorm_last_error());
    if (st != BNORM_STATUS_OK) goto done;
    if (training) {
        ref_forward_train(&sh, x, w, b, fused ? add : NULL, fused, eps, yr, mean, var, inv);
    } else {
        ref_forward_eval(&sh, x, w, b, rm, rv, eps, NULL, 0, yr);
        for (int64_t c = 0; c < C; c++) {
            mean[c] = rm[c];
            inv[c] = 1 / sqrt(rv[c] + eps);
        }
    }
    th_load(&Y, got);
    CHECK(th_close_scaled(got, yr, numel, tol, 1.0), "%s: y differs from the reference", name);
    if (training) {
        th_load(&SM, tmp);
        CHECK(th_close_scaled(tmp, mean, C, tol, 1.0), "%s: save_mean", name);
        th_load(&SI, tmp);
        CHECK(th_close_scaled(tmp, inv, C, tol * 10, 1.0), "%s: save_invstd", name);
        const double m = (double)(N * S);
        for (int64_t c = 0; c < C; c++) dwr[c] = 0.9 * rv[c] + 0.1 * var[c] * m / (m - 1);
        th_load(&RV, tmp);
        CHECK(th_close_scaled(tmp, dwr, C, tol * 10, 1.0), "%s: running_var", name);
    }
    for (int64_t i = 0; i < numel; i++) mask[i] = got[i] > 0;

    bnorm_backward_args ba = {.desc = d, .x = X.p, .dy = DY.p, .dx = DX.p, .weight = W.p,
                              .mean = training ? SM.p : RM.p, .invstd = training ? SI.p : NULL,
                              .var = training ? NULL : RV.p, .eps = eps, .use_global_stats = !training,
                              .relu_mask = fused ? MASK.p : NULL, .daddend = fused ? DA.p : NULL,
                              .dweight = DW.p, .dbias = DB.p};
    st = bnorm_backward(&ba);
    CHECK(st == BNORM_STATUS_OK, "%s: backward: %s", name, bnorm_last_error());
    if (st != BNORM_STATUS_OK) goto done;
    ref_backward(&sh, x, dy, w, mean, inv, !training, fused ? mask : NULL, dxr, dar, dwr, dbr);
    th_load(&DX, got);
    double wi = 0;
    for (int64_t c = 0; c < C; c++) wi = fmax(wi, fabs(w[c] * inv[c]));
    CHECK(th_close_scaled(got, dxr, numel, tol * 5, th_maxabs(dy, numel) * 3 * wi), "%s: dx differs from the reference", name);
    if (fused) {
        th_load(&DA, got);
        CHECK(th_close_scaled(got, dar, numel, tol, 1.0), "%s: daddend", name);
    }
    /* dweight/dbias sum m values: scale by the sum of magnitudes they add up */
    const double msum = sqrt((double)(N * S)) * 4;
    th_load(&DW, tmp);
    CHECK(th_close_scaled(tmp, dwr, C, tol * 5, msum), "%s: dweight", name);
    th_load(&DB, tmp);
    CHECK(th_close_scaled(tmp, dbr, C, tol * 5, msum), "%s: dbias", name);
done:
    th_free(&X); th_free(&Y); th_free(&A); th_free(&DY); th_free(&DX); th_free(&DA);
    th_free(&W); th_free(&B); th_free(&RM); th_free(&RV); th_free(&SM); th_free(&SI); th_free(&DW); th_free(&DB);
    th_free(&MASK);
    free(mean);
}

static void run_shape(const lcase *t, int modes) {
    int64_t S = 1;
    for (int i = 2; i < t->rank; i++) S *= t->dims[i];
    const int64_t N = t->dims[0], C = t->dims[1], numel = N * C * S;
    ref_shape sh = {N, C, S, t->layout == 1};
    double *x = malloc(sizeof(double) * (size_t)numel), *add = malloc(sizeof(double) * (size_t)numel);
    double *dy = malloc(sizeof(double) * (size_t)numel);
    double *work[5];
    for (int i = 0; i < 5; i++) work[i] = malloc(sizeof(double) * (size_t)numel);
    double *w = malloc(sizeof(double) * (size_t)C * 4), *b = w + C, *rm = b + C, *rv = rm + C;
    for (int64_t c = 0; c < C; c++) {
        /* channel offsets large against the spread: the statistics must not cancel */
        double off = 20 * th_normal(), sc = 0.5 + 2 * th_uniform();
        for (int64_t n = 0; n < N; n++)
            for (int64_t s = 0; s < S; s++) x[ref_index(&sh, n, c, s)] = off + sc * th_normal();
        w[c] = 0.5 + th_uniform();
        b[c] = th_normal();
        rm[c] = off;
        rv[c] = sc * sc;
    }
    for (int64_t i = 0; i < numel; i++) {
        add[i] = 2 * th_uniform() - 1;
        dy[i] = 2 * th_uniform() - 1;
    }
    th_round(BNORM_DTYPE_F32, x, numel);
    th_round(BNORM_DTYPE_F32, add, numel);
    th_round(BNORM_DTYPE_F32, dy, numel);
    th_round(BNORM_DTYPE_F32, w, 4 * C);
    for (int mode = MODE_TRAIN; mode <= MODE_INFER; mode++)
        if (modes & (1 << mode)) run_case(t, mode, x, add, dy, w, b, rm, rv, work);
    free(x); free(add); free(dy); free(w);
    for (int i = 0; i < 5; i++) free(work[i]);
}

/* The one-pass statistics shift each plane (NCHW) or row block (NHWC) by its first value; the worst
 * case for that is an outlier in first place. Large mean, unit spread, and the first value of every
 * plane / the first row 3000 standard deviations out: the variance must still match the float64
 * reference to 1e-6 (relative), as test_hard asks of large means. */
static void test_outlier_shift(int layout) {
    const int64_t N = 4, C = 17, S = 112 * 112, numel = N * C * S; /* C = 17: a 16-channel block and a tail */
    ref_shape sh = {N, C, S, layout};
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = (bnorm_layout)layout, .rank = 4, .dims = {N, C, 112, 112}};
    double *x = malloc(sizeof(double) * (size_t)numel), *yr = malloc(sizeof(double) * (size_t)numel);
    double mean[17], var[17], inv[17], got[17];
    for (int64_t c = 0; c < C; c++)
        for (int64_t n = 0; n < N; n++)
            for (int64_t s = 0; s < S; s++) x[ref_index(&sh, n, c, s)] = 1e4 * (double)(c % 5 + 1) + th_normal();
    for (int64_t c = 0; c < C; c++)
        for (int64_t n = 0; n < N; n++) x[ref_index(&sh, n, c, 0)] = 1e4 * (double)(c % 5 + 1) + 3000.0;
    th_round(BNORM_DTYPE_F32, x, numel);
    th_buf X = th_alloc(BNORM_DTYPE_F32, numel, 0), Y = th_alloc(BNORM_DTYPE_F32, numel, 0);
    th_buf SM = th_alloc(BNORM_DTYPE_F32, C, 0), SI = th_alloc(BNORM_DTYPE_F32, C, 0);
    th_store(&X, x);
    bnorm_forward_args fa = {.desc = d, .x = X.p, .y = Y.p, .eps = 0, .training = 1, .momentum = 0.1,
                             .save_mean = SM.p, .save_invstd = SI.p};
    CHECK_STATUS(bnorm_forward(&fa), BNORM_STATUS_OK);
    ref_forward_train(&sh, x, NULL, NULL, NULL, 0, 0, yr, mean, var, inv);
    th_load(&SI, got);
    for (int64_t c = 0; c < C; c++) {
        double v = 1 / (got[c] * got[c]); /* float32 invstd: 2^-23 relative in v from the rounding */
        CHECK(fabs(v - var[c]) <= 1e-6 * var[c], "%s outlier first: channel %lld variance %.9g, reference %.9g",
              layout ? "NHWC" : "NCHW", (long long)c, v, var[c]);
    }
    th_load(&SM, got);
    for (int64_t c = 0; c < C; c++)
        CHECK(fabs(got[c] - mean[c]) <= 1e-6 * sqrt(var[c]) + fabs(mean[c]) * 6e-8, "outlier first: mean %.9g, reference %.9g",
              got[c], mean[c]);
    th_free(&X); th_free(&Y); th_free(&SM); th_free(&SI);
    free(x); free(yr);
}

int main(void) {
    th_seed(7);
    bnorm_set_num_threads(2);
    /* every shape moves more than 16 MiB of float32 output */
    const lcase shapes[] = {
        {0, 4, {9, 40, 131, 97}, 4},  /* NCHW, 12.7k-value planes (odd): chunk tails, unaligned */
        {0, 4, {1500, 60, 7, 7}, 4},  /* NCHW, 7x7 planes: run schedule, staged runs */
        {0, 4, {3, 160, 111, 97}, 4}, /* NCHW, blocks of 4 channels: the next block's statistics
                                         interleaved with the normalization piece by piece */
        {0, 4, {200, 110, 14, 14}, 4}, /* NCHW, 14x14 planes: run schedule with interleaved statistics */
        {1, 4, {40, 97, 33, 35}, 4},  /* NHWC, odd C */
        {0, 2, {40000, 110, 1, 1}, 0}, /* (N, C) */
    };
    /* every mode where the output is misaligned: the unmasked paths cut their chunks on output lines */
    const int all = 1 << MODE_FUSED | 1 << MODE_TRAIN | 1 << MODE_INFER;
    const int modes[] = {all, all, all, all, all, 1 << MODE_TRAIN};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) run_shape(&shapes[i], modes[i]);
    test_outlier_shift(0);
    test_outlier_shift(1);
    return th_finish("test_large");
}
