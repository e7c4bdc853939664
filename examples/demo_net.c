/*
 * demo_net.c - forward, backward, SGD and state files of the examples' network (see demo_net.h).
 * The batch-norm work is done by bnorm layers; everything else is short plain C.
 */
#define _POSIX_C_SOURCE 200809L
#include "demo_net.h"
#include "demo_data.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

const char *const demo_bn_names[3] = {"bn1", "block.bn1", "block.bn2"};

/* Below this many multiply-adds a linear layer runs on one thread (a parallel region costs more). */
#define DEMO_PARALLEL_WORK 65536

static bnorm_status fail(char *err, size_t cap, bnorm_status st, const char *fmt, ...) {
    if (err && cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, cap, fmt, ap);
        va_end(ap);
    }
    return st;
}

static bnorm_desc desc2d(int n, int c) {
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 2, .dims = {n, c}};
    return d;
}

/* ------------------------------------------------------------------------------------------------
 * Linear layers
 * ---------------------------------------------------------------------------------------------- */

static int linear_init(demo_linear *L, int in, int out, uint64_t *rng) {
    L->in = in;
    L->out = out;
    const size_t nw = (size_t)in * out;
    L->w = (float *)malloc(nw * sizeof(float));
    L->gw = (float *)calloc(nw, sizeof(float));
    L->vw = (float *)calloc(nw, sizeof(float));
    L->b = (float *)calloc((size_t)out, sizeof(float));
    L->gb = (float *)calloc((size_t)out, sizeof(float));
    L->vb = (float *)calloc((size_t)out, sizeof(float));
    if (!L->w || !L->gw || !L->vw || !L->b || !L->gb || !L->vb) return -1;
    const double std = sqrt(2.0 / in); /* He (Kaiming) normal, fan-in, for ReLU networks */
    for (size_t i = 0; i < nw; i++) L->w[i] = (float)(std * demo_rng_normal(rng));
    return 0;
}

static void linear_free(demo_linear *L) {
    free(L->w);
    free(L->gw);
    free(L->vw);
    free(L->b);
    free(L->gb);
    free(L->vb);
    memset(L, 0, sizeof *L);
}

/* y[n][out] = x[n][in] w + b. Rows are independent, so threads split them; within a row the sum runs
 * over k in order (axpy form: the inner loop over outputs vectorizes without reassociation). */
static void linear_forward(const demo_linear *L, const float *x, int n, float *y) {
    const int in = L->in, out = L->out;
    const float *w = L->w, *b = L->b;
#pragma omp parallel for schedule(static) if ((long)n * in * out > DEMO_PARALLEL_WORK)
    for (int i = 0; i < n; i++) {
        float *yr = y + (size_t)i * out;
        const float *xr = x + (size_t)i * in;
        for (int j = 0; j < out; j++) yr[j] = b[j];
        for (int k = 0; k < in; k++) {
            const float a = xr[k];
            if (a == 0.0f) continue; /* ReLU outputs and blank pixels are often exactly 0 */
            const float *wr = w + (size_t)k * out;
            for (int j = 0; j < out; j++) yr[j] += a * wr[j];
        }
    }
}

static float dot(const float *a, const float *b, int n) {
    float s[8] = {0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int t = 0; t < 8; t++) s[t] += a[j + t] * b[j + t];
    float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; j < n; j++) r += a[j] * b[j];
    return r;
}

/* Gradients of y = x w + b given dy: gw = x^T dy, gb = column sums of dy (both overwritten), and
 * dx = dy w^T when dx is not NULL. */
static void linear_backward(demo_linear *L, const float *x, const float *dy, int n, float *dx) {
    const int in = L->in, out = L->out;
    const int par = (long)n * in * out > DEMO_PARALLEL_WORK;
    (void)par; /* used only by the OpenMP pragmas */
    float *gw = L->gw, *gb = L->gb;
    const float *w = L->w;
    for (int j = 0; j < out; j++) gb[j] = 0.0f;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < out; j++) gb[j] += dy[(size_t)i * out + j];
