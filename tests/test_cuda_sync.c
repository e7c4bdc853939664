/*
 * test_cuda_sync.c - synchronized batch norm on the CUDA backend, k-way equivalence in one process:
 * k threads (one stream each, one GPU) are the k ranks of a bnorm_comm whose all-gather copies
 * between them, each runs bnorm_cuda_forward/backward on its slice of the batch (uneven, some
 * empty), and the results must equal one call over the whole batch: y and dx slice by slice, the
 * saved and running statistics and the (reduced) parameter gradients on every rank. Also: a global
 * count of one value per channel is BATCH_TOO_SMALL on every rank, and a rank with another C gets
 * COMM_MISMATCH. Exits 77 (skipped) without a GPU.
 */
#define _POSIX_C_SOURCE 200809L
#include "cuda_harness.h"

#include <pthread.h>

enum { MAXK = 8 };

typedef struct group {
    int k;
    pthread_barrier_t bar;
    const double *send[MAXK];
    int64_t count[MAXK];
} group;

typedef struct member {
    group *g;
    int rank;
} member;

/* The all-gather: every rank publishes its send buffer, all copy all, nobody leaves early. */
static int group_allgather(void *ctx, const double *send, int64_t count, double *recv, char *msg, size_t cap) {
    member *me = (member *)ctx;
    group *g = me->g;
    g->send[me->rank] = send;
    g->count[me->rank] = count;
    pthread_barrier_wait(&g->bar);
    int rc = 0;
    for (int r = 0; r < g->k; r++) {
        if (g->count[r] != count) {
            snprintf(msg, cap, "rank %d sent %lld doubles, rank %d %lld", me->rank, (long long)count, r,
                     (long long)g->count[r]);
            rc = 1;
            continue;
        }
        memcpy(recv + (size_t)r * (size_t)count, g->send[r], sizeof(double) * (size_t)count);
    }
    pthread_barrier_wait(&g->bar);
    return rc;
}

typedef struct job {
    member me;
    bnorm_comm comm;
    bnorm_forward_args fa;
    bnorm_backward_args ba;
    bnorm_status fst, bst;
    char ferr[512], berr[512];
} job;

static void *rank_main(void *p) {
    job *j = (job *)p;
    TH_CU(cudaSetDevice(0));
    cudaStream_t s;
    TH_CU(cudaStreamCreate(&s));
    j->fst = bnorm_cuda_forward(&j->fa, s);
    snprintf(j->ferr, sizeof j->ferr, "%s", bnorm_last_error());
    if (j->fst == BNORM_STATUS_OK && j->ba.mean) {
        j->bst = bnorm_cuda_backward(&j->ba, s);
        snprintf(j->berr, sizeof j->berr, "%s", bnorm_last_error());
    }
    TH_CU(cudaStreamSynchronize(s));
    TH_CU(cudaStreamDestroy(s));
    return NULL;
}

static double tol_of(bnorm_dtype dt) {
    switch (dt) {
    case BNORM_DTYPE_F64: return 1e-10;
    case BNORM_DTYPE_F32: return 2e-5;
    case BNORM_DTYPE_F16: return 4e-3;
    case BNORM_DTYPE_BF16: return 2e-2;
    }
    return 0;
}

/* Device buffer of n elements of dt holding v (or poison when v is NULL), and its host image. */
static void *dev_of(bnorm_dtype dt, int64_t n, const double *v) {
    th_buf h = th_alloc(dt, n > 0 ? n : 1, 0);
    if (v) th_store(&h, v);
    void *d = NULL;
    size_t bytes = (size_t)(n > 0 ? n : 1) * bnorm_dtype_size(dt);
    TH_CU(cudaMalloc(&d, bytes));
    TH_CU(cudaMemcpy(d, h.p, bytes, cudaMemcpyHostToDevice));
    th_free(&h);
    return d;
}
static void host_of(bnorm_dtype dt, int64_t n, const void *d, double *v) {
    th_buf h = th_alloc(dt, n, 0);
    TH_CU(cudaMemcpy(h.p, d, (size_t)n * bnorm_dtype_size(dt), cudaMemcpyDeviceToHost));
    th_load(&h, v);
    th_free(&h);
}

/* One group run: k ranks with batch slices nk[r] of a (sum nk, C, S) tensor; compared with the
 * whole-batch call. */
