/*
 * ab.c - bnorm_ab: two builds of libbnorm.so timed against each other in one process, on the same
 * buffers, call by call.
 *
 *   bnorm_ab LIB_A LIB_B [--shape N,C[,d...]] [--layout cf|cl] [--op fwd_infer|fwd_train|bwd_train]
 *            [--threads T] [--rounds R] [--ws-offset BYTES] [--offset BYTES]
 *
 * Why: on the shared VMs this project runs on, the same case moves by 10-40% between processes
 * (docs/performance.md), also with the same binary, because each process gets other physical pages
 * and other neighbours. Two builds loaded side by side (dlmopen, each in its own link namespace with
 * its own OpenMP runtime, both told not to spin) see the same pages and the same moments: each round
 * runs A and B once, in alternating order, each call after a copy of 64 MiB that evicts the caches.
 * Prints the medians (and quartiles) of A and B and their ratio, then whether one more call of each
 * gives the same output bits.
 *
 * The tensors start --offset bytes past a 64-byte line (default 0); the caller workspace, of exactly
 * bnorm_workspace_size bytes, starts --ws-offset bytes past a 4 KiB page (default: none, each library
 * allocates its own).
 */
#define _GNU_SOURCE
#include <bnorm/bnorm.h>

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef bnorm_status (*fwd_fn)(const bnorm_forward_args *);
typedef bnorm_status (*bwd_fn)(const bnorm_backward_args *);
typedef size_t (*wsz_fn)(const bnorm_desc *, int);
typedef void (*nthr_fn)(int);

typedef struct lib {
    const char *path;
    fwd_fn fwd;
    bwd_fn bwd;
    wsz_fn wsz;
    nthr_fn set_threads;
} lib;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void *xalloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 4096, n ? n : 64)) {
        fprintf(stderr, "bnorm_ab: cannot allocate %zu bytes\n", n);
        exit(2);
    }
    memset(p, 0, n);
    return p;
}

static int load(lib *l, const char *path) {
    void *h = dlmopen(LM_ID_NEWLM, path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "bnorm_ab: %s\n", dlerror());
        return 0;
    }
    l->path = path;
    l->fwd = (fwd_fn)dlsym(h, "bnorm_forward");
    l->bwd = (bwd_fn)dlsym(h, "bnorm_backward");
    l->wsz = (wsz_fn)dlsym(h, "bnorm_workspace_size");
    l->set_threads = (nthr_fn)dlsym(h, "bnorm_set_num_threads");
    if (!l->fwd || !l->bwd || !l->wsz || !l->set_threads) {
        fprintf(stderr, "bnorm_ab: %s lacks the bnorm API\n", path);
        return 0;
    }
    return 1;
}

static void usage(void) {
    fprintf(stderr, "usage: bnorm_ab LIB_A LIB_B [--shape N,C[,d...]] [--layout cf|cl] "
                    "[--op fwd_infer|fwd_train|bwd_train] [--threads T] [--rounds R] [--ws-offset BYTES] "
                    "[--offset BYTES]\n");
}

