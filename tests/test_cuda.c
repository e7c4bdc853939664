/*
 * test_cuda.c - the CUDA backend against the CPU backend and the float64 reference, on the same inputs,
 * with the CPU tests' tolerances (test_functional.c's): random shapes (ranks 2..5, both layouts, C
 * around the warp width, odd sizes, misaligned pointers, in place), every dtype, affine on/off, the
 * fused add + ReLU and its mask (the CPU's layout, exchanged between the backends), training and
 * inference forward, training and global-statistics backward; then fixed cases: several reduction
 * chunks per channel, momentum conventions, N = 0, BATCH_TOO_SMALL, NaN/Inf propagation, a large
 * mean, run-to-run bitwise determinism, the caller's workspace, and the error paths (host pointers,
 * small workspace) leaving everything unchanged. Exits 77 (skipped) without a GPU.
 */
#include "cuda_harness.h"
#include "ref.h"

static const int64_t th_channels[] = {1, 2, 3, 15, 16, 17, 31, 33, 64, 1000};

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

/* Values equal (NaN positions equal): the bitwise-agreement checks of the paths that share the CPU's
 * coefficients (stored values of the same dtype, so equal doubles mean equal bits up to NaN payloads). */
static int64_t count_diff(const double *a, const double *b, int64_t n) {
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++)
        if (!((isnan(a[i]) && isnan(b[i])) || a[i] == b[i])) k++;
    return k;
}

typedef struct tcase {
    bnorm_dtype dtype;
    int layout, rank;
    int64_t dims[5];
    int affine, fused_add, relu, inplace, training, misalign;
    double momentum;
} tcase;

static void describe(const tcase *t, char *buf, size_t cap) {
    int k = snprintf(buf, cap, "%s %s dims=(", bnorm_dtype_name(t->dtype), t->layout ? "CL" : "CF");
    for (int i = 0; i < t->rank; i++)
        k += snprintf(buf + k, cap - (size_t)k, "%lld%s", (long long)t->dims[i], i + 1 < t->rank ? "," : "");
    snprintf(buf + k, cap - (size_t)k, ") affine=%d add=%d relu=%d inplace=%d train=%d misalign=%d momentum=%g",
             t->affine, t->fused_add, t->relu, t->inplace, t->training, t->misalign, t->momentum);
}

/* The relu mask a forward must write for outputs y (memory order): bit = y > 0, each plane
 * (channels-first with spatial > 1) or row starting on a byte, unused bits 0. */
static void pack_mask(const bnorm_desc *d, const double *y, unsigned char *out, size_t bytes) {
    int64_t S = 1;
    for (int i = 2; i < d->rank; i++) S *= d->dims[i];
    const int planes = d->layout == BNORM_LAYOUT_CHANNELS_FIRST && S > 1;
    const int64_t L = planes ? S : d->dims[1], segs = planes ? d->dims[0] * d->dims[1] : d->dims[0] * S;
    const int64_t stride = (L + 7) / 8;
    memset(out, 0, bytes);
    for (int64_t s = 0; s < segs; s++)
        for (int64_t p = 0; p < L; p++)
            if (y[s * L + p] > 0) out[s * stride + p / 8] |= (unsigned char)(1u << (p % 8));
}

