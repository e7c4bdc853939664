/*
 * test_state.c - safetensors state files and folding (issue 6).
 *   - round trips of every option combination, bit for bit (tensors, options, counter), and the
 *     written file byte for byte after a reload; dtype conversions on load against C's own casts;
 *   - hand-made files: each field of a valid file broken in turn, every truncation, random byte
 *     changes: each gives an error that names the file, and leaves the layer exactly as it was;
 *   - saves failing at every I/O step (and a process killed at every step) never leave a partial
 *     destination and leave an existing one intact;
 *   - bnorm_state_list on the committed PyTorch checkpoint and on hand-made files;
 *   - folding against a float64 formula written here, and against the layer's own eval forward.
 */
#define _POSIX_C_SOURCE 200809L
#include "harness.h"

#include <dirent.h>
#include <float.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

/* the library's test hook (src/io/safetensors.c), not public API */
extern int (*bn_safetensors_fail_hook)(int step, const char *what);

static char dir[256];

static void path_of(char *out, size_t cap, const char *name) { snprintf(out, cap, "%s/%s", dir, name); }

static unsigned char *read_all(const char *path, size_t *n) {
    *n = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = (unsigned char *)malloc((size_t)len + 1);
    if (fread(p, 1, (size_t)len, f) != (size_t)len) len = 0;
    fclose(f);
    *n = (size_t)len;
    return p;
}

static void write_all(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fwrite(p, 1, n, f);
    fclose(f);
}

/* Everything observable about a layer, to prove an error changed nothing. */
typedef struct snap {
    bnorm_layer_options o;
    int64_t nbt;
    int training;
    unsigned char t[6][64 * 8];
} snap;

static void take(bnorm_layer *l, snap *s) {
    memset(s, 0, sizeof *s);
    bnorm_layer_get_options(l, &s->o);
    bnorm_layer_get_num_batches_tracked(l, &s->nbt);
    s->training = bnorm_layer_is_training(l);
    size_t es = bnorm_dtype_size(s->o.param_dtype);
    for (int t = 0; t < 6; t++) {
        void *p = NULL;
        if (bnorm_layer_tensor(l, (bnorm_tensor_id)t, &p) == BNORM_STATUS_OK)
            memcpy(s->t[t], p, (size_t)s->o.num_features * es);
    }
}

/* Field by field (struct padding is not state); doubles bit for bit. */
static int same_options(const bnorm_layer_options *a, const bnorm_layer_options *b) {
    return a->num_features == b->num_features && a->param_dtype == b->param_dtype &&
           memcmp(&a->eps, &b->eps, sizeof a->eps) == 0 && memcmp(&a->momentum, &b->momentum, sizeof a->momentum) == 0 &&
           a->momentum_mode == b->momentum_mode && a->affine == b->affine &&
           a->track_running_stats == b->track_running_stats && a->freeze == b->freeze && a->fused_relu == b->fused_relu;
}

static int same(const snap *a, const snap *b) {
    return same_options(&a->o, &b->o) && a->nbt == b->nbt && a->training == b->training &&
           memcmp(a->t, b->t, sizeof a->t) == 0;
}

static void fill_bits(bnorm_layer *l) {
    bnorm_layer_options o;
    bnorm_layer_get_options(l, &o);
    size_t es = bnorm_dtype_size(o.param_dtype);
    for (int t = 0; t < 6; t++) {
        void *p = NULL;
        if (bnorm_layer_tensor(l, (bnorm_tensor_id)t, &p) != BNORM_STATUS_OK) continue;
        unsigned char *b = (unsigned char *)p;
        for (size_t i = 0; i < (size_t)o.num_features * es; i++) b[i] = (unsigned char)th_next();
    }
}

static bnorm_layer *mk_layer(int64_t C, bnorm_dtype pd, int affine, int track) {
    bnorm_layer_options o = bnorm_layer_options_default(C);
    o.param_dtype = pd;
    o.affine = affine;
    o.track_running_stats = track;
    bnorm_layer *l = NULL;
    bnorm_layer_create(&o, &l);
    return l;
}

/* ------------------------------------------------------------------------------------------ */
static void test_round_trips(void) {
    static const char *prefixes[] = {"", "layer1.0.bn1.", "odd \"name\" \\ \t \xc3\xa9."};
    char p1[512], p2[512];
    path_of(p1, sizeof p1, "rt1.safetensors");
    path_of(p2, sizeof p2, "rt2.safetensors");
    int idx = 0;
    for (int pdi = 0; pdi < 2; pdi++)
        for (int mode = 0; mode < 3; mode++)
            for (int affine = 0; affine < 2; affine++)
                for (int track = 0; track < 2; track++)
                    for (int freeze = 0; freeze <= track; freeze++)
                        for (int fused = 0; fused < 2; fused++, idx++) {
                            bnorm_dtype pd = pdi ? BNORM_DTYPE_F64 : BNORM_DTYPE_F32;
                            int64_t C = (int64_t[]){1, 5, 17, 64}[idx % 4];
                            const char *prefix = prefixes[idx % 3];
                            bnorm_layer_options o = bnorm_layer_options_default(C);
                            o.param_dtype = pd;
                            o.eps = th_uniform() * 1e-2;
                            o.momentum = th_uniform();
                            o.momentum_mode = (bnorm_momentum_mode)mode;
                            o.affine = affine;
                            o.track_running_stats = track;
                            o.freeze = freeze;
                            o.fused_relu = fused;
                            bnorm_layer *a = NULL, *b = NULL, *c = NULL;
                            CHECK_STATUS(bnorm_layer_create(&o, &a), BNORM_STATUS_OK);
                            fill_bits(a);
                            bnorm_layer_set_num_batches_tracked(a, (int64_t)(th_next() >> 2));
                            CHECK_STATUS(bnorm_layer_save(a, p1, prefix), BNORM_STATUS_OK);
                            /* same structure, other behaviour: the file's options must win */
                            bnorm_layer_options ob = bnorm_layer_options_default(C);
                            ob.param_dtype = pd;
                            ob.affine = affine;
                            ob.track_running_stats = track;
                            ob.eps = 0.5;
                            ob.momentum = 0.25;
                            CHECK_STATUS(bnorm_layer_create(&ob, &b), BNORM_STATUS_OK);
                            fill_bits(b);
                            snap sa, sb0, sb;
                            take(a, &sa);
                            take(b, &sb0);
                            CHECK_STATUS(bnorm_layer_load(b, p1, prefix), BNORM_STATUS_OK);
                            take(b, &sb);
                            CHECK(same_options(&sa.o, &sb.o),
                                  "combo %d: options differ after the round trip (eps %.17g vs %.17g)", idx, sa.o.eps,
                                  sb.o.eps);
                            CHECK(!track || sa.nbt == sb.nbt, "combo %d: num_batches_tracked %lld vs %lld", idx,
                                  (long long)sa.nbt, (long long)sb.nbt);
                            CHECK(memcmp(sa.t, sb.t, 4 * sizeof sa.t[0]) == 0, "combo %d: tensors differ", idx);
                            CHECK(memcmp(sb0.t[4], sb.t[4], 2 * sizeof sb.t[0]) == 0,
                                  "combo %d: gradients changed by a load", idx);
                            CHECK_STATUS(bnorm_layer_save(b, p2, prefix), BNORM_STATUS_OK);
                            size_t n1, n2;
                            unsigned char *f1 = read_all(p1, &n1), *f2 = read_all(p2, &n2);
                            CHECK(f1 && f2 && n1 == n2 && memcmp(f1, f2, n1) == 0, "combo %d: re-saved file differs",
                                  idx);
                            CHECK(n1 >= 8 && (8 + (n1 ? f1[0] | f1[1] << 8 : 0)) % 8 == 0,
                                  "combo %d: data area not 8-aligned", idx);
                            free(f1);
                            free(f2);
                            /* into the other parameter dtype: converted as C converts */
                            bnorm_layer_options oc = ob;
                            oc.param_dtype = pdi ? BNORM_DTYPE_F32 : BNORM_DTYPE_F64;
                            CHECK_STATUS(bnorm_layer_create(&oc, &c), BNORM_STATUS_OK);
                            CHECK_STATUS(bnorm_layer_load(c, p1, prefix), BNORM_STATUS_OK);
                            int bad = 0;
                            for (int t = 0; t < 4; t++) {
                                void *pa = NULL, *pc = NULL;
                                if (bnorm_layer_tensor(a, (bnorm_tensor_id)t, &pa)) continue;
                                bnorm_layer_tensor(c, (bnorm_tensor_id)t, &pc);
                                for (int64_t i = 0; i < C; i++) {
                                    double want = pdi ? (double)(float)((double *)pa)[i] : (double)((float *)pa)[i];
                                    double got = pdi ? (double)((float *)pc)[i] : ((double *)pc)[i];
                                    if (!(got == want || (isnan(got) && isnan(want)))) bad++;
                                }
                            }
                            CHECK(bad == 0, "combo %d: %d values not converted as C casts them", idx, bad);
                            bnorm_layer_destroy(a);
                            bnorm_layer_destroy(b);
                            bnorm_layer_destroy(c);
                        }
    unlink(p1);
    unlink(p2);
}

