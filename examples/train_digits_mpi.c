/*
 * train_digits_mpi.c - the digits demo trained data-parallel under MPI, with synchronized batch norm.
 *
 *   mpirun -np K ./train_digits_mpi [options]          (--help lists them; docs/demo.md explains)
 *
 * Every rank loads the same data and draws the same split, initial weights and batch order as
 * train_digits. Each global mini-batch is cut into K contiguous slices, one per rank (balanced by
 * default; --fill gives each rank up to ceil(B/K) rows in rank order, so that the short last batch of
 * an epoch leaves the last ranks with fewer rows or none), and each rank runs the forward and backward
 * on its slice only. The three BN layers are synchronized (bnorm_layer_set_comm with a bnorm_mpi
 * communicator): their statistics, and the sums their backward needs, are those of the whole global
 * batch, also on a rank whose slice is empty. The loss is normalized by the global batch size, so the
 * slices' gradients add up to the whole batch's: one MPI_Allreduce sums them (every linear weight and
 * bias and every BN weight and bias), every rank takes the same SGD step.
 *
 * Two comparisons with one process on the whole batch show that this is the same training:
 *   - one step: at every step one rank (in turn) copies the data-parallel network's state into a
 *     spare network, runs the same step on the whole batch alone, and compares the loss, the summed
 *     gradients and the running statistics. This holds at every step of the run, empty slices
 *     included: only the float32 rounding of one step differs (sums taken in another order, BN
 *     statistics merged over ranks). Checked to --tol-step (3e-5).
 *   - the whole training: every rank also trains an independent copy alone on the whole batches (it
 *     is train_digits' bnorm network, step for step) and the per-step losses of the two runs are
 *     compared. The rounding differences of each step are amplified by the following ones, as any
 *     perturbation of SGD is (about tenfold every few steps while the loss spikes at lr 0.5), so the
 *     first --early-steps (20) steps are checked to --tol-early (1e-4) and the rest is reported.
 *
 * Rank 0 prints a line per epoch; with --check the program prints only failures and
 * "N passed, N failed" (rank 0), and exits non-zero on a failure (every rank).
 */
#define _POSIX_C_SOURCE 200809L
#include "bnorm/bnorm_mpi.h"
#include "demo_data.h"
#include "demo_net.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif


typedef struct config {
    int epochs, batch, hidden, test_size, threads, quiet, sync, fill, early_steps;
    unsigned long long seed;
    double lr, momentum, min_acc, tol_step, tol_early, tol_all;
    const char *data;
} config;

static int rank, nranks;
static long checks_passed, checks_failed;

/* Rank 0's progress output; --check silences it. */
static int quiet;
static void say(const char *fmt, ...) {
    if (quiet || rank != 0) return;
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

/* Checks are evaluated on rank 0 from values reduced over all ranks. */
static void check(int ok, const char *fmt, ...) {
    if (rank != 0) return;
    if (ok) {
        checks_passed++;
        return;
    }
    checks_failed++;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL train_digits_mpi: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: mpirun -np K train_digits_mpi [options]\n"
            "  --data PATH        digits CSV (default: data/digits.csv.gz, built in)\n"
            "  --epochs N         training epochs (default 6)\n"
            "  --lr X             SGD learning rate (default 0.5)\n"
            "  --momentum X       SGD momentum (default 0.9)\n"
            "  --batch N          global mini-batch size, split over the ranks (default 64)\n"
            "  --hidden N         width of the hidden layers (default 128)\n"
            "  --seed N           seed of the split, the initial weights and the batch order (default 1)\n"
            "  --test-size N      digits held out for testing (default 360)\n"
            "  --threads N        threads per rank for bnorm and the linear layers (default 1)\n"
            "  --fill             each rank takes up to ceil(B/K) rows of a batch in rank order (per-rank\n"
            "                     loaders with a fixed local batch): the short last batch leaves the last\n"
            "                     ranks fewer rows or none. Default: balanced slices of n/K rows\n"
            "  --tol-step X       bound on the one-step differences to one process (default 3e-5)\n"
            "  --early-steps N    steps of the independent single-process run compared tightly (default 20)\n"
            "  --tol-early X      bound on their relative loss difference (default 1e-4)\n"
            "  --tol-all X        the same bound over the whole run (default: reported, not checked)\n"
            "  --min-acc X        fail unless the eval test accuracy is >= X (0..1; --check: 0.9)\n"
            "  --no-sync          leave BN unsynchronized (each rank normalizes its own slice): the\n"
            "                     comparisons then fail, which is what synchronization is for\n"
            "  --check            quiet self-test: prints failures and 'N passed, N failed' only\n");
}

