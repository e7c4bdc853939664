/*
 * test_harden.c - hostile state files and small API edges (issue 18, items 1, 2, 3, 6, 10, 11).
 *   - listing and loading take time linear in the file: a file of 8K layers against one of K layers,
 *     both timed in this run; the big one may take at most 3x its share by size (a quadratic listing
 *     takes 8x its share);
 *   - peak memory of a load or a listing of an absurd header, in a forked child, against a linear
 *     baseline measured the same way (a child that only reads the file into memory): at most 6x;
 *   - the header limits (tensors, metadata entries, rank, nesting) refused early with a clear error,
 *     the layer untouched;
 *   - a FIFO (and other non-regular paths) refused at once by load and list (child with a timeout);
 *   - num_batches_tracked saturates at INT64_MAX in forward, round-trips through a file;
 *   - kill -9 during saves leaves no temporary file and a whole destination;
 *   - bnorm_layer_tensor with an invalid id writes nothing.
 */
#define _GNU_SOURCE
#include "harness.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define TH_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TH_ASAN 1
#endif
#endif
#ifndef TH_ASAN
#define TH_ASAN 0
#endif

static char dir[256];

static void path_of(char *out, size_t cap, const char *name) { snprintf(out, cap, "%s/%s", dir, name); }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- a growing text buffer and safetensors files made by hand ---------------------------------- */
typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf;

static void sb_add(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_add(sbuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->n;
        int k = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? room : 0, fmt, ap);
        va_end(ap);
        if (b->p && (size_t)k < room) {
            b->n += (size_t)k;
            return;
        }
        b->cap = (b->cap + (size_t)k + 1) * 2;
        b->p = (char *)realloc(b->p, b->cap);
    }
}

/* Writes 8-byte length, header, data. Returns the file size. */
static size_t write_st(const char *path, const char *hdr, size_t hlen, const void *data, size_t dn) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(hdr, 1, hlen, f);
    if (dn) fwrite(data, 1, dn, f);
    fclose(f);
    return 8 + hlen + dn;
}

static const char *const META_KEYS[10] = {"version", "num_features", "param_dtype", "eps", "momentum",
                                          "momentum_mode", "affine", "track_running_stats", "freeze", "fused_relu"};

/* A checkpoint index of `layers` BN layers "m.<i>.", each with bnorm's metadata; with_tensors: each also
 * has weight, bias, running_mean, running_var (C = 2, F32) and num_batches_tracked, else the layers
 * are known from the metadata only (affine = track_running_stats = 0). Returns the file size. */
static size_t make_index(const char *path, int layers, int with_tensors) {
    sbuf h = {0};
    sb_add(&h, "{\"__metadata__\":{\"format\":\"pt\"");
    for (int i = 0; i < layers; i++) {
        const char *vals[10] = {"1", "2", "float32", "1.0000000000000001e-05", "0.10000000000000001", "new_weight",
                                with_tensors ? "1" : "0", with_tensors ? "1" : "0", "0", "0"};
        for (int k = 0; k < 10; k++) sb_add(&h, ",\"bnorm.m.%d.%s\":\"%s\"", i, META_KEYS[k], vals[k]);
    }
    sb_add(&h, "}");
    size_t at = 0;
    if (with_tensors)
        for (int i = 0; i < layers; i++) {
            sb_add(&h, ",\"m.%d.num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[%zu,%zu]}", i,
                   at, at + 8);
            at += 8;
            static const char *const t[4] = {"weight", "bias", "running_mean", "running_var"};
            for (int k = 0; k < 4; k++, at += 8)
                sb_add(&h, ",\"m.%d.%s\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[%zu,%zu]}", i, t[k], at,
                       at + 8);
        }
    sb_add(&h, "}");
    unsigned char *data = (unsigned char *)calloc(at + 1, 1);
    for (size_t o = 0; o < at; o += 40) { /* counter 3, then weight 1, bias 0, mean 0, var 1 */
        data[o] = 3;
        float one = 1.0f;
        memcpy(data + o + 8, &one, 4);
        memcpy(data + o + 12, &one, 4);
        memcpy(data + o + 32, &one, 4);
        memcpy(data + o + 36, &one, 4);
    }
    size_t n = write_st(path, h.p, h.n, data, at);
    free(data);
    free(h.p);
    return n;
}

