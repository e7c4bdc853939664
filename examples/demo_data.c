/*
 * demo_data.c - loaders for the examples' data sets. zlib's gz* functions read gzip and plain files
 * alike, so a decompressed copy of a data file works too.
 */
#include "demo_data.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

static int fail(char *err, size_t cap, const char *fmt, ...) {
    if (err && cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, cap, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* The whole (decompressed) content of a file, NUL-terminated; *len excludes the NUL. */
static char *read_gz(const char *path, size_t *len, char *err, size_t cap) {
    gzFile f = gzopen(path, "rb");
    if (!f) {
        fail(err, cap, "cannot open %s", path);
        return NULL;
    }
    size_t size = 0, room = 1 << 20;
    char *buf = (char *)malloc(room + 1);
    for (;;) {
        if (!buf) {
            gzclose(f);
            fail(err, cap, "out of memory reading %s", path);
            return NULL;
        }
        if (size == room) {
            room *= 2;
            char *b = (char *)realloc(buf, room + 1);
            if (!b) free(buf);
            buf = b;
            continue;
        }
        size_t want = room - size;
        if (want > (1u << 30)) want = 1u << 30;
        int got = gzread(f, buf + size, (unsigned)want);
        if (got < 0) {
            int code;
            const char *msg = gzerror(f, &code);
            fail(err, cap, "%s: %s", path, msg);
            free(buf);
            gzclose(f);
            return NULL;
        }
        if (got == 0) break;
        size += (size_t)got;
    }
    gzclose(f);
    buf[size] = '\0';
    *len = size;
    return buf;
}

/* The shipped digits, compiled into the program (demo_digits_gz.c is generated at build time from
 * data/digits.csv.gz by cmake/embed_file.cmake), so that the examples run from anywhere. */
extern const unsigned char demo_digits_gz[];
extern const size_t demo_digits_gz_size;

static char *inflate_embedded(size_t *len, char *err, size_t cap) {
    z_stream z;
    memset(&z, 0, sizeof z);
    if (inflateInit2(&z, 16 + MAX_WBITS) != Z_OK) { /* 16 + MAX_WBITS: a gzip stream */
        fail(err, cap, "embedded data: zlib initialization failed");
        return NULL;
    }
    size_t room = 1 << 20, size = 0;
    char *buf = (char *)malloc(room + 1);
    z.next_in = (unsigned char *)demo_digits_gz;
    z.avail_in = (uInt)demo_digits_gz_size;
    int rc = Z_OK;
    while (buf && rc == Z_OK) {
        if (size == room) {
            room *= 2;
            char *b = (char *)realloc(buf, room + 1);
            if (!b) free(buf);
            buf = b;
            if (!buf) break;
        }
        z.next_out = (unsigned char *)buf + size;
        z.avail_out = (uInt)(room - size);
        rc = inflate(&z, Z_NO_FLUSH);
        size = room - z.avail_out;
    }
    inflateEnd(&z);
    if (!buf || rc != Z_STREAM_END) {
        fail(err, cap, "embedded data/digits.csv.gz: %s", buf ? "corrupt gzip stream" : "out of memory");
        free(buf);
        return NULL;
    }
    buf[size] = '\0';
    *len = size;
    return buf;
}

static int alloc_dataset(demo_dataset *d, int n, int dim, int classes) {
    d->n = n;
    d->dim = dim;
    d->classes = classes;
    d->x = (float *)malloc((size_t)n * (size_t)dim * sizeof(float) + 1);
    d->y = (uint8_t *)malloc((size_t)n + 1);
    if (!d->x || !d->y) {
        demo_dataset_free(d);
        return -1;
    }
    return 0;
}

int demo_load_digits_csv(const char *path, demo_dataset *out, char *err, size_t cap) {
    const char *name = path ? path : "embedded data/digits.csv.gz";
    enum { DIM = 64, CLASSES = 10 };
    memset(out, 0, sizeof *out);
    size_t len;
    char *text = path ? read_gz(path, &len, err, cap) : inflate_embedded(&len, err, cap);
    if (!text) return -1;
    int rows = 0;
    for (size_t i = 0; i < len; i++)
        if (text[i] == '\n') rows++;
    if (len && text[len - 1] != '\n') rows++;
    if (rows == 0 || alloc_dataset(out, rows, DIM, CLASSES)) {
        free(text);
        return fail(err, cap, "%s: %s", name, rows ? "out of memory" : "empty file");
    }
    char *p = text;
    int n = 0;
    while (*p) {
        while (*p == '\n' || *p == '\r') p++;
        if (!*p) break;
        for (int j = 0; j <= DIM; j++) {
            char *end;
            double v = strtod(p, &end);
            if (end == p || !(v >= 0 && v <= (j < DIM ? 16 : CLASSES - 1)) || (j == DIM && v != floor(v))) {
                free(text);
                demo_dataset_free(out);
                return fail(err, cap, "%s: line %d, field %d: expected %s", name, n + 1, j + 1,
                            j < DIM ? "a pixel value 0..16" : "a label 0..9");
            }
            p = end;
            if (j < DIM) {
                if (*p != ',') {
                    free(text);
                    demo_dataset_free(out);
                    return fail(err, cap, "%s: line %d: expected %d comma-separated values", name, n + 1, DIM + 1);
                }
                p++;
                out->x[(size_t)n * DIM + j] = (float)(v / 16.0);
            } else {
                out->y[n] = (uint8_t)v;
            }
        }
        while (*p == ' ' || *p == '\r') p++;
        if (*p && *p != '\n') {
            free(text);
            demo_dataset_free(out);
            return fail(err, cap, "%s: line %d: trailing characters", name, n + 1);
        }
        n++;
    }
    free(text);
    out->n = n;
    return 0;
}

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

int demo_load_idx(const char *images_path, const char *labels_path, int limit, demo_dataset *out, char *err,
                  size_t cap) {
    memset(out, 0, sizeof *out);
    size_t ilen, llen;
    unsigned char *img = (unsigned char *)read_gz(images_path, &ilen, err, cap);
    if (!img) return -1;
    unsigned char *lab = (unsigned char *)read_gz(labels_path, &llen, err, cap);
    if (!lab) {
        free(img);
        return -1;
    }
    int rc = -1;
    /* IDX: 0, 0, type (0x08 = uint8), rank, then rank big-endian uint32 dims, then the data. */
    if (ilen < 16 || be32(img) != 0x803) {
        fail(err, cap, "%s: not an IDX uint8 rank-3 file (magic 0x00000803)", images_path);
        goto done;
    }
    if (llen < 8 || be32(lab) != 0x801) {
        fail(err, cap, "%s: not an IDX uint8 rank-1 file (magic 0x00000801)", labels_path);
        goto done;
    }
    uint32_t n = be32(img + 4), rows = be32(img + 8), cols = be32(img + 12), nl = be32(lab + 4);
    if (n != nl) {
        fail(err, cap, "%s has %u images but %s has %u labels", images_path, n, labels_path, nl);
        goto done;
    }
    if (rows == 0 || cols == 0 || rows > 4096 || cols > 4096 || n > (1u << 24) ||
        ilen - 16 < (size_t)n * rows * cols || llen - 8 < (size_t)n) {
        fail(err, cap, "%s: truncated or implausible sizes (%u x %u x %u)", images_path, n, rows, cols);
        goto done;
    }
    if (limit > 0 && (uint32_t)limit < n) n = (uint32_t)limit;
    int classes = 0;
    for (uint32_t i = 0; i < n; i++)
        if (lab[8 + i] + 1 > classes) classes = lab[8 + i] + 1;
    if (alloc_dataset(out, (int)n, (int)(rows * cols), classes)) {
        fail(err, cap, "out of memory for %u images", n);
        goto done;
    }
    const size_t total = (size_t)n * rows * cols;
    for (size_t i = 0; i < total; i++) out->x[i] = (float)img[16 + i] * (1.0f / 255.0f);
    memcpy(out->y, lab + 8, n);
    rc = 0;
done:
    free(img);
    free(lab);
    return rc;
}

uint64_t demo_rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double demo_rng_uniform(uint64_t *s) { return (double)(demo_rng_next(s) >> 11) * (1.0 / 9007199254740992.0); }

double demo_rng_normal(uint64_t *s) {
    double u1 = demo_rng_uniform(s), u2 = demo_rng_uniform(s);
    return sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2);
}

void demo_shuffle(int *perm, int n, uint64_t *s) {
    for (int i = 0; i < n; i++) perm[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(demo_rng_next(s) % (uint64_t)(i + 1));
        int t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

static void gather(const demo_dataset *src, const int *idx, int n, demo_dataset *dst) {
    for (int i = 0; i < n; i++) {
        memcpy(dst->x + (size_t)i * src->dim, src->x + (size_t)idx[i] * src->dim, (size_t)src->dim * sizeof(float));
        dst->y[i] = src->y[idx[i]];
    }
}

int demo_split(const demo_dataset *src, int n_test, uint64_t seed, demo_dataset *train, demo_dataset *test,
               char *err, size_t cap) {
    memset(train, 0, sizeof *train);
    memset(test, 0, sizeof *test);
    if (n_test <= 0 || n_test >= src->n) return fail(err, cap, "cannot hold out %d of %d samples", n_test, src->n);
    int *perm = (int *)malloc((size_t)src->n * sizeof(int));
    if (!perm || alloc_dataset(train, src->n - n_test, src->dim, src->classes) ||
        alloc_dataset(test, n_test, src->dim, src->classes)) {
        free(perm);
        demo_dataset_free(train);
        demo_dataset_free(test);
        return fail(err, cap, "out of memory");
    }
    uint64_t s = seed;
    demo_shuffle(perm, src->n, &s);
    gather(src, perm, test->n, test);
    gather(src, perm + test->n, train->n, train);
    free(perm);
    return 0;
}

void demo_dataset_free(demo_dataset *d) {
    if (!d) return;
    free(d->x);
    free(d->y);
    d->x = NULL;
    d->y = NULL;
    d->n = 0;
}
