/*
 * test_gradcheck.c - gradients by finite differences. First the float64 reference backward
 * (ref_backward) is checked against central differences of the scalar loss L = sum(dy_fixed * y),
 * y from the reference forward: training mode (the gradient flows through the batch mean and
 * variance) and eval mode (running statistics are constants), with and without the fused add + ReLU
 * (data drawn away from the kink), for dx, dweight, dbias and daddend. Then the library (float64) is
 * checked against ref_backward on the same data. Several shapes, both layouts.
 */
#include "harness.h"
#include "ref.h"

typedef struct problem {
    ref_shape sh;
    int rank;
    int64_t dims[5];
    int64_t numel;
    int training, relu, with_add;
    double eps;
    double *x, *dy, *add, *w, *b, *rm, *rv;
} problem;

/* The forward as a function of everything a gradient is taken for. z (pre-ReLU) optional. */
static void forward(const problem *p, double *y, double *mean, double *invstd) {
    if (p->training) {
        ref_forward_train(&p->sh, p->x, p->w, p->b, p->with_add ? p->add : NULL, p->relu, p->eps, y, mean, NULL,
                          invstd);
    } else {
        ref_forward_eval(&p->sh, p->x, p->w, p->b, p->rm, p->rv, p->eps, p->with_add ? p->add : NULL, p->relu, y);
        if (mean)
            for (int64_t c = 0; c < p->sh.C; c++) {
                mean[c] = p->rm[c];
                invstd[c] = 1 / sqrt(p->rv[c] + p->eps);
            }
    }
}

static double loss(const problem *p, double *scratch) {
    forward(p, scratch, NULL, NULL);
    double l = 0;
    for (int64_t i = 0; i < p->numel; i++) l += p->dy[i] * scratch[i];
    return l;
}

/* Central difference of L with respect to v[i]. */
static double fd(const problem *p, double *v, int64_t i, double *scratch) {
    const double keep = v[i], h = 1e-6 * fmax(1.0, fabs(keep));
    v[i] = keep + h;
    double lp = loss(p, scratch);
    v[i] = keep - h;
    double lm = loss(p, scratch);
    v[i] = keep;
    return (lp - lm) / (2 * h);
}

static double maxabs(const double *v, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(v[i]));
    return m;
}

/* Draws the problem's data; with a ReLU, redraws until every pre-activation is at least 1e-4 from 0
 * (a step of 1e-6 in any input moves z by a few 1e-6 at most, so no difference crosses the kink). */
static void draw(problem *p) {
    const int64_t C = p->sh.C, n = p->numel;
    double *z = malloc(sizeof(double) * (size_t)n);
    for (int attempt = 0; attempt < 1000; attempt++) {
        for (int64_t c = 0; c < C; c++) {
            p->w[c] = (th_uniform() < 0.5 ? -1 : 1) * (0.5 + th_uniform());
            p->b[c] = 0.5 * th_normal();
            p->rm[c] = th_normal();
            p->rv[c] = 0.3 + th_uniform();
        }
        for (int64_t i = 0; i < n; i++) {
            p->x[i] = 2 + 1.5 * th_normal();
            p->dy[i] = th_normal();
            p->add[i] = th_normal();
        }
        if (!p->relu) break;
        int relu = p->relu;
        p->relu = 0;
        forward(p, z, NULL, NULL);
        p->relu = relu;
        double closest = INFINITY;
        for (int64_t i = 0; i < n; i++) closest = fmin(closest, fabs(z[i]));
        /* and the ReLU must let some gradient through in every channel */
        int64_t live_channels = 0;
        for (int64_t c = 0; c < C; c++) {
            int live = 0;
            for (int64_t k = 0; k < p->sh.N; k++)
                for (int64_t s = 0; s < p->sh.S; s++) live |= z[ref_index(&p->sh, k, c, s)] > 0;
            live_channels += live;
        }
        if (closest > 1e-4 && live_channels == C) break;
    }
    free(z);
}

static void describe(const problem *p, char *buf, size_t cap) {
    int k = snprintf(buf, cap, "%s dims=(", p->sh.channels_last ? "CL" : "CF");
    for (int i = 0; i < p->rank; i++)
        k += snprintf(buf + k, cap - (size_t)k, "%lld%s", (long long)p->dims[i], i + 1 < p->rank ? "," : "");
    snprintf(buf + k, cap - (size_t)k, ") %s relu=%d add=%d eps=%g", p->training ? "train" : "eval", p->relu,
             p->with_add, p->eps);
}

