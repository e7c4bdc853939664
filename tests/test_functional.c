/*
 * test_functional.c - bnorm_forward / bnorm_backward against the float64 reference on random shapes:
 * ranks 2..5, both layouts, C around the SIMD widths, spatial sizes including 1, odd sizes, N = 1 and
 * large, misaligned pointers, in place, thread counts 1..4, every dtype, affine on/off, the fused
 * add + ReLU, training and inference forward, training and eval backward.
 */
#include "harness.h"
#include "ref.h"

static const int64_t th_channels[] = {1, 2, 3, 15, 16, 17, 32, 64, 1000};

/* Tolerance per dtype, stated once: about one unit in the last place of the output type. */
static double tol_of(bnorm_dtype dt) {
    switch (dt) {
    case BNORM_DTYPE_F64: return 1e-10;
    case BNORM_DTYPE_F32: return 2e-5;
    case BNORM_DTYPE_F16: return 4e-3;
    case BNORM_DTYPE_BF16: return 2e-2;
    }
    return 0;
}

static int close_enough(const double *got, const double *want, int64_t n, double tol) {
    return th_close_scaled(got, want, n, tol, 1.0);
}

typedef struct tcase {
    bnorm_dtype dtype;
    int layout, rank;
    int64_t dims[5];
    int affine, fused_add, relu, inplace, training, threads, misalign;
} tcase;

static void describe(const tcase *t, char *buf, size_t cap) {
    int k = snprintf(buf, cap, "%s %s dims=(", bnorm_dtype_name(t->dtype), t->layout ? "CL" : "CF");
    for (int i = 0; i < t->rank; i++) k += snprintf(buf + k, cap - (size_t)k, "%lld%s", (long long)t->dims[i], i + 1 < t->rank ? "," : "");
    snprintf(buf + k, cap - (size_t)k, ") affine=%d add=%d relu=%d inplace=%d train=%d threads=%d misalign=%d", t->affine,
             t->fused_add, t->relu, t->inplace, t->training, t->threads, t->misalign);
}