/* ------------------------------------------------------------------------------------------ */
/* A hand-made file: C = 2, prefix "bn.", F32, with a counter of 7. */
static const char *BASE_HDR =
    "{\"bn.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
    "\"bn.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
    "\"bn.running_mean\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]},"
    "\"bn.running_var\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[24,32]},"
    "\"bn.num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[32,40]}}";
static const float BASE_VALS[8] = {1.5f, -2.0f, 0.25f, 3.0f, 0.5f, -1.0f, 2.0f, 0.125f};

static void base_data(unsigned char *d) { /* 40 bytes, little-endian */
    for (int i = 0; i < 8; i++) {
        uint32_t u;
        memcpy(&u, &BASE_VALS[i], 4);
        for (int k = 0; k < 4; k++) d[4 * i + k] = (unsigned char)(u >> (8 * k));
    }
    for (int k = 0; k < 8; k++) d[32 + k] = k == 0 ? 7 : 0;
}

/* 8-byte length + header + data into path (the length may be overridden). */
static size_t write_st(const char *path, const char *hdr, size_t hlen, const unsigned char *data, size_t dn,
                       int64_t len_override) {
    size_t n = 8 + hlen + dn;
    unsigned char *b = (unsigned char *)malloc(n);
    uint64_t L = len_override >= 0 ? (uint64_t)len_override : (uint64_t)hlen;
    for (int k = 0; k < 8; k++) b[k] = (unsigned char)(L >> (8 * k));
    memcpy(b + 8, hdr, hlen);
    if (dn) memcpy(b + 8 + hlen, data, dn);
    write_all(path, b, n);
    free(b);
    return n;
}

/* BASE_HDR with the first `find` replaced by `repl` (twice: the second pair may be NULL). */
static char *edit(const char *hdr, const char *find, const char *repl) {
    const char *at = strstr(hdr, find);
    if (!at) {
        fprintf(stderr, "test bug: \"%s\" not in the header\n", find);
        return NULL;
    }
    size_t n = strlen(hdr) - strlen(find) + strlen(repl);
    char *s = (char *)malloc(n + 1);
    size_t k = (size_t)(at - hdr);
    memcpy(s, hdr, k);
    strcpy(s + k, repl);
    strcat(s, at + strlen(find));
    return s;
}

typedef struct bad_case {
    const char *what, *find, *repl, *find2, *repl2;
    bnorm_status want;
    const char *says; /* a word the message must hold (besides the file name) */
    int layer_level;  /* the file is valid, only the layer under "bn." is not: listing skips it */
} bad_case;

static void expect_error(const char *what, const char *path, bnorm_layer *l, const char *prefix, bnorm_status want,
                         const char *says) {
    snap s0, s1;
    take(l, &s0);
    bnorm_status st = bnorm_layer_load(l, path, prefix);
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", bnorm_last_error());
    take(l, &s1);
    CHECK(st == want, "%s: got %s (%s), want %s", what, bnorm_status_string(st), msg, bnorm_status_string(want));
    CHECK(same(&s0, &s1), "%s: the failed load changed the layer", what);
    CHECK(strstr(msg, path) != NULL, "%s: message does not name the file: %s", what, msg);
    if (says) CHECK(strstr(msg, says) != NULL, "%s: message lacks \"%s\": %s", what, says, msg);
}

