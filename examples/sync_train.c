/*
 * sync_train.c - data-parallel training with synchronized batch norm over MPI.
 *
 *   mpirun -np 3 ./sync_train [--f32] [--steps N] [--batch B] [--tol T] [--quiet] [--no-sync]
 *
 * The model is a small regression network in plain C:
 *
 *   h = x W1 + b1          (D_IN -> HIDDEN)
 *   a = ReLU(BN(h))        one bnorm layer with the fused ReLU, synchronized over the ranks
 *   p = a . w2 + b2        (HIDDEN -> 1), loss = mean over the global batch of (p - target)^2
 *
 * Every step draws a global batch of B rows from a seeded generator (the same on every rank); rank r
 * trains on its slice (uneven when B is not a multiple of the number of ranks). The gradients of the
 * slices are summed with MPI_Allreduce (the loss is normalized by the global B, so their sum is the
 * full-batch gradient), then every rank takes the same SGD step. Because BN's statistics are computed
 * over the whole global batch (bnorm_layer_set_comm with a bnorm_mpi communicator), the result is the
 * single-process training on the full batch. To show it, every rank also trains a second copy of the
 * model without communication on the whole batch; rank 0 prints both loss curves and the largest
 * relative difference, and the program exits non-zero if it exceeds --tol.
 * --no-sync leaves the layer unsynchronized (each rank normalizes its own slice, as plain BN under
 * data parallelism): the curves then differ from the first step and the check fails.
 */
#include "bnorm/bnorm_mpi.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { D_IN = 8, HIDDEN = 16 };

/* ---- a seeded generator, identical on every rank ---- */
static uint64_t rng_state = 0x5eed5eedull;
static double rng_uniform(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (double)((z ^ (z >> 31)) >> 11) * (1.0 / 9007199254740992.0);
}
static double rng_normal(void) {
    double u = rng_uniform(), v = rng_uniform();
    return sqrt(-2.0 * log(u > 1e-300 ? u : 1e-300)) * cos(6.283185307179586 * v);
}

/* ---- the model ---- */
typedef struct model {
    double w1[D_IN * HIDDEN], b1[HIDDEN], w2[HIDDEN], b2;
    double gw1[D_IN * HIDDEN], gb1[HIDDEN], gw2[HIDDEN], gb2;
    bnorm_layer *bn;
    bnorm_dtype dtype; /* of the BN data: float32 or float64 */
} model;

/* Number of parameters exchanged per step: the linear layers' and BN's weight and bias gradients. */
enum { N_GRADS = D_IN * HIDDEN + HIDDEN + HIDDEN + 1 + 2 * HIDDEN };

static int check(bnorm_status st, const char *what) {
    if (st == BNORM_STATUS_OK) return 0;
    fprintf(stderr, "%s: %s (%s)\n", what, bnorm_status_string(st), bnorm_last_error());
    return 1;
}

/* Per-channel BN tensor as doubles, and back (the layer stores float or double parameters). */
static void bn_get(bnorm_layer *bn, bnorm_tensor_id id, double *out) {
    void *p = NULL;
    bnorm_layer_tensor(bn, id, &p);
    bnorm_layer_options o;
    bnorm_layer_get_options(bn, &o);
    for (int c = 0; c < HIDDEN; c++)
        out[c] = o.param_dtype == BNORM_DTYPE_F64 ? ((double *)p)[c] : (double)((float *)p)[c];
}
static void bn_set(bnorm_layer *bn, bnorm_tensor_id id, const double *in) {
    void *p = NULL;
    bnorm_layer_tensor(bn, id, &p);
    bnorm_layer_options o;
    bnorm_layer_get_options(bn, &o);
    for (int c = 0; c < HIDDEN; c++) {
        if (o.param_dtype == BNORM_DTYPE_F64) ((double *)p)[c] = in[c];
        else ((float *)p)[c] = (float)in[c];
    }
}

static int model_init(model *m, bnorm_dtype dtype) {
    memset(m, 0, sizeof *m);
    m->dtype = dtype;
    uint64_t saved = rng_state;
    rng_state = 12345; /* both copies start from the same weights */
    for (int i = 0; i < D_IN * HIDDEN; i++) m->w1[i] = rng_normal() * sqrt(2.0 / D_IN);
    for (int j = 0; j < HIDDEN; j++) m->w2[j] = rng_normal() * sqrt(1.0 / HIDDEN);
    rng_state = saved;
    bnorm_layer_options o = bnorm_layer_options_default(HIDDEN);
    o.param_dtype = bnorm_param_dtype(dtype);
    o.fused_relu = 1;
    return check(bnorm_layer_create(&o, &m->bn), "bnorm_layer_create");
}

/* Forward and backward of rows [0, n) of x/target; the loss and the gradients are normalized by the
 * global batch size B (so that slices add up). Gradients are overwritten; *loss receives the slice's
 * share of the mean squared error. */