/* Best of `reps` timings of a listing (what = 0) or of a load of the last layer (what = 1). */
static double time_op(const char *path, int layers, int with_tensors, int what, int reps) {
    double best = 1e30;
    bnorm_layer_options o = bnorm_layer_options_default(2);
    o.affine = o.track_running_stats = with_tensors;
    bnorm_layer *l = NULL;
    bnorm_layer_create(&o, &l);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "m.%d.", layers - 1);
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        if (what == 0) {
            bnorm_state_entry *e = NULL;
            size_t n = 0;
            bnorm_status st = bnorm_state_list(path, &e, &n);
            CHECK(st == BNORM_STATUS_OK && n == (size_t)layers, "list of %d layers: %s, %zu listed (%s)", layers,
                  bnorm_status_string(st), n, bnorm_last_error());
            bnorm_state_list_free(e);
        } else {
            CHECK_STATUS(bnorm_layer_load(l, path, prefix), BNORM_STATUS_OK);
        }
        double t = now() - t0;
        if (t < best) best = t;
    }
    bnorm_layer_destroy(l);
    return best;
}

/* Item 1: listing (and loading) time grows with the file, not with its square. */
static void test_linear_time(void) {
    const int K = getenv("BNORM_HARDEN_K") ? atoi(getenv("BNORM_HARDEN_K")) : 1000, R = 8;
    char small[512], big[512];
    path_of(small, sizeof small, "index_small.safetensors");
    path_of(big, sizeof big, "index_big.safetensors");
    for (int with_tensors = 0; with_tensors < 2; with_tensors++) {
        size_t ns = make_index(small, K, with_tensors), nb = make_index(big, R * K, with_tensors);
        for (int what = 0; what < 2; what++) {
            double ts = time_op(small, K, with_tensors, what, 7);
            double tb = time_op(big, R * K, with_tensors, what, 3);
            /* the linear baseline: the small file's time scaled by the size ratio; 3x slack for a noisy
             * machine, plus 20 ms for timer and scheduling noise on tiny times */
            double allowed = 3.0 * ts * (double)nb / (double)ns + 0.02;
            printf("%s, %s: %d layers (%zu bytes) %.4f s, %d layers (%zu bytes) %.4f s: %.1fx for %.1fx the bytes\n",
                   what ? "load" : "list", with_tensors ? "tensors + metadata" : "metadata only", K, ns, ts, R * K,
                   nb, tb, tb / ts, (double)nb / (double)ns);
            CHECK(tb <= allowed, "%s (%s): %.4f s for %zu bytes vs %.4f s for %zu bytes: not linear in the file",
                  what ? "load" : "list", with_tensors ? "tensors" : "metadata only", tb, nb, ts, ns);
        }
    }
    unlink(small);
    unlink(big);
}

/* ---- peak memory in a child ---------------------------------------------------------------------- */
typedef enum { OP_READ, OP_LOAD, OP_LIST } mem_op;

/* Runs op on path in a forked child; returns the growth of the child's peak RSS in KiB (-1 on error),
 * the status of the call in *st and its time in *secs. */
