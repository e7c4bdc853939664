/*
 * cuda_emu.h - a CPU stand-in for the parts of the CUDA runtime and language that bnorm's CUDA backend
 * and its tests use, so that the SAME kernel and host sources (src/cuda/, tests/test_cuda*.c) run on
 * a machine without a GPU (-DBNORM_CUDA_EMULATE=ON). The fake <cuda_runtime.h> & co. in include/
 * lead here. It is not CUDA: blocks run one after another, the threads of a block are fibers
 * (ucontext) switched at __syncthreads, memory is host memory, streams are synchronous. It checks
 * the kernels' indexing, reductions, masks and host logic; it cannot show races, coalescing or
 * speed. Not a public header.
 */
#ifndef BN_CUDA_EMU_H
#define BN_CUDA_EMU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorNoDevice = 100
} cudaError_t;
typedef struct bn_emu_stream *cudaStream_t;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
enum cudaMemoryType {
    cudaMemoryTypeUnregistered = 0,
    cudaMemoryTypeHost = 1,
    cudaMemoryTypeDevice = 2,
    cudaMemoryTypeManaged = 3
};
struct cudaPointerAttributes {
    enum cudaMemoryType type;
    int device;
    void *devicePointer;
    void *hostPointer;
};
typedef struct cudaPointerAttributes cudaPointerAttributes;
struct cudaDeviceProp {
    char name[256];
    int major, minor, multiProcessorCount;
};
typedef struct cudaDeviceProp cudaDeviceProp;

/* "Device" memory: host allocations the emulator tracks, so cudaPointerGetAttributes tells them from
 * host memory (the backend refuses host pointers, and the tests check that). */
cudaError_t cudaMalloc(void **p, size_t bytes);
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocAsync(void **p, size_t bytes, cudaStream_t s);
cudaError_t cudaFreeAsync(void *p, cudaStream_t s);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind, cudaStream_t s);
cudaError_t cudaMemset(void *p, int v, size_t bytes);
cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t s);
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int dev);
cudaError_t cudaGetDevice(int *dev);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *a, const void *p);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaDeviceSynchronize(void);
const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);

#ifdef __cplusplus
}

#include <math.h>
#include <string.h>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 {
    unsigned x, y, z, w;
};
struct bn_emu_idx {
    unsigned x, y, z;
};
extern thread_local bn_emu_idx bn_emu_thread, bn_emu_block;
extern thread_local dim3 bn_emu_bdim, bn_emu_gdim;
#define threadIdx bn_emu_thread
#define blockIdx bn_emu_block
#define blockDim bn_emu_bdim
#define gridDim bn_emu_gdim
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
void bn_emu_syncthreads(void);
#define __syncthreads() bn_emu_syncthreads()
static inline long long min(long long a, long long b) { return a < b ? a : b; }

/* Runs fn(ctx) as every thread of every block of the grid. */
void bn_emu_run(dim3 grid, dim3 block, void (*fn)(void *), void *ctx);
template <typename F> static void bn_emu_launch(dim3 grid, dim3 block, F f) {
    bn_emu_run(grid, block, [](void *c) { (*(F *)c)(); }, &f);
}
#define BN_LAUNCH(kernel, grid, block, stream, ...) \
    bn_emu_launch(dim3(grid), dim3(block), [&] { BN_UNPAREN kernel(__VA_ARGS__); })

/* float16 / bfloat16 storage with the core's exact conversions (round to nearest even) */
extern "C" {
float bn_f16_to_f32(uint16_t h);
uint16_t bn_f32_to_f16(float f);
float bn_bf16_to_f32(uint16_t h);
uint16_t bn_f32_to_bf16(float f);
}
struct __half {
    uint16_t x;
};
struct __nv_bfloat16 {
    uint16_t x;
};
static inline float __half2float(__half h) { return bn_f16_to_f32(h.x); }
static inline __half __float2half_rn(float f) { return __half{bn_f32_to_f16(f)}; }
static inline float __bfloat162float(__nv_bfloat16 h) { return bn_bf16_to_f32(h.x); }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{bn_f32_to_bf16(f)}; }
#endif

#endif