static int model_step(model *m, const double *x, const double *target, int n, int B, double *loss) {
    const size_t es = bnorm_dtype_size(m->dtype);
    double *h = malloc(sizeof(double) * (size_t)(n * HIDDEN + 1)), *a = malloc(sizeof(double) * (size_t)(n * HIDDEN + 1));
    double *da = malloc(sizeof(double) * (size_t)(n * HIDDEN + 1));
    void *hb = malloc(es * (size_t)(n * HIDDEN + 1)), *ab = malloc(es * (size_t)(n * HIDDEN + 1));
    const int f64 = m->dtype == BNORM_DTYPE_F64;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < HIDDEN; j++) {
            double s = m->b1[j];
            for (int k = 0; k < D_IN; k++) s += x[r * D_IN + k] * m->w1[k * HIDDEN + j];
            h[r * HIDDEN + j] = s;
            if (f64) ((double *)hb)[r * HIDDEN + j] = s;
            else ((float *)hb)[r * HIDDEN + j] = (float)s;
        }
    bnorm_desc d = {.dtype = m->dtype, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 2, .dims = {n, HIDDEN}};
    int err = check(bnorm_layer_forward(m->bn, &d, hb, ab, NULL), "bnorm_layer_forward");
    double l = 0;
    memset(m->gw2, 0, sizeof m->gw2);
    m->gb2 = 0;
    for (int r = 0; r < n && !err; r++) {
        double p = m->b2;
        for (int j = 0; j < HIDDEN; j++) {
            a[r * HIDDEN + j] = f64 ? ((double *)ab)[r * HIDDEN + j] : (double)((float *)ab)[r * HIDDEN + j];
            p += a[r * HIDDEN + j] * m->w2[j];
        }
        double e = p - target[r], dp = 2 * e / B;
        l += e * e / B;
        m->gb2 += dp;
        for (int j = 0; j < HIDDEN; j++) {
            m->gw2[j] += a[r * HIDDEN + j] * dp;
            da[r * HIDDEN + j] = m->w2[j] * dp;
            if (f64) ((double *)ab)[r * HIDDEN + j] = da[r * HIDDEN + j];
            else ((float *)ab)[r * HIDDEN + j] = (float)da[r * HIDDEN + j];
        }
    }
    /* through BN and its ReLU (dh overwrites the gradient buffer); BN's weight/bias grads accumulate */
    if (!err) err = check(bnorm_layer_zero_grad(m->bn), "bnorm_layer_zero_grad");
    if (!err) err = check(bnorm_layer_backward(m->bn, &d, hb, ab, ab, NULL), "bnorm_layer_backward");
    memset(m->gw1, 0, sizeof m->gw1);
    memset(m->gb1, 0, sizeof m->gb1);
    for (int r = 0; r < n && !err; r++)
        for (int j = 0; j < HIDDEN; j++) {
            double g = f64 ? ((double *)ab)[r * HIDDEN + j] : (double)((float *)ab)[r * HIDDEN + j];
            m->gb1[j] += g;
            for (int k = 0; k < D_IN; k++) m->gw1[k * HIDDEN + j] += x[r * D_IN + k] * g;
        }
    *loss = l;
    free(h); free(a); free(da); free(hb); free(ab);
    return err;
}

/* All gradients in one array (linear layers, then BN weight and bias), and the SGD step from it. */
static void model_pack_grads(model *m, double *g) {
    memcpy(g, m->gw1, sizeof m->gw1);
    g += D_IN * HIDDEN;
    memcpy(g, m->gb1, sizeof m->gb1);
    g += HIDDEN;
    memcpy(g, m->gw2, sizeof m->gw2);
    g += HIDDEN;
    *g++ = m->gb2;
    bn_get(m->bn, BNORM_TENSOR_WEIGHT_GRAD, g);
    bn_get(m->bn, BNORM_TENSOR_BIAS_GRAD, g + HIDDEN);
}
static void model_sgd(model *m, const double *g, double lr) {
    for (int i = 0; i < D_IN * HIDDEN; i++) m->w1[i] -= lr * *g++;
    for (int j = 0; j < HIDDEN; j++) m->b1[j] -= lr * *g++;
    for (int j = 0; j < HIDDEN; j++) m->w2[j] -= lr * *g++;
    m->b2 -= lr * *g++;
    double w[HIDDEN], b[HIDDEN];
    bn_get(m->bn, BNORM_TENSOR_WEIGHT, w);
    bn_get(m->bn, BNORM_TENSOR_BIAS, b);
    for (int j = 0; j < HIDDEN; j++) {
        w[j] -= lr * g[j];
        b[j] -= lr * g[HIDDEN + j];
    }
    bn_set(m->bn, BNORM_TENSOR_WEIGHT, w);
    bn_set(m->bn, BNORM_TENSOR_BIAS, b);
}