/* 1. ref_backward against finite differences. */
static void check_reference(problem *p, const char *name) {
    const int64_t C = p->sh.C, n = p->numel;
    double *y = malloc(sizeof(double) * (size_t)n), *scratch = malloc(sizeof(double) * (size_t)n);
    double *dx = malloc(sizeof(double) * (size_t)n), *da = malloc(sizeof(double) * (size_t)n);
    double *fdx = malloc(sizeof(double) * (size_t)n), *fda = malloc(sizeof(double) * (size_t)n);
    double mean[8], inv[8], dw[8], db[8], fdw[8], fdb[8];
    unsigned char *mask = malloc((size_t)n);
    forward(p, y, mean, inv);
    for (int64_t i = 0; i < n; i++) mask[i] = y[i] > 0;
    ref_backward(&p->sh, p->x, p->dy, p->w, mean, inv, !p->training, p->relu ? mask : NULL, dx, da, dw, db);
    for (int64_t i = 0; i < n; i++) {
        fdx[i] = fd(p, p->x, i, scratch);
        fda[i] = fd(p, p->add, i, scratch);
    }
    for (int64_t c = 0; c < C; c++) {
        fdw[c] = fd(p, p->w, c, scratch);
        fdb[c] = fd(p, p->b, c, scratch);
    }
    /* truncation ~h^2, cancellation ~1e-16 * |L| / h: 1e-6 of the gradient's scale is ample */
    CHECK(th_err(dx, fdx, n, 1e-6 * (1 + maxabs(fdx, n)), 1e-6) <= 1, "%s: ref dx vs finite differences", name);
    CHECK(th_err(dw, fdw, C, 1e-6 * (1 + maxabs(fdw, C)), 1e-6) <= 1, "%s: ref dweight vs finite differences", name);
    CHECK(th_err(db, fdb, C, 1e-6 * (1 + maxabs(fdb, C)), 1e-6) <= 1, "%s: ref dbias vs finite differences", name);
    if (p->with_add)
        CHECK(th_err(da, fda, n, 1e-6 * (1 + maxabs(fda, n)), 1e-6) <= 1, "%s: ref daddend vs finite differences", name);
    /* the checks above are not vacuous: the gradients are not all zero */
    CHECK(maxabs(fdx, n) > 1e-3 && maxabs(fdw, C) > 1e-3, "%s: degenerate problem", name);
    free(y); free(scratch); free(dx); free(da); free(fdx); free(fda); free(mask);
}