static int parse(int argc, char **argv, config *c) {
    *c = (config){.epochs = 6, .batch = 64, .hidden = 128, .test_size = 360, .threads = 1, .sync = 1, .seed = 1,
                  .lr = 0.5, .momentum = 0.9, .min_acc = -1, .early_steps = 20, .tol_step = 3e-5,
                  .tol_early = 1e-4, .tol_all = -1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            if (rank == 0) usage(stdout);
            return 1;
        }
        if (!strcmp(a, "--check")) c->quiet = 1;
        else if (!strcmp(a, "--fill")) c->fill = 1;
        else if (!strcmp(a, "--no-sync")) c->sync = 0;
        else if (!strcmp(a, "--data")) c->data = v;
        else if (!strcmp(a, "--epochs")) c->epochs = v ? atoi(v) : 0;
        else if (!strcmp(a, "--lr")) c->lr = v ? atof(v) : 0;
        else if (!strcmp(a, "--momentum")) c->momentum = v ? atof(v) : -1;
        else if (!strcmp(a, "--batch")) c->batch = v ? atoi(v) : 0;
        else if (!strcmp(a, "--hidden")) c->hidden = v ? atoi(v) : 0;
        else if (!strcmp(a, "--seed")) c->seed = v ? strtoull(v, NULL, 10) : 0;
        else if (!strcmp(a, "--test-size")) c->test_size = v ? atoi(v) : 0;
        else if (!strcmp(a, "--threads")) c->threads = v ? atoi(v) : 0;
        else if (!strcmp(a, "--tol-step")) c->tol_step = v ? atof(v) : 0;
        else if (!strcmp(a, "--early-steps")) c->early_steps = v ? atoi(v) : 0;
        else if (!strcmp(a, "--tol-early")) c->tol_early = v ? atof(v) : 0;
        else if (!strcmp(a, "--tol-all")) c->tol_all = v ? atof(v) : 0;
        else if (!strcmp(a, "--min-acc")) c->min_acc = v ? atof(v) : 0;
        else {
            if (rank == 0) {
                fprintf(stderr, "train_digits_mpi: unknown option %s\n", a);
                usage(stderr);
            }
            return -1;
        }
        if (!strcmp(a, "--check") || !strcmp(a, "--fill") || !strcmp(a, "--no-sync")) continue;
        if (!v) {
            if (rank == 0) fprintf(stderr, "train_digits_mpi: %s needs a value\n", a);
            return -1;
        }
        i++;
    }
    if (c->quiet && c->min_acc < 0) c->min_acc = 0.9;
    if (c->epochs < 1 || c->batch < 2 || c->hidden < 1 || c->threads < 1 || c->early_steps < 1 || !(c->lr > 0) ||
        !(c->momentum >= 0 && c->momentum < 1)) {
        if (rank == 0)
            fprintf(stderr, "train_digits_mpi: need --epochs >= 1, --batch >= 2, --hidden >= 1, --threads >= 1, "
                            "--early-steps >= 1, --lr > 0, 0 <= --momentum < 1\n");
        return -1;
    }
    return 0;
}

/* Rank r's rows of a global batch of n rows (n <= B): [*first, *first + *count).
 * Balanced: n/K rows each, the first n%K ranks one more; a slice is empty only when n < K.
 * Fill: up to ceil(B/K) rows per rank in rank order. */