static long child_peak(const char *path, mem_op op, bnorm_status *st, double *secs) {
    int fds[2];
    if (pipe(fds) != 0) return -1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        long r0 = ru.ru_maxrss;
        double t0 = now();
        long res[3] = {0, 0, 0};
        if (op == OP_READ) { /* the linear baseline: the file's bytes in memory, each touched */
            FILE *f = fopen(path, "rb");
            struct stat sb;
            stat(path, &sb);
            unsigned char *p = (unsigned char *)malloc((size_t)sb.st_size + 1);
            size_t got = f ? fread(p, 1, (size_t)sb.st_size, f) : 0;
            unsigned sum = 0;
            for (size_t i = 0; i < got; i++) sum += p[i];
            res[1] = (long)(sum & 1);
            if (f) fclose(f);
            free(p);
        } else if (op == OP_LOAD) {
            bnorm_layer *l = NULL;
            bnorm_layer_options o = bnorm_layer_options_default(2);
            bnorm_layer_create(&o, &l);
            res[1] = (long)bnorm_layer_load(l, path, "bn.");
            bnorm_layer_destroy(l);
        } else {
            bnorm_state_entry *e = NULL;
            size_t n = 0;
            res[1] = (long)bnorm_state_list(path, &e, &n);
            bnorm_state_list_free(e);
        }
        double t = now() - t0;
        getrusage(RUSAGE_SELF, &ru);
        res[0] = ru.ru_maxrss - r0;
        res[2] = (long)(t * 1e6);
        if (write(fds[1], res, sizeof res) != (ssize_t)sizeof res) _exit(2);
        _exit(0);
    }
    close(fds[1]);
    long res[3] = {-1, 0, 0};
    ssize_t k = read(fds[0], res, sizeof res);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (k != (ssize_t)sizeof res || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return -1;
    *st = (bnorm_status)res[1];
    *secs = (double)res[2] * 1e-6;
    return res[0];
}

/* Item 2: absurd headers cost a small multiple of the header's size, nothing per JSON token. */
static void test_memory(void) {
    char path[512];
    path_of(path, sizeof path, "hostile.safetensors");
    static const char *const kinds[3] = {"a shape of 4 million zeros", "400,000 metadata entries",
                                         "200,000 one-dimensional tensors"};
    for (int kind = 0; kind < 3; kind++) {
        sbuf h = {0};
        size_t dn = 0;
        if (kind == 0) { /* the file, scaled down: legal JSON, refused for its rank */
            sb_add(&h, "{\"bn.weight\":{\"dtype\":\"F32\",\"data_offsets\":[0,0],\"shape\":[0");
            for (int i = 1; i < 4000000; i++) sb_add(&h, ",0");
            sb_add(&h, "]}}");
        } else if (kind == 1) { /* a legal file: many metadata entries and one layer */
            sb_add(&h, "{\"__metadata__\":{\"format\":\"pt\"");
            for (int i = 0; i < 400000; i++) sb_add(&h, ",\"k%06d\":\"\"", i);
            sb_add(&h, "},\"bn.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"bn.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                       "\"bn.running_mean\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]},"
                       "\"bn.running_var\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[24,32]}}");
            dn = 32;
        } else { /* a legal file: many small tensors (zero-sized, so the data area stays empty) */
            sb_add(&h, "{\"t0\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}");
            for (int i = 1; i < 200000; i++) sb_add(&h, ",\"t%d\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}", i);
            sb_add(&h, ",\"bn.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"bn.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                       "\"bn.running_mean\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]},"
                       "\"bn.running_var\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[24,32]}}");
            dn = 32;
        }
        unsigned char data[32] = {0};
        size_t fsz = write_st(path, h.p, h.n, data, dn);
        free(h.p);
        bnorm_status st0 = BNORM_STATUS_OK, st1 = BNORM_STATUS_OK, st2 = BNORM_STATUS_OK;
        double t0 = 0, t1 = 0, t2 = 0;
        long base = child_peak(path, OP_READ, &st0, &t0);
        long load = child_peak(path, OP_LOAD, &st1, &t1);
        long list = child_peak(path, OP_LIST, &st2, &t2);
        printf("%s (%zu bytes): peak growth read %ld KiB, load %ld KiB (%.2f s), list %ld KiB (%.2f s)\n",
               kinds[kind], fsz, base, load, t1, list, t2);
        CHECK(base > 0 && load >= 0 && list >= 0, "%s: a child failed", kinds[kind]);
        if (kind == 0) {
            CHECK(st1 == BNORM_STATUS_FORMAT && st2 == BNORM_STATUS_FORMAT, "%s: load %s, list %s", kinds[kind],
                  bnorm_status_string(st1), bnorm_status_string(st2));
        } else {
            CHECK(st1 == BNORM_STATUS_OK && st2 == BNORM_STATUS_OK, "%s: load %s, list %s", kinds[kind],
                  bnorm_status_string(st1), bnorm_status_string(st2));
        }
        if (!TH_ASAN) { /* AddressSanitizer's allocator (redzones, quarantine) is not what is measured */
            CHECK(load <= 6 * base + 1024, "%s: the load peaked at %ld KiB, %.1fx the file's %ld KiB", kinds[kind],
                  load, (double)load / (double)base, base);
            CHECK(list <= 6 * base + 1024, "%s: the listing peaked at %ld KiB, %.1fx the file's %ld KiB", kinds[kind],
                  list, (double)list / (double)base, base);
        }
    }
    unlink(path);
}

