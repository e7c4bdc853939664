/*
 * test_state_interop.c - the C side of the PyTorch interop test (run by torch_interop.py, or alone on
 * the committed fixtures in tests/interop/data).
 *   usage: test_state_interop DATA_DIR OUT_DIR
 * DATA_DIR holds model.safetensors (a torch state_dict) and expected.txt (torch's eval outputs and
 * fold results). This program lists the BN layers of the checkpoint, loads each by prefix, compares
 * its eval output with torch's, compares folding with fuse_conv_bn_eval / fuse_linear_bn_eval, and
 * then writes layers of its own (trained a little in C) to OUT_DIR with c_expected.txt, which the
 * script loads into torch with load_state_dict(strict=True).
 */
#include "harness.h"

#include <float.h>

#define MAXT 256

typedef struct fx_tensor {
    char name[128];
    int rank;
    int64_t dims[8];
    int64_t n;
    double *v;
} fx_tensor;

typedef struct fx_layer {
    char prefix[128];
    int affine, track, cumulative;
    double eps;
} fx_layer;

static fx_tensor fx_t[MAXT];
static int fx_nt;
static fx_layer fx_l[16];
static int fx_nl;

static int fx_read(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char tok[256];
    while (fscanf(f, "%255s", tok) == 1) {
        if (tok[0] == '#') {
            int c;
            while ((c = fgetc(f)) != EOF && c != '\n') {}
        } else if (strcmp(tok, "L") == 0 && fx_nl < 16) {
            fx_layer *l = &fx_l[fx_nl++];
            if (fscanf(f, "%127s %d %d %lf %d", l->prefix, &l->affine, &l->track, &l->eps, &l->cumulative) != 5) break;
        } else if (strcmp(tok, "T") == 0 && fx_nt < MAXT) {
            fx_tensor *t = &fx_t[fx_nt++];
            if (fscanf(f, "%127s %d", t->name, &t->rank) != 2 || t->rank < 0 || t->rank > 8) break;
            t->n = 1;
            for (int i = 0; i < t->rank; i++) {
                long long d;
                if (fscanf(f, "%lld", &d) != 1) break;
                t->dims[i] = d;
                t->n *= d;
            }
            t->v = (double *)malloc((size_t)(t->n ? t->n : 1) * sizeof(double));
            for (int64_t i = 0; i < t->n; i++)
                if (fscanf(f, "%lf", &t->v[i]) != 1) break;
        }
    }
    fclose(f);
    return fx_nt > 0;
}

static const fx_tensor *fx_get(const char *a, const char *b) {
    size_t la = strlen(a);
    for (int i = 0; i < fx_nt; i++)
        if (strncmp(fx_t[i].name, a, la) == 0 && strcmp(fx_t[i].name + la, b) == 0) return &fx_t[i];
    return NULL;
}

static uint64_t rng = 0x1234567u;
static double rnd(void) { /* xorshift64*, uniform in [-1, 1) */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (double)((rng * 2685821657736338717ull) >> 11) / 4503599627370496.0 - 1.0;
}

/* Eval output of the layer on x (float32 or float64 data to match its parameters). */
static void eval_out(bnorm_layer *l, int rank, const int64_t *dims, const double *x, double *y, int64_t n) {
    bnorm_layer_options o;
    bnorm_layer_get_options(l, &o);
    bnorm_desc d = {.dtype = o.param_dtype, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = rank};
    for (int i = 0; i < rank; i++) d.dims[i] = dims[i];
    th_buf bx = th_alloc(o.param_dtype, n, 0), by = th_alloc(o.param_dtype, n, 0);
    th_store(&bx, x);
    bnorm_layer_set_training(l, 0);
    CHECK_STATUS(bnorm_layer_forward(l, &d, bx.p, by.p, NULL), BNORM_STATUS_OK);
    th_load(&by, y);
    th_free(&bx);
    th_free(&by);
}