static void slice(int n, int B, int fill, int r, int *first, int *count) {
    if (fill) {
        const int chunk = (B + nranks - 1) / nranks;
        *first = r * chunk < n ? r * chunk : n;
        *count = n - *first < chunk ? n - *first : chunk;
        return;
    }
    const int q = n / nranks, extra = n % nranks;
    *count = q + (r < extra);
    *first = r * q + (r < extra ? r : extra);
}

/* "22/21/21": the slice sizes of a batch of n rows. */
static void slice_sizes(int n, int B, int fill, char *out, size_t cap) {
    size_t len = 0;
    out[0] = '\0';
    for (int r = 0; r < nranks && len + 12 < cap; r++) {
        int f, k;
        slice(n, B, fill, r, &f, &k);
        len += (size_t)snprintf(out + len, cap - len, r ? "/%d" : "%d", k);
    }
}

/* ------------------------------------------------------------------------------------------------
 * The gradient exchange: every gradient of the network in one float64 buffer, plus three extras
 * (the slice's summed loss, its number of correct predictions, a failure flag), summed by one
 * MPI_Allreduce. In float64 the order in which MPI adds the ranks' contributions changes the sum far
 * below the float32 rounding that follows; every rank rounds the same sum, so every rank takes the
 * same SGD step (checked at the end by hashing the networks).
 * ---------------------------------------------------------------------------------------------- */

enum { EXTRA_LOSS, EXTRA_CORRECT, EXTRA_FAILED, N_EXTRAS };

static size_t grad_count(const demo_net *net) {
    size_t n = 0;
    for (int i = 0; i < 4; i++) n += (size_t)net->fc[i].in * net->fc[i].out + net->fc[i].out;
    return n + 3 * 2 * (size_t)net->hidden;
}

/* A BN layer's float32 tensor (the demo's layers have float32 parameters). */
static float *bn_tensor(demo_net *net, int i, bnorm_tensor_id id) {
    void *p = NULL;
    return bnorm_layer_tensor(net->bn[i], id, &p) == BNORM_STATUS_OK ? (float *)p : NULL;
}

/* The gradients in exchange order: each linear layer's weight and bias, then each BN's weight and
 * bias; *n receives the lengths. Returns the number of tensors (14), or -1 if a BN tensor is missing. */
static int grad_tensors(demo_net *net, float *t[14], size_t n[14]) {
    int k = 0;
    for (int i = 0; i < 4; i++) {
        t[k] = net->fc[i].gw, n[k++] = (size_t)net->fc[i].in * net->fc[i].out;
        t[k] = net->fc[i].gb, n[k++] = (size_t)net->fc[i].out;
    }
    for (int i = 0; i < 3; i++) {
        t[k] = bn_tensor(net, i, BNORM_TENSOR_WEIGHT_GRAD), n[k++] = (size_t)net->hidden;
        t[k] = bn_tensor(net, i, BNORM_TENSOR_BIAS_GRAD), n[k++] = (size_t)net->hidden;
        if (!t[k - 1] || !t[k - 2]) return -1;
    }
    return k;
}

/* dir > 0: gradients -> buf; dir < 0: buf -> gradients (rounded to float32). */
static void move_grads(demo_net *net, double *buf, int dir) {
    float *t[14];
    size_t n[14], k = 0;
    const int count = grad_tensors(net, t, n);
    for (int i = 0; i < count; i++)
        for (size_t j = 0; j < n[i]; j++, k++) {
            if (dir > 0) buf[k] = t[i][j];
            else t[i][j] = (float)buf[k];
        }
}

/* ------------------------------------------------------------------------------------------------
 * The one-step comparison
 * ---------------------------------------------------------------------------------------------- */

