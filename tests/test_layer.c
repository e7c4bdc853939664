/*
 * test_layer.c - the layer object against PyTorch's nn.BatchNorm semantics (and MegEngine's freeze and
 * momentum convention, OneFlow's fused ReLU), every expectation computed from the float64 reference
 * or written out as the framework's formula:
 *   running_var with the unbiased variance; num_batches_tracked on every tracked training forward,
 *   N = 0 included (nothing else changes); momentum None = cumulative average; KEPT_WEIGHT 0.9 =
 *   NEW_WEIGHT 0.1; freeze; track_running_stats = 0; affine = 0; one value per channel fails and
 *   changes nothing; eval with N = 1; gradient accumulation and zero_grad; reset_parameters /
 *   reset_running_stats; fused ReLU; backward before a forward or with another descriptor.
 */
#include "harness.h"
#include "ref.h"

/* ---- small helpers ------------------------------------------------------------------------ */

typedef struct geo {
    bnorm_desc d;
    ref_shape sh;
    int64_t numel;
} geo;

static geo mkgeo(bnorm_dtype dt, int layout, int rank, const int64_t *dims) {
    geo g;
    memset(&g, 0, sizeof g);
    g.d.dtype = dt;
    g.d.layout = (bnorm_layout)layout;
    g.d.rank = rank;
    int64_t S = 1;
    for (int i = 0; i < rank; i++) g.d.dims[i] = dims[i];
    for (int i = 2; i < rank; i++) S *= dims[i];
    g.sh = (ref_shape){dims[0], dims[1], S, layout == 1};
    g.numel = dims[0] * dims[1] * S;
    return g;
}

static bnorm_layer *mklayer(const bnorm_layer_options *o) {
    bnorm_layer *l = NULL;
    CHECK_STATUS(bnorm_layer_create(o, &l), BNORM_STATUS_OK);
    return l;
}

static void *tensor(bnorm_layer *l, bnorm_tensor_id id) {
    void *p = NULL;
    bnorm_status st = bnorm_layer_tensor(l, id, &p);
    CHECK(st == BNORM_STATUS_OK && p != NULL, "bnorm_layer_tensor(%s): %s", bnorm_tensor_name(id), bnorm_last_error());
    return p;
}

static bnorm_dtype pdt(bnorm_layer *l) {
    bnorm_layer_options o;
    bnorm_layer_get_options(l, &o);
    return o.param_dtype;
}

static void tget(bnorm_layer *l, bnorm_tensor_id id, double *v, int64_t C) {
    void *p = tensor(l, id);
    for (int64_t c = 0; c < C; c++) v[c] = p ? (pdt(l) == BNORM_DTYPE_F64 ? ((double *)p)[c] : ((float *)p)[c]) : NAN;
}

static void tset(bnorm_layer *l, bnorm_tensor_id id, const double *v, int64_t C) {
    void *p = tensor(l, id);
    if (!p) return;
    for (int64_t c = 0; c < C; c++) {
        if (pdt(l) == BNORM_DTYPE_F64) ((double *)p)[c] = v[c];
        else ((float *)p)[c] = (float)v[c];
    }
}

static int64_t nbt(const bnorm_layer *l) {
    int64_t v = -1;
    CHECK_STATUS(bnorm_layer_get_num_batches_tracked(l, &v), BNORM_STATUS_OK);
    return v;
}

/* Layer forward of x (doubles, rounded to the dtype by the caller) into y (doubles). */
static bnorm_status lfwd(bnorm_layer *l, const geo *g, const double *x, const double *add, double *y) {
    th_buf X = th_alloc(g->d.dtype, g->numel, 0), Y = th_alloc(g->d.dtype, g->numel, 0);
    th_buf A = th_alloc(g->d.dtype, g->numel, 0);
    th_store(&X, x);
    if (add) th_store(&A, add);
    bnorm_status st = bnorm_layer_forward(l, &g->d, X.p, Y.p, add ? A.p : NULL);
    if (y) th_load(&Y, y);
    th_free(&X); th_free(&Y); th_free(&A);
    return st;
}

static bnorm_status lbwd(bnorm_layer *l, const geo *g, const double *x, const double *dy, double *dx, double *da) {
    th_buf X = th_alloc(g->d.dtype, g->numel, 0), DY = th_alloc(g->d.dtype, g->numel, 0);
    th_buf DX = th_alloc(g->d.dtype, g->numel, 0), DA = th_alloc(g->d.dtype, g->numel, 0);
    th_store(&X, x);
    th_store(&DY, dy);
    bnorm_status st = bnorm_layer_backward(l, &g->d, X.p, DY.p, dx ? DX.p : NULL, da ? DA.p : NULL);
    if (dx) th_load(&DX, dx);
    if (da) th_load(&DA, da);
    th_free(&X); th_free(&DY); th_free(&DX); th_free(&DA);
    return st;
}

static double *randv(int64_t n, double off, double sc, bnorm_dtype dt) {
    double *v = malloc(sizeof(double) * (size_t)(n + 1));
    for (int64_t i = 0; i < n; i++) v[i] = off + sc * th_normal();
    th_round(dt, v, n);
    return v;
}

static double tol_of(bnorm_dtype dt) {
    return dt == BNORM_DTYPE_F64 ? 1e-12 : dt == BNORM_DTYPE_F32 ? 3e-6 : dt == BNORM_DTYPE_F16 ? 4e-3 : 2e-2;
}

/* ---- 1. running statistics, counter, affine parameters ------------------------------------- */