static void train_steps(bnorm_layer *l, int rank, const int64_t *dims, int64_t n, int steps) {
    double *x = (double *)malloc((size_t)n * sizeof(double));
    for (int s = 0; s < steps; s++) {
        for (int64_t i = 0; i < n; i++) x[i] = 2.5 * rnd() + 0.8;
        bnorm_layer_options o;
        bnorm_layer_get_options(l, &o);
        bnorm_desc d = {.dtype = o.param_dtype, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = rank};
        for (int i = 0; i < rank; i++) d.dims[i] = dims[i];
        th_buf bx = th_alloc(o.param_dtype, n, 0), by = th_alloc(o.param_dtype, n, 0);
        th_store(&bx, x);
        bnorm_layer_set_training(l, 1);
        CHECK_STATUS(bnorm_layer_forward(l, &d, bx.p, by.p, NULL), BNORM_STATUS_OK);
        th_free(&bx);
        th_free(&by);
    }
    free(x);
}

static void check_model(const char *dir) {
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    bnorm_state_entry *ent = NULL;
    size_t count = 0;
    CHECK_STATUS(bnorm_state_list(path, &ent, &count), BNORM_STATUS_OK);
    CHECK(count == (size_t)fx_nl, "listed %zu BN layers, the model has %d", count, fx_nl);
    for (int i = 0; i < fx_nl; i++) {
        const fx_layer *fl = &fx_l[i];
        const bnorm_state_entry *e = NULL;
        for (size_t k = 0; k < count; k++)
            if (strcmp(ent[k].prefix, fl->prefix) == 0) e = &ent[k];
        CHECK(e != NULL, "layer %s not listed", fl->prefix);
        if (!e) continue;
        CHECK(e->has_options == 0 && e->options.affine == fl->affine && e->options.track_running_stats == fl->track &&
                  e->options.param_dtype == BNORM_DTYPE_F32,
              "%s: listed as affine %d track %d", fl->prefix, e->options.affine, e->options.track_running_stats);
        if (i > 0) CHECK(strcmp(ent[i].prefix, fl->prefix) == 0, "order: %s at %d", fl->prefix, i);
        bnorm_layer_options o = e->options;
        o.eps = fl->eps; /* torch keeps eps and momentum out of the state_dict */
        if (fl->cumulative) o.momentum_mode = BNORM_MOMENTUM_CUMULATIVE;
        bnorm_layer *l = NULL;
        CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
        if (!l) continue;
        CHECK_STATUS(bnorm_layer_load(l, path, fl->prefix), BNORM_STATUS_OK);
        const fx_tensor *x = fx_get(fl->prefix, "x"), *yt = fx_get(fl->prefix, "y");
        CHECK(x && yt && x->n == yt->n, "fixture tensors of %s", fl->prefix);
        if (x && yt && x->n == yt->n) {
            double *y = (double *)malloc((size_t)x->n * sizeof(double));
            eval_out(l, x->rank, x->dims, x->v, y, x->n);
            double err = th_err(y, yt->v, x->n, 2e-6, 2e-6);
            CHECK(err <= 4.0, "%s: eval output vs torch: normalized error %g", fl->prefix, err);
            free(y);
        }
        bnorm_layer_destroy(l);
    }
    bnorm_state_list_free(ent);
}