static void run_case(const tcase *t) {
    char name[256];
    describe(t, name, sizeof name);
    bnorm_desc d = {.dtype = t->dtype, .layout = (bnorm_layout)t->layout, .rank = t->rank};
    int64_t S = 1;
    for (int i = 0; i < t->rank; i++) d.dims[i] = t->dims[i];
    for (int i = 2; i < t->rank; i++) S *= t->dims[i];
    const int64_t N = t->dims[0], C = t->dims[1], numel = N * C * S;
    ref_shape sh = {N, C, S, t->layout == 1};
    const bnorm_dtype pd = bnorm_param_dtype(t->dtype);
    const double tol = tol_of(t->dtype);
    bnorm_set_num_threads(t->threads);

    double *x = malloc(sizeof(double) * (size_t)(numel + 1)), *add = malloc(sizeof(double) * (size_t)(numel + 1));
    double *dy = malloc(sizeof(double) * (size_t)(numel + 1)), *yr = malloc(sizeof(double) * (size_t)(numel + 1));
    double *got = malloc(sizeof(double) * (size_t)(numel + 1)), *dxr = malloc(sizeof(double) * (size_t)(numel + 1));
    double *dar = malloc(sizeof(double) * (size_t)(numel + 1));
    unsigned char *mask = malloc((size_t)numel + 1);
    double *w = malloc(sizeof(double) * (size_t)C), *b = malloc(sizeof(double) * (size_t)C);
    double *rm = malloc(sizeof(double) * (size_t)C), *rv = malloc(sizeof(double) * (size_t)C);
    double *mean = malloc(sizeof(double) * (size_t)C), *var = malloc(sizeof(double) * (size_t)C);
    double *inv = malloc(sizeof(double) * (size_t)C), *tmp = malloc(sizeof(double) * (size_t)C);
    double *dwr = malloc(sizeof(double) * (size_t)C), *dbr = malloc(sizeof(double) * (size_t)C);
    /* per-channel offsets and scales so channels differ */
    for (int64_t c = 0; c < C; c++) {
        double off = 3 * th_normal(), sc = 0.5 + 2 * th_uniform();
        for (int64_t n = 0; n < N; n++)
            for (int64_t s = 0; s < S; s++) x[ref_index(&sh, n, c, s)] = off + sc * th_normal();
        w[c] = 0.5 + th_uniform();
        b[c] = th_normal();
        rm[c] = th_normal();
        rv[c] = 0.5 + th_uniform();
    }
    for (int64_t i = 0; i < numel; i++) {
        add[i] = th_normal();
        dy[i] = th_normal();
    }
    th_round(t->dtype, x, numel);
    th_round(t->dtype, add, numel);
    th_round(t->dtype, dy, numel);
    th_round(pd, w, C);
    th_round(pd, b, C);
    th_round(pd, rm, C);
    th_round(pd, rv, C);
    const double eps = 1e-5;

    th_buf X = th_alloc(t->dtype, numel, t->misalign), Y = th_alloc(t->dtype, numel, t->misalign);
    th_buf A = th_alloc(t->dtype, numel, t->misalign), DY = th_alloc(t->dtype, numel, t->misalign);
    th_buf DX = th_alloc(t->dtype, numel, t->misalign), DA = th_alloc(t->dtype, numel, t->misalign);
    th_buf W = th_alloc(pd, C, 0), B = th_alloc(pd, C, 0), RM = th_alloc(pd, C, 0), RV = th_alloc(pd, C, 0);
    th_buf SM = th_alloc(pd, C, 0), SI = th_alloc(pd, C, 0), DW = th_alloc(pd, C, 0), DB = th_alloc(pd, C, 0);
    th_store(&X, x);
    th_store(&A, add);
    th_store(&DY, dy);
    th_store(&W, w);
    th_store(&B, b);
    th_store(&RM, rm);
    th_store(&RV, rv);
    th_buf MASK = th_alloc(BNORM_DTYPE_BF16, (int64_t)bnorm_relu_mask_size(&d) / 2 + 1, 0);
    void *ydst = t->inplace ? X.p : Y.p;

    /* ---- forward ---- */
    bnorm_forward_args fa = {.desc = d, .x = X.p, .y = ydst, .weight = t->affine ? W.p : NULL,
                             .bias = t->affine ? B.p : NULL, .eps = eps, .training = t->training,
                             .running_mean = RM.p, .running_var = RV.p, .momentum = 0.1,
                             .save_mean = t->training ? SM.p : NULL, .save_invstd = t->training ? SI.p : NULL,
                             .addend = t->fused_add ? A.p : NULL, .relu = t->relu,
                             .relu_mask = t->relu ? MASK.p : NULL};
    bnorm_status st = bnorm_forward(&fa);
    CHECK(st == BNORM_STATUS_OK, "%s: forward: %s", name, bnorm_last_error());
    if (st != BNORM_STATUS_OK) goto done;
    if (t->training) {
        ref_forward_train(&sh, x, t->affine ? w : NULL, t->affine ? b : NULL, t->fused_add ? add : NULL, t->relu, eps,
                          yr, mean, var, inv);
    } else {
        ref_forward_eval(&sh, x, t->affine ? w : NULL, t->affine ? b : NULL, rm, rv, eps, t->fused_add ? add : NULL,
                         t->relu, yr);
        for (int64_t c = 0; c < C; c++) {
            mean[c] = rm[c];
            inv[c] = 1 / sqrt(rv[c] + eps);
        }
    }
    th_buf Yv = t->inplace ? X : Y;
    th_load(&Yv, got);
    CHECK(close_enough(got, yr, numel, tol), "%s: y differs from the reference", name);
    if (t->training) {
        th_load(&SM, tmp);
        CHECK(close_enough(tmp, mean, C, tol), "%s: save_mean", name);
        th_load(&SI, tmp);
        CHECK(close_enough(tmp, inv, C, tol * 10), "%s: save_invstd", name);
        /* running statistics: PyTorch's update with the unbiased variance */
        double m = (double)(N * S), *want = malloc(sizeof(double) * (size_t)C);
        for (int64_t c = 0; c < C; c++) want[c] = 0.9 * rm[c] + 0.1 * mean[c];
        th_load(&RM, tmp);
        CHECK(close_enough(tmp, want, C, tol), "%s: running_mean", name);
        for (int64_t c = 0; c < C; c++) want[c] = 0.9 * rv[c] + 0.1 * var[c] * m / (m - 1);
        th_load(&RV, tmp);
        CHECK(close_enough(tmp, want, C, tol * 10), "%s: running_var", name);
        free(want);
    } else {
        th_load(&RM, tmp);
        CHECK(th_err(tmp, rm, C, 0, 0) == 0, "%s: inference changed running_mean", name);
    }

    /* ---- backward (restore x when the forward ran in place) ---- */
    if (t->inplace) th_store(&X, x);
    for (int64_t i = 0; i < numel; i++) mask[i] = got[i] > 0;
    if (t->relu) {
        /* The gradient passes where the library's own bit is set: its z > 0 in the compute type, which
           for z within rounding of 0 may differ from y > 0 after y is stored (float16 rounds a tiny z to
           0) and from the reference's sign. Read the bits back through a backward with dy = 1 (daddend =
           mask) and take them where the reference z is within y's tolerance of 0; a difference anywhere
           else is an error. */
        double *ones = malloc(sizeof(double) * (size_t)numel);
        for (int64_t i = 0; i < numel; i++) ones[i] = 1.0;
        th_buf ONE = th_alloc(t->dtype, numel, 0), DA2 = th_alloc(t->dtype, numel, 0);
        th_buf DX2 = th_alloc(t->dtype, numel, 0);
        th_store(&ONE, ones);
        bnorm_backward_args mb = {.desc = d, .x = X.p, .dy = ONE.p, .dx = DX2.p, .weight = t->affine ? W.p : NULL,
                                  .mean = t->training ? SM.p : RM.p, .invstd = t->training ? SI.p : NULL,
                                  .var = t->training ? NULL : RV.p, .eps = eps, .use_global_stats = !t->training,
                                  .relu_mask = MASK.p, .daddend = DA2.p};
        st = bnorm_backward(&mb);
        CHECK(st == BNORM_STATUS_OK, "%s: mask read-back backward: %s", name, bnorm_last_error());
        th_load(&DA2, ones);
        long bad = 0;
        for (int64_t i = 0; i < numel; i++) {
            const unsigned char bit = ones[i] > 0.5;
            if (bit != (yr[i] > 0) && !(yr[i] <= tol * 4 && fabs(got[i]) <= tol * 4)) bad++;
            mask[i] = bit;
        }
        CHECK(bad == 0, "%s: %ld ReLU mask bits differ from the reference away from 0", name, bad);
        th_free(&ONE); th_free(&DA2); th_free(&DX2);
        free(ones);
    }
    {
        void *dxdst = t->inplace ? DY.p : DX.p;
        bnorm_backward_args ba = {.desc = d, .x = X.p, .dy = DY.p, .dx = dxdst, .weight = t->affine ? W.p : NULL,
                                  .mean = t->training ? SM.p : RM.p, .invstd = t->training ? SI.p : NULL,
                                  .var = t->training ? NULL : RV.p, .eps = eps, .use_global_stats = !t->training,
                                  .relu_mask = t->relu ? MASK.p : NULL,
                                  .daddend = (t->relu && t->fused_add) ? DA.p : NULL, .dweight = DW.p, .dbias = DB.p};
        st = bnorm_backward(&ba);
        CHECK(st == BNORM_STATUS_OK, "%s: backward: %s", name, bnorm_last_error());
        if (st != BNORM_STATUS_OK) goto done;
        ref_backward(&sh, x, dy, t->affine ? w : NULL, mean, inv, !t->training, t->relu ? mask : NULL, dxr, dar, dwr, dbr);
        th_buf DXv = t->inplace ? DY : DX;
        th_load(&DXv, got);
        /* dx = w*invstd*(g - mean(g) - xhat*mean(g*xhat)) cancels: scale by its terms */
        double terms = th_maxabs(dy, numel) * 3, wi = 0;
        for (int64_t c = 0; c < C; c++) wi = fmax(wi, fabs((t->affine ? w[c] : 1.0) * inv[c]));
        CHECK(th_close_scaled(got, dxr, numel, tol * 5, terms * wi), "%s: dx differs from the reference", name);
        if (t->relu && t->fused_add) {
            th_load(&DA, got);
            CHECK(close_enough(got, dar, numel, tol), "%s: daddend", name);
        }
        th_load(&DW, tmp);
        CHECK(close_enough(tmp, dwr, C, tol * 5), "%s: dweight", name);
        th_load(&DB, tmp);
        CHECK(close_enough(tmp, dbr, C, tol * 5), "%s: dbias", name);
    }
done:
    th_free(&X); th_free(&Y); th_free(&A); th_free(&DY); th_free(&DX); th_free(&DA);
    th_free(&W); th_free(&B); th_free(&RM); th_free(&RV); th_free(&SM); th_free(&SI); th_free(&DW); th_free(&DB);
    th_free(&MASK);
    free(x); free(add); free(dy); free(yr); free(got); free(dxr); free(dar); free(mask);
    free(w); free(b); free(rm); free(rv); free(mean); free(var); free(inv); free(tmp); free(dwr); free(dbr);
}