static void test_running_stats(bnorm_dtype dt, int layout, int rank, const int64_t *dims) {
    geo g = mkgeo(dt, layout, rank, dims);
    const int64_t C = g.sh.C, m = g.sh.N * g.sh.S;
    const bnorm_dtype pd = bnorm_param_dtype(dt);
    const double tol = tol_of(dt), ptol = pd == BNORM_DTYPE_F64 ? 1e-12 : 3e-6;
    bnorm_layer_options o = bnorm_layer_options_default(C);
    o.param_dtype = pd;
    bnorm_layer *l = mklayer(&o);
    if (!l) return;
    CHECK(bnorm_layer_is_training(l) == 1, "a new layer is in training mode");
    double *rm = calloc((size_t)C, sizeof(double)), *rv = malloc(sizeof(double) * (size_t)C);
    double *mean = malloc(sizeof(double) * (size_t)C), *var = malloc(sizeof(double) * (size_t)C);
    double *got = malloc(sizeof(double) * (size_t)C), *w = randv(C, 1, 0.3, pd), *b = randv(C, 0, 1, pd);
    double *y = malloc(sizeof(double) * (size_t)g.numel), *yr = malloc(sizeof(double) * (size_t)g.numel);
    for (int64_t c = 0; c < C; c++) rv[c] = 1;
    tget(l, BNORM_TENSOR_WEIGHT, got, C);
    CHECK(th_err(got, rv, C, 0, 0) == 0, "initial weight is 1");
    tget(l, BNORM_TENSOR_RUNNING_MEAN, got, C);
    CHECK(th_err(got, rm, C, 0, 0) == 0, "initial running_mean is 0");
    CHECK(nbt(l) == 0, "initial num_batches_tracked is 0");
    for (int step = 0; step < 3; step++) {
        double *x = randv(g.numel, step - 1.0, 0.5 + step, dt);
        if (step == 1) { /* parameters are used from the next forward on */
            tset(l, BNORM_TENSOR_WEIGHT, w, C);
            tset(l, BNORM_TENSOR_BIAS, b, C);
        }
        CHECK_STATUS(lfwd(l, &g, x, NULL, y), BNORM_STATUS_OK);
        ref_forward_train(&g.sh, x, step ? w : NULL, step ? b : NULL, NULL, 0, 1e-5, yr, mean, var, NULL);
        th_round(dt, yr, g.numel);
        for (int64_t c = 0; c < C; c++) {
            rm[c] = 0.9 * rm[c] + 0.1 * mean[c];
            rv[c] = 0.9 * rv[c] + 0.1 * var[c] * (double)m / (double)(m - 1); /* unbiased */
        }
        CHECK(th_err(y, yr, g.numel, tol * 4, tol) <= 1, "%s step %d: y", bnorm_dtype_name(dt), step);
        tget(l, BNORM_TENSOR_RUNNING_MEAN, got, C);
        CHECK(th_err(got, rm, C, ptol, ptol) <= 1, "%s layout %d step %d: running_mean", bnorm_dtype_name(dt), layout, step);
        tget(l, BNORM_TENSOR_RUNNING_VAR, got, C);
        CHECK(th_err(got, rv, C, ptol, ptol) <= 1, "%s layout %d step %d: running_var (unbiased)", bnorm_dtype_name(dt),
              layout, step);
        CHECK(nbt(l) == step + 1, "num_batches_tracked %lld after %d forwards", (long long)nbt(l), step + 1);
        free(x);
    }
    /* eval: the running statistics, and no update */
    CHECK_STATUS(bnorm_layer_set_training(l, 0), BNORM_STATUS_OK);
    CHECK(bnorm_layer_is_training(l) == 0, "set_training(0)");
    {
        double *x = randv(g.numel, 0, 2, dt);
        CHECK_STATUS(lfwd(l, &g, x, NULL, y), BNORM_STATUS_OK);
        ref_forward_eval(&g.sh, x, w, b, rm, rv, 1e-5, NULL, 0, yr);
        th_round(dt, yr, g.numel);
        CHECK(th_err(y, yr, g.numel, tol * 4, tol * 2) <= 1, "%s eval: y with running statistics", bnorm_dtype_name(dt));
        tget(l, BNORM_TENSOR_RUNNING_MEAN, got, C);
        CHECK(th_err(got, rm, C, ptol, ptol) <= 1, "eval changed running_mean");
        CHECK(nbt(l) == 3, "eval changed num_batches_tracked");
        free(x);
    }
    CHECK_STATUS(bnorm_layer_set_training(l, 7), BNORM_STATUS_OK);
    CHECK(bnorm_layer_is_training(l) == 1, "set_training(7) means training");
    bnorm_layer_options back;
    CHECK_STATUS(bnorm_layer_get_options(l, &back), BNORM_STATUS_OK);
    CHECK(back.num_features == C && back.param_dtype == pd && back.eps == 1e-5 && back.momentum == 0.1 &&
              back.momentum_mode == BNORM_MOMENTUM_NEW_WEIGHT && back.affine && back.track_running_stats &&
              !back.freeze && !back.fused_relu,
          "get_options returns the creation options");
    bnorm_layer_destroy(l);
    free(rm); free(rv); free(mean); free(var); free(got); free(w); free(b); free(y); free(yr);
}

/* ---- 2. N = 0 and momentum None ------------------------------------------------------------ */