#pragma omp parallel for schedule(static) if (par)
    for (int k = 0; k < in; k++) {
        float *g = gw + (size_t)k * out;
        for (int j = 0; j < out; j++) g[j] = 0.0f;
        for (int i = 0; i < n; i++) {
            const float a = x[(size_t)i * in + k];
            if (a == 0.0f) continue;
            const float *d = dy + (size_t)i * out;
            for (int j = 0; j < out; j++) g[j] += a * d[j];
        }
    }
    if (!dx) return;
#pragma omp parallel for schedule(static) if (par)
    for (int i = 0; i < n; i++)
        for (int k = 0; k < in; k++) dx[(size_t)i * in + k] = dot(dy + (size_t)i * out, w + (size_t)k * out, out);
}

static void sgd(float *p, float *v, const float *g, size_t n, float lr, float mu) {
    for (size_t i = 0; i < n; i++) {
        v[i] = mu * v[i] + g[i];
        p[i] -= lr * v[i];
    }
}

static void relu(float *a, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] = a[i] > 0.0f ? a[i] : 0.0f;
}

/* g *= (h > 0): the gradient of a ReLU whose output was h. */
static void relu_backward(float *g, const float *h, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!(h[i] > 0.0f)) g[i] = 0.0f;
}

/* ------------------------------------------------------------------------------------------------
 * The network
 * ---------------------------------------------------------------------------------------------- */

bnorm_status demo_net_create(demo_net *net, int in, int hidden, int classes, int use_bn, int capacity,
                             uint64_t seed) {
    memset(net, 0, sizeof *net);
    if (in < 1 || hidden < 1 || classes < 2 || capacity < 2) return BNORM_STATUS_INVALID_ARGUMENT;
    net->use_bn = use_bn;
    net->in = in;
    net->hidden = hidden;
    net->classes = classes;
    net->capacity = capacity;
    uint64_t rng = seed;
    const int dims[5] = {in, hidden, hidden, hidden, classes};
    int bad = 0;
    for (int i = 0; i < 4; i++) bad |= linear_init(&net->fc[i], dims[i], dims[i + 1], &rng);
    const size_t act = (size_t)capacity * hidden;
    const size_t wide = (size_t)capacity * (size_t)(hidden > classes ? hidden : classes);
    float **bufs[] = {&net->z1, &net->h1, &net->z2, &net->h2, &net->z3, &net->h3};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) bad |= !(*bufs[i] = (float *)malloc(act * sizeof(float)));
    bad |= !(net->logits = (float *)malloc((size_t)capacity * classes * sizeof(float)));
    bad |= !(net->d_a = (float *)malloc(wide * sizeof(float)));
    bad |= !(net->d_b = (float *)malloc(act * sizeof(float)));
    bad |= !(net->d_skip = (float *)malloc(act * sizeof(float)));
    if (bad) {
        demo_net_destroy(net);
        return BNORM_STATUS_OUT_OF_MEMORY;
    }
    if (use_bn) {
        for (int i = 0; i < 3; i++) {
            bnorm_layer_options o = bnorm_layer_options_default(hidden);
            o.fused_relu = i == 2; /* the block's last BN: y = ReLU(BN(x) + skip) in one call */
            bnorm_status st = bnorm_layer_create(&o, &net->bn[i]);
            if (st) {
                demo_net_destroy(net);
                return st;
            }
            for (int t = 0; t < 2; t++) {
                net->vbn[i][t] = (float *)calloc((size_t)hidden, sizeof(float));
                if (!net->vbn[i][t]) {
                    demo_net_destroy(net);
                    return BNORM_STATUS_OUT_OF_MEMORY;
                }
            }
        }
    }
    return BNORM_STATUS_OK;
}

void demo_net_destroy(demo_net *net) {
    for (int i = 0; i < 4; i++) linear_free(&net->fc[i]);
    for (int i = 0; i < 3; i++) {
        bnorm_layer_destroy(net->bn[i]);
        free(net->vbn[i][0]);
        free(net->vbn[i][1]);
    }
    free(net->z1);
    free(net->h1);
    free(net->z2);
    free(net->h2);
    free(net->z3);
    free(net->h3);
    free(net->logits);
    free(net->d_a);
    free(net->d_b);
    free(net->d_skip);
    memset(net, 0, sizeof *net);
}