static void run_group(bnorm_dtype dt, int layout, int64_t C, int64_t S, int k, const int64_t *nk, int relu) {
    char name[200];
    int64_t N = 0;
    for (int r = 0; r < k; r++) N += nk[r];
    snprintf(name, sizeof name, "%s %s C=%lld S=%lld k=%d N=%lld relu=%d", bnorm_dtype_name(dt), layout ? "CL" : "CF",
             (long long)C, (long long)S, k, (long long)N, relu);
    const bnorm_dtype pd = bnorm_param_dtype(dt);
    const int64_t numel = N * C * S, per = C * S;
    const double tol = tol_of(dt);
    bnorm_desc d = {.dtype = dt, .layout = (bnorm_layout)layout, .rank = 3, .dims = {N, C, S}};
    double *x = malloc(sizeof(double) * (size_t)(numel + 1)), *dy = malloc(sizeof(double) * (size_t)(numel + 1));
    double *add = malloc(sizeof(double) * (size_t)(numel + 1)), *a1 = malloc(sizeof(double) * (size_t)(numel + 1));
    double *a2 = malloc(sizeof(double) * (size_t)(numel + 1)), *p1 = malloc(sizeof(double) * (size_t)C);
    double *p2 = malloc(sizeof(double) * (size_t)C), *w = malloc(sizeof(double) * (size_t)C);
    double *rm = malloc(sizeof(double) * (size_t)C), *rv = malloc(sizeof(double) * (size_t)C);
    for (int64_t i = 0; i < numel; i++) {
        x[i] = 2 + 3 * th_normal();
        dy[i] = th_normal();
        add[i] = th_normal();
    }
    for (int64_t c = 0; c < C; c++) {
        w[c] = 0.5 + th_uniform();
        rm[c] = th_normal();
        rv[c] = 1 + th_uniform();
    }
    th_round(dt, x, numel);
    th_round(dt, dy, numel);
    th_round(dt, add, numel);
    th_round(pd, w, C);
    th_round(pd, rm, C);
    th_round(pd, rv, C);
    void *dX = dev_of(dt, numel, x), *dDY = dev_of(dt, numel, dy), *dA = dev_of(dt, numel, add);
    void *dW = dev_of(pd, C, w), *dY1 = dev_of(dt, numel, NULL), *dY2 = dev_of(dt, numel, NULL);
    void *dDX1 = dev_of(dt, numel, NULL), *dDX2 = dev_of(dt, numel, NULL);
    const size_t mask_rank = bnorm_relu_mask_size(&(bnorm_desc){.dtype = dt, .layout = (bnorm_layout)layout, .rank = 3,
                                                                .dims = {1, C, S}});
    void *dM1 = NULL, *dM2 = NULL;
    TH_CU(cudaMalloc(&dM1, mask_rank * (size_t)(N + 1)));
    TH_CU(cudaMalloc(&dM2, mask_rank * (size_t)(N + 1)));
    /* whole batch */
    void *rm1 = dev_of(pd, C, rm), *rv1 = dev_of(pd, C, rv), *sm1 = dev_of(pd, C, NULL), *si1 = dev_of(pd, C, NULL);
    void *dw1 = dev_of(pd, C, NULL), *db1 = dev_of(pd, C, NULL);
    bnorm_forward_args fa = {.desc = d, .x = dX, .y = dY1, .weight = dW, .eps = 1e-5, .training = 1, .running_mean = rm1,
                             .running_var = rv1, .momentum = 0.1, .save_mean = sm1, .save_invstd = si1,
                             .addend = relu ? dA : NULL, .relu = relu, .relu_mask = relu ? dM1 : NULL};
    CHECK_STATUS(bnorm_cuda_forward(&fa, NULL), BNORM_STATUS_OK);
    bnorm_backward_args ba = {.desc = d, .x = dX, .dy = dDY, .dx = dDX1, .weight = dW, .mean = sm1, .invstd = si1,
                              .relu_mask = relu ? dM1 : NULL, .dweight = dw1, .dbias = db1};
    CHECK_STATUS(bnorm_cuda_backward(&ba, NULL), BNORM_STATUS_OK);
    TH_CU(cudaDeviceSynchronize());

    /* k ranks */
    group g = {.k = k};
    pthread_barrier_init(&g.bar, NULL, (unsigned)k);
    job jobs[MAXK];
    pthread_t th[MAXK];
    void *rmk[MAXK], *rvk[MAXK], *smk[MAXK], *sik[MAXK], *dwk[MAXK], *dbk[MAXK];
    int64_t n0 = 0;
    for (int r = 0; r < k; r++) {
        job *j = &jobs[r];
        memset(j, 0, sizeof *j);
        j->me = (member){&g, r};
        j->comm = (bnorm_comm){.rank = r, .size = k, .validate = 1, .allgather = group_allgather, .ctx = &j->me};
        rmk[r] = dev_of(pd, C, rm);
        rvk[r] = dev_of(pd, C, rv);
        smk[r] = dev_of(pd, C, NULL);
        sik[r] = dev_of(pd, C, NULL);
        dwk[r] = dev_of(pd, C, NULL);
        dbk[r] = dev_of(pd, C, NULL);
        bnorm_desc dr = d;
        dr.dims[0] = nk[r];
        const size_t off = (size_t)(n0 * per) * bnorm_dtype_size(dt);
        j->fa = fa;
        j->fa.desc = dr;
        j->fa.x = nk[r] ? (char *)dX + off : NULL;
        j->fa.y = nk[r] ? (char *)dY2 + off : NULL;
        j->fa.addend = relu && nk[r] ? (char *)dA + off : NULL;
        j->fa.relu_mask = relu && nk[r] ? (char *)dM2 + (size_t)n0 * mask_rank : NULL;
        j->fa.running_mean = rmk[r];
        j->fa.running_var = rvk[r];
        j->fa.save_mean = smk[r];
        j->fa.save_invstd = sik[r];
        j->fa.comm = &j->comm;
        j->ba = ba;
        j->ba.desc = dr;
        j->ba.x = j->fa.x;
        j->ba.dy = nk[r] ? (char *)dDY + off : NULL;
        j->ba.dx = nk[r] ? (char *)dDX2 + off : NULL;
        j->ba.relu_mask = j->fa.relu_mask;
        j->ba.mean = smk[r];
        j->ba.invstd = sik[r];
        j->ba.dweight = dwk[r];
        j->ba.dbias = dbk[r];
        j->ba.comm = &j->comm;
        j->ba.reduce_param_grads = 1;
        n0 += nk[r];
    }
    for (int r = 0; r < k; r++) pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    for (int r = 0; r < k; r++) pthread_join(th[r], NULL);
    pthread_barrier_destroy(&g.bar);
    for (int r = 0; r < k; r++) {
        CHECK(jobs[r].fst == BNORM_STATUS_OK, "%s: rank %d forward: %s", name, r, jobs[r].ferr);
        CHECK(jobs[r].bst == BNORM_STATUS_OK, "%s: rank %d backward: %s", name, r, jobs[r].berr);
    }
    host_of(dt, numel, dY1, a1);
    host_of(dt, numel, dY2, a2);
    CHECK(th_close_scaled(a2, a1, numel, tol, 1.0), "%s: k-way y differs from the whole batch", name);
    host_of(dt, numel, dDX1, a1);
    host_of(dt, numel, dDX2, a2);
    CHECK(th_close_scaled(a2, a1, numel, tol * 5, th_maxabs(a1, numel)), "%s: k-way dx differs from the whole batch", name);
    if (relu) {
        unsigned char *m1 = malloc(mask_rank * (size_t)N + 1), *m2 = malloc(mask_rank * (size_t)N + 1);
        TH_CU(cudaMemcpy(m1, dM1, mask_rank * (size_t)N, cudaMemcpyDeviceToHost));
        TH_CU(cudaMemcpy(m2, dM2, mask_rank * (size_t)N, cudaMemcpyDeviceToHost));
        size_t diff = 0;
        for (size_t i = 0; i < mask_rank * (size_t)N; i++) diff += m1[i] != m2[i];
        /* values at the ReLU's edge may round differently: allow a handful of bytes */
        CHECK(diff <= (size_t)(numel / 5000 + 2), "%s: k-way masks differ in %zu bytes", name, diff);
        free(m1);
        free(m2);
    }
    struct {
        const char *what;
        void *whole;
        void **ranks;
        double t;
    } per_ch[] = {{"save_mean", sm1, smk, tol}, {"save_invstd", si1, sik, tol * 10}, {"running_mean", rm1, rmk, tol},
                  {"running_var", rv1, rvk, tol * 10}, {"dweight (reduced)", dw1, dwk, tol * 5},
                  {"dbias (reduced)", db1, dbk, tol * 5}};
    for (size_t i = 0; i < sizeof per_ch / sizeof per_ch[0]; i++) {
        host_of(pd, C, per_ch[i].whole, p1);
        for (int r = 0; r < k; r++) {
            host_of(pd, C, per_ch[i].ranks[r], p2);
            CHECK(th_close_scaled(p2, p1, C, per_ch[i].t, 1.0), "%s: rank %d %s differs from the whole batch", name, r,
                  per_ch[i].what);
        }
    }
    for (int r = 0; r < k; r++) {
        cudaFree(rmk[r]); cudaFree(rvk[r]); cudaFree(smk[r]); cudaFree(sik[r]); cudaFree(dwk[r]); cudaFree(dbk[r]);
    }
    cudaFree(dX); cudaFree(dDY); cudaFree(dA); cudaFree(dW); cudaFree(dY1); cudaFree(dY2); cudaFree(dDX1); cudaFree(dDX2);
    cudaFree(dM1); cudaFree(dM2); cudaFree(rm1); cudaFree(rv1); cudaFree(sm1); cudaFree(si1); cudaFree(dw1); cudaFree(db1);
    free(x); free(dy); free(add); free(a1); free(a2); free(p1); free(p2); free(w); free(rm); free(rv);
}

