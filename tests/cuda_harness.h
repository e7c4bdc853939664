/*
 * cuda_harness.h - what the CUDA tests share (only built with -DBNORM_CUDA=ON): the skip rule (exit
 * code 77, ctest's SKIP_RETURN_CODE, with a message saying why) and device copies of th_buf buffers.
 */
#ifndef BNORM_TEST_CUDA_HARNESS_H
#define BNORM_TEST_CUDA_HARNESS_H

#include "bnorm/bnorm_cuda.h"
#include "harness.h"

#include <cuda_runtime_api.h>

enum { TH_SKIP = 77 };

/* 1 if a CUDA device can run kernels; 0 (after printing "SKIP: ...") otherwise. */
static inline int th_cuda_usable(const char *name) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        printf("SKIP: %s needs a CUDA GPU: %s\n", name,
               e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount reports 0 devices");
        return 0;
    }
    struct cudaDeviceProp pr;
    if (cudaGetDeviceProperties(&pr, 0) == cudaSuccess)
        printf("device 0: %s, compute capability %d.%d, %d SMs\n", pr.name, pr.major, pr.minor, pr.multiProcessorCount);
    return 1;
}

/* Aborts the test program on a failing CUDA call of the test itself (not of the library). */
#define TH_CU(call)                                                                                    \
    do {                                                                                               \
        cudaError_t th_e_ = (call);                                                                    \
        if (th_e_ != cudaSuccess) {                                                                    \
            fprintf(stderr, "FATAL %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(th_e_)); \
            exit(2);                                                                                   \
        }                                                                                              \
    } while (0)

/* A device copy of a host th_buf: same bytes, at the same misalignment from a 256-byte boundary. */
typedef struct th_dbuf {
    void *base;
    void *p;
    size_t bytes;
    int misalign;
} th_dbuf;

static inline th_dbuf th_dalloc(const th_buf *h) {
    th_dbuf d = {0};
    d.bytes = (size_t)h->n * bnorm_dtype_size(h->dtype);
    d.misalign = (int)((uintptr_t)h->p % 64);
    TH_CU(cudaMalloc(&d.base, d.bytes + 256));
    d.p = (char *)d.base + d.misalign;
    /* poison as the host buffer: unwritten outputs show */
    TH_CU(cudaMemset(d.base, 0xA5, d.bytes + 256));
    return d;
}
static inline void th_dput(th_dbuf *d, const th_buf *h) { TH_CU(cudaMemcpy(d->p, h->p, d->bytes, cudaMemcpyHostToDevice)); }
static inline void th_dget(const th_dbuf *d, th_buf *h) { TH_CU(cudaMemcpy(h->p, d->p, d->bytes, cudaMemcpyDeviceToHost)); }
static inline th_dbuf th_dcopy(const th_buf *h) {
    th_dbuf d = th_dalloc(h);
    th_dput(&d, h);
    return d;
}
static inline void th_dfree(th_dbuf *d) {
    if (d->base) cudaFree(d->base);
    d->base = d->p = NULL;
}

#endif
