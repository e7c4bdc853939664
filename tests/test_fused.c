/*
 * test_fused.c - the fused ReLU(BN(x) + addend) at its edges: pre-activations that land exactly on
 * z == 0 (the gradient must not pass: OneFlow's strict z > 0), and NaN in x or in the addend (NaN
 * propagates through the ReLU as torch.relu does, and passes no gradient). Both layouts, float32 and
 * float64, 1 and 3 threads, against the float64 reference with the mask it derives from z.
 */
#include "harness.h"
#include "ref.h"

/* Runs forward (training) + backward and compares with the reference; returns y for extra checks. */
static void run(const char *what, bnorm_dtype dt, int layout, int64_t N, int64_t C, int64_t S, const double *x,
                const double *add, const double *w, const double *b, double eps, const double *dy, double *y_out) {
    const int64_t n = N * C * S;
    ref_shape sh = {N, C, S, layout};
    bnorm_desc d = {.dtype = dt, .layout = (bnorm_layout)layout, .rank = S > 1 ? 3 : 2, .dims = {N, C, S}};
    const bnorm_dtype pd = bnorm_param_dtype(dt);
    /* the reference's z decides the mask */
    double *yr = malloc(sizeof(double) * (size_t)n), *z = malloc(sizeof(double) * (size_t)n);
    double mean[8], var[8], inv[8];
    ref_forward_train(&sh, x, w, b, add, 0, eps, z, mean, var, inv);
    ref_forward_train(&sh, x, w, b, add, 1, eps, yr, NULL, NULL, NULL);
    unsigned char *mask = malloc((size_t)n);
    for (int64_t i = 0; i < n; i++) mask[i] = z[i] > 0;

    th_buf X = th_alloc(dt, n, 0), A = th_alloc(dt, n, 0), Y = th_alloc(dt, n, 0), DY = th_alloc(dt, n, 0);
    th_buf DX = th_alloc(dt, n, 0), DA = th_alloc(dt, n, 0);
    th_buf W = th_alloc(pd, C, 0), B = th_alloc(pd, C, 0), SM = th_alloc(pd, C, 0), SI = th_alloc(pd, C, 0);
    th_buf DW = th_alloc(pd, C, 0), DB = th_alloc(pd, C, 0);
    th_store(&X, x); th_store(&A, add); th_store(&DY, dy); th_store(&W, w); th_store(&B, b);
    void *M = malloc(bnorm_relu_mask_size(&d));
    bnorm_forward_args fa = {.desc = d, .x = X.p, .y = Y.p, .weight = W.p, .bias = B.p, .eps = eps, .training = 1,
                             .save_mean = SM.p, .save_invstd = SI.p, .addend = A.p, .relu = 1, .relu_mask = M};
    CHECK_STATUS(bnorm_forward(&fa), BNORM_STATUS_OK);
    double *got = malloc(sizeof(double) * (size_t)n);
    th_load(&Y, got);
    CHECK(th_err(got, yr, n, 1e-6, 1e-6) <= 1, "%s: y (NaN positions must match too)", what);
    memcpy(y_out, got, sizeof(double) * (size_t)n);

    bnorm_backward_args ba = {.desc = d, .x = X.p, .dy = DY.p, .dx = DX.p, .weight = W.p, .mean = SM.p,
                              .invstd = SI.p, .relu_mask = M, .daddend = DA.p, .dweight = DW.p, .dbias = DB.p};
    CHECK_STATUS(bnorm_backward(&ba), BNORM_STATUS_OK);
    double *dxr = malloc(sizeof(double) * (size_t)n), *dar = malloc(sizeof(double) * (size_t)n), dwr[8], dbr[8];
    ref_backward(&sh, x, dy, w, mean, inv, 0, mask, dxr, dar, dwr, dbr);
    th_load(&DA, got);
    CHECK(th_err(got, dar, n, 0, 0) == 0, "%s: d_addend = dy where z > 0, else exactly 0", what);
    th_load(&DX, got);
    CHECK(th_err(got, dxr, n, 1e-5, 1e-5) <= 1, "%s: dx", what);
    double g[8];
    th_load(&DW, g);
    CHECK(th_err(g, dwr, C, 1e-5, 1e-5) <= 1, "%s: dweight", what);
    th_load(&DB, g);
    CHECK(th_err(g, dbr, C, 1e-5, 1e-5) <= 1, "%s: dbias", what);

    th_free(&X); th_free(&A); th_free(&Y); th_free(&DY); th_free(&DX); th_free(&DA);
    th_free(&W); th_free(&B); th_free(&SM); th_free(&SI); th_free(&DW); th_free(&DB);
    free(M); free(yr); free(z); free(mask); free(got); free(dxr); free(dar);
}