/* Every rank gets the group's verdict: one value per channel over the group, or a rank with another C. */
static void run_refusals(void) {
    const int k = 2;
    group g = {.k = k};
    pthread_barrier_init(&g.bar, NULL, (unsigned)k);
    job jobs[2];
    pthread_t th[2];
    void *bufs[8];
    for (int r = 0; r < k; r++) {
        job *j = &jobs[r];
        memset(j, 0, sizeof *j);
        j->me = (member){&g, r};
        j->comm = (bnorm_comm){.rank = r, .size = k, .validate = 1, .allgather = group_allgather, .ctx = &j->me};
        bufs[2 * r] = dev_of(BNORM_DTYPE_F32, 3, NULL);
        bufs[2 * r + 1] = dev_of(BNORM_DTYPE_F32, 3, NULL);
        /* rank 0: one row of 3 channels; rank 1: empty */
        j->fa = (bnorm_forward_args){.desc = {.dtype = BNORM_DTYPE_F32, .rank = 2, .dims = {r == 0 ? 1 : 0, 3}},
                                     .x = r == 0 ? bufs[2 * r] : NULL, .y = r == 0 ? bufs[2 * r + 1] : NULL,
                                     .training = 1, .comm = &j->comm};
    }
    for (int r = 0; r < k; r++) pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    for (int r = 0; r < k; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < k; r++)
        CHECK(jobs[r].fst == BNORM_STATUS_BATCH_TOO_SMALL, "rank %d: one value per channel over the group: %s (%s)", r,
              bnorm_status_string(jobs[r].fst), jobs[r].ferr);
    jobs[1].fa.desc.dims[1] = 4; /* another C on rank 1 (buffers unused: N = 0) */
    for (int r = 0; r < k; r++) pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    for (int r = 0; r < k; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < k; r++)
        CHECK(jobs[r].fst == BNORM_STATUS_COMM_MISMATCH, "rank %d: C 3 vs 4: %s (%s)", r,
              bnorm_status_string(jobs[r].fst), jobs[r].ferr);
    pthread_barrier_destroy(&g.bar);
    for (int i = 0; i < 4; i++) cudaFree(bufs[i]);
}

int main(void) {
    if (!th_cuda_usable("test_cuda_sync")) return TH_SKIP;
    th_seed(21);
    const int64_t s3[] = {3, 0, 4}, s2[] = {1, 5}, s4[] = {10, 0, 7, 1}, s1[] = {6};
    run_group(BNORM_DTYPE_F32, 0, 16, 49, 3, s3, 1);
    run_group(BNORM_DTYPE_BF16, 1, 33, 9, 2, s2, 1);
    run_group(BNORM_DTYPE_F64, 0, 17, 1, 4, s4, 0);
    run_group(BNORM_DTYPE_F16, 1, 64, 25, 3, s3, 0);
    run_group(BNORM_DTYPE_F32, 1, 8, 100, 1, s1, 1);
    run_refusals();
    return th_finish("test_cuda_sync");
}