static void run_case(const tcase *t) {
    char name[320];
    describe(t, name, sizeof name);
    bnorm_desc d = {.dtype = t->dtype, .layout = (bnorm_layout)t->layout, .rank = t->rank};
    int64_t S = 1;
    for (int i = 0; i < t->rank; i++) d.dims[i] = t->dims[i];
    for (int i = 2; i < t->rank; i++) S *= t->dims[i];
    const int64_t N = t->dims[0], C = t->dims[1], numel = N * C * S;
    ref_shape sh = {N, C, S, t->layout == 1};
    const bnorm_dtype pd = bnorm_param_dtype(t->dtype);
    const double tol = tol_of(t->dtype);
    const size_t mbytes = bnorm_relu_mask_size(&d);

    double *x = malloc(sizeof(double) * (size_t)(numel + 1)), *add = malloc(sizeof(double) * (size_t)(numel + 1));
    double *dy = malloc(sizeof(double) * (size_t)(numel + 1)), *yr = malloc(sizeof(double) * (size_t)(numel + 1));
    double *got = malloc(sizeof(double) * (size_t)(numel + 1)), *cpu = malloc(sizeof(double) * (size_t)(numel + 1));
    double *w = malloc(sizeof(double) * (size_t)C), *b = malloc(sizeof(double) * (size_t)C);
    double *rm = malloc(sizeof(double) * (size_t)C), *rv = malloc(sizeof(double) * (size_t)C);
    double *mean = malloc(sizeof(double) * (size_t)C), *var = malloc(sizeof(double) * (size_t)C);
    double *inv = malloc(sizeof(double) * (size_t)C), *t1 = malloc(sizeof(double) * (size_t)C);
    double *t2 = malloc(sizeof(double) * (size_t)C);
    unsigned char *want_mask = malloc(mbytes + 1), *mask_h = malloc(mbytes + 1), *mask_c = malloc(mbytes + 1);
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

    /* host buffers: the CPU backend's inputs/outputs, and the CUDA results copied back (G*) */
    th_buf X = th_alloc(t->dtype, numel, t->misalign), Y = th_alloc(t->dtype, numel, t->misalign);
    th_buf A = th_alloc(t->dtype, numel, t->misalign), DY = th_alloc(t->dtype, numel, t->misalign);
    th_buf DX = th_alloc(t->dtype, numel, t->misalign), DA = th_alloc(t->dtype, numel, t->misalign);
    th_buf W = th_alloc(pd, C, 0), B = th_alloc(pd, C, 0), RM = th_alloc(pd, C, 0), RV = th_alloc(pd, C, 0);
    th_buf SM = th_alloc(pd, C, 0), SI = th_alloc(pd, C, 0), DW = th_alloc(pd, C, 0), DB = th_alloc(pd, C, 0);
    th_buf MASK = th_alloc(BNORM_DTYPE_BF16, (int64_t)mbytes / 2 + 1, 0);
    th_buf GY = th_alloc(t->dtype, numel, t->misalign), GDX = th_alloc(t->dtype, numel, t->misalign);
    th_buf GDA = th_alloc(t->dtype, numel, t->misalign), GRM = th_alloc(pd, C, 0), GRV = th_alloc(pd, C, 0);
    th_buf GSM = th_alloc(pd, C, 0), GSI = th_alloc(pd, C, 0), GDW = th_alloc(pd, C, 0), GDB = th_alloc(pd, C, 0);
    th_buf GMASK = th_alloc(BNORM_DTYPE_BF16, (int64_t)mbytes / 2 + 1, 0);
    th_store(&X, x);
    th_store(&A, add);
    th_store(&DY, dy);
    th_store(&W, w);
    th_store(&B, b);
    th_store(&RM, rm);
    th_store(&RV, rv);
    th_dbuf dX = th_dcopy(&X), dY = th_dalloc(&Y), dA = th_dcopy(&A), dDY = th_dcopy(&DY), dDX = th_dalloc(&DX);
    th_dbuf dDA = th_dalloc(&DA), dW = th_dcopy(&W), dB = th_dcopy(&B), dRM = th_dcopy(&RM), dRV = th_dcopy(&RV);
    th_dbuf dSM = th_dalloc(&SM), dSI = th_dalloc(&SI), dDW = th_dalloc(&DW), dDB = th_dalloc(&DB);
    th_dbuf dMASK = th_dalloc(&MASK);

    /* ---- forward: CPU and CUDA on the same inputs ---- */
    bnorm_forward_args fa = {.desc = d, .x = X.p, .y = t->inplace ? X.p : Y.p, .weight = t->affine ? W.p : NULL,
                             .bias = t->affine ? B.p : NULL, .eps = eps, .training = t->training,
                             .running_mean = RM.p, .running_var = RV.p, .momentum = t->momentum,
                             .save_mean = t->training ? SM.p : NULL, .save_invstd = t->training ? SI.p : NULL,
                             .addend = t->fused_add ? A.p : NULL, .relu = t->relu, .relu_mask = t->relu ? MASK.p : NULL};
    bnorm_forward_args ga = fa;
    ga.x = dX.p;
    ga.y = t->inplace ? dX.p : dY.p;
    ga.weight = t->affine ? dW.p : NULL;
    ga.bias = t->affine ? dB.p : NULL;
    ga.running_mean = dRM.p;
    ga.running_var = dRV.p;
    ga.save_mean = t->training ? dSM.p : NULL;
    ga.save_invstd = t->training ? dSI.p : NULL;
    ga.addend = t->fused_add ? dA.p : NULL;
    ga.relu_mask = t->relu ? dMASK.p : NULL;
    bnorm_status st = bnorm_forward(&fa);
    CHECK(st == BNORM_STATUS_OK, "%s: CPU forward: %s", name, bnorm_last_error());
    bnorm_status gs = bnorm_cuda_forward(&ga, NULL);
    CHECK(gs == BNORM_STATUS_OK, "%s: CUDA forward: %s", name, bnorm_last_error());
    TH_CU(cudaDeviceSynchronize());
    if (st != BNORM_STATUS_OK || gs != BNORM_STATUS_OK) goto done;
    th_dget(t->inplace ? &dX : &dY, &GY);
    th_dget(&dRM, &GRM);
    th_dget(&dRV, &GRV);
    if (t->training) {
        th_dget(&dSM, &GSM);
        th_dget(&dSI, &GSI);
        ref_forward_train(&sh, x, t->affine ? w : NULL, t->affine ? b : NULL, t->fused_add ? add : NULL, t->relu, eps,
                          yr, mean, var, inv);
    } else {
        ref_forward_eval(&sh, x, t->affine ? w : NULL, t->affine ? b : NULL, rm, rv, eps, t->fused_add ? add : NULL,
                         t->relu, yr);
    }
    th_load(&GY, got);
    th_load(t->inplace ? &X : &Y, cpu);
    CHECK(close_enough(got, yr, numel, tol), "%s: CUDA y differs from the reference", name);
    if (t->training) {
        CHECK(close_enough(got, cpu, numel, 2 * tol), "%s: CUDA y differs from the CPU's", name);
        th_load(&GSM, t1);
        th_load(&SM, t2);
        CHECK(close_enough(t1, mean, C, tol) && close_enough(t1, t2, C, tol), "%s: save_mean", name);
        th_load(&GSI, t1);
        th_load(&SI, t2);
        CHECK(close_enough(t1, inv, C, tol * 10) && close_enough(t1, t2, C, tol * 10), "%s: save_invstd", name);
        th_load(&GRM, t1);
        th_load(&RM, t2);
        CHECK(close_enough(t1, t2, C, tol), "%s: running_mean differs from the CPU's", name);
        th_load(&GRV, t1);
        th_load(&RV, t2);
        CHECK(close_enough(t1, t2, C, tol * 10), "%s: running_var differs from the CPU's", name);
    } else {
        int64_t k = count_diff(got, cpu, numel);
        CHECK(k == 0, "%s: inference y differs from the CPU's in %lld values (must be bitwise equal)", name, (long long)k);
        th_load(&GRM, t1);
        CHECK(th_err(t1, rm, C, 0, 0) == 0, "%s: inference changed running_mean", name);
    }
    if (t->relu) {
        TH_CU(cudaMemcpy(mask_h, dMASK.p, mbytes, cudaMemcpyDeviceToHost));
        pack_mask(&d, got, want_mask, mbytes);
        /* bit = z > 0 where z is the float32 value before storage: a tiny positive z that rounds to a
           float16/bfloat16 zero keeps its bit although y == 0; every other bit must match */
        int64_t bad = 0, underflow = 0;
        for (size_t i = 0; i < mbytes; i++) {
            unsigned diff = (unsigned)(mask_h[i] ^ want_mask[i]);
            for (int k = 0; k < 8; k++)
                if ((diff >> k) & 1) {
                    if ((mask_h[i] >> k) & 1) underflow++;
                    else bad++;
                }
        }
        const int half = t->dtype == BNORM_DTYPE_F16 || t->dtype == BNORM_DTYPE_BF16;
        CHECK(bad == 0 && (half ? underflow <= 2 : underflow == 0),
              "%s: CUDA relu mask is not bit (y > 0) in the CPU layout (%lld bits clear that should be set, %lld set "
              "that should be clear)", name, (long long)bad, (long long)underflow);
        if (!t->training) {
            memcpy(mask_c, MASK.p, mbytes);
            CHECK(memcmp(mask_h, mask_c, mbytes) == 0, "%s: inference relu mask differs from the CPU's", name);
        }
    }

    /* ---- backward: both backends get the CPU forward's statistics and the CUDA forward's mask ---- */
    if (t->inplace) th_store(&X, x), th_dput(&dX, &X);
    if (t->relu) memcpy(MASK.p, mask_h, mbytes);
    {
        th_dbuf dSM2 = th_dcopy(t->training ? &SM : &RM), dSI2 = th_dcopy(t->training ? &SI : &RV);
        bnorm_backward_args ba = {.desc = d, .x = X.p, .dy = DY.p, .dx = t->inplace ? DY.p : DX.p,
                                  .weight = t->affine ? W.p : NULL, .mean = t->training ? SM.p : RM.p,
                                  .invstd = t->training ? SI.p : NULL, .var = t->training ? NULL : RV.p, .eps = eps,
                                  .use_global_stats = !t->training, .relu_mask = t->relu ? MASK.p : NULL,
                                  .daddend = (t->relu && t->fused_add) ? DA.p : NULL, .dweight = DW.p, .dbias = DB.p};
        bnorm_backward_args gb = ba;
        gb.x = dX.p;
        gb.dy = dDY.p;
        gb.dx = t->inplace ? dDY.p : dDX.p;
        gb.weight = t->affine ? dW.p : NULL;
        gb.mean = dSM2.p;
        gb.invstd = t->training ? dSI2.p : NULL;
        gb.var = t->training ? NULL : dSI2.p;
        gb.relu_mask = t->relu ? dMASK.p : NULL;
        gb.daddend = (t->relu && t->fused_add) ? dDA.p : NULL;
        gb.dweight = dDW.p;
        gb.dbias = dDB.p;
        st = bnorm_backward(&ba);
        CHECK(st == BNORM_STATUS_OK, "%s: CPU backward: %s", name, bnorm_last_error());
        gs = bnorm_cuda_backward(&gb, NULL);
        CHECK(gs == BNORM_STATUS_OK, "%s: CUDA backward: %s", name, bnorm_last_error());
        TH_CU(cudaDeviceSynchronize());
        if (st == BNORM_STATUS_OK && gs == BNORM_STATUS_OK) {
            th_dget(t->inplace ? &dDY : &dDX, &GDX);
            th_load(&GDX, got);
            th_load(t->inplace ? &DY : &DX, cpu);
            double terms = th_maxabs(dy, numel) * 3, wi = 0;
            th_load(t->training ? &SI : &RV, t1);
            for (int64_t c = 0; c < C; c++) {
                double iv = t->training ? t1[c] : 1 / sqrt(t1[c] + eps);
                wi = fmax(wi, fabs((t->affine ? w[c] : 1.0) * iv));
            }
            if (t->training)
                CHECK(th_close_scaled(got, cpu, numel, tol * 5, terms * wi), "%s: CUDA dx differs from the CPU's", name);
            else
                CHECK(count_diff(got, cpu, numel) == 0, "%s: global-stats dx differs from the CPU's (must be bitwise)", name);
            if (t->relu && t->fused_add) {
                th_dget(&dDA, &GDA);
                th_load(&GDA, got);
                th_load(&DA, cpu);
                CHECK(count_diff(got, cpu, numel) == 0, "%s: daddend differs from the CPU's", name);
            }
            th_dget(&dDW, &GDW);
            th_load(&GDW, t1);
            th_load(&DW, t2);
            CHECK(close_enough(t1, t2, C, tol * 5), "%s: dweight differs from the CPU's", name);
            th_dget(&dDB, &GDB);
            th_load(&GDB, t1);
            th_load(&DB, t2);
            CHECK(close_enough(t1, t2, C, tol * 5), "%s: dbias differs from the CPU's", name);
        }
        th_dfree(&dSM2);
        th_dfree(&dSI2);
    }
done:
    th_dfree(&dX); th_dfree(&dY); th_dfree(&dA); th_dfree(&dDY); th_dfree(&dDX); th_dfree(&dDA); th_dfree(&dW);
    th_dfree(&dB); th_dfree(&dRM); th_dfree(&dRV); th_dfree(&dSM); th_dfree(&dSI); th_dfree(&dDW); th_dfree(&dDB);
    th_dfree(&dMASK);
    th_free(&X); th_free(&Y); th_free(&A); th_free(&DY); th_free(&DX); th_free(&DA); th_free(&W); th_free(&B);
    th_free(&RM); th_free(&RV); th_free(&SM); th_free(&SI); th_free(&DW); th_free(&DB); th_free(&MASK);
    th_free(&GY); th_free(&GDX); th_free(&GDA); th_free(&GRM); th_free(&GRV); th_free(&GSM); th_free(&GSI);
    th_free(&GDW); th_free(&GDB); th_free(&GMASK);
    free(x); free(add); free(dy); free(yr); free(got); free(cpu); free(w); free(b); free(rm); free(rv);
    free(mean); free(var); free(inv); free(t1); free(t2); free(want_mask); free(mask_h); free(mask_c);
}