int main(int argc, char **argv) {
    if (argc < 3) {
        usage();
        return 2;
    }
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_LAST, .rank = 4, .dims = {32, 2048, 7, 7}};
    const char *op = "fwd_infer";
    int threads = 2, rounds = 15;
    long ws_off = -1, off = 0;
    for (int i = 3; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            usage();
            return 2;
        }
        if (!strcmp(a, "--shape")) {
            char buf[128];
            snprintf(buf, sizeof buf, "%s", v);
            d.rank = 0;
            for (char *t = strtok(buf, ","); t && d.rank < BNORM_MAX_RANK; t = strtok(NULL, ",")) d.dims[d.rank++] = atoll(t);
        } else if (!strcmp(a, "--layout")) {
            d.layout = strcmp(v, "cf") ? BNORM_LAYOUT_CHANNELS_LAST : BNORM_LAYOUT_CHANNELS_FIRST;
        } else if (!strcmp(a, "--op")) {
            op = v;
        } else if (!strcmp(a, "--threads")) {
            threads = atoi(v);
        } else if (!strcmp(a, "--rounds")) {
            rounds = atoi(v);
        } else if (!strcmp(a, "--ws-offset")) {
            ws_off = atol(v);
        } else if (!strcmp(a, "--offset")) {
            off = atol(v);
        } else {
            usage();
            return 2;
        }
        i++;
    }
    const int bwd = !strcmp(op, "bwd_train"), infer = !strcmp(op, "fwd_infer");
    if ((!bwd && !infer && strcmp(op, "fwd_train")) || threads < 1 || rounds < 1 || rounds > 1000 || off < 0 ||
        off >= 64 || off % 4 || ws_off >= 4096 || (ws_off >= 0 && ws_off % 8) || bnorm_desc_check(&d)) {
        usage();
        return 2;
    }
    setenv("OMP_WAIT_POLICY", "passive", 0); /* two OpenMP runtimes in one process: neither may spin */
    lib L[2];
    if (!load(&L[0], argv[1]) || !load(&L[1], argv[2])) return 2;

    const int64_t n = bnorm_desc_numel(&d), C = d.dims[1];
    const size_t bytes = (size_t)n * sizeof(float) + 64;
    float *x = (float *)((char *)xalloc(bytes) + off), *y = (float *)((char *)xalloc(bytes) + off);
    float *dy = (float *)((char *)xalloc(bytes) + off), *dx = (float *)((char *)xalloc(bytes) + off);
    srand(1);
    for (int64_t i = 0; i < n; i++) {
        x[i] = 3.0f + (float)rand() / (float)RAND_MAX;
        dy[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    }
    float *pv = (float *)xalloc(8 * (size_t)C * sizeof(float));
    float *w = pv, *b = w + C, *rm = b + C, *rv = rm + C, *sm = rv + C, *si = sm + C, *dw = si + C, *db = dw + C;
    for (int64_t c = 0; c < C; c++) w[c] = 1.0f, rm[c] = 3.5f, rv[c] = 0.1f;
    size_t wsz = 0;
    void *ws = NULL;
    if (ws_off >= 0) {
        for (int k = 0; k < 2; k++) {
            L[k].set_threads(threads);
            size_t s = L[k].wsz(&d, 1);
            if (s > wsz) wsz = s;
        }
        ws = (char *)xalloc(wsz + 4096) + ws_off;
    }
    bnorm_forward_args fa = {.struct_size = sizeof fa, .desc = d, .x = x, .y = y, .weight = w, .bias = b, .eps = 1e-5,
                             .training = !infer, .running_mean = rm, .running_var = rv, .momentum = 0.1,
                             .save_mean = infer ? NULL : sm, .save_invstd = infer ? NULL : si,
                             .workspace = ws, .workspace_size = wsz, .num_threads = threads};
    bnorm_backward_args ba = {.struct_size = sizeof ba, .desc = d, .x = x, .dy = dy, .dx = dx, .weight = w, .mean = sm,
                              .invstd = si, .dweight = dw, .dbias = db, .workspace = ws, .workspace_size = wsz,
                              .num_threads = threads};
    if (bwd) { /* the statistics the backward needs */
        bnorm_forward_args t = fa;
        t.training = 1, t.save_mean = sm, t.save_invstd = si, t.running_mean = t.running_var = NULL;
        if (L[0].fwd(&t)) return 1;
    }
    const size_t flush_bytes = 64u << 20;
    char *f1 = (char *)xalloc(flush_bytes), *f2 = (char *)xalloc(flush_bytes);
    memset(f1, 1, flush_bytes);
    double *t[2] = {(double *)xalloc(sizeof(double) * (size_t)rounds), (double *)xalloc(sizeof(double) * (size_t)rounds)};
    for (int r = -1; r < rounds; r++)
        for (int s = 0; s < 2; s++) {
            const int k = (s + (r < 0 ? 0 : r)) % 2; /* who goes first alternates */
            memcpy(f2, f1, flush_bytes);
            const double t0 = now();
            const bnorm_status st = bwd ? L[k].bwd(&ba) : L[k].fwd(&fa);
            const double t1 = now();
            if (st) {
                fprintf(stderr, "bnorm_ab: %s failed (status %d)\n", L[k].path, (int)st);
                return 1;
            }
            if (r >= 0) t[k][r] = t1 - t0;
        }
    double med[2];
    printf("bnorm_ab: %s, %lld", op, (long long)d.dims[0]);
    for (int i = 1; i < d.rank; i++) printf("x%lld", (long long)d.dims[i]);
    printf(" %s float32, %d threads, %d rounds, tensors %ld bytes past a line, workspace %s\n",
           d.layout == BNORM_LAYOUT_CHANNELS_LAST ? "channels-last" : "channels-first", threads, rounds, off,
           ws_off < 0 ? "the library's own" : "the caller's");
    for (int k = 0; k < 2; k++) {
        qsort(t[k], (size_t)rounds, sizeof(double), cmp_double);
        med[k] = t[k][rounds / 2];
        printf("  %c %-50s median %.3f ms (quartiles %.3f-%.3f)\n", 'A' + k, L[k].path, med[k] * 1e3,
               t[k][rounds / 4] * 1e3, t[k][(3 * rounds) / 4] * 1e3);
    }
    printf("  A / B = %.2f (> 1: B faster)\n", med[0] / med[1]);

    /* Then one more call of each on the same inputs, outputs compared bit for bit: y, or dx, dweight and
       dbias; a training forward's saved statistics and running statistics (from equal copies) too. */
    float *o[2], *p[2];
    for (int k = 0; k < 2; k++) {
        o[k] = (float *)((char *)xalloc(bytes) + off);
        p[k] = (float *)xalloc(4 * (size_t)C * sizeof(float));
        memcpy(p[k] + 2 * C, rm, 2 * (size_t)C * sizeof(float)); /* running mean and var, contiguous */
        bnorm_status st;
        if (bwd) {
            bnorm_backward_args c = ba;
            c.dx = o[k], c.dweight = p[k], c.dbias = p[k] + C;
            st = L[k].bwd(&c);
        } else {
            bnorm_forward_args c = fa;
            c.y = o[k];
            if (!infer) c.save_mean = p[k], c.save_invstd = p[k] + C, c.running_mean = p[k] + 2 * C, c.running_var = p[k] + 3 * C;
            st = L[k].fwd(&c);
        }
        if (st) return 1;
    }
    int64_t diff = 0, first = -1;
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&o[0][i], &o[1][i], sizeof(float))) diff++, first = first < 0 ? i : first;
    const int64_t np = bwd ? 2 * C : infer ? 0 : 4 * C;
    int64_t pdiff = 0;
    for (int64_t i = 0; i < np; i++) pdiff += memcmp(&p[0][i], &p[1][i], sizeof(float)) != 0;
    if (!diff && !pdiff) printf("  outputs: identical bit for bit\n");
    else printf("  outputs: %lld of %lld values differ (first at %lld), %lld of %lld per-channel values\n", (long long)diff,
                (long long)n, (long long)first, (long long)pdiff, (long long)np);
    return 0;
}