static void test_empty_and_cumulative(void) {
    const int64_t C = 3;
    const int64_t dA[] = {4, C, 5}, dB[] = {7, C, 2}, dC[] = {2, C, 9}, d0[] = {0, C, 5};
    geo gs[3] = {mkgeo(BNORM_DTYPE_F64, 0, 3, dA), mkgeo(BNORM_DTYPE_F64, 1, 3, dB), mkgeo(BNORM_DTYPE_F64, 0, 3, dC)};
    geo g0 = mkgeo(BNORM_DTYPE_F64, 0, 3, d0);
    bnorm_layer_options o = bnorm_layer_options_default(C);
    o.param_dtype = BNORM_DTYPE_F64;
    o.momentum_mode = BNORM_MOMENTUM_CUMULATIVE;
    o.momentum = NAN; /* ignored for CUMULATIVE */
    bnorm_layer *l = mklayer(&o);
    if (!l) return;
    double rm[3] = {0, 0, 0}, rv[3] = {0, 0, 0}, mean[3], var[3], got[3], before_m[3], before_v[3];
    double y[200];
    for (int k = 0; k < 3; k++) {
        double *x = randv(gs[k].numel, 3 * k, 1 + k, BNORM_DTYPE_F64);
        CHECK_STATUS(lfwd(l, &gs[k], x, NULL, y), BNORM_STATUS_OK);
        ref_forward_train(&gs[k].sh, x, NULL, NULL, NULL, 0, 1e-5, y, mean, var, NULL);
        double m = (double)(gs[k].sh.N * gs[k].sh.S);
        for (int c = 0; c < 3; c++) {
            rm[c] += mean[c] / 3; /* the plain average of the three batches */
            rv[c] += var[c] * m / (m - 1) / 3;
        }
        free(x);
    }
    tget(l, BNORM_TENSOR_RUNNING_MEAN, got, C);
    CHECK(th_err(got, rm, C, 1e-12, 1e-12) <= 1, "momentum None: running_mean is the average of the batch means");
    tget(l, BNORM_TENSOR_RUNNING_VAR, got, C);
    CHECK(th_err(got, rv, C, 1e-12, 1e-12) <= 1, "momentum None: running_var is the average of the unbiased variances");
    CHECK(nbt(l) == 3, "counter after 3 batches");

    /* N = 0: the counter moves, nothing else (x and y may be NULL: no elements) */
    tget(l, BNORM_TENSOR_RUNNING_MEAN, before_m, C);
    tget(l, BNORM_TENSOR_RUNNING_VAR, before_v, C);
    CHECK_STATUS(bnorm_layer_forward(l, &g0.d, NULL, NULL, NULL), BNORM_STATUS_OK);
    CHECK(nbt(l) == 4, "N = 0 training forward increments num_batches_tracked (PyTorch)");
    tget(l, BNORM_TENSOR_RUNNING_MEAN, got, C);
    CHECK(memcmp(got, before_m, sizeof got) == 0, "N = 0 changed running_mean");
    tget(l, BNORM_TENSOR_RUNNING_VAR, got, C);
    CHECK(memcmp(got, before_v, sizeof got) == 0, "N = 0 changed running_var");
    /* the counter includes the empty batch: the next factor is 1/5 */
    {
        double *x = randv(gs[0].numel, -2, 0.5, BNORM_DTYPE_F64);
        CHECK_STATUS(lfwd(l, &gs[0], x, NULL, y), BNORM_STATUS_OK);
        ref_forward_train(&gs[0].sh, x, NULL, NULL, NULL, 0, 1e-5, y, mean, var, NULL);
        double m = (double)(gs[0].sh.N * gs[0].sh.S), want[3];
        for (int c = 0; c < 3; c++) want[c] = 0.8 * before_m[c] + 0.2 * mean[c];
        tget(l, BNORM_TENSOR_RUNNING_MEAN, got, C);
        CHECK(th_err(got, want, C, 1e-12, 1e-12) <= 1, "momentum None after an empty batch: factor 1/5");
        for (int c = 0; c < 3; c++) want[c] = 0.8 * before_v[c] + 0.2 * var[c] * m / (m - 1);
        tget(l, BNORM_TENSOR_RUNNING_VAR, got, C);
        CHECK(th_err(got, want, C, 1e-12, 1e-12) <= 1, "momentum None after an empty batch: running_var");
        free(x);
    }
    /* a counter set by hand (a loaded checkpoint) sets the next factor: 1/(7+1) */
    CHECK_STATUS(bnorm_layer_set_num_batches_tracked(l, 7), BNORM_STATUS_OK);
    CHECK(nbt(l) == 7, "set_num_batches_tracked");
    {
        tget(l, BNORM_TENSOR_RUNNING_MEAN, before_m, C);
        double *x = randv(gs[1].numel, 1, 1, BNORM_DTYPE_F64), want[3];
        CHECK_STATUS(lfwd(l, &gs[1], x, NULL, y), BNORM_STATUS_OK);
        ref_forward_train(&gs[1].sh, x, NULL, NULL, NULL, 0, 1e-5, y, mean, var, NULL);
        for (int c = 0; c < 3; c++) want[c] = 0.875 * before_m[c] + 0.125 * mean[c];
        tget(l, BNORM_TENSOR_RUNNING_MEAN, got, C);
        CHECK(th_err(got, want, C, 1e-12, 1e-12) <= 1, "momentum None with num_batches_tracked = 7: factor 1/8");
        CHECK(nbt(l) == 8, "counter 8");
        free(x);
    }
    /* eval with N = 0 does not count; neither does a backward */
    CHECK_STATUS(bnorm_layer_set_training(l, 0), BNORM_STATUS_OK);
    CHECK_STATUS(bnorm_layer_forward(l, &g0.d, NULL, NULL, NULL), BNORM_STATUS_OK);
    CHECK(nbt(l) == 8, "eval N = 0 changed the counter");
    /* backward of an empty training batch: nothing to do, gradients unchanged */
    CHECK_STATUS(bnorm_layer_set_training(l, 1), BNORM_STATUS_OK);
    CHECK_STATUS(bnorm_layer_forward(l, &g0.d, NULL, NULL, NULL), BNORM_STATUS_OK);
    CHECK_STATUS(bnorm_layer_backward(l, &g0.d, NULL, NULL, NULL, NULL), BNORM_STATUS_OK);
    tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
    CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0, "empty backward changed weight.grad");
    bnorm_layer_destroy(l);
}

/* ---- 3. MegEngine's convention ------------------------------------------------------------- */