/* ---- header limits: refused with a clear error, nothing changed ----------------------------------- */
static void expect_refused(const char *what, const char *path, const char *says) {
    bnorm_layer_options o = bnorm_layer_options_default(2);
    bnorm_layer *l = NULL;
    bnorm_layer_create(&o, &l);
    float *w = NULL;
    bnorm_layer_tensor(l, BNORM_TENSOR_WEIGHT, (void **)&w);
    w[0] = 42.0f;
    bnorm_status st = bnorm_layer_load(l, path, "bn.");
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", bnorm_last_error());
    CHECK(st == BNORM_STATUS_FORMAT, "%s: load gave %s (%s)", what, bnorm_status_string(st), msg);
    CHECK(strstr(msg, path) && strstr(msg, says), "%s: message lacks the file or \"%s\": %s", what, says, msg);
    CHECK(w[0] == 42.0f, "%s: the failed load changed the layer", what);
    bnorm_state_entry *e = (bnorm_state_entry *)&e;
    size_t n = 7;
    st = bnorm_state_list(path, &e, &n);
    CHECK(st == BNORM_STATUS_FORMAT && e == NULL && n == 0 && strstr(bnorm_last_error(), says),
          "%s: list gave %s (%s)", what, bnorm_status_string(st), bnorm_last_error());
    bnorm_layer_destroy(l);
}