bnorm_status demo_net_set_training(demo_net *net, int training) {
    for (int i = 0; i < 3; i++) {
        if (!net->bn[i]) continue;
        bnorm_status st = bnorm_layer_set_training(net->bn[i], training);
        if (st) return st;
    }
    return BNORM_STATUS_OK;
}

bnorm_status demo_net_forward(demo_net *net, const float *x, int n, const float **logits) {
    /* n = 0 is an empty slice of a distributed batch: synchronized BN layers must still take part */
    if (n < 0 || n > net->capacity) return BNORM_STATUS_INVALID_ARGUMENT;
    const int H = net->hidden;
    const size_t m = (size_t)n * H;
    const bnorm_desc d = desc2d(n, H);
    bnorm_status st;
    linear_forward(&net->fc[0], x, n, net->z1);
    if (net->use_bn) {
        if ((st = bnorm_layer_forward(net->bn[0], &d, net->z1, net->h1, NULL))) return st;
        relu(net->h1, m);
    } else {
        memcpy(net->h1, net->z1, m * sizeof(float));
        relu(net->h1, m);
    }
    linear_forward(&net->fc[1], net->h1, n, net->z2);
    if (net->use_bn) {
        if ((st = bnorm_layer_forward(net->bn[1], &d, net->z2, net->h2, NULL))) return st;
        relu(net->h2, m);
    } else {
        memcpy(net->h2, net->z2, m * sizeof(float));
        relu(net->h2, m);
    }
    linear_forward(&net->fc[2], net->h2, n, net->z3);
    if (net->use_bn) {
        if ((st = bnorm_layer_forward(net->bn[2], &d, net->z3, net->h3, net->h1))) return st;
    } else {
        for (size_t i = 0; i < m; i++) net->h3[i] = net->z3[i] + net->h1[i];
        relu(net->h3, m);
    }
    linear_forward(&net->fc[3], net->h3, n, net->logits);
    *logits = net->logits;
    return BNORM_STATUS_OK;
}

/* Softmax cross-entropy of one row: returns the loss, writes (softmax - onehot) * scale into g if given. */
static double softmax_xent(const float *l, int classes, int label, float scale, float *g, int *argmax) {
    int best = 0;
    float mx = l[0];
    for (int j = 1; j < classes; j++)
        if (l[j] > mx) mx = l[j], best = j;
    *argmax = best;
    double sum = 0;
    for (int j = 0; j < classes; j++) sum += exp((double)l[j] - mx);
    if (g)
        for (int j = 0; j < classes; j++)
            g[j] = (float)((exp((double)l[j] - mx) / sum - (j == label)) * scale);
    return log(sum) - ((double)l[label] - mx);
}

bnorm_status demo_net_forward_backward(demo_net *net, const float *x, const uint8_t *y, int n, float grad_scale,
                                       double *loss_sum, int *correct) {
    const float *logits;
    bnorm_status st = demo_net_forward(net, x, n, &logits);
    if (st) return st;
    const int H = net->hidden, K = net->classes;
    const size_t m = (size_t)n * H;
    const bnorm_desc d = desc2d(n, H);
    double loss = 0;
    int ok = 0;
    for (int i = 0; i < n; i++) {
        int am;
        loss += softmax_xent(logits + (size_t)i * K, K, y[i], grad_scale, net->d_a + (size_t)i * K, &am);
        ok += am == y[i];
    }
    *loss_sum = loss;
    *correct = ok;

    for (int i = 0; i < 3; i++)
        if (net->bn[i] && (st = bnorm_layer_zero_grad(net->bn[i]))) return st;
    /* d_a: dlogits -> d_b: dh3 */
    linear_backward(&net->fc[3], net->h3, net->d_a, n, net->d_b);
    /* through ReLU(BN3(z3) + h1): d_b becomes dz3, d_skip the gradient reaching h1 by the skip */
    if (net->use_bn) {
        if ((st = bnorm_layer_backward(net->bn[2], &d, net->z3, net->d_b, net->d_b, net->d_skip))) return st;
    } else {
        relu_backward(net->d_b, net->h3, m);
        memcpy(net->d_skip, net->d_b, m * sizeof(float));
    }
    linear_backward(&net->fc[2], net->h2, net->d_b, n, net->d_a); /* d_a: dh2 */
    relu_backward(net->d_a, net->h2, m);
    if (net->use_bn && (st = bnorm_layer_backward(net->bn[1], &d, net->z2, net->d_a, net->d_a, NULL))) return st;
    linear_backward(&net->fc[1], net->h1, net->d_a, n, net->d_b); /* d_b: dh1 through the block body */
    for (size_t i = 0; i < m; i++) net->d_b[i] += net->d_skip[i];
    relu_backward(net->d_b, net->h1, m);
    if (net->use_bn && (st = bnorm_layer_backward(net->bn[0], &d, net->z1, net->d_b, net->d_b, NULL))) return st;
    linear_backward(&net->fc[0], x, net->d_b, n, NULL);
    return BNORM_STATUS_OK;
}