/* dst = src's parameters, running statistics and num_batches_tracked (not the momentum buffers). */
static bnorm_status copy_state(demo_net *dst, demo_net *src) {
    for (int i = 0; i < 4; i++) {
        memcpy(dst->fc[i].w, src->fc[i].w, (size_t)src->fc[i].in * src->fc[i].out * sizeof(float));
        memcpy(dst->fc[i].b, src->fc[i].b, (size_t)src->fc[i].out * sizeof(float));
    }
    for (int i = 0; i < 3; i++) {
        for (int id = BNORM_TENSOR_WEIGHT; id <= BNORM_TENSOR_RUNNING_VAR; id++) {
            float *d = bn_tensor(dst, i, (bnorm_tensor_id)id), *s = bn_tensor(src, i, (bnorm_tensor_id)id);
            if (!d || !s) return BNORM_STATUS_UNSUPPORTED;
            memcpy(d, s, (size_t)src->hidden * sizeof(float));
        }
        int64_t nbt;
        bnorm_status st = bnorm_layer_get_num_batches_tracked(src->bn[i], &nbt);
        if (!st) st = bnorm_layer_set_num_batches_tracked(dst->bn[i], nbt);
        if (st) return st;
    }
    return BNORM_STATUS_OK;
}

/* The largest difference between two groups of tensors relative to the largest magnitude in b.
 * Per group, not per value: the biases in front of a BN have a gradient of zero up to rounding, so
 * they are compared at the scale of their layer's weight gradients. NaN counts as infinitely far. */
typedef struct gap {
    double diff, mag;
} gap;

static void gap_add(gap *g, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)b[i]);
        if (e != e) e = INFINITY;
        if (e > g->diff) g->diff = e;
        if (fabs((double)b[i]) > g->mag) g->mag = fabs((double)b[i]);
    }
}

static double gap_rel(gap g) { return g.diff == 0 ? 0 : g.mag > 0 ? g.diff / g.mag : INFINITY; }

/* Gradients (per layer) and running statistics (per tensor) of the data-parallel network after a step
 * against one process's on the whole batch from the same state. */
static void compare_step(demo_net *dist, demo_net *one, double *grad_err, double *stats_err) {
    float *ta[14], *tb[14];
    size_t n[14];
    grad_tensors(dist, ta, n);
    grad_tensors(one, tb, n);
    double g = 0, r = 0;
    for (int i = 0; i < 14; i += 2) { /* a layer: its weight and bias gradients */
        gap d = {0, 0};
        gap_add(&d, ta[i], tb[i], n[i]);
        gap_add(&d, ta[i + 1], tb[i + 1], n[i + 1]);
        g = fmax(g, gap_rel(d));
    }
    for (int i = 0; i < 3; i++)
        for (int id = BNORM_TENSOR_RUNNING_MEAN; id <= BNORM_TENSOR_RUNNING_VAR; id++) {
            gap d = {0, 0};
            gap_add(&d, bn_tensor(dist, i, (bnorm_tensor_id)id), bn_tensor(one, i, (bnorm_tensor_id)id),
                    (size_t)dist->hidden);
            r = fmax(r, gap_rel(d));
        }
    *grad_err = g;
    *stats_err = r;
}

/* FNV-1a over the bits of every parameter and running statistic: equal on every rank iff the ranks
 * hold bitwise identical networks. */
static uint64_t fnv(uint64_t h, const void *p, size_t bytes) {
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < bytes; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t net_hash(demo_net *net) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < 4; i++) {
        const demo_linear *L = &net->fc[i];
        h = fnv(h, L->w, (size_t)L->in * L->out * sizeof(float));
        h = fnv(h, L->b, (size_t)L->out * sizeof(float));
    }
    for (int i = 0; i < 3; i++) {
        for (int id = BNORM_TENSOR_WEIGHT; id <= BNORM_TENSOR_RUNNING_VAR; id++) {
            const float *p = bn_tensor(net, i, (bnorm_tensor_id)id);
            if (p) h = fnv(h, p, (size_t)net->hidden * sizeof(float));
        }
        int64_t nbt = 0;
        bnorm_layer_get_num_batches_tracked(net->bn[i], &nbt);
        h = fnv(h, &nbt, sizeof nbt);
    }
    return h;
}