int main(void) {
    th_seed(7);
    const bnorm_dtype dts[] = {BNORM_DTYPE_F32, BNORM_DTYPE_F64};
    for (int di = 0; di < 2; di++)
        for (int layout = 0; layout < 2; layout++)
            for (int threads = 1; threads <= 3; threads += 2) {
                bnorm_set_num_threads(threads);
                char what[128];
                /* 1. z == 0 exactly: channel 0 holds -1, 1, -1, 1 (mean 0, var 1, eps 0: xhat = x), w 1, b 0,
                 *    addend -xhat at two places (z = 0), other values non-zero; channel 1 is constant with
                 *    eps 0 (invstd 0: BN gives the bias 0) and addend 0 (z = 0 everywhere) but for one 2.5. */
                const int64_t N = 4, C = 2, S = 1;
                double x[8], add[8], dy[8], y[8], w[2] = {1, 1}, b[2] = {0, 0};
                const double x0[4] = {-1, 1, -1, 1}, a0[4] = {1, -1, 0.5, -2};
                const double a1[4] = {0, 0, 2.5, 0};
                ref_shape sh = {N, C, S, layout};
                for (int64_t i = 0; i < N; i++) {
                    x[ref_index(&sh, i, 0, 0)] = x0[i];
                    add[ref_index(&sh, i, 0, 0)] = a0[i];
                    x[ref_index(&sh, i, 1, 0)] = 3.0;
                    add[ref_index(&sh, i, 1, 0)] = a1[i];
                }
                for (int i = 0; i < 8; i++) dy[i] = 1 + th_uniform();
                th_round(dts[di], dy, 8);
                snprintf(what, sizeof what, "z == 0, %s, layout %d, %d threads", bnorm_dtype_name(dts[di]), layout, threads);
                run(what, dts[di], layout, N, C, S, x, add, w, b, 0.0, dy, y);
                int zeros = 0;
                for (int i = 0; i < 8; i++) zeros += y[i] == 0 && !signbit(y[i]);
                /* channel 0: z = 0, 0, -0.5, -1; channel 1: z = 0, 0, 2.5, 0 */
                CHECK(zeros == 7, "%s: %d of 8 outputs are +0, want 7", what, zeros);

                /* 2. NaN in x (channel 0 of a 3-channel tensor) and in the addend (one element of channel 2) */
                const int64_t N2 = 3, C2 = 3, S2 = 5, n2 = N2 * C2 * S2;
                double x2[45], add2[45], dy2[45], y2[45], w2[3], b2[3];
                for (int i = 0; i < n2; i++) {
                    x2[i] = th_normal();
                    add2[i] = th_normal();
                    dy2[i] = th_normal();
                }
                th_round(dts[di], dy2, n2);
                for (int c = 0; c < 3; c++) {
                    w2[c] = 0.5 + th_uniform();
                    b2[c] = th_normal();
                }
                ref_shape sh2 = {N2, C2, S2, layout};
                x2[ref_index(&sh2, 1, 0, 3)] = NAN;
                add2[ref_index(&sh2, 2, 2, 1)] = NAN;
                th_round(dts[di], x2, n2);
                th_round(dts[di], add2, n2);
                snprintf(what, sizeof what, "NaN, %s, layout %d, %d threads", bnorm_dtype_name(dts[di]), layout, threads);
                run(what, dts[di], layout, N2, C2, S2, x2, add2, w2, b2, 1e-5, dy2, y2);
                int nan0 = 0, nan_other = 0;
                for (int64_t i = 0; i < N2; i++)
                    for (int64_t s = 0; s < S2; s++) {
                        nan0 += isnan(y2[ref_index(&sh2, i, 0, s)]);
                        nan_other += isnan(y2[ref_index(&sh2, i, 1, s)]) + isnan(y2[ref_index(&sh2, i, 2, s)]);
                    }
                CHECK(nan0 == N2 * S2, "%s: a NaN in x makes its whole channel NaN (%d of %lld)", what, nan0,
                      (long long)(N2 * S2));
                CHECK(nan_other == 1, "%s: a NaN addend makes exactly its own output NaN (%d)", what, nan_other);
            }
    bnorm_set_num_threads(0);
    return th_finish("test_fused");
}