bnorm_status demo_net_sgd_step(demo_net *net, float lr, float momentum) {
    for (int i = 0; i < 4; i++) {
        demo_linear *L = &net->fc[i];
        sgd(L->w, L->vw, L->gw, (size_t)L->in * L->out, lr, momentum);
        sgd(L->b, L->vb, L->gb, (size_t)L->out, lr, momentum);
    }
    for (int i = 0; i < 3; i++) {
        if (!net->bn[i]) continue;
        static const bnorm_tensor_id param[2] = {BNORM_TENSOR_WEIGHT, BNORM_TENSOR_BIAS};
        static const bnorm_tensor_id grad[2] = {BNORM_TENSOR_WEIGHT_GRAD, BNORM_TENSOR_BIAS_GRAD};
        for (int t = 0; t < 2; t++) {
            void *p, *g;
            bnorm_status st = bnorm_layer_tensor(net->bn[i], param[t], &p);
            if (!st) st = bnorm_layer_tensor(net->bn[i], grad[t], &g);
            if (st) return st;
            sgd((float *)p, net->vbn[i][t], (const float *)g, (size_t)net->hidden, lr, momentum);
        }
    }
    return BNORM_STATUS_OK;
}

bnorm_status demo_net_evaluate(demo_net *net, const float *x, const uint8_t *y, int n, int *correct,
                               double *loss_sum, float *logits_out) {
    bnorm_status st = demo_net_set_training(net, 0);
    if (st) return st;
    const int K = net->classes;
    int ok = 0;
    double loss = 0;
    for (int i0 = 0; i0 < n; i0 += net->capacity) {
        const int b = n - i0 < net->capacity ? n - i0 : net->capacity;
        const float *logits;
        if ((st = demo_net_forward(net, x + (size_t)i0 * net->in, b, &logits))) return st;
        for (int i = 0; i < b; i++) {
            int am;
            loss += softmax_xent(logits + (size_t)i * K, K, y[i0 + i], 1.0f, NULL, &am);
            ok += am == y[i0 + i];
        }
        if (logits_out) memcpy(logits_out + (size_t)i0 * K, logits, (size_t)b * K * sizeof(float));
    }
    *correct = ok;
    if (loss_sum) *loss_sum = loss;
    return BNORM_STATUS_OK;
}

/* ------------------------------------------------------------------------------------------------
 * State files. linear.bin, all integers and floats little-endian:
 *   "bnormLIN" (8 bytes), uint32 version = 1, uint32 layer count;
 *   per layer: uint32 in, uint32 out, in*out float32 weights ([in][out] row-major), out float32 biases.
 * ---------------------------------------------------------------------------------------------- */

static int put_u32(FILE *f, uint32_t v) {
    unsigned char b[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16), (unsigned char)(v >> 24)};
    return fwrite(b, 1, 4, f) == 4 ? 0 : -1;
}

static int get_u32(FILE *f, uint32_t *v) {
    unsigned char b[4];
    if (fread(b, 1, 4, f) != 4) return -1;
    *v = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    return 0;
}

static int put_floats(FILE *f, const float *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &p[i], 4);
        if (put_u32(f, u)) return -1;
    }
    return 0;
}