static void test_limits(void) {
    char path[512];
    path_of(path, sizeof path, "limits.safetensors");
    sbuf h = {0};
    /* rank 65 (of ones: a legal element count) */
    sb_add(&h, "{\"bn.weight\":{\"dtype\":\"F32\",\"shape\":[2");
    for (int i = 1; i < 65; i++) sb_add(&h, ",1");
    sb_add(&h, "],\"data_offsets\":[0,8]}}");
    write_st(path, h.p, h.n, "\0\0\0\0\0\0\0\0", 8);
    expect_refused("rank 65", path, "more than 64 dimensions");
    /* rank 64 is still read (and is then not a per-channel shape) */
    h.n = 0;
    sb_add(&h, "{\"x\":{\"dtype\":\"F32\",\"shape\":[2");
    for (int i = 1; i < 64; i++) sb_add(&h, ",1");
    sb_add(&h, "],\"data_offsets\":[0,8]}}");
    write_st(path, h.p, h.n, "\0\0\0\0\0\0\0\0", 8);
    bnorm_state_entry *e = NULL;
    size_t n = 9;
    CHECK_STATUS(bnorm_state_list(path, &e, &n), BNORM_STATUS_OK);
    CHECK(n == 0, "rank 64: %zu layers", n);
    bnorm_state_list_free(e);
    /* nesting deeper than 16 in an unknown member */
    h.n = 0;
    sb_add(&h, "{\"x\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0],\"extra\":");
    for (int i = 0; i < 20; i++) sb_add(&h, "[");
    for (int i = 0; i < 20; i++) sb_add(&h, "]");
    sb_add(&h, "}}");
    write_st(path, h.p, h.n, NULL, 0);
    expect_refused("nesting 22", path, "nested deeper than 16");
    /* 1,000,001 tensors */
    h.n = 0;
    sb_add(&h, "{");
    for (int i = 0; i <= 1000000; i++) sb_add(&h, "%s\"%d\":0", i ? "," : "", i);
    sb_add(&h, "}");
    write_st(path, h.p, h.n, NULL, 0);
    double t0 = now();
    expect_refused("1,000,001 tensors", path, "more than 1000000 tensors");
    printf("1,000,001 tensors (%zu bytes) refused twice in %.3f s\n", h.n, now() - t0);
    /* 1,000,001 metadata entries */
    h.n = 0;
    sb_add(&h, "{\"__metadata__\":{");
    for (int i = 0; i <= 1000000; i++) sb_add(&h, "%s\"%d\":\"\"", i ? "," : "", i);
    sb_add(&h, "}}");
    write_st(path, h.p, h.n, NULL, 0);
    expect_refused("1,000,001 metadata entries", path, "more than 1000000 __metadata__ entries");
    /* numbers that are not plain integers, a lone surrogate */
    static const char *const bad[][2] = {
        {"{\"bn.weight\":{\"dtype\":\"F32\",\"shape\":[2e0],\"data_offsets\":[0,8]}}", "shape"},
        {"{\"bn.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8.0]}}", "data_offsets"},
        {"{\"bn.weight\":{\"dtype\":\"F32\",\"shape\":[9007199254740993],\"data_offsets\":[0,8]}}", "shape"},
        {"{\"bn.w\\ud800eight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "surrogate"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_st(path, bad[i][0], strlen(bad[i][0]), "\0\0\0\0\0\0\0\0", 8);
        expect_refused(bad[i][0], path, bad[i][1]);
    }
    /* escapes are decoded: a surrogate pair and \n in a name */
    const char *ok = "{\"bn.\\ud83d\\ude00\\n\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                     "\"b\\u006e.running_mean\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                     "\"bn.running_var\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}";
    unsigned char z[24] = {0};
    write_st(path, ok, strlen(ok), z, 24);
    CHECK_STATUS(bnorm_state_list(path, &e, &n), BNORM_STATUS_OK);
    CHECK(n == 1 && e && strcmp(e[0].prefix, "bn.") == 0, "escaped names: %zu layers, first %s", n,
          n ? e[0].prefix : "-");
    bnorm_state_list_free(e);
    /* "__metadata__" spelled with an escape is still the metadata (more entries than pass 1 counted) */
    const char *esc = "{\"__metadata\\u005f_\":{\"a\":\"1\",\"b\":\"2\",\"c\":\"3\"}}";
    write_st(path, esc, strlen(esc), NULL, 0);
    CHECK_STATUS(bnorm_state_list(path, &e, &n), BNORM_STATUS_OK);
    CHECK(n == 0, "escaped __metadata__: %zu layers", n);
    bnorm_state_list_free(e);
    free(h.p);
    unlink(path);
}

/* ---- item 3: a FIFO must not block load or list ---------------------------------------------------- */
static void test_fifo(void) {
    char path[512];
    path_of(path, sizeof path, "fifo");
    CHECK(mkfifo(path, 0600) == 0, "mkfifo: %s", strerror(errno));
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        bnorm_layer_options o = bnorm_layer_options_default(2);
        bnorm_layer *l = NULL;
        bnorm_layer_create(&o, &l);
        bnorm_status a = bnorm_layer_load(l, path, "bn.");
        int ra = strstr(bnorm_last_error(), "regular") != NULL;
        bnorm_state_entry *e = NULL;
        size_t n = 0;
        bnorm_status b = bnorm_state_list(path, &e, &n);
        int rb = strstr(bnorm_last_error(), "regular") != NULL;
        bnorm_status c = bnorm_layer_load(l, "/dev/null", "bn.");
        _exit(a == BNORM_STATUS_IO && b == BNORM_STATUS_IO && c == BNORM_STATUS_IO && ra && rb ? 0 : 1);
    }
    int status = 0, done = 0;
    for (int i = 0; i < 1000 && !done; i++) { /* 10 s */
        done = waitpid(pid, &status, WNOHANG) == pid;
        if (!done) usleep(10000);
    }
    if (!done) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
    CHECK(done, "load or list of a FIFO still blocked after 10 s");
    CHECK(!done || (WIFEXITED(status) && WEXITSTATUS(status) == 0), "FIFO or /dev/null: not refused as IO (%d)",
          status);
    unlink(path);
}