int main(int argc, char **argv) {
    int steps = 20, B = 29, quiet = 0, no_sync = 0;
    bnorm_dtype dtype = BNORM_DTYPE_F64;
    double tol = -1, lr = 0.05;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--f32")) dtype = BNORM_DTYPE_F32;
        else if (!strcmp(argv[i], "--quiet")) quiet = 1;
        else if (!strcmp(argv[i], "--no-sync")) no_sync = 1;
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc) B = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tol") && i + 1 < argc) tol = atof(argv[++i]);
        else {
            fprintf(stderr, "usage: mpirun -np K %s [--f32] [--steps N] [--batch B] [--tol T] [--quiet] [--no-sync]\n",
                    argv[0]);
            return 2;
        }
    }
    /* float64: the two runs differ by reassociation only; float32: BN's outputs round to float */
    if (tol < 0) tol = dtype == BNORM_DTYPE_F64 ? 1e-10 : 1e-5;

    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (B < 2 || steps < 1) {
        if (rank == 0) fprintf(stderr, "need --batch >= 2 and --steps >= 1\n");
        MPI_Finalize();
        return 2;
    }
    /* this rank's slice of every global batch: sizes B/size, the first B%size ranks one more */
    const int n_local = B / size + (rank < B % size), first = rank * (B / size) + (rank < B % size ? rank : B % size);

    bnorm_comm *sync = NULL;
    model dist, single;
    int err = check(bnorm_mpi_comm_create(MPI_COMM_WORLD, NULL, &sync), "bnorm_mpi_comm_create");
    if (err) fprintf(stderr, "%s\n", bnorm_mpi_last_error());
    err |= model_init(&dist, dtype) | model_init(&single, dtype);
    /* convert_sync_batchnorm: from now on the training statistics are the global batch's */
    if (!err && !no_sync) err = check(bnorm_layer_set_comm(dist.bn, sync, 0), "bnorm_layer_set_comm");

    double *x = malloc(sizeof(double) * (size_t)B * D_IN), *t = malloc(sizeof(double) * (size_t)B);
    double g[N_GRADS], gsum[N_GRADS], worst = 0;
    double teacher[D_IN];
    for (int k = 0; k < D_IN; k++) teacher[k] = rng_normal();
    if (rank == 0 && !quiet)
        printf("%d ranks, global batch %d (this rank: rows %d..%d), BN data %s\n%5s %22s %22s %10s\n", size, B,
               first, first + n_local - 1, bnorm_dtype_name(dtype), "step", "loss (data-parallel)",
               "loss (single process)", "rel. diff");
    for (int s = 0; s < steps && !err; s++) {
        for (int r = 0; r < B; r++) {
            double z = 0;
            for (int k = 0; k < D_IN; k++) {
                x[r * D_IN + k] = 1.5 + rng_normal(); /* an offset so that BN has a mean to remove */
                z += x[r * D_IN + k] * teacher[k];
            }
            t[r] = tanh(0.3 * z) + 0.05 * rng_normal();
        }
        double l_local = 0, l_dist = 0, l_single = 0;
        /* data-parallel: this rank's slice, then the sum of the gradients and of the loss */
        err = model_step(&dist, x + (size_t)first * D_IN, t + first, n_local, B, &l_local);
        int any = 0;
        MPI_Allreduce(&err, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        if (any) { err = 1; break; }
        model_pack_grads(&dist, g);
        MPI_Allreduce(g, gsum, N_GRADS, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        MPI_Allreduce(&l_local, &l_dist, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        model_sgd(&dist, gsum, lr);
        /* the same step on the whole batch in this process alone */
        err = model_step(&single, x, t, B, B, &l_single);
        if (err) break;
        model_pack_grads(&single, g);
        model_sgd(&single, g, lr);
        double diff = fabs(l_dist - l_single) / fabs(l_single);
        if (diff > worst) worst = diff;
        if (rank == 0 && !quiet) printf("%5d %22.15g %22.15g %10.2e\n", s, l_dist, l_single, diff);
    }
    /* the running statistics, updated with the global batch's statistics, agree too */
    double rm1[HIDDEN], rm2[HIDDEN], rv1[HIDDEN], rv2[HIDDEN], worst_stats = 0;
    if (!err) {
        bn_get(dist.bn, BNORM_TENSOR_RUNNING_MEAN, rm1);
        bn_get(single.bn, BNORM_TENSOR_RUNNING_MEAN, rm2);
        bn_get(dist.bn, BNORM_TENSOR_RUNNING_VAR, rv1);
        bn_get(single.bn, BNORM_TENSOR_RUNNING_VAR, rv2);
        for (int j = 0; j < HIDDEN; j++) {
            worst_stats = fmax(worst_stats, fabs(rm1[j] - rm2[j]) / fmax(fabs(rm2[j]), 1e-3));
            worst_stats = fmax(worst_stats, fabs(rv1[j] - rv2[j]) / fabs(rv2[j]));
        }
    }
    double mine[2] = {worst, worst_stats}, all[2];
    MPI_Allreduce(mine, all, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    int any_err = 0;
    MPI_Allreduce(&err, &any_err, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    const int ok = !any_err && all[0] <= tol && all[1] <= tol;
    if (rank == 0)
        printf("max relative difference over %d steps: loss %.3g, running statistics %.3g (tolerance %.1g): %s\n",
               steps, all[0], all[1], tol, ok ? "OK" : "FAILED");

    bnorm_layer_destroy(dist.bn);
    bnorm_layer_destroy(single.bn);
    bnorm_mpi_comm_destroy(sync);
    free(x);
    free(t);
    MPI_Finalize();
    return ok ? 0 : 1;
}