static void random_case(tcase *t, bnorm_dtype dt) {
    memset(t, 0, sizeof *t);
    t->dtype = dt;
    t->layout = (int)th_randint(0, 1);
    t->rank = (int)th_randint(2, 5);
    t->dims[1] = th_channels[th_randint(0, 9)];
    int64_t budget = 60000 / t->dims[1];
    t->dims[0] = th_randint(1, 9);
    for (int i = 2; i < t->rank; i++) t->dims[i] = th_randint(1, t->rank == 3 ? 40 : 9);
    int64_t numel = t->dims[0];
    for (int i = 2; i < t->rank; i++) numel *= t->dims[i];
    while (numel > budget && numel > 2) {
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
    t->misalign = (int)th_randint(0, 3) * (int)bnorm_dtype_size(dt);
    t->momentum = 0.1;
    int64_t m = t->dims[0];
    for (int i = 2; i < t->rank; i++) m *= t->dims[i];
    if (t->training && m < 2) t->dims[0] = 2;
}

/* ---- fixed edge cases ------------------------------------------------------------------------- */

/* A float32 training forward of x (C channels of m values, NCHW (N=1 planes) layout) on the GPU;
 * returns its status and fills save_mean/save_invstd/running stats. */
static bnorm_status gpu_stats(const double *x, int64_t C, int64_t m, double *mean, double *invstd, void *workspace,
                              size_t ws_size, unsigned char *ybytes) {
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 3, .dims = {1, C, m}};
    th_buf X = th_alloc(BNORM_DTYPE_F32, C * m, 0), SM = th_alloc(BNORM_DTYPE_F32, C, 0), SI = th_alloc(BNORM_DTYPE_F32, C, 0);
    th_store(&X, x);
    th_dbuf dX = th_dcopy(&X), dY = th_dalloc(&X), dSM = th_dalloc(&SM), dSI = th_dalloc(&SI);
    bnorm_forward_args a = {.desc = d, .x = dX.p, .y = dY.p, .eps = 0, .training = 1, .save_mean = dSM.p,
                            .save_invstd = dSI.p, .workspace = workspace, .workspace_size = ws_size};
    bnorm_status st = bnorm_cuda_forward(&a, NULL);
    TH_CU(cudaDeviceSynchronize());
    th_dget(&dSM, &SM);
    th_dget(&dSI, &SI);
    th_load(&SM, mean);
    th_load(&SI, invstd);
    if (ybytes) TH_CU(cudaMemcpy(ybytes, dY.p, (size_t)(C * m) * 4, cudaMemcpyDeviceToHost));
    th_dfree(&dX); th_dfree(&dY); th_dfree(&dSM); th_dfree(&dSI);
    th_free(&X); th_free(&SM); th_free(&SI);
    return st;
}