static void test_kept_weight(void) {
    const int64_t C = 4, dims[] = {5, C, 3, 3};
    geo g = mkgeo(BNORM_DTYPE_F64, 1, 4, dims);
    bnorm_layer_options om = bnorm_layer_options_megengine(C);
    CHECK(om.momentum == 0.9 && om.momentum_mode == BNORM_MOMENTUM_KEPT_WEIGHT && om.eps == 1e-5 && om.affine &&
              om.track_running_stats,
          "MegEngine defaults");
    om.param_dtype = BNORM_DTYPE_F64;
    bnorm_layer_options op = bnorm_layer_options_default(C);
    op.param_dtype = BNORM_DTYPE_F64;
    bnorm_layer *lm = mklayer(&om), *lp = mklayer(&op);
    if (!lm || !lp) return;
    double rm[4] = {0, 0, 0, 0}, rv[4] = {1, 1, 1, 1}, mean[4], var[4], a[4], b[4];
    double *y = malloc(sizeof(double) * (size_t)g.numel);
    const double m = (double)(g.sh.N * g.sh.S);
    for (int step = 0; step < 3; step++) {
        double *x = randv(g.numel, step, 2, BNORM_DTYPE_F64);
        CHECK_STATUS(lfwd(lm, &g, x, NULL, y), BNORM_STATUS_OK);
        CHECK_STATUS(lfwd(lp, &g, x, NULL, y), BNORM_STATUS_OK);
        ref_forward_train(&g.sh, x, NULL, NULL, NULL, 0, 1e-5, y, mean, var, NULL);
        for (int c = 0; c < 4; c++) { /* MegEngine: running = m * running + (1 - m) * batch */
            rm[c] = 0.9 * rm[c] + (1 - 0.9) * mean[c];
            rv[c] = 0.9 * rv[c] + (1 - 0.9) * var[c] * m / (m - 1);
        }
        free(x);
    }
    tget(lm, BNORM_TENSOR_RUNNING_MEAN, a, C);
    tget(lp, BNORM_TENSOR_RUNNING_MEAN, b, C);
    CHECK(th_err(a, b, C, 1e-13, 1e-13) <= 1 && th_err(a, rm, C, 1e-13, 1e-13) <= 1,
          "KEPT_WEIGHT 0.9 running_mean = NEW_WEIGHT 0.1 = formula");
    tget(lm, BNORM_TENSOR_RUNNING_VAR, a, C);
    tget(lp, BNORM_TENSOR_RUNNING_VAR, b, C);
    CHECK(th_err(a, b, C, 1e-13, 1e-13) <= 1 && th_err(a, rv, C, 1e-13, 1e-13) <= 1,
          "KEPT_WEIGHT 0.9 running_var = NEW_WEIGHT 0.1 = formula");
    CHECK(nbt(lm) == 3, "KEPT_WEIGHT layer counts batches too");
    bnorm_layer_destroy(lm);
    bnorm_layer_destroy(lp);
    free(y);
}

/* ---- 4. freeze ----------------------------------------------------------------------------- */

static void test_freeze(bnorm_dtype dt) {
    const int64_t C = 3, dims[] = {4, C, 2, 5};
    geo g = mkgeo(dt, 0, 4, dims);
    const bnorm_dtype pd = bnorm_param_dtype(dt);
    const double tol = tol_of(dt);
    bnorm_layer_options o = bnorm_layer_options_megengine(C);
    o.param_dtype = pd;
    o.freeze = 1;
    bnorm_layer *l = mklayer(&o);
    if (!l) return;
    double *w = randv(C, 1, 0.5, pd), *b = randv(C, 0, 1, pd), *rm = randv(C, 0.5, 1, pd), *rv = randv(C, 0, 1, pd);
    for (int c = 0; c < C; c++) rv[c] = fabs(rv[c]) + 0.2;
    th_round(pd, rv, C);
    tset(l, BNORM_TENSOR_WEIGHT, w, C);
    tset(l, BNORM_TENSOR_BIAS, b, C);
    tset(l, BNORM_TENSOR_RUNNING_MEAN, rm, C);
    tset(l, BNORM_TENSOR_RUNNING_VAR, rv, C);
    double *y = malloc(sizeof(double) * (size_t)g.numel), *yr = malloc(sizeof(double) * (size_t)g.numel);
    double *dx = malloc(sizeof(double) * (size_t)g.numel), *dxr = malloc(sizeof(double) * (size_t)g.numel);
    double got[3], inv[3];
    for (int c = 0; c < C; c++) inv[c] = 1 / sqrt(rv[c] + 1e-5);
    for (int training = 1; training >= 0; training--) {
        CHECK_STATUS(bnorm_layer_set_training(l, training), BNORM_STATUS_OK);
        double *x = randv(g.numel, 1, 2, dt), *dy = randv(g.numel, 0, 1, dt);
        CHECK_STATUS(lfwd(l, &g, x, NULL, y), BNORM_STATUS_OK);
        ref_forward_eval(&g.sh, x, w, b, rm, rv, 1e-5, NULL, 0, yr);
        th_round(dt, yr, g.numel);
        CHECK(th_err(y, yr, g.numel, tol * 4, tol * 2) <= 1, "freeze %s training=%d: y uses the running statistics",
              bnorm_dtype_name(dt), training);
        tget(l, BNORM_TENSOR_RUNNING_MEAN, got, C);
        CHECK(th_err(got, rm, C, 0, 0) == 0, "freeze: running_mean changed");
        tget(l, BNORM_TENSOR_RUNNING_VAR, got, C);
        CHECK(th_err(got, rv, C, 0, 0) == 0, "freeze: running_var changed");
        CHECK(nbt(l) == 0, "freeze: num_batches_tracked changed");
        CHECK_STATUS(lbwd(l, &g, x, dy, dx, NULL), BNORM_STATUS_OK);
        /* dx = g * w / sqrt(rv + eps): the statistics are constants */
        ref_backward(&g.sh, x, dy, w, rm, inv, 1, NULL, dxr, NULL, NULL, NULL);
        th_round(dt, dxr, g.numel);
        CHECK(th_err(dx, dxr, g.numel, tol * 4, tol * 2) <= 1, "freeze %s training=%d: dx = g*w/sqrt(rv+eps)",
              bnorm_dtype_name(dt), training);
        tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
        CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0, "freeze: weight.grad must stay 0");
        tget(l, BNORM_TENSOR_BIAS_GRAD, got, C);
        CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0, "freeze: bias.grad must stay 0");
        free(x); free(dy);
    }
    bnorm_layer_destroy(l);
    free(w); free(b); free(rm); free(rv); free(y); free(yr); free(dx); free(dxr);
}

/* ---- 5. track_running_stats = 0, affine = 0 ------------------------------------------------ */