static void test_bad_files(void) {
    char path[512];
    path_of(path, sizeof path, "bad.safetensors");
    unsigned char data[64] = {0};
    base_data(data);
    bnorm_layer *l = mk_layer(2, BNORM_DTYPE_F32, 1, 1);
    fill_bits(l);
    bnorm_layer_set_num_batches_tracked(l, 99);

    /* the base file is valid and loads as written */
    write_st(path, BASE_HDR, strlen(BASE_HDR), data, 40, -1);
    CHECK_STATUS(bnorm_layer_load(l, path, "bn."), BNORM_STATUS_OK);
    for (int t = 0; t < 4; t++) {
        float *p = NULL;
        bnorm_layer_tensor(l, (bnorm_tensor_id)t, (void **)&p);
        CHECK(p[0] == BASE_VALS[2 * t] && p[1] == BASE_VALS[2 * t + 1], "base file tensor %d", t);
    }
    int64_t nbt = 0;
    bnorm_layer_get_num_batches_tracked(l, &nbt);
    CHECK(nbt == 7, "num_batches_tracked = %lld, want 7", (long long)nbt);
    fill_bits(l);

    static const bad_case cases[] = {
        {"unknown dtype", "\"dtype\":\"F32\"", "\"dtype\":\"F33\"", 0, 0, BNORM_STATUS_FORMAT, "unknown dtype", 0},
        {"dtype not a string", "\"dtype\":\"F32\"", "\"dtype\":32", 0, 0, BNORM_STATUS_FORMAT, "bn.weight", 0},
        {"no dtype", "\"dtype\":\"F32\",", "", 0, 0, BNORM_STATUS_FORMAT, "dtype", 0},
        {"dtype twice", "\"dtype\":\"F32\",", "\"dtype\":\"F32\",\"dtype\":\"F16\",", 0, 0, BNORM_STATUS_FORMAT, "twice", 0},
        {"shape not an array", "\"shape\":[2]", "\"shape\":2", 0, 0, BNORM_STATUS_FORMAT, "shape", 0},
        {"negative shape", "\"shape\":[2]", "\"shape\":[-2]", 0, 0, BNORM_STATUS_FORMAT, "shape", 0},
        {"fractional shape", "\"shape\":[2]", "\"shape\":[2.5]", 0, 0, BNORM_STATUS_FORMAT, "shape", 0},
        {"string shape", "\"shape\":[2]", "\"shape\":[\"2\"]", 0, 0, BNORM_STATUS_FORMAT, "shape", 0},
        {"huge shape", "\"shape\":[2]", "\"shape\":[4294967296,4294967296,4294967296]", 0, 0, BNORM_STATUS_FORMAT, "overflow", 0},
        {"no shape", "\"shape\":[2],", "", 0, 0, BNORM_STATUS_FORMAT, "shape", 0},
        {"size != shape", "\"shape\":[2]", "\"shape\":[3]", 0, 0, BNORM_STATUS_FORMAT, "bytes", 0},
        {"one offset", "[0,8]", "[0]", 0, 0, BNORM_STATUS_FORMAT, "data_offsets", 0},
        {"three offsets", "[0,8]", "[0,8,16]", 0, 0, BNORM_STATUS_FORMAT, "data_offsets", 0},
        {"negative offset", "[0,8]", "[-8,8]", 0, 0, BNORM_STATUS_FORMAT, "data_offsets", 0},
        {"no offsets", ",\"data_offsets\":[0,8]", "", 0, 0, BNORM_STATUS_FORMAT, "data_offsets", 0},
        {"begin > end", "[0,8]", "[8,0]", 0, 0, BNORM_STATUS_FORMAT, "begin > end", 0},
        {"end beyond data", "[32,40]", "[32,48]", "\"shape\":[]", "\"shape\":[2]", BNORM_STATUS_FORMAT, "beyond", 0},
        {"overlap", "[8,16]", "[0,8]", 0, 0, BNORM_STATUS_FORMAT, "overlap", 0},
        {"hole", "[0,8]", "[4,12]", "[8,16]", "[12,20]", BNORM_STATUS_FORMAT, "holes", 0},
        {"duplicate name", "\"bn.running_var\"", "\"bn.running_mean\"", 0, 0, BNORM_STATUS_FORMAT, "twice", 0},
        {"entry not an object", "{\"bn.weight\"", "{\"x\":5,\"bn.weight\"", 0, 0, BNORM_STATUS_FORMAT, "not an object", 0},
        {"invalid JSON", "[0,8]}", "[0,8]]", 0, 0, BNORM_STATUS_FORMAT, "JSON", 0},
        {"text after JSON", "[32,40]}}", "[32,40]}}x", 0, 0, BNORM_STATUS_FORMAT, "after", 0},
        {"bad UTF-8", "\"bn.weight\"", "\"bn.weight\xff\"", 0, 0, BNORM_STATUS_FORMAT, "UTF-8", 0},
        {"overlong UTF-8", "\"bn.weight\"", "\"bn.weight\xc0\xae\"", 0, 0, BNORM_STATUS_FORMAT, "UTF-8", 0},
        {"control char", "\"bn.weight\"", "\"bn.we\night\"", 0, 0, BNORM_STATUS_FORMAT, "control", 0},
        {"\\u0000 in a name", "\"bn.weight\"", "\"bn.weight\\u0000x\"", 0, 0, BNORM_STATUS_FORMAT, "u0000", 0},
        {"metadata not an object", "{\"bn.weight\"", "{\"__metadata__\":5,\"bn.weight\"", 0, 0, BNORM_STATUS_FORMAT, "__metadata__", 0},
        {"metadata value not a string", "{\"bn.weight\"", "{\"__metadata__\":{\"a\":1},\"bn.weight\"", 0, 0, BNORM_STATUS_FORMAT, "\"a\"", 0},
        {"metadata key twice", "{\"bn.weight\"", "{\"__metadata__\":{\"a\":\"1\",\"a\":\"2\"},\"bn.weight\"", 0, 0, BNORM_STATUS_FORMAT, "twice", 0},
        {"metadata twice", "{\"bn.weight\"", "{\"__metadata__\":{},\"__metadata__\":{},\"bn.weight\"", 0, 0, BNORM_STATUS_FORMAT, "twice", 0},
        {"integer weight", "\"dtype\":\"F32\"", "\"dtype\":\"I32\"", 0, 0, BNORM_STATUS_FORMAT, "must be F16", 1},
        {"weight shape (2,1)", "\"shape\":[2]", "\"shape\":[2,1]", 0, 0, BNORM_STATUS_SHAPE_MISMATCH, "bn.weight", 1},
        {"weight shape (1,2,2)", "\"shape\":[2]", "\"shape\":[1,1,2]", 0, 0, BNORM_STATUS_SHAPE_MISMATCH, "bn.weight", 1},
        {"float counter", "\"dtype\":\"I64\"", "\"dtype\":\"F64\"", 0, 0, BNORM_STATUS_FORMAT, "must be I64", 1},
        {"counter shape [2]", "\"dtype\":\"I64\",\"shape\":[]", "\"dtype\":\"I32\",\"shape\":[2]", 0, 0, BNORM_STATUS_FORMAT, "must be I64", 1},
        {"weight without bias", "\"bn.bias\"", "\"bn.bias2\"", 0, 0, BNORM_STATUS_FORMAT, "without", 1},
        {"mean without var", "\"bn.running_var\"", "\"bn.running_var2\"", 0, 0, BNORM_STATUS_FORMAT, "without", 1},
        {"counter without stats", "\"bn.running_var\"", "\"x.running_var\"", "\"bn.running_mean\"", "\"x.running_mean\"",
         BNORM_STATUS_FORMAT, "num_batches_tracked", 1},
        {"channel counts differ", "\"shape\":[2],\"data_offsets\":[8,16]", "\"shape\":[1],\"data_offsets\":[8,12]",
         "\"shape\":[2],\"data_offsets\":[16,24]", "\"shape\":[3],\"data_offsets\":[12,24]",
         BNORM_STATUS_SHAPE_MISMATCH, "channels", 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const bad_case *c = &cases[i];
        char *h = edit(BASE_HDR, c->find, c->repl);
        if (h && c->find2) {
            char *h2 = edit(h, c->find2, c->repl2);
            free(h);
            h = h2;
        }
        if (!h) { CHECK(0, "case %s: bad edit", c->what); continue; }
        write_st(path, h, strlen(h), data, 40, -1);
        expect_error(c->what, path, l, "bn.", c->want, c->says);
        bnorm_state_entry *e = (bnorm_state_entry *)&e;
        size_t count = 99;
        bnorm_status ls = bnorm_state_list(path, &e, &count);
        if (c->layer_level) {
            int listed = 0;
            for (size_t k = 0; ls == BNORM_STATUS_OK && k < count; k++) listed |= strcmp(e[k].prefix, "bn.") == 0;
            CHECK(ls == BNORM_STATUS_OK && !listed, "list of '%s': %s, bn. listed %d", c->what, bnorm_status_string(ls),
                  listed);
        }
        else
            CHECK(ls != BNORM_STATUS_OK && e == NULL && count == 0, "list of '%s': %s, entries %p count %zu", c->what,
                  bnorm_status_string(ls), (void *)e, count);
        if (ls == BNORM_STATUS_OK) bnorm_state_list_free(e);
        free(h);
    }
    /* header length and size rules */
    size_t hl = strlen(BASE_HDR);
    write_st(path, BASE_HDR, hl, data, 40, (int64_t)hl + 41);
    expect_error("header length beyond the file", path, l, "bn.", BNORM_STATUS_FORMAT, "header length");
    write_st(path, BASE_HDR, hl, data, 40, 100000001);
    expect_error("header length over 100 MB", path, l, "bn.", BNORM_STATUS_FORMAT, "header length");
    write_st(path, BASE_HDR, hl, data, 40, 0);
    expect_error("header length 0", path, l, "bn.", BNORM_STATUS_FORMAT, "header length");
    write_st(path, BASE_HDR, hl, data, 40, (int64_t)1 << 62);
    expect_error("header length 2^62", path, l, "bn.", BNORM_STATUS_FORMAT, "header length");
    write_st(path, "[1,2]   ", 8, NULL, 0, -1);
    expect_error("root not an object", path, l, "bn.", BNORM_STATUS_FORMAT, "'{'");
    write_st(path, "{} x", 4, NULL, 0, -1);
    expect_error("garbage after {}", path, l, "bn.", BNORM_STATUS_FORMAT, "after");
    write_st(path, "{\"a\\u0000\":5}", 14, NULL, 0, -1);
    expect_error("\\u0000 escape", path, l, "bn.", BNORM_STATUS_FORMAT, "u0000");
    write_st(path, BASE_HDR, hl, data, 48, -1);
    expect_error("trailing bytes", path, l, "bn.", BNORM_STATUS_FORMAT, "trailing");
    write_all(path, "\x08\0\0\0", 4);
    expect_error("4-byte file", path, l, "bn.", BNORM_STATUS_FORMAT, "shorter");
    write_all(path, "", 0);
    expect_error("empty file", path, l, "bn.", BNORM_STATUS_FORMAT, "shorter");
    {
        char *h = (char *)malloc(hl + 2);
        memcpy(h, BASE_HDR, hl);
        h[hl] = '\0';
        h[10] = '\0'; /* a NUL inside the header */
        write_st(path, h, hl, data, 40, -1);
        expect_error("NUL in the header", path, l, "bn.", BNORM_STATUS_FORMAT, "NUL");
        free(h);
    }
    /* a negative counter */
    {
        unsigned char d2[64];
        memcpy(d2, data, 40);
        memset(d2 + 32, 0xff, 8);
        write_st(path, BASE_HDR, hl, d2, 40, -1);
        expect_error("negative counter", path, l, "bn.", BNORM_STATUS_FORMAT, "bn.num_batches_tracked");
    }
    /* padding with spaces after the JSON is valid */
    {
        char *h = (char *)malloc(hl + 8);
        memcpy(h, BASE_HDR, hl);
        memset(h + hl, ' ', 5);
        write_st(path, h, hl + 5, data, 40, -1);
        CHECK_STATUS(bnorm_layer_load(l, path, "bn."), BNORM_STATUS_OK);
        free(h);
        fill_bits(l);
    }
    /* the layer's structure against the file's */
    write_st(path, BASE_HDR, hl, data, 40, -1);
    expect_error("wrong prefix", path, l, "bx.", BNORM_STATUS_FORMAT, "prefix");
    expect_error("NULL prefix (no tensors named weight)", path, l, NULL, BNORM_STATUS_FORMAT, "weight");
    bnorm_layer *l3 = mk_layer(3, BNORM_DTYPE_F32, 1, 1), *na = mk_layer(2, BNORM_DTYPE_F32, 0, 1),
                *nt = mk_layer(2, BNORM_DTYPE_F32, 1, 0);
    expect_error("3-channel layer", path, l3, "bn.", BNORM_STATUS_SHAPE_MISMATCH, "num_features");
    expect_error("non-affine layer", path, na, "bn.", BNORM_STATUS_SHAPE_MISMATCH, "affine");
    expect_error("untracked layer", path, nt, "bn.", BNORM_STATUS_SHAPE_MISMATCH, "track_running_stats");
    bnorm_layer_destroy(l3);
    bnorm_layer_destroy(na);
    bnorm_layer_destroy(nt);
    /* I/O errors */
    char missing[512];
    path_of(missing, sizeof missing, "does-not-exist.safetensors");
    expect_error("missing file", missing, l, "bn.", BNORM_STATUS_IO, "cannot open");
    expect_error("a directory", dir, l, "bn.", BNORM_STATUS_IO, "regular");
    CHECK_STATUS(bnorm_layer_load(NULL, path, "bn."), BNORM_STATUS_NULL_POINTER);
    CHECK_STATUS(bnorm_layer_load(l, NULL, "bn."), BNORM_STATUS_NULL_POINTER);
    bnorm_layer_destroy(l);
}

/* ------------------------------------------------------------------------------------------ */
static void test_metadata(void) {
    char path[512];
    path_of(path, sizeof path, "meta.safetensors");
    unsigned char data[64];
    base_data(data);
    static const char *GOOD =
        "{\"__metadata__\":{\"format\":\"pt\",\"bnorm.bn.version\":\"1\",\"bnorm.bn.num_features\":\"2\","
        "\"bnorm.bn.param_dtype\":\"float64\",\"bnorm.bn.eps\":\"0.001\",\"bnorm.bn.momentum\":\"0.75\","
        "\"bnorm.bn.momentum_mode\":\"kept_weight\",\"bnorm.bn.affine\":\"1\",\"bnorm.bn.track_running_stats\":\"1\","
        "\"bnorm.bn.freeze\":\"1\",\"bnorm.bn.fused_relu\":\"1\"},";
    char hdr[2048];
    snprintf(hdr, sizeof hdr, "%s%s", GOOD, BASE_HDR + 1);
    bnorm_layer *l = mk_layer(2, BNORM_DTYPE_F32, 1, 1);
    fill_bits(l);
    write_st(path, hdr, strlen(hdr), data, 40, -1);
    CHECK_STATUS(bnorm_layer_load(l, path, "bn."), BNORM_STATUS_OK);
    bnorm_layer_options o;
    bnorm_layer_get_options(l, &o);
    CHECK(o.eps == 0.001 && o.momentum == 0.75 && o.momentum_mode == BNORM_MOMENTUM_KEPT_WEIGHT && o.freeze == 1 &&
              o.fused_relu == 1 && o.param_dtype == BNORM_DTYPE_F32,
          "options from the metadata: eps %g momentum %g mode %d freeze %d fused %d pd %d", o.eps, o.momentum,
          (int)o.momentum_mode, o.freeze, o.fused_relu, (int)o.param_dtype);
    /* without metadata the layer keeps its options */
    bnorm_layer *k = mk_layer(2, BNORM_DTYPE_F32, 1, 1);
    bnorm_layer_options before, after;
    bnorm_layer_get_options(k, &before);
    write_st(path, BASE_HDR, strlen(BASE_HDR), data, 40, -1);
    CHECK_STATUS(bnorm_layer_load(k, path, "bn."), BNORM_STATUS_OK);
    bnorm_layer_get_options(k, &after);
    CHECK(same_options(&before, &after), "options changed by a file without metadata");
    bnorm_layer_destroy(k);
    /* list: exact options */
    write_st(path, hdr, strlen(hdr), data, 40, -1);
    bnorm_state_entry *e = NULL;
    size_t count = 0;
    CHECK_STATUS(bnorm_state_list(path, &e, &count), BNORM_STATUS_OK);
    CHECK(count == 1 && e && strcmp(e[0].prefix, "bn.") == 0 && e[0].has_options == 1 &&
              e[0].options.param_dtype == BNORM_DTYPE_F64 && e[0].options.eps == 0.001,
          "list of a file with metadata: %zu entries", count);
    bnorm_state_list_free(e);

    static const struct { const char *find, *repl, *says; } bad[] = {
        {"\"bnorm.bn.version\":\"1\"", "\"bnorm.bn.version\":\"2\"", "version"},
        {"\"bnorm.bn.version\":\"1\",", "", "bnorm.bn.version"},
        {"\"0.001\"", "\"abc\"", "bnorm.bn.eps"},
        {"\"0.001\"", "\"-1\"", "eps"},
        {"\"0.001\"", "\"nan\"", "eps"},
        {"\"0.75\"", "\"1.5\"", "momentum"},
        {"\"kept_weight\"", "\"ema\"", "momentum_mode"},
        {"\"bnorm.bn.affine\":\"1\"", "\"bnorm.bn.affine\":\"2\"", "affine"},
        {"\"bnorm.bn.affine\":\"1\"", "\"bnorm.bn.affine\":\"0\"", "contradict"},
        {"\"bnorm.bn.num_features\":\"2\"", "\"bnorm.bn.num_features\":\"3\"", "contradict"},
        {"\"bnorm.bn.num_features\":\"2\"", "\"bnorm.bn.num_features\":\"x2\"", "num_features"},
        {"\"float64\"", "\"float16\"", "param_dtype"},
        {"\"bnorm.bn.track_running_stats\":\"1\"", "\"bnorm.bn.track_running_stats\":\"0\"", NULL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *h = edit(hdr, bad[i].find, bad[i].repl);
        if (!h) { CHECK(0, "metadata case %zu: bad edit", i); continue; }
        write_st(path, h, strlen(h), data, 40, -1);
        char what[64];
        snprintf(what, sizeof what, "metadata case %zu", i);
        expect_error(what, path, l, "bn.", BNORM_STATUS_FORMAT, bad[i].says);
        free(h);
    }
    bnorm_layer_destroy(l);
}

/* ------------------------------------------------------------------------------------------ */
static void put_f16(unsigned char *d, uint16_t h) { d[0] = (unsigned char)h; d[1] = (unsigned char)(h >> 8); }
static void put_f64(unsigned char *d, double v) {
    uint64_t u;
    memcpy(&u, &v, 8);
    for (int k = 0; k < 8; k++) d[k] = (unsigned char)(u >> (8 * k));
}

static void test_conversions(void) {
    char path[512];
    path_of(path, sizeof path, "conv.safetensors");
    /* MegEngine-style: (1,C,1,1) shapes, no counter; weight F16, bias BF16, mean and var F64 */
    const double tie_down = 1.0 + ldexp(1.0, -24), tie_up = 1.0 + 3 * ldexp(1.0, -24);
    const char *hdr =
        "{\"weight\":{\"dtype\":\"F16\",\"shape\":[1,3,1,1],\"data_offsets\":[0,6]},"
        "\"bias\":{\"dtype\":\"BF16\",\"shape\":[1,3],\"data_offsets\":[6,12]},"
        "\"running_mean\":{\"dtype\":\"F64\",\"shape\":[1,3,1],\"data_offsets\":[16,40]},"
        "\"running_var\":{\"dtype\":\"F64\",\"shape\":[3],\"data_offsets\":[40,64]},"
        "\"pad\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[12,16]}}";
    unsigned char d[64] = {0};
    put_f16(d + 0, 0x3c00);  /* 1.0 */
    put_f16(d + 2, 0x0001);  /* 2^-24, the smallest subnormal */
    put_f16(d + 4, 0xfc00);  /* -inf */
    put_f16(d + 6, 0x3f80);  /* bf16 1.0 */
    put_f16(d + 8, 0xc0a0);  /* bf16 -5.0 */
    put_f16(d + 10, 0x7fc1); /* bf16 NaN */
    put_f64(d + 16, tie_down);
    put_f64(d + 24, tie_up);
    put_f64(d + 32, 1e300);
    put_f64(d + 40, 0.1);
    put_f64(d + 48, -0.0);
    put_f64(d + 56, 1e-46);
    write_st(path, hdr, strlen(hdr), d, 64, -1);
    bnorm_layer *f = mk_layer(3, BNORM_DTYPE_F32, 1, 1), *g = mk_layer(3, BNORM_DTYPE_F64, 1, 1);
    bnorm_layer_set_num_batches_tracked(f, 5);
    CHECK_STATUS(bnorm_layer_load(f, path, ""), BNORM_STATUS_OK);
    CHECK_STATUS(bnorm_layer_load(g, path, NULL), BNORM_STATUS_OK);
    int64_t nbt = -1;
    bnorm_layer_get_num_batches_tracked(f, &nbt);
    CHECK(nbt == 0, "no num_batches_tracked in the file: got %lld, want 0", (long long)nbt);
    float *w, *b, *m, *v;
    double *W, *B, *M, *V;
    bnorm_layer_tensor(f, BNORM_TENSOR_WEIGHT, (void **)&w);
    bnorm_layer_tensor(f, BNORM_TENSOR_BIAS, (void **)&b);
    bnorm_layer_tensor(f, BNORM_TENSOR_RUNNING_MEAN, (void **)&m);
    bnorm_layer_tensor(f, BNORM_TENSOR_RUNNING_VAR, (void **)&v);
    bnorm_layer_tensor(g, BNORM_TENSOR_WEIGHT, (void **)&W);
    bnorm_layer_tensor(g, BNORM_TENSOR_BIAS, (void **)&B);
    bnorm_layer_tensor(g, BNORM_TENSOR_RUNNING_MEAN, (void **)&M);
    bnorm_layer_tensor(g, BNORM_TENSOR_RUNNING_VAR, (void **)&V);
    CHECK(w[0] == 1.0f && w[1] == ldexpf(1.0f, -24) && isinf(w[2]) && w[2] < 0, "F16 -> F32: %g %g %g", w[0], w[1], w[2]);
    CHECK(W[0] == 1.0 && W[1] == ldexp(1.0, -24) && isinf(W[2]) && W[2] < 0, "F16 -> F64");
    CHECK(b[0] == 1.0f && b[1] == -5.0f && isnan(b[2]), "BF16 -> F32: %g %g %g", b[0], b[1], b[2]);
    CHECK(B[0] == 1.0 && B[1] == -5.0 && isnan(B[2]), "BF16 -> F64");
    CHECK(m[0] == 1.0f, "F64 tie 1 + 2^-24 rounds to even 1.0f: got %.9g", m[0]);
    CHECK(m[1] == 1.0f + ldexpf(1.0f, -22), "F64 tie 1 + 3*2^-24 rounds to even 1 + 2^-22: got %.9g", m[1]);
    CHECK(isinf(m[2]) && m[2] > 0, "F64 1e300 -> +inf in F32: got %g", m[2]);
    CHECK(v[0] == 0.1f && v[1] == 0.0f && signbit(v[1]) && v[2] == 0.0f, "F64 -> F32: %.9g %g %g", v[0], v[1], v[2]);
    CHECK(M[0] == tie_down && M[1] == tie_up && M[2] == 1e300 && V[0] == 0.1 && V[2] == 1e-46, "F64 -> F64 exact");
    /* list infers the structure, with float64 parameters because F64 tensors are stored */
    bnorm_state_entry *e = NULL;
    size_t count = 0;
    CHECK_STATUS(bnorm_state_list(path, &e, &count), BNORM_STATUS_OK);
    CHECK(count == 1 && e && e[0].prefix[0] == '\0' && e[0].has_options == 0 && e[0].options.num_features == 3 &&
              e[0].options.param_dtype == BNORM_DTYPE_F64 && e[0].options.affine == 1 &&
              e[0].options.track_running_stats == 1 && e[0].options.eps == 1e-5,
          "list of a MegEngine-style file: %zu entries", count);
    bnorm_state_list_free(e);
    bnorm_state_list_free(NULL);
    bnorm_layer_destroy(f);
    bnorm_layer_destroy(g);
}

/* ------------------------------------------------------------------------------------------ */
static void test_list(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", BNORM_STATE_DATA_DIR);
    bnorm_state_entry *e = NULL;
    size_t n = 0;
    CHECK_STATUS(bnorm_state_list(path, &e, &n), BNORM_STATUS_OK);
    static const char *want[] = {"bn1.", "layer1.1.", "bn3.", "bn_head."};
    CHECK(n == 4, "the committed model has 4 BN layers, listed %zu", n);
    for (size_t i = 0; i < n && i < 4; i++)
        CHECK(strcmp(e[i].prefix, want[i]) == 0 && e[i].options.param_dtype == BNORM_DTYPE_F32 &&
                  e[i].options.affine == (i != 1) && e[i].options.track_running_stats == 1,
              "entry %zu: prefix \"%s\" affine %d", i, e[i].prefix, e[i].options.affine);
    bnorm_state_list_free(e);
    /* a bnorm file of an untracked layer is listed through its metadata; an empty file lists nothing */
    char p2[512];
    path_of(p2, sizeof p2, "untracked.safetensors");
    bnorm_layer *l = mk_layer(6, BNORM_DTYPE_F64, 1, 0);
    CHECK_STATUS(bnorm_layer_save(l, p2, "m.bn."), BNORM_STATUS_OK);
    CHECK_STATUS(bnorm_state_list(p2, &e, &n), BNORM_STATUS_OK);
    CHECK(n == 1 && strcmp(e[0].prefix, "m.bn.") == 0 && e[0].has_options && e[0].options.num_features == 6 &&
              e[0].options.param_dtype == BNORM_DTYPE_F64 && !e[0].options.track_running_stats,
          "list of an untracked layer: %zu", n);
    bnorm_state_list_free(e);
    bnorm_layer_destroy(l);
    l = mk_layer(3, BNORM_DTYPE_F32, 0, 0);
    CHECK_STATUS(bnorm_layer_save(l, p2, NULL), BNORM_STATUS_OK);
    bnorm_layer *k = mk_layer(3, BNORM_DTYPE_F32, 0, 0);
    CHECK_STATUS(bnorm_layer_load(k, p2, ""), BNORM_STATUS_OK);
    bnorm_layer_destroy(k);
    bnorm_layer_destroy(l);
    write_st(p2, "{}      ", 8, NULL, 0, -1);
    e = (bnorm_state_entry *)&n;
    CHECK_STATUS(bnorm_state_list(p2, &e, &n), BNORM_STATUS_OK);
    CHECK(n == 0 && e == NULL, "empty file: %zu entries", n);
    CHECK_STATUS(bnorm_state_list(NULL, &e, &n), BNORM_STATUS_NULL_POINTER);
    CHECK_STATUS(bnorm_state_list(p2, NULL, &n), BNORM_STATUS_NULL_POINTER);
    CHECK_STATUS(bnorm_state_list(p2, &e, NULL), BNORM_STATUS_NULL_POINTER);
    unlink(p2);
}

/* ------------------------------------------------------------------------------------------ */
static void test_truncation_and_mutation(void) {
    char src[512], path[512];
    path_of(src, sizeof src, "full.safetensors");
    path_of(path, sizeof path, "cut.safetensors");
    bnorm_layer *a = mk_layer(3, BNORM_DTYPE_F32, 1, 1), *l = mk_layer(3, BNORM_DTYPE_F32, 1, 1);
    fill_bits(a);
    CHECK_STATUS(bnorm_layer_save(a, src, "x."), BNORM_STATUS_OK);
    size_t n;
    unsigned char *full = read_all(src, &n);
    int ok = 0, changed = 0;
    fill_bits(l);
    snap s0, s1;
    take(l, &s0);
    for (size_t cut = 0; cut < n; cut++) {
        write_all(path, full, cut);
        if (bnorm_layer_load(l, path, "x.") == BNORM_STATUS_OK) ok++;
        take(l, &s1);
        changed += !same(&s0, &s1);
    }
    CHECK(ok == 0 && changed == 0, "truncated files: %d of %zu loaded, %d changed the layer", ok, n, changed);
    /* random byte changes: either a valid file or an error with the layer untouched */
    int bad = 0;
    unsigned char *m = (unsigned char *)malloc(n);
    for (int it = 0; it < 400; it++) {
        memcpy(m, full, n);
        int flips = 1 + (int)(th_next() % 3);
        for (int k = 0; k < flips; k++) m[th_next() % n] = (unsigned char)th_next();
        write_all(path, m, n);
        take(l, &s0);
        bnorm_status st = bnorm_layer_load(l, path, "x.");
        take(l, &s1);
        if (st != BNORM_STATUS_OK && !same(&s0, &s1)) bad++;
        if (st == BNORM_STATUS_OK) fill_bits(l);
    }
    CHECK(bad == 0, "%d mutated files changed the layer and failed", bad);
    free(m);
    free(full);
    unlink(src);
    unlink(path);
    bnorm_layer_destroy(a);
    bnorm_layer_destroy(l);
}

/* ------------------------------------------------------------------------------------------ */
static int fail_at, calls, crash;
static int hook(int step, const char *what) {
    (void)what;
    calls = step;
    if (step == fail_at) {
        /* the process dies in the middle of the save: SIGKILL, as a crash or the OOM killer would end it
         * (no atexit handlers, no leak check of a memory checker that runs the test) */
        if (crash) raise(SIGKILL);
        return 1;
    }
    return 0;
}

/* Number of files in dir whose name starts with base + ".tmp". */
static int stray_temps(const char *base) {
    DIR *d = opendir(dir);
    int n = 0;
    char pre[256];
    snprintf(pre, sizeof pre, "%s.tmp", base);
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strncmp(e->d_name, pre, strlen(pre)) == 0) n++;
    if (d) closedir(d);
    return n;
}

static void remove_temps(const char *base) {
    DIR *d = opendir(dir);
    char pre[256], p[600];
    snprintf(pre, sizeof pre, "%s.tmp", base);
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strncmp(e->d_name, pre, strlen(pre)) == 0) {
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            unlink(p);
        }
    if (d) closedir(d);
}