static void random_case(tcase *t, bnorm_dtype dt) {
    memset(t, 0, sizeof *t);
    t->dtype = dt;
    t->layout = (int)th_randint(0, 1);
    t->rank = (int)th_randint(2, 5);
    t->dims[1] = th_channels[th_randint(0, (int64_t)(sizeof th_channels / sizeof th_channels[0]) - 1)];
    int64_t budget = 60000 / t->dims[1];
    t->dims[0] = th_randint(1, 9);
    for (int i = 2; i < t->rank; i++) t->dims[i] = th_randint(1, t->rank == 3 ? 40 : 9);
    int64_t numel = t->dims[0];
    for (int i = 2; i < t->rank; i++) numel *= t->dims[i];
    while (numel > budget && numel > 2) { /* keep the case small: shrink the largest dim */
        int big = 0;
        for (int i = 2; i < t->rank; i++)
            if (t->dims[i] > t->dims[big]) big = i;
        if (t->dims[big] == 1) break;
        numel = numel / t->dims[big] * (t->dims[big] / 2);
        t->dims[big] /= 2;
    }
    t->affine = th_randint(0, 3) != 0;
    t->fused_add = (int)th_randint(0, 2) == 0;
    t->relu = t->fused_add || th_randint(0, 3) == 0;
    t->inplace = th_randint(0, 3) == 0;
    t->training = th_randint(0, 3) != 0;
    t->threads = (int)th_randint(1, 4);
    t->misalign = (int)th_randint(0, 3) * (int)bnorm_dtype_size(dt);
    /* a training forward needs more than one value per channel */
    int64_t m = t->dims[0];
    for (int i = 2; i < t->rank; i++) m *= t->dims[i];
    if (t->training && m < 2) t->dims[0] = 2;
}