static void test_untracked_and_plain(void) {
    const int64_t C = 5, dims[] = {3, C, 7};
    for (int layout = 0; layout < 2; layout++) {
        geo g = mkgeo(BNORM_DTYPE_F64, layout, 3, dims);
        double *y = malloc(sizeof(double) * (size_t)g.numel), *yr = malloc(sizeof(double) * (size_t)g.numel);
        double *dx = malloc(sizeof(double) * (size_t)g.numel), *dxr = malloc(sizeof(double) * (size_t)g.numel);
        double mean[5], inv[5], dw[5], db[5], got[5];
        void *p = (void *)&p;

        /* no tracking: batch statistics in eval too, no running tensors, no counter */
        bnorm_layer_options o = bnorm_layer_options_default(C);
        o.param_dtype = BNORM_DTYPE_F64;
        o.track_running_stats = 0;
        bnorm_layer *l = mklayer(&o);
        if (!l) return;
        CHECK_STATUS(bnorm_layer_tensor(l, BNORM_TENSOR_RUNNING_MEAN, &p), BNORM_STATUS_UNSUPPORTED);
        CHECK(p == NULL, "untracked: running_mean pointer must be NULL");
        p = (void *)&p;
        CHECK_STATUS(bnorm_layer_tensor(l, BNORM_TENSOR_RUNNING_VAR, &p), BNORM_STATUS_UNSUPPORTED);
        CHECK(p == NULL, "untracked: running_var pointer must be NULL");
        double *w = randv(C, 1, 0.3, BNORM_DTYPE_F64), *b = randv(C, 0, 1, BNORM_DTYPE_F64);
        tset(l, BNORM_TENSOR_WEIGHT, w, C);
        tset(l, BNORM_TENSOR_BIAS, b, C);
        for (int training = 1; training >= 0; training--) {
            CHECK_STATUS(bnorm_layer_set_training(l, training), BNORM_STATUS_OK);
            double *x = randv(g.numel, 2, 3, BNORM_DTYPE_F64), *dy = randv(g.numel, 0, 1, BNORM_DTYPE_F64);
            CHECK_STATUS(lfwd(l, &g, x, NULL, y), BNORM_STATUS_OK);
            ref_forward_train(&g.sh, x, w, b, NULL, 0, 1e-5, yr, mean, NULL, inv);
            CHECK(th_err(y, yr, g.numel, 1e-12, 1e-12) <= 1, "untracked training=%d: batch statistics", training);
            CHECK(nbt(l) == 0, "untracked: counter moved");
            CHECK_STATUS(bnorm_layer_zero_grad(l), BNORM_STATUS_OK);
            CHECK_STATUS(lbwd(l, &g, x, dy, dx, NULL), BNORM_STATUS_OK);
            /* the gradient flows through the batch statistics, in eval as well */
            ref_backward(&g.sh, x, dy, w, mean, inv, 0, NULL, dxr, NULL, dw, db);
            CHECK(th_err(dx, dxr, g.numel, 1e-11, 1e-11) <= 1, "untracked training=%d: dx", training);
            tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
            CHECK(th_err(got, dw, C, 1e-11, 1e-11) <= 1, "untracked training=%d: weight.grad", training);
            tget(l, BNORM_TENSOR_BIAS_GRAD, got, C);
            CHECK(th_err(got, db, C, 1e-11, 1e-11) <= 1, "untracked training=%d: bias.grad", training);
            free(x); free(dy);
        }
        bnorm_layer_destroy(l);
        free(w); free(b);

        /* affine = 0: no weight/bias tensors; y = xhat */
        o = bnorm_layer_options_default(C);
        o.param_dtype = BNORM_DTYPE_F64;
        o.affine = 0;
        l = mklayer(&o);
        if (!l) return;
        const bnorm_tensor_id none[] = {BNORM_TENSOR_WEIGHT, BNORM_TENSOR_BIAS, BNORM_TENSOR_WEIGHT_GRAD,
                                        BNORM_TENSOR_BIAS_GRAD};
        for (int i = 0; i < 4; i++) {
            p = (void *)&p;
            CHECK_STATUS(bnorm_layer_tensor(l, none[i], &p), BNORM_STATUS_UNSUPPORTED);
            CHECK(p == NULL, "affine = 0: %s pointer must be NULL", bnorm_tensor_name(none[i]));
        }
        double *x = randv(g.numel, -1, 2, BNORM_DTYPE_F64), *dy = randv(g.numel, 0, 1, BNORM_DTYPE_F64);
        CHECK_STATUS(lfwd(l, &g, x, NULL, y), BNORM_STATUS_OK);
        ref_forward_train(&g.sh, x, NULL, NULL, NULL, 0, 1e-5, yr, mean, NULL, inv);
        CHECK(th_err(y, yr, g.numel, 1e-12, 1e-12) <= 1, "affine = 0: y");
        CHECK_STATUS(lbwd(l, &g, x, dy, dx, NULL), BNORM_STATUS_OK);
        ref_backward(&g.sh, x, dy, NULL, mean, inv, 0, NULL, dxr, NULL, NULL, NULL);
        CHECK(th_err(dx, dxr, g.numel, 1e-11, 1e-11) <= 1, "affine = 0: dx");
        CHECK_STATUS(bnorm_layer_zero_grad(l), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_reset_parameters(l), BNORM_STATUS_OK);
        bnorm_layer_destroy(l);
        free(x); free(dy); free(y); free(yr); free(dx); free(dxr);
    }
}

/* ---- 6. one value per channel ---------------------------------------------------------------- */