static void check_fold(void) {
    static const char *cases[] = {"conv_bias", "conv_nobias", "linear"};
    for (int i = 0; i < 3; i++) {
        char pre[64];
        snprintf(pre, sizeof pre, "fold.%s.", cases[i]);
        const fx_tensor *eps = fx_get(pre, "eps"), *g = fx_get(pre, "gamma"), *be = fx_get(pre, "beta"),
                        *rm = fx_get(pre, "rm"), *rv = fx_get(pre, "rv"), *w = fx_get(pre, "w"), *b = fx_get(pre, "b"),
                        *wo = fx_get(pre, "wout"), *bo = fx_get(pre, "bout");
        CHECK(eps && g && be && rm && rv && w && wo && bo, "fold fixture %s incomplete", cases[i]);
        if (!(eps && g && be && rm && rv && w && wo && bo)) continue;
        int64_t C = g->n, k = w->n / C;
        bnorm_layer_options o = bnorm_layer_options_default(C);
        o.eps = eps->v[0];
        bnorm_layer *l = NULL;
        CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
        if (!l) continue;
        const fx_tensor *src[4] = {g, be, rm, rv};
        for (int t = 0; t < 4; t++) {
            void *p = NULL;
            bnorm_layer_tensor(l, (bnorm_tensor_id)t, &p);
            for (int64_t c = 0; c < C; c++) ((float *)p)[c] = (float)src[t]->v[c];
        }
        bnorm_layer_set_training(l, 0);
        float *wi = (float *)malloc((size_t)w->n * 4), *wout = (float *)malloc((size_t)w->n * 4);
        float *bi = (float *)malloc((size_t)C * 4), *bout = (float *)malloc((size_t)C * 4);
        for (int64_t j = 0; j < w->n; j++) wi[j] = (float)w->v[j];
        for (int64_t c = 0; c < C; c++) bi[c] = b ? (float)b->v[c] : 0.0f;
        CHECK_STATUS(bnorm_layer_fold_into(l, C, k, wi, b ? bi : NULL, wout, bout), BNORM_STATUS_OK);
        int bad = 0;
        for (int64_t c = 0; c < C; c++) {
            double s = fabs(g->v[c]) / sqrt(rv->v[c] + o.eps);
            for (int64_t j = 0; j < k; j++) {
                double want = wo->v[c * k + j], tol = 3 * FLT_EPSILON * fabs(w->v[c * k + j]) * s + 1e-30;
                if (fabs(wout[c * k + j] - want) > tol && bad++ < 5)
                    fprintf(stderr, "%s weight[%lld][%lld] = %.9g, torch %.9g\n", cases[i], (long long)c, (long long)j,
                            wout[c * k + j], want);
            }
            double bb = b ? b->v[c] : 0.0;
            double tol = 3 * FLT_EPSILON * (fabs(bb - rm->v[c]) * s + fabs(be->v[c]) + fabs(bb) * s + fabs(rm->v[c]) * s);
            if (fabs(bout[c] - bo->v[c]) > tol && bad++ < 5)
                fprintf(stderr, "%s bias[%lld] = %.9g, torch %.9g\n", cases[i], (long long)c, bout[c], bo->v[c]);
        }
        CHECK(bad == 0, "fold %s: %d values differ from torch by more than float32 rounding", cases[i], bad);
        free(wi); free(wout); free(bi); free(bout);
        bnorm_layer_destroy(l);
    }
}

static void tensor_line(FILE *f, const char *name, int rank, const int64_t *dims, const double *v, int64_t n) {
    fprintf(f, "T %s %d", name, rank);
    for (int i = 0; i < rank; i++) fprintf(f, " %lld", (long long)dims[i]);
    for (int64_t i = 0; i < n; i++) fprintf(f, " %.17g", v[i]);
    fprintf(f, "\n");
}

