/*
 * test_cuda_nccl.c - the NCCL communicator (bnorm_nccl.h) with one rank, the only group one GPU allows
 * (NCCL refuses two ranks on one device): CUDA forward and backward through it must equal the calls
 * without a communicator bit for bit (one rank's statistics pass the merge unchanged), and the CPU
 * backend accepts it too (host doubles). Exits 77 (skipped) without a GPU.
 */
#include "bnorm/bnorm_nccl.h"
#include "cuda_harness.h"

static int same_bytes(const void *d1, const void *d2, size_t bytes) {
    unsigned char *a = malloc(bytes), *b = malloc(bytes);
    TH_CU(cudaMemcpy(a, d1, bytes, cudaMemcpyDeviceToHost));
    TH_CU(cudaMemcpy(b, d2, bytes, cudaMemcpyDeviceToHost));
    int same = memcmp(a, b, bytes) == 0;
    free(a);
    free(b);
    return same;
}

int main(void) {
    if (!th_cuda_usable("test_cuda_nccl")) return TH_SKIP;
    th_seed(22);
    ncclComm_t nc;
    int devs[1] = {0};
    ncclResult_t r = ncclCommInitAll(&nc, 1, devs);
    if (r != ncclSuccess) {
        printf("FAIL: ncclCommInitAll with one rank: %s\n", ncclGetErrorString(r));
        return 1;
    }
    cudaStream_t s;
    TH_CU(cudaStreamCreate(&s));
    bnorm_comm *comm = NULL;
    CHECK_STATUS(bnorm_nccl_comm_create(nc, s, 1, &comm), BNORM_STATUS_OK);
    CHECK(comm && comm->rank == 0 && comm->size == 1, "rank/size of a one-rank communicator");
    CHECK_STATUS(bnorm_nccl_comm_create(NULL, s, 1, &comm), BNORM_STATUS_NULL_POINTER);
    CHECK(comm == NULL, "out cleared on failure");
    CHECK_STATUS(bnorm_nccl_comm_create(nc, s, 1, &comm), BNORM_STATUS_OK);

    const int64_t N = 6, C = 24, S = 49, numel = N * C * S;
    bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_LAST, .rank = 3, .dims = {N, C, S}};
    double *v = malloc(sizeof(double) * (size_t)numel);
    th_buf X = th_alloc(BNORM_DTYPE_F32, numel, 0), DY = th_alloc(BNORM_DTYPE_F32, numel, 0);
    for (int64_t i = 0; i < numel; i++) v[i] = 1 + 2 * th_normal();
    th_store(&X, v);
    for (int64_t i = 0; i < numel; i++) v[i] = th_normal();
    th_store(&DY, v);
    th_dbuf dX = th_dcopy(&X), dDY = th_dcopy(&DY), dY[2], dDX[2], dSM[2], dSI[2], dRM[2], dRV[2], dDW[2];
    th_buf Pc = th_alloc(BNORM_DTYPE_F32, C, 0);
    for (int k = 0; k < 2; k++) {
        dY[k] = th_dalloc(&X);
        dDX[k] = th_dalloc(&X);
        dSM[k] = th_dalloc(&Pc);
        dSI[k] = th_dalloc(&Pc);
        dRM[k] = th_dalloc(&Pc);
        dRV[k] = th_dalloc(&Pc);
        dDW[k] = th_dalloc(&Pc);
        TH_CU(cudaMemset(dRM[k].p, 0, (size_t)C * 4));
        TH_CU(cudaMemset(dRV[k].p, 0, (size_t)C * 4));
        bnorm_forward_args fa = {.desc = d, .x = dX.p, .y = dY[k].p, .eps = 1e-5, .training = 1,
                                 .running_mean = dRM[k].p, .running_var = dRV[k].p, .momentum = 0.1,
                                 .save_mean = dSM[k].p, .save_invstd = dSI[k].p, .comm = k ? comm : NULL};
        CHECK_STATUS(bnorm_cuda_forward(&fa, s), BNORM_STATUS_OK);
        bnorm_backward_args ba = {.desc = d, .x = dX.p, .dy = dDY.p, .dx = dDX[k].p, .mean = dSM[k].p,
                                  .invstd = dSI[k].p, .dweight = dDW[k].p, .comm = k ? comm : NULL};
        CHECK_STATUS(bnorm_cuda_backward(&ba, s), BNORM_STATUS_OK);
    }
    TH_CU(cudaStreamSynchronize(s));
    const size_t tb = (size_t)numel * 4, cb = (size_t)C * 4;
    CHECK(same_bytes(dY[0].p, dY[1].p, tb), "y with the one-rank NCCL communicator differs from y without");
    CHECK(same_bytes(dDX[0].p, dDX[1].p, tb), "dx with the one-rank NCCL communicator differs");
    CHECK(same_bytes(dSM[0].p, dSM[1].p, cb) && same_bytes(dSI[0].p, dSI[1].p, cb), "saved statistics differ");
    CHECK(same_bytes(dRM[0].p, dRM[1].p, cb) && same_bytes(dRV[0].p, dRV[1].p, cb), "running statistics differ");
    CHECK(same_bytes(dDW[0].p, dDW[1].p, cb), "dweight differs");

    /* the CPU backend through the same communicator (its exchange is host doubles too) */
    th_buf Y1 = th_alloc(BNORM_DTYPE_F32, numel, 0), Y2 = th_alloc(BNORM_DTYPE_F32, numel, 0);
    bnorm_forward_args ca = {.desc = d, .x = X.p, .y = Y1.p, .eps = 1e-5, .training = 1};
    CHECK_STATUS(bnorm_forward(&ca), BNORM_STATUS_OK);
    ca.y = Y2.p;
    ca.comm = comm;
    CHECK_STATUS(bnorm_forward(&ca), BNORM_STATUS_OK);
    CHECK(memcmp(Y1.p, Y2.p, tb) == 0, "CPU forward through the NCCL communicator differs");

    bnorm_nccl_comm_destroy(comm);
    bnorm_nccl_comm_destroy(NULL);
    for (int k = 0; k < 2; k++) {
        th_dfree(&dY[k]); th_dfree(&dDX[k]); th_dfree(&dSM[k]); th_dfree(&dSI[k]); th_dfree(&dRM[k]);
        th_dfree(&dRV[k]); th_dfree(&dDW[k]);
    }
    th_dfree(&dX); th_dfree(&dDY);
    th_free(&X); th_free(&DY); th_free(&Pc); th_free(&Y1); th_free(&Y2);
    free(v);
    cudaStreamDestroy(s);
    ncclCommDestroy(nc);
    return th_finish("test_cuda_nccl");
}