static void test_one_value(void) {
    const int64_t C = 6;
    const int64_t d2[] = {1, C}, d3[] = {1, C, 1}, d4[] = {1, C, 1, 1};
    const int ranks[] = {2, 3, 4};
    const int64_t *dims[] = {d2, d3, d4};
    for (int k = 0; k < 3; k++)
        for (int layout = 0; layout < 2; layout++) {
            geo g = mkgeo(BNORM_DTYPE_F32, layout, ranks[k], dims[k]);
            bnorm_layer_options o = bnorm_layer_options_default(C);
            bnorm_layer *l = mklayer(&o);
            if (!l) return;
            /* give the layer a history first */
            const int64_t dh[] = {3, C, 2};
            geo gh = mkgeo(BNORM_DTYPE_F32, layout, 3, dh);
            double *xh = randv(gh.numel, 1, 1, BNORM_DTYPE_F32);
            CHECK_STATUS(lfwd(l, &gh, xh, NULL, NULL), BNORM_STATUS_OK);
            float rm0[6], rv0[6], w0[6];
            memcpy(rm0, tensor(l, BNORM_TENSOR_RUNNING_MEAN), sizeof rm0);
            memcpy(rv0, tensor(l, BNORM_TENSOR_RUNNING_VAR), sizeof rv0);
            memcpy(w0, tensor(l, BNORM_TENSOR_WEIGHT), sizeof w0);
            float x[6] = {1, 2, 3, 4, 5, 6}, y[6];
            memset(y, 0x5A, sizeof y);
            unsigned char poison[sizeof y];
            memcpy(poison, y, sizeof y);
            CHECK_STATUS(bnorm_layer_forward(l, &g.d, x, y, NULL), BNORM_STATUS_BATCH_TOO_SMALL);
            CHECK(strstr(bnorm_last_error(), "expected more than 1 value per channel when training") != NULL,
                  "message: %s", bnorm_last_error());
            CHECK(memcmp(y, poison, sizeof y) == 0, "rank %d: a failed forward wrote y", ranks[k]);
            CHECK(memcmp(rm0, tensor(l, BNORM_TENSOR_RUNNING_MEAN), sizeof rm0) == 0, "failed forward: running_mean");
            CHECK(memcmp(rv0, tensor(l, BNORM_TENSOR_RUNNING_VAR), sizeof rv0) == 0, "failed forward: running_var");
            CHECK(memcmp(w0, tensor(l, BNORM_TENSOR_WEIGHT), sizeof w0) == 0, "failed forward: weight");
            CHECK(nbt(l) == 1, "failed forward moved the counter to %lld", (long long)nbt(l));
            /* the failed forward left the saved state of the last good one: its backward still works */
            double *dyh = randv(gh.numel, 0, 1, BNORM_DTYPE_F32);
            CHECK_STATUS(lbwd(l, &gh, xh, dyh, NULL, NULL), BNORM_STATUS_OK);
            free(dyh);
            /* eval with one value per channel is fine */
            CHECK_STATUS(bnorm_layer_set_training(l, 0), BNORM_STATUS_OK);
            CHECK_STATUS(bnorm_layer_forward(l, &g.d, x, y, NULL), BNORM_STATUS_OK);
            double xd[6], yd[6], yr[6], rm[6], rv[6];
            for (int c = 0; c < C; c++) {
                xd[c] = x[c];
                yd[c] = y[c];
                rm[c] = rm0[c];
                rv[c] = rv0[c];
            }
            ref_forward_eval(&g.sh, xd, NULL, NULL, rm, rv, 1e-5, NULL, 0, yr);
            CHECK(th_err(yd, yr, C, 1e-6, 1e-6) <= 1, "eval with N = 1");
            bnorm_layer_destroy(l);
            free(xh);
        }
    /* (1, C, 2): two values per channel train */
    {
        const int64_t d[] = {1, C, 2};
        geo g = mkgeo(BNORM_DTYPE_F32, 0, 3, d);
        bnorm_layer_options o = bnorm_layer_options_default(C);
        bnorm_layer *l = mklayer(&o);
        double *x = randv(g.numel, 0, 1, BNORM_DTYPE_F32);
        CHECK_STATUS(lfwd(l, &g, x, NULL, NULL), BNORM_STATUS_OK);
        free(x);
        bnorm_layer_destroy(l);
    }
}

/* ---- 7. gradients: accumulation, zero_grad, fused ReLU, misuse ------------------------------ */