/* ---- item 6: num_batches_tracked saturates ---------------------------------------------------------- */
static void test_counter(void) {
    char path[512];
    path_of(path, sizeof path, "counter.safetensors");
    for (int mode = 0; mode < 2; mode++) {
        bnorm_layer_options o = bnorm_layer_options_default(2);
        o.param_dtype = BNORM_DTYPE_F64;
        o.momentum_mode = mode ? BNORM_MOMENTUM_CUMULATIVE : BNORM_MOMENTUM_NEW_WEIGHT;
        bnorm_layer *l = NULL;
        CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_set_num_batches_tracked(l, INT64_MAX - 1), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_set_num_batches_tracked(l, -1), BNORM_STATUS_INVALID_ARGUMENT);
        double x[8] = {1, 1, 1, 1, 1, 1, 1, 1}, y[8];
        bnorm_desc d = {.dtype = BNORM_DTYPE_F64, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 2, .dims = {4, 2}};
        int64_t k = 0;
        for (int step = 0; step < 3; step++) {
            CHECK_STATUS(bnorm_layer_forward(l, &d, x, y, NULL), BNORM_STATUS_OK);
            bnorm_layer_get_num_batches_tracked(l, &k);
            CHECK(k == INT64_MAX, "mode %d step %d: num_batches_tracked = %lld, want INT64_MAX (saturated)", mode, step,
                  (long long)k);
        }
        double *rm = NULL;
        bnorm_layer_tensor(l, BNORM_TENSOR_RUNNING_MEAN, (void **)&rm);
        /* cumulative: factor 1 / 2^63 > 0, the mean moves from 0 towards 1 by a tiny positive step */
        CHECK(rm[0] >= 0 && rm[0] <= 1 && rm[1] >= 0 && rm[1] <= 1, "mode %d: running_mean %g %g", mode, rm[0], rm[1]);
        CHECK_STATUS(bnorm_layer_save(l, path, "bn."), BNORM_STATUS_OK);
        bnorm_layer *l2 = NULL;
        CHECK_STATUS(bnorm_layer_create(&o, &l2), BNORM_STATUS_OK);
        CHECK_STATUS(bnorm_layer_load(l2, path, "bn."), BNORM_STATUS_OK);
        k = 0;
        bnorm_layer_get_num_batches_tracked(l2, &k);
        CHECK(k == INT64_MAX, "saved INT64_MAX loaded as %lld", (long long)k);
        bnorm_layer_destroy(l2);
        bnorm_layer_destroy(l);
    }
    unlink(path);
}

/* ---- item 10: kill -9 in the middle of saves -------------------------------------------------------- */
/* Removes the temporary files a killed save left next to base; counts them, and those of them that are
 * not a complete file (one that loads into a layer made with o). */
static int count_temps(const char *base, const bnorm_layer_options *o, int *incomplete) {
    DIR *d = opendir(dir);
    int n = 0;
    char pre[256];
    snprintf(pre, sizeof pre, "%s.tmp", base);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (strncmp(e->d_name, pre, strlen(pre)) == 0) {
            char p[800];
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            bnorm_layer *l2 = NULL;
            bnorm_layer_create(o, &l2);
            *incomplete += bnorm_layer_load(l2, p, "bn.") != BNORM_STATUS_OK;
            bnorm_layer_destroy(l2);
            unlink(p);
            n++;
        }
    }
    if (d) closedir(d);
    return n;
}

