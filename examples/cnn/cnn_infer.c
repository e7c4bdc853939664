/*
 * cnn_infer.c - inference in C with a network trained in PyTorch: the BN layers of a checkpoint are
 * loaded into bnorm layers, run in eval mode, and folded into the preceding convolution / linear
 * weights; both ways must reproduce PyTorch's logits.
 *
 *   /usr/bin/python3 examples/cnn/train_cnn.py --out DIR      (PyTorch: trains, writes the files)
 *   build/examples/cnn_infer DIR
 *
 * DIR/model.safetensors is the network's whole state_dict (train_cnn.py describes the network): the
 * convolution and linear weights are read here with a few lines of cJSON; each BN layer is read by
 * bnorm_layer_load(layer, path, "bn1.") out of the same file (PyTorch's names, num_batches_tracked
 * included). DIR/expected.safetensors holds the test images and the logits PyTorch computed for them
 * in eval mode. The program computes the logits twice:
 *   1. unfused: conv -> bnorm_layer_forward (eval: running statistics) -> ReLU ..., and
 *   2. folded: bnorm_layer_fold_into turns each conv/linear + BN pair into one conv/linear
 *      (torch.nn.utils.fusion.fuse_conv_bn_eval), so inference makes no BN call at all,
 * and fails unless both agree with PyTorch's to float32 rounding: max |difference| <= 1e-4 * max(1,
 * max |logit|) (seen: about 1e-6), and the eval accuracy is the same as PyTorch's.
 */
#include <bnorm/bnorm.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a minimal safetensors reader: 8-byte little-endian header length, JSON header, data ------- */
typedef struct {
    unsigned char *bytes;
    size_t size, data_start;
    cJSON *header;
} st_file;

static int st_open(st_file *f, const char *path) {
    memset(f, 0, sizeof *f);
    FILE *fp = fopen(path, "rb");
    if (!fp) return fprintf(stderr, "cnn_infer: cannot open %s\n", path), -1;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    f->bytes = n > 8 ? malloc((size_t)n) : NULL;
    if (!f->bytes || fread(f->bytes, 1, (size_t)n, fp) != (size_t)n) {
        fclose(fp);
        return fprintf(stderr, "cnn_infer: cannot read %s\n", path), -1;
    }
    fclose(fp);
    f->size = (size_t)n;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | f->bytes[i];
    if (hlen > f->size - 8) return fprintf(stderr, "cnn_infer: %s: bad header length\n", path), -1;
    f->data_start = 8 + (size_t)hlen;
    f->header = cJSON_ParseWithLength((const char *)f->bytes + 8, (size_t)hlen);
    if (!f->header) return fprintf(stderr, "cnn_infer: %s: header is not JSON\n", path), -1;
    return 0;
}

static void st_close(st_file *f) {
    cJSON_Delete(f->header);
    free(f->bytes);
}

/* A copy of tensor name, which must be F32 with the given element count. */
static float *st_f32(const st_file *f, const char *name, size_t count) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(f->header, name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(t, "dtype");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(t, "data_offsets");
    if (!cJSON_IsString(dt) || strcmp(dt->valuestring, "F32") || cJSON_GetArraySize(off) != 2) {
        fprintf(stderr, "cnn_infer: tensor %s: missing or not F32\n", name);
        return NULL;
    }
    double b = cJSON_GetArrayItem(off, 0)->valuedouble, e = cJSON_GetArrayItem(off, 1)->valuedouble;
    if (e - b != (double)(count * 4) || f->data_start + e > (double)f->size) {
        fprintf(stderr, "cnn_infer: tensor %s: expected %zu values\n", name, count);
        return NULL;
    }
    float *out = malloc(count * sizeof *out);
    const unsigned char *p = f->bytes + f->data_start + (size_t)b;
    for (size_t i = 0; out && i < count; i++) {  /* little-endian on any host */
        uint32_t u = (uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8 | (uint32_t)p[4 * i + 2] << 16 |
                     (uint32_t)p[4 * i + 3] << 24;
        memcpy(&out[i], &u, 4);
    }
    return out;
}

/* ---- the network's other layers, plain C (sums in double) ----------------------------------- */
enum { N_TEST = 360, H = 8, W = 8, C1 = 8, C2 = 16, F1 = 32, CLASSES = 10 };

/* 3x3 convolution, padding 1, stride 1: x [n][cin][H][W] -> y [n][cout][H][W] */
static void conv3x3(const float *x, int n, int cin, int cout, const float *w, const float *b, float *y) {
    for (int s = 0; s < n; s++)
        for (int o = 0; o < cout; o++)
            for (int i = 0; i < H; i++)
                for (int j = 0; j < W; j++) {
                    double acc = b ? b[o] : 0;
                    for (int c = 0; c < cin; c++)
                        for (int di = -1; di <= 1; di++)
                            for (int dj = -1; dj <= 1; dj++) {
                                int ii = i + di, jj = j + dj;
                                if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
                                acc += (double)w[((o * cin + c) * 3 + di + 1) * 3 + dj + 1] *
                                       x[((size_t)(s * cin + c) * H + ii) * W + jj];
                            }
                    y[((size_t)(s * cout + o) * H + i) * W + j] = (float)acc;
                }
}

/* x [n][k] -> y [n][m] = x W^T + b (W [m][k], PyTorch's nn.Linear) */
static void linear(const float *x, int n, int k, int m, const float *w, const float *b, float *y) {
    for (int s = 0; s < n; s++)
        for (int o = 0; o < m; o++) {
            double acc = b[o];
            for (int i = 0; i < k; i++) acc += (double)w[(size_t)o * k + i] * x[(size_t)s * k + i];
            y[(size_t)s * m + o] = (float)acc;
        }
}

static void relu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = x[i] > 0 ? x[i] : 0;
}