static int get_floats(FILE *f, float *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        if (get_u32(f, &u)) return -1;
        memcpy(&p[i], &u, 4);
    }
    return 0;
}

static void join(char *out, size_t cap, const char *dir, const char *name) { snprintf(out, cap, "%s/%s", dir, name); }

/* The state file of BN layer i ("<dir>/<name>.safetensors") and its tensor prefix ("<name>."). */
static void bn_state_path(const char *dir, int i, char *path, size_t cap, char *prefix, size_t pcap) {
    char file[80];
    snprintf(prefix, pcap, "%s.", demo_bn_names[i]);
    snprintf(file, sizeof file, "%s.safetensors", demo_bn_names[i]);
    join(path, cap, dir, file);
}

bnorm_status demo_net_save(const demo_net *net, const char *dir, char *err, size_t cap) {
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return fail(err, cap, BNORM_STATUS_IO, "cannot create directory %s: %s", dir, strerror(errno));
    char path[4096], prefix[64];
    for (int i = 0; i < 3; i++) {
        if (!net->bn[i]) continue;
        bn_state_path(dir, i, path, sizeof path, prefix, sizeof prefix);
        bnorm_status st = bnorm_layer_save(net->bn[i], path, prefix);
        if (st) return fail(err, cap, st, "bnorm_layer_save(%s): %s", path, bnorm_last_error());
    }
    join(path, sizeof path, dir, "linear.bin");
    FILE *f = fopen(path, "wb");
    if (!f) return fail(err, cap, BNORM_STATUS_IO, "cannot write %s: %s", path, strerror(errno));
    int bad = fwrite("bnormLIN", 1, 8, f) != 8 || put_u32(f, 1) || put_u32(f, 4);
    for (int i = 0; i < 4 && !bad; i++) {
        const demo_linear *L = &net->fc[i];
        bad = put_u32(f, (uint32_t)L->in) || put_u32(f, (uint32_t)L->out) ||
              put_floats(f, L->w, (size_t)L->in * L->out) || put_floats(f, L->b, (size_t)L->out);
    }
    bad |= fclose(f) != 0;
    if (bad) return fail(err, cap, BNORM_STATUS_IO, "error writing %s", path);
    return BNORM_STATUS_OK;
}

bnorm_status demo_net_load(demo_net *net, const char *dir, char *err, size_t cap) {
    char path[4096], prefix[64];
    for (int i = 0; i < 3; i++) {
        if (!net->bn[i]) continue;
        bn_state_path(dir, i, path, sizeof path, prefix, sizeof prefix);
        bnorm_status st = bnorm_layer_load(net->bn[i], path, prefix);
        if (st) return fail(err, cap, st, "bnorm_layer_load(%s): %s", path, bnorm_last_error());
    }
    join(path, sizeof path, dir, "linear.bin");
    FILE *f = fopen(path, "rb");
    if (!f) return fail(err, cap, BNORM_STATUS_IO, "cannot read %s: %s", path, strerror(errno));
    char magic[8];
    uint32_t version, count;
    bnorm_status st = BNORM_STATUS_OK;
    if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "bnormLIN", 8) || get_u32(f, &version) || version != 1 ||
        get_u32(f, &count) || count != 4) {
        st = fail(err, cap, BNORM_STATUS_FORMAT, "%s: not a version-1 linear.bin of 4 layers", path);
    }
    for (int i = 0; i < 4 && !st; i++) {
        demo_linear *L = &net->fc[i];
        uint32_t in, out;
        if (get_u32(f, &in) || get_u32(f, &out) || in != (uint32_t)L->in || out != (uint32_t)L->out)
            st = fail(err, cap, BNORM_STATUS_FORMAT, "%s: layer %d does not have the shape %d x %d", path, i, L->in,
                      L->out);
        else if (get_floats(f, L->w, (size_t)L->in * L->out) || get_floats(f, L->b, (size_t)L->out))
            st = fail(err, cap, BNORM_STATUS_FORMAT, "%s: truncated in layer %d", path, i);
    }
    fclose(f);
    return st;
}