/* 2. The float64 library against ref_backward on the same data. */
static void check_library(problem *p, const char *name, int threads) {
    const int64_t C = p->sh.C, n = p->numel;
    bnorm_set_num_threads(threads);
    bnorm_desc d = {.dtype = BNORM_DTYPE_F64, .layout = p->sh.channels_last ? BNORM_LAYOUT_CHANNELS_LAST
                                                                              : BNORM_LAYOUT_CHANNELS_FIRST,
                    .rank = p->rank};
    for (int i = 0; i < p->rank; i++) d.dims[i] = p->dims[i];
    double *y = malloc(sizeof(double) * (size_t)n), *dx = malloc(sizeof(double) * (size_t)n);
    double *da = malloc(sizeof(double) * (size_t)n), *ly = malloc(sizeof(double) * (size_t)n);
    double *ldx = malloc(sizeof(double) * (size_t)n), *lda = malloc(sizeof(double) * (size_t)n);
    double mean[8], inv[8], dw[8], db[8], sm[8], si[8], ldw[8], ldb[8];
    unsigned char *mask = malloc((size_t)n);
    unsigned char *lmask = malloc(bnorm_relu_mask_size(&d) + 1);
    forward(p, y, mean, inv);
    for (int64_t i = 0; i < n; i++) mask[i] = y[i] > 0;
    ref_backward(&p->sh, p->x, p->dy, p->w, mean, inv, !p->training, p->relu ? mask : NULL, dx,
                 p->relu ? da : NULL, dw, db);
    bnorm_forward_args fa = {.desc = d, .x = p->x, .y = ly, .weight = p->w, .bias = p->b, .eps = p->eps,
                             .training = p->training, .save_mean = p->training ? sm : NULL,
                             .save_invstd = p->training ? si : NULL, .running_mean = p->training ? NULL : p->rm,
                             .running_var = p->training ? NULL : p->rv, .addend = p->with_add ? p->add : NULL,
                             .relu = p->relu, .relu_mask = p->relu ? lmask : NULL};
    bnorm_status st = bnorm_forward(&fa);
    CHECK(st == BNORM_STATUS_OK, "%s: library forward: %s", name, bnorm_last_error());
    if (st == BNORM_STATUS_OK) {
        CHECK(th_err(ly, y, n, 1e-12, 1e-12) <= 1, "%s threads %d: library y", name, threads);
        if (p->training) {
            CHECK(th_err(sm, mean, C, 1e-12, 1e-12) <= 1, "%s threads %d: save_mean", name, threads);
            CHECK(th_err(si, inv, C, 1e-12, 1e-12) <= 1, "%s threads %d: save_invstd", name, threads);
        }
        /* eval: once with var + eps, once with invstd */
        for (int form = 0; form < (p->training ? 1 : 2); form++) {
            memset(ldx, 0xA5, sizeof(double) * (size_t)n);
            bnorm_backward_args ba = {.desc = d, .x = p->x, .dy = p->dy, .dx = ldx, .weight = p->w,
                                      .mean = p->training ? sm : p->rm, .use_global_stats = !p->training,
                                      .relu_mask = p->relu ? lmask : NULL, .daddend = p->relu ? lda : NULL,
                                      .dweight = ldw, .dbias = ldb};
            if (p->training) ba.invstd = si;
            else if (form == 0) { ba.var = p->rv; ba.eps = p->eps; }
            else ba.invstd = inv;
            st = bnorm_backward(&ba);
            CHECK(st == BNORM_STATUS_OK, "%s: library backward: %s", name, bnorm_last_error());
            if (st) continue;
            double sx = 1 + maxabs(dx, n), sw = 1 + maxabs(dw, C);
            CHECK(th_err(ldx, dx, n, 1e-12 * sx, 1e-12) <= 1, "%s threads %d form %d: library dx", name, threads, form);
            CHECK(th_err(ldw, dw, C, 1e-12 * sw, 1e-12) <= 1, "%s threads %d: library dweight", name, threads);
            CHECK(th_err(ldb, db, C, 1e-12 * sw, 1e-12) <= 1, "%s threads %d: library dbias", name, threads);
            if (p->relu) CHECK(th_err(lda, da, n, 1e-15, 0) <= 1, "%s threads %d: library daddend", name, threads);
        }
    }
    free(y); free(dx); free(da); free(ly); free(ldx); free(lda); free(mask); free(lmask);
}

int main(void) {
    th_seed(7);
    const struct { int rank; int64_t dims[5]; } shapes[] = {
        {2, {6, 3}}, {3, {3, 2, 5}}, {4, {2, 3, 2, 3}}, {5, {2, 2, 2, 2, 3}}, {3, {1, 2, 7}}, {4, {3, 1, 1, 4}},
    };
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int layout = 0; layout < 2; layout++)
            for (int training = 0; training < 2; training++)
                for (int variant = 0; variant < 3; variant++) { /* plain, ReLU, add + ReLU */
                    problem p = {0};
                    p.rank = shapes[si].rank;
                    int64_t S = 1;
                    for (int i = 0; i < p.rank; i++) p.dims[i] = shapes[si].dims[i];
                    for (int i = 2; i < p.rank; i++) S *= p.dims[i];
                    p.sh = (ref_shape){p.dims[0], p.dims[1], S, layout};
                    p.numel = p.dims[0] * p.dims[1] * S;
                    p.training = training;
                    p.relu = variant > 0;
                    p.with_add = variant == 2;
                    p.eps = variant == 1 ? 0.1 : 1e-5;
                    const size_t nb = sizeof(double) * (size_t)p.numel, cb = sizeof(double) * 8;
                    p.x = malloc(nb); p.dy = malloc(nb); p.add = malloc(nb);
                    p.w = malloc(cb); p.b = malloc(cb); p.rm = malloc(cb); p.rv = malloc(cb);
                    draw(&p);
                    char name[160];
                    describe(&p, name, sizeof name);
                    check_reference(&p, name);
                    check_library(&p, name, 1);
                    check_library(&p, name, 3);
                    free(p.x); free(p.dy); free(p.add); free(p.w); free(p.b); free(p.rm); free(p.rv);
                }
    bnorm_set_num_threads(0);
    return th_finish("test_gradcheck");
}