/* ------------------------------------------------------------------------------------------------
 * Training
 * ---------------------------------------------------------------------------------------------- */

static double eval_accuracy(demo_net *net, const demo_dataset *te, int *failed) {
    int correct = 0;
    bnorm_status st = demo_net_evaluate(net, te->x, te->y, te->n, &correct, NULL, NULL);
    if (st) {
        fprintf(stderr, "train_digits_mpi (rank %d): evaluation failed: %s: %s\n", rank, bnorm_status_string(st),
                bnorm_last_error());
        *failed = 1;
        return 0;
    }
    return (double)correct / te->n;
}

static void gather_rows(const demo_dataset *tr, const int *idx, int n, float *x, uint8_t *y) {
    for (int i = 0; i < n; i++) {
        memcpy(x + (size_t)i * tr->dim, tr->x + (size_t)idx[i] * tr->dim, (size_t)tr->dim * sizeof(float));
        y[i] = tr->y[idx[i]];
    }
}

static int any_rank(int flag) {
    int any = 0;
    MPI_Allreduce(&flag, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return any;
}

static int report(bnorm_status st, const char *what, int step) {
    if (st)
        fprintf(stderr, "train_digits_mpi (rank %d): %s, step %d: %s: %s\n", rank, what, step,
                bnorm_status_string(st), bnorm_last_error());
    return st != BNORM_STATUS_OK;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    config c;
    const int rc = parse(argc, argv, &c);
    if (rc) {
        MPI_Finalize();
        return rc > 0 ? 0 : 2;
    }
    quiet = c.quiet;
    /* The digits network is so small that threads cost more than they save (docs/demo.md). */
    bnorm_set_num_threads(c.threads);
#ifdef _OPENMP
    omp_set_num_threads(c.threads);
#endif

    /* Every rank: the same data, split, initial weights and batch order as train_digits. */
    char err[512] = "";
    demo_dataset all, tr = {0}, te = {0};
    const char *path = c.data;
    int failed = demo_load_digits_csv(path, &all, err, sizeof err) != 0;
    if (!failed) {
        failed = demo_split(&all, c.test_size, c.seed, &tr, &te, err, sizeof err) != 0;
        demo_dataset_free(&all);
    }
    if (failed) fprintf(stderr, "train_digits_mpi (rank %d): %s\n", rank, err);
    if (any_rank(failed)) {
        MPI_Finalize();
        return 2;
    }

    /* dist: the data-parallel network; ref: the same network trained alone on the whole batches;
     * one: the spare network of the one-step comparison */
    demo_net dist, ref, one;
    const int capacity = c.batch > 500 ? c.batch : 500; /* evaluation runs in chunks of this many rows */
    const uint64_t init_seed = c.seed * 7919 + 17;     /* train_digits' bnorm network */
    bnorm_status st = demo_net_create(&dist, tr.dim, c.hidden, tr.classes, 1, capacity, init_seed);
    if (!st) st = demo_net_create(&ref, tr.dim, c.hidden, tr.classes, 1, capacity, init_seed);
    if (!st) st = demo_net_create(&one, tr.dim, c.hidden, tr.classes, 1, c.batch, init_seed);
    bnorm_comm *sync = NULL;
    if (!st) {
        bnorm_mpi_options mo = bnorm_mpi_options_default();
        mo.timeout_seconds = 60; /* a rank missing for a minute is an error here, not a slow rank */
        st = bnorm_mpi_comm_create(MPI_COMM_WORLD, &mo, &sync);
        if (st) fprintf(stderr, "train_digits_mpi (rank %d): %s\n", rank, bnorm_mpi_last_error());
    }
    /* convert_sync_batchnorm: from now on the training statistics are the global batch's */
    for (int i = 0; i < 3 && !st && c.sync; i++) st = bnorm_layer_set_comm(dist.bn[i], sync, 0);
    if (!st) st = demo_net_set_training(&one, 1);
    if (st) fprintf(stderr, "train_digits_mpi (rank %d): setup failed: %s\n", rank, bnorm_status_string(st));
    if (any_rank(st != BNORM_STATUS_OK)) MPI_Abort(MPI_COMM_WORLD, 2);

    int steps_per_epoch = 0;
    for (int i0 = 0; i0 + 2 <= tr.n; i0 += c.batch) steps_per_epoch++; /* a final batch of 1 row is dropped */
    const int max_steps = steps_per_epoch * c.epochs;
    const size_t ng = grad_count(&dist);
    double *gbuf = (double *)malloc((ng + N_EXTRAS) * sizeof(double));
    double *gsum = (double *)malloc((ng + N_EXTRAS) * sizeof(double));
    double *loss_dist = (double *)malloc((size_t)max_steps * sizeof(double));
    double *loss_ref = (double *)malloc((size_t)max_steps * sizeof(double));
    float *xb = (float *)malloc((size_t)c.batch * tr.dim * sizeof(float));
    uint8_t *yb = (uint8_t *)malloc((size_t)c.batch);
    int *perm = (int *)malloc((size_t)tr.n * sizeof(int));
    if (!gbuf || !gsum || !loss_dist || !loss_ref || !xb || !yb || !perm) {
        fprintf(stderr, "train_digits_mpi (rank %d): out of memory\n", rank);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }

    char s_full[256], s_last[256];
    int last_n = tr.n - (steps_per_epoch - 1) * c.batch; /* the last batch that is trained on */
    if (last_n > c.batch) last_n = c.batch;
    slice_sizes(c.batch, c.batch, c.fill, s_full, sizeof s_full);
    slice_sizes(last_n, c.batch, c.fill, s_last, sizeof s_last);
    say("bnorm %s (%s kernels, %d thread(s) per rank) - UCI digits: %d training, %d test samples\n",
        bnorm_version_string(), bnorm_isa_name(bnorm_get_isa()), bnorm_get_num_threads(), tr.n, te.n);
    say("data-parallel over %d MPI rank(s), BN %s\n", nranks,
        c.sync ? "synchronized (bnorm_mpi)" : "NOT synchronized (--no-sync)");
    say("global batch %d: %s rows per rank (last batch of each epoch, %d rows: %s)%s\n", c.batch, s_full, last_n,
        s_last, c.fill ? " --fill" : "");
    say("SGD lr %g, momentum %g, %d epochs; every rank also trains the same network alone on whole batches\n\n",
        c.lr, c.momentum, c.epochs);
    say("epoch |       data-parallel (%d rank%s)       |  one process, whole batches  | loss diff\n", nranks,
        nranks > 1 ? "s" : " ");
    say("      |    loss   train    test    time    |    loss   train    test     | (max/step)\n");

    uint64_t order_rng = c.seed ^ 0xB0B0CAFEull; /* train_digits' batch order */
    int steps = 0, diverged = 0;
    double acc_dist = 0, acc_ref = 0;
    double one_step[3] = {0, 0, 0}; /* worst one-step differences: loss, gradients, running statistics */
    for (int e = 0; e < c.epochs && !failed && !diverged; e++) {
        demo_shuffle(perm, tr.n, &order_rng);
        demo_net_set_training(&dist, 1);
        demo_net_set_training(&ref, 1);
        double sum_d = 0, sum_r = 0, seconds = 0, epoch_diff = 0;
        long ok_d = 0, ok_r = 0, seen = 0;
        for (int i0 = 0; i0 + 2 <= tr.n; i0 += c.batch) {
            const int n = tr.n - i0 < c.batch ? tr.n - i0 : c.batch;
            const float scale = 1.0f / (float)n; /* every run: the mean over the global batch */
            const int my_check = steps % nranks == rank;
            int first, count, ok;
            double l;
            if (my_check) failed |= report(copy_state(&one, &dist), "copy for the one-step comparison", steps);

            /* data-parallel: this rank's slice, then one sum of the gradients, the loss and the flags */
            const double t0 = MPI_Wtime();
            slice(n, c.batch, c.fill, rank, &first, &count);
            gather_rows(&tr, perm + i0 + first, count, xb, yb);
            st = demo_net_forward_backward(&dist, xb, yb, count, scale, &l, &ok);
            report(st, "data-parallel forward/backward", steps);
            if (!st) move_grads(&dist, gbuf, +1);
            gbuf[ng + EXTRA_LOSS] = st ? 0 : l;
            gbuf[ng + EXTRA_CORRECT] = st ? 0 : ok;
            gbuf[ng + EXTRA_FAILED] = st != BNORM_STATUS_OK || failed; /* a failure anywhere stops all */
            MPI_Allreduce(gbuf, gsum, (int)(ng + N_EXTRAS), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
            if (gsum[ng + EXTRA_FAILED] != 0) { /* the same on every rank: all stop here */
                failed = 1;
                break;
            }
            move_grads(&dist, gsum, -1);
            const double ld = gsum[ng + EXTRA_LOSS] / n;
            const double t1 = MPI_Wtime();

            /* one-step comparison: the same step from the same state in one process */
            gather_rows(&tr, perm + i0, n, xb, yb);
            if (my_check && !failed) {
                st = demo_net_forward_backward(&one, xb, yb, n, scale, &l, &ok);
                failed |= report(st, "one-step comparison", steps);
                if (!st) {
                    double g, r, d = fabs(ld - l / n) / fabs(l / n);
                    compare_step(&dist, &one, &g, &r);
                    one_step[0] = fmax(one_step[0], d != d ? INFINITY : d);
                    one_step[1] = fmax(one_step[1], g);
                    one_step[2] = fmax(one_step[2], r);
                }
            }

            const double t2 = MPI_Wtime();
            demo_net_sgd_step(&dist, (float)c.lr, (float)c.momentum);
            seconds += (t1 - t0) + (MPI_Wtime() - t2);

            /* the independent run: the same batch in this process alone */
            st = demo_net_forward_backward(&ref, xb, yb, n, scale, &l, &ok);
            if (!st) st = demo_net_sgd_step(&ref, (float)c.lr, (float)c.momentum);
            failed |= report(st, "single-process run", steps);
            loss_dist[steps] = ld;
            loss_ref[steps] = l / n;
            ok_d += (long)gsum[ng + EXTRA_CORRECT];
            ok_r += ok;
            sum_d += gsum[ng + EXTRA_LOSS];
            sum_r += l;
            seen += n;
            const double diff = fabs(loss_dist[steps] - loss_ref[steps]) / fabs(loss_ref[steps]);
            epoch_diff = diff > epoch_diff || diff != diff ? diff : epoch_diff;
            steps++;
            /* every rank has the same losses, so every rank stops at the same step */
            if (!isfinite(ld) || !isfinite(loss_ref[steps - 1])) {
                diverged = 1;
                break;
            }
        }
        if (any_rank(failed)) {
            failed = 1;
            break;
        }
        acc_dist = eval_accuracy(&dist, &te, &failed);
        acc_ref = eval_accuracy(&ref, &te, &failed);
        say("%5d | %7.4f  %5.1f%%  %5.1f%%  %6.3fs   | %7.4f  %5.1f%%  %5.1f%%     | %9.2e\n", e + 1, sum_d / seen,
            100.0 * ok_d / seen, 100 * acc_dist, seconds, sum_r / seen, 100.0 * ok_r / seen, 100 * acc_ref,
            epoch_diff);
    }
    failed = any_rank(failed);

    /* Everything below is reduced over the ranks. */
    double mine[5] = {one_step[0], one_step[1], one_step[2], 0, 0}, worst[5];
    for (int s = 0; s < steps; s++) { /* [3]: the first early_steps steps, [4]: the whole run */
        double d = fabs(loss_dist[s] - loss_ref[s]) / fabs(loss_ref[s]);
        if (d != d) d = INFINITY;
        if (s < c.early_steps) mine[3] = fmax(mine[3], d);
        mine[4] = fmax(mine[4], d);
    }
    MPI_Allreduce(mine, worst, 5, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    double acc_min = acc_dist;
    MPI_Allreduce(&acc_dist, &acc_min, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
    unsigned long long h = (unsigned long long)net_hash(&dist), hmin = 0, hmax = 0;
    MPI_Allreduce(&h, &hmin, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&h, &hmax, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
    int nbt_ok = 1;
    for (int i = 0; i < 3; i++) {
        int64_t nbt = -1;
        bnorm_layer_get_num_batches_tracked(dist.bn[i], &nbt);
        nbt_ok &= nbt == steps;
    }
    nbt_ok = !any_rank(!nbt_ok);

    const int early_n = steps < c.early_steps ? steps : c.early_steps;
    char all_bound[64] = "not checked";
    if (c.tol_all >= 0) snprintf(all_bound, sizeof all_bound, "bound %.0e", c.tol_all);
    say("\nevery step against one process on the whole batch from the same state (%d steps, relative):\n", steps);
    say("  loss %.2e, gradients %.2e, running statistics %.2e (bound %.0e)\n", worst[0], worst[1], worst[2],
        c.tol_step);
    say("per-step loss against the independent single-process run (relative):\n");
    say("  first %d steps %.2e (bound %.0e), whole run %.2e (%s)\n", early_n, worst[3], c.tol_early, worst[4],
        all_bound);
    say("eval mode (running statistics): test accuracy %.2f%% data-parallel, %.2f%% single process\n", 100 * acc_dist,
        100 * acc_ref);
    say("networks after training: %s on all %d ranks\n", hmin == hmax ? "bitwise identical" : "DIFFERENT", nranks);

    check(!failed, "training failed (see the messages above)");
    check(!diverged, "training diverged (a loss was not finite)");
    check(steps == max_steps, "%d training steps, expected %d", steps, max_steps);
    check(worst[0] <= c.tol_step && worst[1] <= c.tol_step && worst[2] <= c.tol_step,
          "one step against one process: loss %.3g, gradients %.3g, running statistics %.3g > %.3g", worst[0],
          worst[1], worst[2], c.tol_step);
    check(worst[3] <= c.tol_early, "first %d steps: loss differs from the single-process run by %.3g > %.3g",
          early_n, worst[3], c.tol_early);
    if (c.tol_all >= 0)
        check(worst[4] <= c.tol_all, "whole run: loss differs from the single-process run by %.3g > %.3g", worst[4],
              c.tol_all);
    check(hmin == hmax, "the ranks' networks differ after training (the SGD steps were not identical)");
    check(nbt_ok, "a BN layer did not count one num_batches_tracked per step (%d) on every rank", steps);
    if (c.min_acc >= 0)
        check(acc_min >= c.min_acc, "eval test accuracy %.4f < --min-acc %.4f", acc_min, c.min_acc);
    if (rank == 0 && quiet) printf("%ld passed, %ld failed\n", checks_passed, checks_failed);
    else if (rank == 0 && checks_failed) fprintf(stderr, "train_digits_mpi: %ld check(s) failed\n", checks_failed);
    long nfail = checks_failed;
    MPI_Bcast(&nfail, 1, MPI_LONG, 0, MPI_COMM_WORLD);

    demo_net_destroy(&dist); /* its layers hold copies of sync: destroy them first */
    demo_net_destroy(&ref);
    demo_net_destroy(&one);
    bnorm_mpi_comm_destroy(sync);
    demo_dataset_free(&tr);
    demo_dataset_free(&te);
    free(gbuf);
    free(gsum);
    free(loss_dist);
    free(loss_ref);
    free(xb);
    free(yb);
    free(perm);
    MPI_Finalize();
    return nfail ? 1 : 0;
}