static void test_interrupted_saves(void) {
    char path[512];
    path_of(path, sizeof path, "dest.safetensors");
    bnorm_layer *old = mk_layer(9, BNORM_DTYPE_F32, 1, 1), *nw = mk_layer(9, BNORM_DTYPE_F32, 1, 1);
    fill_bits(old);
    fill_bits(nw);
    size_t on, nn;
    CHECK_STATUS(bnorm_layer_save(nw, path, "n."), BNORM_STATUS_OK);
    unsigned char *newf = read_all(path, &nn);
    CHECK_STATUS(bnorm_layer_save(old, path, "o."), BNORM_STATUS_OK);
    unsigned char *oldf = read_all(path, &on);
    int steps = 0;
    for (int exists = 1; exists >= 0; exists--) {
        for (fail_at = 1;; fail_at++) {
            if (exists) write_all(path, oldf, on);
            else unlink(path);
            calls = 0;
            crash = 0;
            bn_safetensors_fail_hook = hook;
            bnorm_status st = bnorm_layer_save(nw, path, "n.");
            bn_safetensors_fail_hook = NULL;
            int fired = calls >= fail_at;
            size_t n;
            unsigned char *now = read_all(path, &n);
            int is_old = now && n == on && memcmp(now, oldf, on) == 0;
            int is_new = now && n == nn && memcmp(now, newf, nn) == 0;
            if (!fired) {
                CHECK(st == BNORM_STATUS_OK && is_new, "save without a failure: %s", bnorm_last_error());
                steps = fail_at - 1;
                free(now);
                break;
            }
            CHECK(st == BNORM_STATUS_IO, "step %d: status %s, want IO", fail_at, bnorm_status_string(st));
            CHECK(strstr(bnorm_last_error(), path) != NULL, "step %d: message %s", fail_at, bnorm_last_error());
            if (is_new) /* only after the rename: the close of the synced file, the directory sync */
                CHECK(strstr(bnorm_last_error(), "saved, but") != NULL, "step %d: new file but %s", fail_at,
                      bnorm_last_error());
            else if (exists)
                CHECK(is_old, "step %d: an existing destination was changed (%zu bytes)", fail_at, n);
            else
                CHECK(now == NULL, "step %d: a partial destination of %zu bytes appeared", fail_at, n);
            CHECK(stray_temps("dest.safetensors") == 0, "step %d: a temporary file was left behind", fail_at);
            free(now);
            if (fail_at > 50) break;
        }
    }
    CHECK(steps >= 8, "the save has %d I/O steps, expected at least 8", steps);
    /* a process killed at every step: the destination is the old file or the new one, whole */
    for (fail_at = 1; fail_at <= steps; fail_at++) {
        write_all(path, oldf, on);
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0) {
            crash = 1;
            bn_safetensors_fail_hook = hook;
            bnorm_layer_save(nw, path, "n.");
            _exit(3);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "crash at step %d: child status %d (want killed "
              "at that step)", fail_at, status);
        size_t n;
        unsigned char *now = read_all(path, &n);
        int whole = now && ((n == on && memcmp(now, oldf, on) == 0) || (n == nn && memcmp(now, newf, nn) == 0));
        CHECK(whole, "crash at step %d: destination is neither the old nor the new file (%zu bytes)", fail_at, n);
        free(now);
        remove_temps("dest.safetensors");
    }
    /* argument errors leave the destination alone */
    write_all(path, oldf, on);
    CHECK_STATUS(bnorm_layer_save(NULL, path, ""), BNORM_STATUS_NULL_POINTER);
    CHECK_STATUS(bnorm_layer_save(nw, NULL, ""), BNORM_STATUS_NULL_POINTER);
    CHECK_STATUS(bnorm_layer_save(nw, "", ""), BNORM_STATUS_INVALID_ARGUMENT);
    CHECK_STATUS(bnorm_layer_save(nw, path, "bad\xff"), BNORM_STATUS_INVALID_ARGUMENT);
    char nodir[600];
    snprintf(nodir, sizeof nodir, "%s/no/such/dir/x.safetensors", dir);
    CHECK_STATUS(bnorm_layer_save(nw, nodir, ""), BNORM_STATUS_IO);
    size_t n;
    unsigned char *now = read_all(path, &n);
    CHECK(now && n == on && memcmp(now, oldf, on) == 0, "argument errors changed the destination");
    free(now);
    free(oldf);
    free(newf);
    unlink(path);
    bnorm_layer_destroy(old);
    bnorm_layer_destroy(nw);
}