static void test_gradients(bnorm_dtype dt, int layout) {
    const int64_t C = 4, dims[] = {3, C, 3, 4};
    geo g = mkgeo(dt, layout, 4, dims);
    const bnorm_dtype pd = bnorm_param_dtype(dt);
    const double tol = tol_of(dt);
    bnorm_layer_options o = bnorm_layer_options_default(C);
    o.param_dtype = pd;
    bnorm_layer *l = mklayer(&o);
    if (!l) return;
    double *w = randv(C, 1, 0.4, pd), *b = randv(C, 0, 1, pd);
    tset(l, BNORM_TENSOR_WEIGHT, w, C);
    tset(l, BNORM_TENSOR_BIAS, b, C);
    double *x = randv(g.numel, 2, 1.5, dt), *dy1 = randv(g.numel, 0, 1, dt), *dy2 = randv(g.numel, 0.3, 1, dt);
    double *dx = malloc(sizeof(double) * (size_t)g.numel), *dxr = malloc(sizeof(double) * (size_t)g.numel);
    double mean[4], inv[4], dw1[4], db1[4], dw2[4], db2[4], got[4], want[4];

    /* backward before any forward */
    CHECK_STATUS(lbwd(l, &g, x, dy1, dx, NULL), BNORM_STATUS_STATE);
    tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
    CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0 && got[3] == 0, "backward before forward wrote weight.grad");

    CHECK_STATUS(lfwd(l, &g, x, NULL, NULL), BNORM_STATUS_OK);
    ref_forward_train(&g.sh, x, w, b, NULL, 0, 1e-5, dxr, mean, NULL, inv);
    ref_backward(&g.sh, x, dy1, w, mean, inv, 0, NULL, dxr, NULL, dw1, db1);
    ref_backward(&g.sh, x, dy2, w, mean, inv, 0, NULL, dxr, NULL, dw2, db2);
    th_round(dt, dxr, g.numel);
    CHECK_STATUS(lbwd(l, &g, x, dy1, dx, NULL), BNORM_STATUS_OK);
    CHECK_STATUS(lbwd(l, &g, x, dy2, dx, NULL), BNORM_STATUS_OK);
    /* dx is overwritten: it is the second backward's alone */
    CHECK(th_err(dx, dxr, g.numel, tol * 20, tol * 5) <= 1, "%s layout %d: dx of the second backward", bnorm_dtype_name(dt),
          layout);
    /* weight/bias gradients accumulate */
    for (int c = 0; c < C; c++) want[c] = dw1[c] + dw2[c];
    tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
    CHECK(th_err(got, want, C, tol * 20, tol * 5) <= 1, "%s: weight.grad accumulates over two backwards",
          bnorm_dtype_name(dt));
    for (int c = 0; c < C; c++) want[c] = db1[c] + db2[c];
    tget(l, BNORM_TENSOR_BIAS_GRAD, got, C);
    CHECK(th_err(got, want, C, tol * 20, tol * 5) <= 1, "%s: bias.grad accumulates", bnorm_dtype_name(dt));
    /* without dx */
    CHECK_STATUS(lbwd(l, &g, x, dy1, NULL, NULL), BNORM_STATUS_OK);
    for (int c = 0; c < C; c++) want[c] = dw1[c] * 2 + dw2[c];
    tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
    CHECK(th_err(got, want, C, tol * 20, tol * 5) <= 1, "%s: weight.grad after a third backward without dx",
          bnorm_dtype_name(dt));
    CHECK_STATUS(bnorm_layer_zero_grad(l), BNORM_STATUS_OK);
    tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
    CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0 && got[3] == 0, "zero_grad: weight.grad");
    tget(l, BNORM_TENSOR_BIAS_GRAD, got, C);
    CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0 && got[3] == 0, "zero_grad: bias.grad");

    /* a different descriptor than the last forward's */
    geo other = g;
    other.d.dims[0] = 2;
    other.numel = g.numel / 3 * 2;
    CHECK_STATUS(lbwd(l, &other, x, dy1, dx, NULL), BNORM_STATUS_SHAPE_MISMATCH);
    other = g;
    other.d.layout = (bnorm_layout)!layout;
    CHECK_STATUS(lbwd(l, &other, x, dy1, dx, NULL), BNORM_STATUS_SHAPE_MISMATCH);
    tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
    CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0 && got[3] == 0, "a failed backward wrote weight.grad");

    /* eval backward: statistics constant, weight/bias gradients still accumulated (PyTorch) */
    CHECK_STATUS(bnorm_layer_set_training(l, 0), BNORM_STATUS_OK);
    double rm[4], rv[4], einv[4];
    tget(l, BNORM_TENSOR_RUNNING_MEAN, rm, C);
    tget(l, BNORM_TENSOR_RUNNING_VAR, rv, C);
    for (int c = 0; c < C; c++) einv[c] = 1 / sqrt(rv[c] + 1e-5);
    CHECK_STATUS(lfwd(l, &g, x, NULL, NULL), BNORM_STATUS_OK);
    CHECK_STATUS(lbwd(l, &g, x, dy1, dx, NULL), BNORM_STATUS_OK);
    ref_backward(&g.sh, x, dy1, w, rm, einv, 1, NULL, dxr, NULL, dw1, db1);
    th_round(dt, dxr, g.numel);
    CHECK(th_err(dx, dxr, g.numel, tol * 4, tol * 2) <= 1, "%s eval backward: dx = g*w*invstd_running", bnorm_dtype_name(dt));
    tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
    CHECK(th_err(got, dw1, C, tol * 20, tol * 5) <= 1, "%s eval backward: weight.grad", bnorm_dtype_name(dt));

    bnorm_layer_destroy(l);
    free(w); free(b); free(x); free(dy1); free(dy2); free(dx); free(dxr);
}

static void test_fused(int layout) {
    const int64_t C = 3, dims[] = {4, C, 5};
    geo g = mkgeo(BNORM_DTYPE_F64, layout, 3, dims);
    bnorm_layer_options o = bnorm_layer_options_default(C);
    o.param_dtype = BNORM_DTYPE_F64;
    o.fused_relu = 1;
    bnorm_layer *l = mklayer(&o);
    if (!l) return;
    double *w = randv(C, 1, 0.4, BNORM_DTYPE_F64), *b = randv(C, 0, 0.5, BNORM_DTYPE_F64);
    tset(l, BNORM_TENSOR_WEIGHT, w, C);
    tset(l, BNORM_TENSOR_BIAS, b, C);
    const int64_t n = g.numel;
    double *y = malloc(sizeof(double) * (size_t)n), *yr = malloc(sizeof(double) * (size_t)n);
    double *dx = malloc(sizeof(double) * (size_t)n), *dxr = malloc(sizeof(double) * (size_t)n);
    double *da = malloc(sizeof(double) * (size_t)n), *dar = malloc(sizeof(double) * (size_t)n);
    unsigned char *mask = malloc((size_t)n);
    double mean[3], inv[3], dw[3], db[3], got[3], rm[3], rv[3];
    for (int training = 1; training >= 0; training--)
        for (int with_add = 0; with_add < 2; with_add++) {
            CHECK_STATUS(bnorm_layer_set_training(l, training), BNORM_STATUS_OK);
            double *x = randv(n, 1, 2, BNORM_DTYPE_F64), *add = randv(n, 0, 1, BNORM_DTYPE_F64);
            double *dy = randv(n, 0, 1, BNORM_DTYPE_F64);
            tget(l, BNORM_TENSOR_RUNNING_MEAN, rm, C);
            tget(l, BNORM_TENSOR_RUNNING_VAR, rv, C);
            CHECK_STATUS(bnorm_layer_zero_grad(l), BNORM_STATUS_OK);
            CHECK_STATUS(lfwd(l, &g, x, with_add ? add : NULL, y), BNORM_STATUS_OK);
            if (training) {
                ref_forward_train(&g.sh, x, w, b, with_add ? add : NULL, 1, 1e-5, yr, mean, NULL, inv);
            } else {
                ref_forward_eval(&g.sh, x, w, b, rm, rv, 1e-5, with_add ? add : NULL, 1, yr);
                for (int c = 0; c < C; c++) {
                    mean[c] = rm[c];
                    inv[c] = 1 / sqrt(rv[c] + 1e-5);
                }
            }
            CHECK(th_err(y, yr, n, 1e-12, 1e-12) <= 1, "fused layout %d training %d add %d: y", layout, training, with_add);
            long zeros = 0;
            for (int64_t i = 0; i < n; i++) {
                mask[i] = yr[i] > 0;
                zeros += !mask[i];
            }
            CHECK(zeros > 0 && zeros < n, "fused: the ReLU should cut some but not all outputs");
            CHECK_STATUS(lbwd(l, &g, x, dy, dx, da), BNORM_STATUS_OK);
            ref_backward(&g.sh, x, dy, w, mean, inv, !training, mask, dxr, dar, dw, db);
            CHECK(th_err(dx, dxr, n, 1e-11, 1e-11) <= 1, "fused layout %d training %d add %d: dx", layout, training, with_add);
            CHECK(th_err(da, dar, n, 0, 0) == 0, "fused: daddend = dy * mask");
            tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
            CHECK(th_err(got, dw, C, 1e-11, 1e-11) <= 1, "fused: weight.grad");
            tget(l, BNORM_TENSOR_BIAS_GRAD, got, C);
            CHECK(th_err(got, db, C, 1e-11, 1e-11) <= 1, "fused: bias.grad");
            free(x); free(add); free(dy);
        }
    bnorm_layer_destroy(l);
    free(w); free(b); free(y); free(yr); free(dx); free(dxr); free(da); free(dar); free(mask);
}

