/*
 * nccl_comm.c - the bnorm_comm over NCCL (bnorm_nccl.h): host doubles staged through device buffers
 * owned by this object, ncclAllGather on the caller's stream, a wait for the stream.
 */
#include "bnorm/bnorm_nccl.h"

#include <cuda_runtime_api.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct bn_nccl {
    bnorm_comm pub; /* handed to the user; pub.ctx points back here */
    ncclComm_t comm;
    cudaStream_t stream;
    int device;
    double *dsend, *drecv; /* device staging buffers */
    size_t scap, rcap;     /* capacities in doubles */
} bn_nccl;

static _Thread_local char bn_nccl_message[1024];

const char *bnorm_nccl_last_error(void) { return bn_nccl_message; }

static bnorm_status bn_nccl_fail(bnorm_status st, const char *fmt, ...) {
    int k = snprintf(bn_nccl_message, sizeof bn_nccl_message, "bnorm_nccl_comm_create: ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(bn_nccl_message + k, sizeof bn_nccl_message - (size_t)k, fmt, ap);
    va_end(ap);
    return st;
}

static int bn_nccl_grow(double **p, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    void *q = NULL;
    if (cudaMalloc(&q, need * sizeof(double)) != cudaSuccess) return -1;
    if (*p) cudaFree(*p);
    *p = (double *)q;
    *cap = need;
    return 0;
}

#define BN_NCCL_CU(call)                                                                        \
    do {                                                                                        \
        cudaError_t e_ = (call);                                                                \
        if (e_ != cudaSuccess) {                                                                \
            snprintf(msg, cap, "%s failed: %s", #call, cudaGetErrorString(e_));                 \
            rc = 1;                                                                             \
            goto out;                                                                           \
        }                                                                                       \
    } while (0)

static int bn_nccl_allgather(void *ctx, const double *send, int64_t count, double *recv, char *msg, size_t cap) {
    bn_nccl *m = (bn_nccl *)ctx;
    const size_t n = (size_t)count, total = n * (size_t)m->pub.size;
    int rc = 0, prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
    BN_NCCL_CU(cudaSetDevice(m->device));
    if (bn_nccl_grow(&m->dsend, &m->scap, n) || bn_nccl_grow(&m->drecv, &m->rcap, total)) {
        snprintf(msg, cap, "cannot allocate %zu doubles of device staging memory", n + total);
        rc = 1;
        goto out;
    }
    BN_NCCL_CU(cudaMemcpyAsync(m->dsend, send, n * sizeof(double), cudaMemcpyHostToDevice, m->stream));
    ncclResult_t r = ncclAllGather(m->dsend, m->drecv, n, ncclDouble, m->comm, m->stream);
    if (r != ncclSuccess) {
        snprintf(msg, cap, "ncclAllGather failed: %s (%s)", ncclGetErrorString(r), ncclGetLastError(m->comm));
        rc = 1;
        goto out;
    }
    BN_NCCL_CU(cudaMemcpyAsync(recv, m->drecv, total * sizeof(double), cudaMemcpyDeviceToHost, m->stream));
    BN_NCCL_CU(cudaStreamSynchronize(m->stream));
    ncclResult_t ar = ncclSuccess;
    if (ncclCommGetAsyncError(m->comm, &ar) == ncclSuccess && ar != ncclSuccess) {
        snprintf(msg, cap, "NCCL reported an asynchronous error: %s", ncclGetErrorString(ar));
        rc = 1;
    }
out:
    if (prev >= 0) cudaSetDevice(prev);
    return rc;
}

bnorm_status bnorm_nccl_comm_create(ncclComm_t comm, cudaStream_t stream, int validate, bnorm_comm **out) {
    bn_nccl_message[0] = '\0';
    if (!out) return bn_nccl_fail(BNORM_STATUS_NULL_POINTER, "out is NULL");
    *out = NULL;
    if (!comm) return bn_nccl_fail(BNORM_STATUS_NULL_POINTER, "comm is NULL");
    int rank = 0, size = 0, dev = 0;
    ncclResult_t r = ncclCommUserRank(comm, &rank);
    if (r == ncclSuccess) r = ncclCommCount(comm, &size);
    if (r == ncclSuccess) r = ncclCommCuDevice(comm, &dev);
    if (r != ncclSuccess) return bn_nccl_fail(BNORM_STATUS_COMM, "NCCL query failed: %s", ncclGetErrorString(r));
    bn_nccl *m = (bn_nccl *)calloc(1, sizeof *m);
    if (!m) return bn_nccl_fail(BNORM_STATUS_OUT_OF_MEMORY, "cannot allocate the communicator");
    m->comm = comm;
    m->stream = stream;
    m->device = dev;
    m->pub.rank = rank;
    m->pub.size = size;
    m->pub.validate = validate != 0;
    m->pub.allgather = bn_nccl_allgather;
    m->pub.ctx = m;
    *out = &m->pub;
    return BNORM_STATUS_OK;
}

void bnorm_nccl_comm_destroy(bnorm_comm *comm) {
    if (!comm || comm->allgather != bn_nccl_allgather) return;
    bn_nccl *m = (bn_nccl *)comm->ctx;
    if (m->dsend) cudaFree(m->dsend);
    if (m->drecv) cudaFree(m->drecv);
    free(m);
}