/* ------------------------------------------------------------------------------------------ */
static void test_fold(void) {
    for (int pdi = 0; pdi < 2; pdi++)
        for (int affine = 0; affine < 2; affine++) {
            bnorm_dtype pd = pdi ? BNORM_DTYPE_F64 : BNORM_DTYPE_F32;
            const int64_t C = 7, K = 5, N = 3;
            bnorm_layer_options o = bnorm_layer_options_default(C);
            o.param_dtype = pd;
            o.affine = affine;
            o.eps = 1e-3;
            bnorm_layer *l = NULL;
            CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
            double g[7], be[7], rm[7], rv[7];
            for (int64_t c = 0; c < C; c++) {
                g[c] = affine ? 2 * th_normal() : 1.0;
                be[c] = affine ? th_normal() : 0.0;
                rm[c] = 3 * th_normal();
                rv[c] = c == 0 ? 0.0 : 0.1 + 2 * th_uniform();
            }
            th_round(pd, g, C);
            th_round(pd, be, C);
            th_round(pd, rm, C);
            th_round(pd, rv, C);
            const double *src[4] = {g, be, rm, rv};
            for (int t = affine ? 0 : 2; t < 4; t++) {
                void *p = NULL;
                bnorm_layer_tensor(l, (bnorm_tensor_id)t, &p);
                for (int64_t c = 0; c < C; c++) {
                    if (pdi) ((double *)p)[c] = src[t][c];
                    else ((float *)p)[c] = (float)src[t][c];
                }
            }
            th_buf sc = th_alloc(pd, C, 1), sh = th_alloc(pd, C, 3);
            CHECK_STATUS(bnorm_layer_fold_scale_shift(l, sc.p, sh.p), BNORM_STATUS_STATE); /* training */
            bnorm_layer_set_training(l, 0);
            CHECK_STATUS(bnorm_layer_fold_scale_shift(l, sc.p, sh.p), BNORM_STATUS_OK);
            double s[7], h[7];
            th_load(&sc, s);
            th_load(&sh, h);
            const double ulp = pdi ? DBL_EPSILON : FLT_EPSILON;
            int bad = 0;
            for (int64_t c = 0; c < C; c++) {
                double ws = g[c] / sqrt(rv[c] + o.eps), wh = be[c] - rm[c] * ws;
                if (fabs(s[c] - ws) > 4 * ulp * fabs(ws) || fabs(h[c] - wh) > 4 * ulp * (fabs(be[c]) + fabs(rm[c] * ws)))
                    bad++;
            }
            CHECK(bad == 0, "scale/shift vs formula (pd %d affine %d): %d channels", pdi, affine, bad);
            /* y = scale * x + shift is the layer's eval forward */
            int64_t n = N * C * 2;
            double *x = (double *)malloc((size_t)n * sizeof(double)), *y = (double *)malloc((size_t)n * sizeof(double)),
                   *z = (double *)malloc((size_t)n * sizeof(double));
            for (int64_t i = 0; i < n; i++) x[i] = 4 * th_normal();
            th_round(pd, x, n);
            bnorm_desc d = {.dtype = pd, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 3, .dims = {N, C, 2}};
            th_buf bx = th_alloc(pd, n, 0), by = th_alloc(pd, n, 0);
            th_store(&bx, x);
            CHECK_STATUS(bnorm_layer_forward(l, &d, bx.p, by.p, NULL), BNORM_STATUS_OK);
            th_load(&by, y);
            /* both round intermediates of the size of scale*x and running_mean*scale: the bound scales with them */
            int far = 0;
            for (int64_t i = 0; i < n; i++) {
                int64_t c = (i / 2) % C;
                z[i] = s[c] * x[i] + h[c];
                double mag = fabs(s[c] * x[i]) + fabs(s[c] * rm[c]) + fabs(be[c]);
                far += !(fabs(z[i] - y[i]) <= 8 * ulp * mag + 1e-300);
            }
            CHECK(far == 0, "scale*x+shift vs eval forward (pd %d affine %d): %d values differ", pdi, affine, far);
            /* fold into a conv weight [C, K] with and without bias, and in place */
            double w[35], b[7], wo[35], bo[7];
            for (int i = 0; i < C * K; i++) w[i] = th_normal();
            for (int i = 0; i < C; i++) b[i] = th_normal();
            th_round(pd, w, C * K);
            th_round(pd, b, C);
            th_buf bw = th_alloc(pd, C * K, 0), bb = th_alloc(pd, C, 0), bwo = th_alloc(pd, C * K, 2),
                   bbo = th_alloc(pd, C, 2);
            th_store(&bw, w);
            th_store(&bb, b);
            for (int withb = 0; withb < 2; withb++) {
                CHECK_STATUS(bnorm_layer_fold_into(l, C, K, bw.p, withb ? bb.p : NULL, bwo.p, bbo.p), BNORM_STATUS_OK);
                th_load(&bwo, wo);
                th_load(&bbo, bo);
                bad = 0;
                for (int64_t c = 0; c < C; c++) {
                    double ws = c == 0 && o.eps == 0 ? 0 : g[c] / sqrt(rv[c] + o.eps);
                    for (int64_t j = 0; j < K; j++)
                        bad += fabs(wo[c * K + j] - w[c * K + j] * ws) > 4 * ulp * fabs(w[c * K + j] * ws);
                    double bias = withb ? b[c] : 0.0, wb = (bias - rm[c]) * ws + be[c];
                    bad += fabs(bo[c] - wb) > 4 * ulp * (fabs((bias - rm[c]) * ws) + fabs(be[c]) + fabs(bias * ws));
                }
                CHECK(bad == 0, "fold_into vs formula (pd %d affine %d bias %d): %d values", pdi, affine, withb, bad);
            }
            /* in place gives the same bits */
            CHECK_STATUS(bnorm_layer_fold_into(l, C, K, bw.p, bb.p, bw.p, bb.p), BNORM_STATUS_OK);
            size_t es = bnorm_dtype_size(pd);
            CHECK(memcmp(bw.p, bwo.p, (size_t)(C * K) * es) == 0 && memcmp(bb.p, bbo.p, (size_t)C * es) == 0,
                  "in-place fold differs");
            /* errors */
            CHECK_STATUS(bnorm_layer_fold_into(l, C + 1, K, bw.p, NULL, bwo.p, bbo.p), BNORM_STATUS_SHAPE_MISMATCH);
            CHECK_STATUS(bnorm_layer_fold_into(l, C, 0, bw.p, NULL, bwo.p, bbo.p), BNORM_STATUS_INVALID_ARGUMENT);
            CHECK_STATUS(bnorm_layer_fold_into(l, C, INT64_MAX / 2, bw.p, NULL, bwo.p, bbo.p), BNORM_STATUS_OVERFLOW);
            CHECK_STATUS(bnorm_layer_fold_into(l, C, K, NULL, NULL, bwo.p, bbo.p), BNORM_STATUS_NULL_POINTER);
            CHECK_STATUS(bnorm_layer_fold_into(l, C, K, bw.p, NULL, bwo.p, NULL), BNORM_STATUS_NULL_POINTER);
            CHECK_STATUS(bnorm_layer_fold_into(NULL, C, K, bw.p, NULL, bwo.p, bbo.p), BNORM_STATUS_NULL_POINTER);
            CHECK_STATUS(bnorm_layer_fold_scale_shift(l, NULL, sh.p), BNORM_STATUS_NULL_POINTER);
            th_free(&bw); th_free(&bb); th_free(&bwo); th_free(&bbo);
            th_free(&bx); th_free(&by); th_free(&sc); th_free(&sh);
            free(x); free(y); free(z);
            bnorm_layer_destroy(l);
        }
    /* untracked layers cannot be folded; freeze layers can, even in training mode */
    bnorm_layer *u = mk_layer(2, BNORM_DTYPE_F32, 1, 0);
    float s[2], h[2];
    bnorm_layer_set_training(u, 0);
    CHECK_STATUS(bnorm_layer_fold_scale_shift(u, s, h), BNORM_STATUS_UNSUPPORTED);
    bnorm_layer_destroy(u);
    bnorm_layer_options o = bnorm_layer_options_megengine(2);
    o.freeze = 1;
    bnorm_layer_create(&o, &u);
    CHECK_STATUS(bnorm_layer_fold_scale_shift(u, s, h), BNORM_STATUS_OK);
    CHECK(s[0] == (float)(1.0 / sqrt(1.0 + 1e-5)) && h[0] == 0.0f, "freeze layer scale %g shift %g", s[0], h[0]);
    bnorm_layer_destroy(u);
}

int main(void) {
    th_seed(0x57a7e);
    snprintf(dir, sizeof dir, "/tmp/bnorm_state_XXXXXX");
    if (!mkdtemp(dir)) {
        fprintf(stderr, "cannot create a temporary directory\n");
        return 1;
    }
    test_round_trips();
    test_bad_files();
    test_metadata();
    test_conversions();
    test_list();
    test_truncation_and_mutation();
    test_interrupted_saves();
    test_fold();
    char p[600];
    static const char *leftovers[] = {"bad.safetensors", "meta.safetensors", "conv.safetensors"};
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, leftovers[i]);
        unlink(p);
    }
    CHECK(rmdir(dir) == 0, "temporary directory %s not empty at the end", dir);
    return th_finish("test_state");
}