static void test_edge_cases(void) {
    /* NaN in channel 0, +Inf in channel 1, a large mean in channel 2 (1e4 + N(0,1): float32 values
       whose E[x^2]-E[x]^2 would cancel 1e8 against 1), a constant channel 3 (var 0, eps 0: invstd 0) */
    const int64_t C = 4, m = 50000;
    double *x = malloc(sizeof(double) * (size_t)(C * m)), mean[4], inv[4], rmean[4], rvar[4], rinv[4];
    for (int64_t i = 0; i < m; i++) {
        x[i] = th_normal();
        x[m + i] = th_normal();
        x[2 * m + i] = 1e4 + th_normal();
        x[3 * m + i] = 7.0;
    }
    x[1234] = NAN;
    x[m + 77] = INFINITY;
    th_round(BNORM_DTYPE_F32, x, C * m);
    ref_shape sh = {1, C, m, 0};
    double *yr = malloc(sizeof(double) * (size_t)(C * m));
    ref_forward_train(&sh, x, NULL, NULL, NULL, 0, 0, yr, rmean, rvar, rinv);
    unsigned char *y1 = malloc((size_t)(C * m) * 4), *y2 = malloc((size_t)(C * m) * 4);
    CHECK_STATUS(gpu_stats(x, C, m, mean, inv, NULL, 0, y1), BNORM_STATUS_OK);
    CHECK(isnan(mean[0]) && isnan(inv[0]), "NaN channel: mean %g invstd %g, want NaN", mean[0], inv[0]);
    CHECK(isinf(mean[1]) && mean[1] > 0, "Inf channel: mean %g, want +Inf", mean[1]);
    CHECK(fabs(mean[2] - rmean[2]) <= 1e-7 * fabs(rmean[2]), "large mean: %.9g vs %.9g", mean[2], rmean[2]);
    CHECK(fabs(inv[2] - rinv[2]) <= 1e-5 * rinv[2], "large mean: invstd %.9g vs %.9g (a one-pass E[x^2] would be far off)",
          inv[2], rinv[2]);
    CHECK(mean[3] == 7.0 && inv[3] == 0.0, "constant channel with eps 0: mean %g invstd %g, want 7 and 0", mean[3], inv[3]);

    /* determinism: bitwise the same outputs run to run, and with the caller's workspace */
    double mean2[4], inv2[4];
    CHECK_STATUS(gpu_stats(x, C, m, mean2, inv2, NULL, 0, y2), BNORM_STATUS_OK);
    CHECK(memcmp(y1, y2, (size_t)(C * m) * 4) == 0 && memcmp(mean, mean2, sizeof mean) == 0,
          "two identical runs differ (a race or an order that depends on scheduling)");
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 3, .dims = {1, C, m}};
    size_t need = bnorm_cuda_workspace_size(&d, 1);
    CHECK(need > 0, "workspace size");
    void *ws = NULL;
    TH_CU(cudaMalloc(&ws, need));
    CHECK_STATUS(gpu_stats(x, C, m, mean2, inv2, ws, need, y2), BNORM_STATUS_OK);
    CHECK(memcmp(y1, y2, (size_t)(C * m) * 4) == 0, "the caller's workspace changes the result");
    CHECK_STATUS(gpu_stats(x, C, m, mean2, inv2, ws, need - 8, NULL), BNORM_STATUS_INVALID_ARGUMENT);
    TH_CU(cudaFree(ws));
    free(x); free(yr); free(y1); free(y2);
}