/* The save writes an anonymous file (O_TMPFILE), syncs it, gives it a temporary name (linkat) and renames
 * that over the destination. Linux has no call that puts an anonymous file over an existing name, so a
 * kill that lands between the linkat and the rename leaves the complete file under its temporary name;
 * the library closes the file only after the rename so that this window is a few instructions. A kill
 * anywhere else must leave nothing: an incomplete temporary file is a failure, a complete one is counted
 * and reported. */
static void test_killed_saves(void) {
    char path[512];
    path_of(path, sizeof path, "killed.safetensors");
    const int64_t C = 1 << 20; /* 16 MiB of state: a save takes long enough to be hit */
    bnorm_layer_options o = bnorm_layer_options_default(C);
    bnorm_layer *l = NULL;
    CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
    int kills = 0, strays = 0, incomplete = 0, bad = 0;
    for (int round = 0; round < 40; round++) {
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0) {
            for (;;) bnorm_layer_save(l, path, "bn.");
        }
        usleep((useconds_t)(20000 + th_randint(0, 120000)));
        kill(pid, SIGKILL);
        int status;
        waitpid(pid, &status, 0);
        kills++;
        strays += count_temps("killed.safetensors", &o, &incomplete);
        struct stat sb;
        if (stat(path, &sb) == 0) { /* the destination, if there, is whole */
            bnorm_layer *l2 = NULL;
            bnorm_layer_create(&o, &l2);
            bad += bnorm_layer_load(l2, path, "bn.") != BNORM_STATUS_OK;
            bnorm_layer_destroy(l2);
        }
    }
    printf("kill -9 during saves: %d kills, %d temporary files left (%d of them incomplete), %d broken destinations\n",
           kills, strays, incomplete, bad);
    CHECK(incomplete == 0, "%d of %d killed saves left an incomplete temporary file", incomplete, kills);
    CHECK(strays <= kills / 4, "%d of %d killed saves left a complete temporary file: the window between linkat "
          "and rename is not small", strays, kills);
    CHECK(bad == 0, "%d killed saves left a destination that does not load", bad);
    unlink(path);
    bnorm_layer_destroy(l);
}

/* ---- item 11: nothing written on failure ------------------------------------------------------------ */
static void test_tensor_id(void) {
    bnorm_layer_options o = bnorm_layer_options_default(2);
    bnorm_layer *l = NULL;
    CHECK_STATUS(bnorm_layer_create(&o, &l), BNORM_STATUS_OK);
    void *sentinel = (void *)&o, *p = sentinel;
    CHECK_STATUS(bnorm_layer_tensor(l, (bnorm_tensor_id)99, &p), BNORM_STATUS_INVALID_ARGUMENT);
    CHECK(p == sentinel, "an invalid id wrote %p", p);
    CHECK_STATUS(bnorm_layer_tensor(l, (bnorm_tensor_id)-1, &p), BNORM_STATUS_INVALID_ARGUMENT);
    CHECK(p == sentinel, "id -1 wrote %p", p);
    bnorm_layer_destroy(l);
}

int main(void) {
    th_seed(0x4841524eull);
    /* fixed malloc thresholds: big blocks are mapped and returned at free, so that the parent's freed
     * memory does not hide the children's growth */
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);
    mallopt(M_TRIM_THRESHOLD, 256 * 1024);
    snprintf(dir, sizeof dir, "/tmp/bnorm_harden_XXXXXX");
    if (!mkdtemp(dir)) {
        fprintf(stderr, "cannot create a temporary directory\n");
        return 1;
    }
    const char *only = getenv("BNORM_HARDEN_ONLY"); /* one part by name, for proving a part alone */
#define PART(name)                                   \
    if (!only || strcmp(only, #name) == 0) {         \
        printf("-- %s\n", #name);                    \
        fflush(stdout);                              \
        name();                                      \
    }
    PART(test_tensor_id)
    PART(test_counter)
    PART(test_fifo)
    PART(test_limits)
    PART(test_memory)
    PART(test_linear_time)
    PART(test_killed_saves)
    CHECK(rmdir(dir) == 0, "temporary directory %s not empty at the end", dir);
    return th_finish("test_harden");
}