#define TRY(call)                                                                   \
    do {                                                                            \
        if ((call) != BNORM_STATUS_OK) {                                            \
            fprintf(stderr, "cnn_infer: %s: %s\n", #call, bnorm_last_error());      \
            return 1;                                                               \
        }                                                                           \
    } while (0)

typedef struct {
    float *w, *b;  /* weight and bias of the conv/linear layer */
    int c_out, k;  /* weight [c_out][k] */
    bnorm_layer *bn;
    float *fw, *fb; /* folded */
} pair;

static double compare(const char *what, const float *got, const float *want, const float *labels, size_t n,
                      double *acc) {
    double maxdiff = 0, maxabs = 0;
    int correct = 0;
    for (size_t s = 0; s < n; s++) {
        int best = 0;
        for (int c = 0; c < CLASSES; c++) {
            size_t i = s * CLASSES + (size_t)c;
            maxdiff = fmax(maxdiff, fabs((double)got[i] - want[i]));
            maxabs = fmax(maxabs, fabs((double)want[i]));
            if (got[i] > got[s * CLASSES + (size_t)best]) best = c;
        }
        correct += best == (int)labels[s];
    }
    *acc = (double)correct / (double)n;
    double rel = maxdiff / fmax(1.0, maxabs);
    printf("%-44s max |logit - PyTorch| %.2e (relative %.2e), test accuracy %.2f%%\n", what, maxdiff, rel,
           100 * *acc);
    return rel;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: cnn_infer DIR   (DIR written by examples/cnn/train_cnn.py)\n");
        return 2;
    }
    char mpath[4096], epath[4096];
    snprintf(mpath, sizeof mpath, "%s/model.safetensors", argv[1]);
    snprintf(epath, sizeof epath, "%s/expected.safetensors", argv[1]);
    st_file m, e;
    if (st_open(&m, mpath) || st_open(&e, epath)) return 1;

    pair p[3] = {{.c_out = C1, .k = 1 * 9}, {.c_out = C2, .k = C1 * 9}, {.c_out = F1, .k = C2 * H * W}};
    const char *names[3] = {"conv1", "conv2", "fc1"}, *bn_names[3] = {"bn1.", "bn2.", "bn3."};
    for (int l = 0; l < 3; l++) {
        char key[64];
        snprintf(key, sizeof key, "%s.weight", names[l]);
        p[l].w = st_f32(&m, key, (size_t)p[l].c_out * (size_t)p[l].k);
        snprintf(key, sizeof key, "%s.bias", names[l]);
        p[l].b = st_f32(&m, key, (size_t)p[l].c_out);
        if (!p[l].w || !p[l].b) return 1;
        /* The BN layer: created with PyTorch's defaults, then its state loaded from the checkpoint. */
        bnorm_layer_options o = bnorm_layer_options_default(p[l].c_out);
        TRY(bnorm_layer_create(&o, &p[l].bn));
        TRY(bnorm_layer_load(p[l].bn, mpath, bn_names[l]));
        TRY(bnorm_layer_set_training(p[l].bn, 0));
        p[l].fw = malloc((size_t)p[l].c_out * (size_t)p[l].k * sizeof(float));
        p[l].fb = malloc((size_t)p[l].c_out * sizeof(float));
        if (!p[l].fw || !p[l].fb) return 1;
        TRY(bnorm_layer_fold_into(p[l].bn, p[l].c_out, p[l].k, p[l].w, p[l].b, p[l].fw, p[l].fb));
    }
    float *w2 = st_f32(&m, "fc2.weight", (size_t)CLASSES * F1), *b2 = st_f32(&m, "fc2.bias", CLASSES);
    float *x = st_f32(&e, "x", (size_t)N_TEST * H * W), *want = st_f32(&e, "logits", (size_t)N_TEST * CLASSES);
    if (!w2 || !b2 || !x || !want) return 1;
    const cJSON *lab = cJSON_GetObjectItemCaseSensitive(e.header, "labels");
    const cJSON *lab_off = cJSON_GetObjectItemCaseSensitive(lab, "data_offsets");
    float labels[N_TEST];
    if (cJSON_GetArraySize(lab_off) != 2 ||
        cJSON_GetArrayItem(lab_off, 1)->valuedouble - cJSON_GetArrayItem(lab_off, 0)->valuedouble != 8.0 * N_TEST)
        return fprintf(stderr, "cnn_infer: labels: expected %d I64 values\n", N_TEST), 1;
    for (int s = 0; s < N_TEST; s++) {
        const unsigned char *q = e.bytes + e.data_start + (size_t)cJSON_GetArrayItem(lab_off, 0)->valuedouble + 8 * (size_t)s;
        labels[s] = (float)q[0];  /* 0..9, little-endian */
    }

    size_t n1 = (size_t)N_TEST * C1 * H * W, n2 = (size_t)N_TEST * C2 * H * W, n3 = (size_t)N_TEST * F1;
    float *a1 = malloc(n1 * sizeof *a1), *a2 = malloc(n2 * sizeof *a2), *a3 = malloc(n3 * sizeof *a3);
    float *out = malloc((size_t)N_TEST * CLASSES * sizeof *out);
    if (!a1 || !a2 || !a3 || !out) return 1;
    bnorm_desc d1 = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 4, .dims = {N_TEST, C1, H, W}};
    bnorm_desc d2 = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 4, .dims = {N_TEST, C2, H, W}};
    bnorm_desc d3 = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 2, .dims = {N_TEST, F1}};
    double acc_bn, acc_fold, rel_bn, rel_fold;

    /* 1. unfused: each BN is a bnorm call in eval mode (in place) */
    conv3x3(x, N_TEST, 1, C1, p[0].w, p[0].b, a1);
    TRY(bnorm_layer_forward(p[0].bn, &d1, a1, a1, NULL));
    relu(a1, n1);
    conv3x3(a1, N_TEST, C1, C2, p[1].w, p[1].b, a2);
    TRY(bnorm_layer_forward(p[1].bn, &d2, a2, a2, NULL));
    relu(a2, n2);
    linear(a2, N_TEST, C2 * H * W, F1, p[2].w, p[2].b, a3);
    TRY(bnorm_layer_forward(p[2].bn, &d3, a3, a3, NULL));
    relu(a3, n3);
    linear(a3, N_TEST, F1, CLASSES, w2, b2, out);
    rel_bn = compare("bnorm layers in eval mode:", out, want, labels, N_TEST, &acc_bn);

    /* 2. folded: the BN layers are gone, their scale and shift live in the weights */
    conv3x3(x, N_TEST, 1, C1, p[0].fw, p[0].fb, a1);
    relu(a1, n1);
    conv3x3(a1, N_TEST, C1, C2, p[1].fw, p[1].fb, a2);
    relu(a2, n2);
    linear(a2, N_TEST, C2 * H * W, F1, p[2].fw, p[2].fb, a3);
    relu(a3, n3);
    linear(a3, N_TEST, F1, CLASSES, w2, b2, out);
    rel_fold = compare("folded (bnorm_layer_fold_into), no BN calls:", out, want, labels, N_TEST, &acc_fold);

    double acc_torch;
    compare("PyTorch (its own logits):", want, want, labels, N_TEST, &acc_torch);
    int ok = rel_bn <= 1e-4 && rel_fold <= 1e-4 && acc_bn == acc_torch && acc_fold == acc_torch;
    printf("cnn_infer: %s (bound 1e-4 relative, same accuracy as PyTorch)\n", ok ? "OK" : "FAILED");

    for (int l = 0; l < 3; l++) {
        bnorm_layer_destroy(p[l].bn);
        free(p[l].w), free(p[l].b), free(p[l].fw), free(p[l].fb);
    }
    free(w2), free(b2), free(x), free(want), free(a1), free(a2), free(a3), free(out);
    st_close(&m);
    st_close(&e);
    return ok ? 0 : 1;
}