int main(void) {
    th_seed(1);
    const bnorm_dtype dts[] = {BNORM_DTYPE_F32, BNORM_DTYPE_F64, BNORM_DTYPE_F16, BNORM_DTYPE_BF16};
    const int isa_max = (int)bnorm_get_isa();
    for (int isa = 0; isa <= isa_max; isa++) {
        if (bnorm_set_isa((bnorm_isa)isa) != BNORM_STATUS_OK) continue;
        for (int d = 0; d < 4; d++)
            for (int i = 0; i < 60; i++) {
                tcase t;
                random_case(&t, dts[d]);
                run_case(&t);
            }
        /* fixed cases: large N, 1-element spatial dims, N = 1 with spatial, rank 2 with large N */
        const tcase fixed[] = {
            {BNORM_DTYPE_F32, 0, 2, {4096, 17}, 1, 0, 0, 0, 1, 2, 0},
            {BNORM_DTYPE_F32, 1, 4, {1, 3, 7, 5}, 1, 1, 1, 0, 1, 3, 4},
            {BNORM_DTYPE_F32, 0, 4, {1, 16, 1, 9}, 1, 0, 0, 1, 1, 4, 0},
            {BNORM_DTYPE_F64, 0, 5, {3, 2, 1, 1, 1}, 0, 0, 1, 0, 1, 1, 8},
            {BNORM_DTYPE_F32, 0, 3, {2000, 3, 1}, 1, 1, 1, 0, 1, 4, 0},
            {BNORM_DTYPE_F64, 1, 3, {5, 1000, 3}, 1, 0, 0, 0, 1, 2, 0},
            /* NCHW planes of 2 KiB or more, 35 channels a thread: more than one channel block, so the
               next block's statistics are read between this block's planes (lanes; float64: planes) */
            {BNORM_DTYPE_F32, 0, 4, {2, 70, 23, 25}, 1, 1, 1, 0, 1, 2, 4},
            {BNORM_DTYPE_F16, 0, 4, {2, 70, 33, 32}, 1, 0, 1, 0, 1, 2, 2},
            {BNORM_DTYPE_F64, 0, 4, {2, 70, 16, 17}, 1, 1, 1, 1, 1, 2, 8},
            /* small planes, several channel blocks a thread: the run schedule's interleaved statistics */
            {BNORM_DTYPE_F32, 0, 4, {4, 70, 14, 14}, 1, 1, 1, 0, 1, 2, 4},
            {BNORM_DTYPE_BF16, 0, 4, {4, 70, 16, 16}, 1, 0, 0, 0, 1, 2, 2},
            /* wide rows (C above the four-rows-a-pass threshold of kernel_impl.h's bn_rows_per_pass on a
               48 KiB L1), thread ranges of 4k + 1..3 rows: the four-row sums and their tails */
            {BNORM_DTYPE_F32, 1, 2, {15, 2049}, 1, 0, 0, 0, 1, 2, 4},
            {BNORM_DTYPE_F32, 1, 4, {3, 1100, 3, 3}, 1, 0, 0, 0, 1, 1, 0},
            {BNORM_DTYPE_BF16, 1, 3, {7, 1500, 1}, 1, 0, 0, 0, 1, 2, 2},
            {BNORM_DTYPE_F16, 1, 2, {9, 700}, 0, 0, 0, 0, 1, 1, 0},
            {BNORM_DTYPE_F64, 1, 2, {11, 1030}, 1, 0, 0, 1, 1, 2, 8},
            {BNORM_DTYPE_F32, 1, 2, {9, 1000}, 1, 0, 0, 0, 0, 2, 0}, /* eval: the backward apply without x */
            /* rows of 16, 32 and 64 channels: the register-resident sums (bn_narrow_regs), threads'
               ranges of odd lengths, with and without the mask of the fused ReLU */
            {BNORM_DTYPE_F32, 1, 4, {7, 64, 5, 3}, 1, 0, 0, 0, 1, 2, 4},
            {BNORM_DTYPE_F32, 1, 4, {5, 64, 3, 7}, 1, 1, 1, 0, 1, 3, 0},
            {BNORM_DTYPE_F64, 1, 3, {9, 64, 5}, 1, 0, 0, 0, 1, 2, 8},
            {BNORM_DTYPE_BF16, 1, 2, {301, 32}, 1, 0, 0, 0, 1, 2, 2},
            {BNORM_DTYPE_F16, 1, 5, {3, 16, 5, 3, 7}, 0, 0, 0, 1, 1, 4, 2},
            {BNORM_DTYPE_F32, 1, 2, {1001, 16}, 1, 0, 0, 0, 1, 1, 0},
        };
        for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) run_case(&fixed[i]);
    }
    bnorm_set_isa((bnorm_isa)isa_max);
    return th_finish("test_functional");
}