/* Layers written by bnorm for torch to load: the model's layers after C training, and a few others. */
static void write_c_files(const char *data_dir, const char *out) {
    char path[1024], model[1024];
    snprintf(path, sizeof path, "%s/c_expected.txt", out);
    snprintf(model, sizeof model, "%s/model.safetensors", data_dir);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL, "cannot write %s", path);
    if (!f) return;
    fprintf(f, "# written by test_state_interop\n");
    struct { const char *from; int64_t C; bnorm_dtype pd; int mode, affine, track, rank; } plan[] = {
        {"bn1.", 8, BNORM_DTYPE_F32, BNORM_MOMENTUM_NEW_WEIGHT, 1, 1, 4},
        {"layer1.1.", 6, BNORM_DTYPE_F32, BNORM_MOMENTUM_NEW_WEIGHT, 0, 1, 4},
        {"bn3.", 5, BNORM_DTYPE_F32, BNORM_MOMENTUM_CUMULATIVE, 1, 1, 4},
        {NULL, 7, BNORM_DTYPE_F64, BNORM_MOMENTUM_KEPT_WEIGHT, 1, 1, 2},
        {NULL, 3, BNORM_DTYPE_F32, BNORM_MOMENTUM_NEW_WEIGHT, 1, 0, 5},
        {NULL, 4, BNORM_DTYPE_F32, BNORM_MOMENTUM_NEW_WEIGHT, 0, 0, 4},
    };
    for (size_t i = 0; i < sizeof plan / sizeof plan[0]; i++) {
        bnorm_layer_options o = plan[i].pd == BNORM_DTYPE_F64 ? bnorm_layer_options_megengine(plan[i].C)
                                                              : bnorm_layer_options_default(plan[i].C);
        o.param_dtype = plan[i].pd;
        o.momentum_mode = (bnorm_momentum_mode)plan[i].mode;
        o.affine = plan[i].affine;
        o.track_running_stats = plan[i].track;
        o.eps = 1e-5 * (double)(i + 1);
        bnorm_layer *l = NULL;
        CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
        if (!l) continue;
        if (plan[i].from) CHECK_STATUS(bnorm_layer_load(l, model, plan[i].from), BNORM_STATUS_OK);
        if (plan[i].affine && !plan[i].from) { /* non-trivial parameters */
            void *w = NULL, *b = NULL;
            bnorm_layer_tensor(l, BNORM_TENSOR_WEIGHT, &w);
            bnorm_layer_tensor(l, BNORM_TENSOR_BIAS, &b);
            for (int64_t c = 0; c < o.num_features; c++) {
                double vw = 1.0 + 0.5 * rnd(), vb = rnd();
                if (o.param_dtype == BNORM_DTYPE_F64) { ((double *)w)[c] = vw; ((double *)b)[c] = vb; }
                else { ((float *)w)[c] = (float)vw; ((float *)b)[c] = (float)vb; }
            }
        }
        int64_t dims[5] = {3, plan[i].C, 2, 3, 2};
        int64_t n = 1;
        for (int r = 0; r < plan[i].rank; r++) n *= dims[r];
        train_steps(l, plan[i].rank, dims, n, 2);
        char fname[64], prefix[64];
        snprintf(fname, sizeof fname, "c_%zu.safetensors", i);
        if (i % 2) snprintf(prefix, sizeof prefix, "net.block%zu.bn.", i);
        else prefix[0] = '\0';
        snprintf(path, sizeof path, "%s/%s", out, fname);
        CHECK_STATUS(bnorm_layer_save(l, path, prefix), BNORM_STATUS_OK);
        double *x = (double *)malloc((size_t)n * sizeof(double)), *y = (double *)malloc((size_t)n * sizeof(double));
        for (int64_t j = 0; j < n; j++) x[j] = 3.0 * rnd() + 0.5;
        th_round(plan[i].pd, x, n);
        eval_out(l, plan[i].rank, dims, x, y, n);
        fprintf(f, "F %s %s %d", fname, prefix[0] ? prefix : "\"\"", plan[i].rank);
        for (int r = 0; r < plan[i].rank; r++) fprintf(f, " %lld", (long long)dims[r]);
        fprintf(f, "\n");
        char tn[128];
        snprintf(tn, sizeof tn, "%s.x", fname);
        tensor_line(f, tn, plan[i].rank, dims, x, n);
        snprintf(tn, sizeof tn, "%s.y", fname);
        tensor_line(f, tn, plan[i].rank, dims, y, n);
        free(x);
        free(y);
        bnorm_layer_destroy(l);
    }
    fclose(f);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s DATA_DIR OUT_DIR\n", argv[0]);
        return 2;
    }
    char path[1024];
    snprintf(path, sizeof path, "%s/expected.txt", argv[1]);
    CHECK(fx_read(path), "cannot read %s", path);
    check_model(argv[1]);
    check_fold();
    write_c_files(argv[1], argv[2]);
    return th_finish("test_state_interop");
}