/* N = 0, one value per channel, and host pointers: the call fails (or does nothing) and no device
 * buffer changes. */
static void test_errors_unchanged(void) {
    const int64_t C = 5;
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_LAST, .rank = 4, .dims = {0, C, 3, 3}};
    th_buf RM = th_alloc(BNORM_DTYPE_F32, C, 0), X = th_alloc(BNORM_DTYPE_F32, 9 * C, 0), G = th_alloc(BNORM_DTYPE_F32, 9 * C, 0);
    double v[45];
    for (int i = 0; i < 45; i++) v[i] = th_normal();
    th_store(&RM, v);
    th_store(&X, v);
    th_dbuf dRM = th_dcopy(&RM), dRV = th_dcopy(&RM), dX = th_dcopy(&X), dY = th_dalloc(&X);
    bnorm_forward_args a = {.desc = d, .x = NULL, .y = NULL, .eps = 1e-5, .training = 1, .running_mean = dRM.p,
                            .running_var = dRV.p, .momentum = 0.1};
    CHECK_STATUS(bnorm_cuda_forward(&a, NULL), BNORM_STATUS_OK); /* N = 0: nothing to do */
    d.dims[0] = 1;
    d.dims[2] = d.dims[3] = 1;
    a.desc = d;
    a.x = dX.p;
    a.y = dY.p;
    CHECK_STATUS(bnorm_cuda_forward(&a, NULL), BNORM_STATUS_BATCH_TOO_SMALL);
    d.dims[0] = 9;
    a.desc = d;
    a.x = X.p; /* a host pointer */
    CHECK_STATUS(bnorm_cuda_forward(&a, NULL), BNORM_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(bnorm_last_error(), "args->x") != NULL, "message names x: %s", bnorm_last_error());
    a.x = dX.p;
    a.running_var = RM.p;
    CHECK_STATUS(bnorm_cuda_forward(&a, NULL), BNORM_STATUS_INVALID_ARGUMENT);
    a.running_var = dRV.p;
    a.y = (char *)dY.p + 1; /* misaligned */
    CHECK_STATUS(bnorm_cuda_forward(&a, NULL), BNORM_STATUS_INVALID_ARGUMENT);
    a.y = dY.p;
    a.momentum = 2;
    CHECK_STATUS(bnorm_cuda_forward(&a, NULL), BNORM_STATUS_INVALID_ARGUMENT);
    TH_CU(cudaDeviceSynchronize());
    th_dget(&dRM, &G);
    CHECK(memcmp(G.p, RM.p, (size_t)C * 4) == 0, "running_mean changed by failing calls");
    th_dget(&dY, &G);
    unsigned char poison[4] = {0xA5, 0xA5, 0xA5, 0xA5};
    CHECK(memcmp(G.p, poison, 4) == 0, "y written by failing calls");
    /* backward: host dy refused, device dweight untouched */
    bnorm_backward_args b = {.desc = d, .x = dX.p, .dy = X.p, .dx = dY.p, .mean = dRM.p, .invstd = dRV.p, .dweight = dRM.p};
    CHECK_STATUS(bnorm_cuda_backward(&b, NULL), BNORM_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(bnorm_cuda_backward(NULL, NULL), BNORM_STATUS_NULL_POINTER);
    CHECK_STATUS(bnorm_cuda_forward(NULL, NULL), BNORM_STATUS_NULL_POINTER);
    th_dget(&dRM, &G);
    CHECK(memcmp(G.p, RM.p, (size_t)C * 4) == 0, "dweight written by a failing backward");
    th_dfree(&dRM); th_dfree(&dRV); th_dfree(&dX); th_dfree(&dY);
    th_free(&RM); th_free(&X); th_free(&G);
}