/* ---- 8. resets ----------------------------------------------------------------------------- */

static void test_resets(void) {
    const int64_t C = 4, dims[] = {6, C};
    geo g = mkgeo(BNORM_DTYPE_F32, 0, 2, dims);
    bnorm_layer_options o = bnorm_layer_options_default(C);
    bnorm_layer *l = mklayer(&o);
    if (!l) return;
    double *x = randv(g.numel, 3, 2, BNORM_DTYPE_F32), *dy = randv(g.numel, 0, 1, BNORM_DTYPE_F32);
    double w[4] = {2, 3, 4, 5}, b[4] = {-1, -2, -3, -4}, got[4], gw[4];
    tset(l, BNORM_TENSOR_WEIGHT, w, C);
    tset(l, BNORM_TENSOR_BIAS, b, C);
    CHECK_STATUS(lfwd(l, &g, x, NULL, NULL), BNORM_STATUS_OK);
    CHECK_STATUS(lbwd(l, &g, x, dy, NULL, NULL), BNORM_STATUS_OK);
    CHECK_STATUS(bnorm_layer_set_num_batches_tracked(l, 11), BNORM_STATUS_OK);
    tget(l, BNORM_TENSOR_WEIGHT_GRAD, gw, C);
    CHECK(gw[0] != 0, "expected a weight gradient");

    CHECK_STATUS(bnorm_layer_reset_running_stats(l), BNORM_STATUS_OK);
    tget(l, BNORM_TENSOR_RUNNING_MEAN, got, C);
    CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0 && got[3] == 0, "reset_running_stats: running_mean = 0");
    tget(l, BNORM_TENSOR_RUNNING_VAR, got, C);
    CHECK(got[0] == 1 && got[1] == 1 && got[2] == 1 && got[3] == 1, "reset_running_stats: running_var = 1");
    CHECK(nbt(l) == 0, "reset_running_stats: counter = 0");
    tget(l, BNORM_TENSOR_WEIGHT, got, C);
    CHECK(th_err(got, w, C, 0, 0) == 0, "reset_running_stats must keep the weight");
    tget(l, BNORM_TENSOR_WEIGHT_GRAD, got, C);
    CHECK(th_err(got, gw, C, 0, 0) == 0, "reset_running_stats must keep the gradients");

    CHECK_STATUS(lfwd(l, &g, x, NULL, NULL), BNORM_STATUS_OK);
    CHECK_STATUS(bnorm_layer_reset_parameters(l), BNORM_STATUS_OK);
    tget(l, BNORM_TENSOR_WEIGHT, got, C);
    CHECK(got[0] == 1 && got[1] == 1 && got[2] == 1 && got[3] == 1, "reset_parameters: weight = 1");
    tget(l, BNORM_TENSOR_BIAS, got, C);
    CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0 && got[3] == 0, "reset_parameters: bias = 0");
    tget(l, BNORM_TENSOR_RUNNING_MEAN, got, C);
    CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0 && got[3] == 0, "reset_parameters: running_mean = 0");
    tget(l, BNORM_TENSOR_RUNNING_VAR, got, C);
    CHECK(got[0] == 1 && got[1] == 1 && got[2] == 1 && got[3] == 1, "reset_parameters: running_var = 1");
    CHECK(nbt(l) == 0, "reset_parameters: counter = 0");
    bnorm_layer_destroy(l);
    free(x); free(dy);
}

int main(void) {
    th_seed(11);
    const int64_t d3[] = {5, 7, 6}, d4[] = {2, 3, 4, 5}, d2[] = {9, 16};
    for (int layout = 0; layout < 2; layout++) {
        test_running_stats(BNORM_DTYPE_F64, layout, 3, d3);
        test_running_stats(BNORM_DTYPE_F32, layout, 4, d4);
        test_running_stats(BNORM_DTYPE_F16, layout, 2, d2);
        test_running_stats(BNORM_DTYPE_BF16, layout, 3, d3);
        test_gradients(BNORM_DTYPE_F64, layout);
        test_gradients(BNORM_DTYPE_F32, layout);
        test_gradients(BNORM_DTYPE_F16, layout);
        test_fused(layout);
    }
    test_empty_and_cumulative();
    test_kept_weight();
    test_freeze(BNORM_DTYPE_F64);
    test_freeze(BNORM_DTYPE_F32);
    test_untracked_and_plain();
    test_one_value();
    test_resets();
    return th_finish("test_layer");
}