int main(void) {
    printf("workspace for a (32,64,56,56) float32 tensor: %zu bytes\n",
           bnorm_cuda_workspace_size(&(bnorm_desc){.dtype = BNORM_DTYPE_F32, .rank = 4, .dims = {32, 64, 56, 56}}, 1));
    if (!th_cuda_usable("test_cuda")) return TH_SKIP;
    th_seed(20);
    const bnorm_dtype dts[] = {BNORM_DTYPE_F32, BNORM_DTYPE_F64, BNORM_DTYPE_F16, BNORM_DTYPE_BF16};
    /* BNORM_TEST_CUDA_CASES: random cases per dtype (default 40; gpu_check.sh's sanitizer runs use fewer) */
    const char *ncase = getenv("BNORM_TEST_CUDA_CASES");
    const int cases = ncase ? atoi(ncase) : 40;
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < cases; i++) {
            tcase t;
            random_case(&t, dts[k]);
            run_case(&t);
        }
    /* several reduction chunks per channel (planes and rows), rank 2, N = 1 planes, momentum
       conventions (0: running stats kept; 1: replaced; 0.25 = MegEngine's 0.75 kept weight) */
    const tcase fixed[] = {
        {BNORM_DTYPE_F32, 0, 4, {16, 16, 32, 32}, 1, 1, 1, 0, 1, 0, 0.1},
        {BNORM_DTYPE_BF16, 1, 4, {16, 24, 16, 16}, 1, 0, 1, 0, 1, 2, 0.0},
        {BNORM_DTYPE_F32, 0, 2, {8192, 17}, 1, 0, 0, 0, 1, 4, 1.0},
        {BNORM_DTYPE_F16, 0, 2, {5000, 3}, 0, 1, 1, 1, 1, 0, 0.25},
        {BNORM_DTYPE_F64, 1, 3, {64, 1000, 3}, 1, 0, 0, 0, 1, 8, 0.1},
        {BNORM_DTYPE_F32, 0, 4, {1, 16, 1, 9}, 1, 0, 0, 1, 1, 0, 0.1},
        {BNORM_DTYPE_F64, 0, 5, {3, 2, 1, 1, 1}, 0, 0, 1, 0, 1, 8, 0.1},
        {BNORM_DTYPE_F32, 0, 4, {4, 70, 7, 7}, 1, 1, 1, 0, 1, 4, 0.1},
        {BNORM_DTYPE_F16, 1, 4, {4, 70, 7, 7}, 1, 1, 1, 0, 0, 2, 0.1},
    };
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) run_case(&fixed[i]);
    test_edge_cases();
    test_errors_unchanged();
    return th_finish("test_cuda");
}
