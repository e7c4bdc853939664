/*
 * emu.cpp - the CPU emulation of the CUDA runtime and of kernel launches (see cuda_emu.h).
 * A launch runs the blocks one after another; the threads of a block are fibers (ucontext) that run
 * in rounds: each round resumes every live thread until its next __syncthreads or its end, so a
 * barrier is passed only when every thread of the block has reached it (the kernels' barriers are
 * block-uniform, as CUDA requires). Per OS thread state is thread_local (test_cuda_sync runs ranks
 * on threads).
 */
#include "cuda_emu.h"

#include <mutex>
#include <map>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

thread_local bn_emu_idx bn_emu_thread, bn_emu_block;
thread_local dim3 bn_emu_bdim, bn_emu_gdim;

namespace {

enum { STACK = 64 * 1024 };

struct fiber {
    ucontext_t ctx;
    int done;
    unsigned x, y, z;
};

thread_local ucontext_t sched;
thread_local fiber *cur;
thread_local fiber *fibers;
thread_local char *stacks;
thread_local unsigned cap;
thread_local void (*run_fn)(void *);
thread_local void *run_ctx;

void trampoline() {
    run_fn(run_ctx);
    cur->done = 1; /* returns to uc_link: the scheduler */
}

/* allocations handed out as device memory: start -> size */
std::mutex mem_lock;
std::map<uintptr_t, size_t> mem;

cudaError_t track(void **p, size_t bytes) {
    *p = malloc(bytes ? bytes : 1);
    if (!*p) return cudaErrorMemoryAllocation;
    std::lock_guard<std::mutex> g(mem_lock);
    mem[(uintptr_t)*p] = bytes ? bytes : 1;
    return cudaSuccess;
}

}  // namespace

/* Launch sites (the function a launch runs) whose kernel has never reached a barrier run their
 * threads as plain calls, without fibers: the element-wise and finalize kernels, most of the work. */
thread_local std::map<void (*)(void *), bool> *barrier_free;
thread_local bool direct, saw_barrier;

void bn_emu_syncthreads(void) {
    if (direct) abort(); /* a kernel that skipped barriers before reached one now: not expected here */
    saw_barrier = true;
    swapcontext(&cur->ctx, &sched);
}

void bn_emu_run(dim3 grid, dim3 block, void (*fn)(void *), void *ctx) {
    const unsigned n = block.x * block.y * block.z;
    if (n > cap) {
        free(fibers);
        free(stacks);
        fibers = (fiber *)calloc(n, sizeof(fiber));
        stacks = (char *)malloc((size_t)n * STACK);
        if (!fibers || !stacks) abort();
        cap = n;
    }
    run_fn = fn;
    run_ctx = ctx;
    bn_emu_bdim = block;
    bn_emu_gdim = grid;
    if (!barrier_free) barrier_free = new std::map<void (*)(void *), bool>();
    auto known = barrier_free->find(fn);
    if (known != barrier_free->end() && known->second) {
        direct = true;
        for (unsigned bz = 0; bz < grid.z; bz++)
            for (unsigned by = 0; by < grid.y; by++)
                for (unsigned bx = 0; bx < grid.x; bx++) {
                    bn_emu_block = {bx, by, bz};
                    for (unsigned t = 0; t < n; t++) {
                        bn_emu_thread = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        fn(ctx);
                    }
                }
        direct = false;
        return;
    }
    saw_barrier = false;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                bn_emu_block = {bx, by, bz};
                for (unsigned t = 0; t < n; t++) {
                    fiber *f = &fibers[t];
                    f->done = 0;
                    f->x = t % block.x;
                    f->y = (t / block.x) % block.y;
                    f->z = t / (block.x * block.y);
                    getcontext(&f->ctx);
                    f->ctx.uc_stack.ss_sp = stacks + (size_t)t * STACK;
                    f->ctx.uc_stack.ss_size = STACK;
                    f->ctx.uc_link = &sched;
                    makecontext(&f->ctx, trampoline, 0);
                }
                for (unsigned alive = n; alive > 0;) {
                    alive = 0;
                    for (unsigned t = 0; t < n; t++) {
                        fiber *f = &fibers[t];
                        if (f->done) continue;
                        cur = f;
                        bn_emu_thread = {f->x, f->y, f->z};
                        swapcontext(&sched, &f->ctx);
                        if (!f->done) alive++;
                    }
                }
            }
    (*barrier_free)[fn] = !saw_barrier;
}

extern "C" {

cudaError_t cudaMalloc(void **p, size_t bytes) { return track(p, bytes); }
cudaError_t cudaMallocAsync(void **p, size_t bytes, cudaStream_t) { return track(p, bytes); }
cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    std::lock_guard<std::mutex> g(mem_lock);
    if (!mem.erase((uintptr_t)p)) return cudaErrorInvalidValue;
    free(p);
    return cudaSuccess;
}
cudaError_t cudaFreeAsync(void *p, cudaStream_t) { return cudaFree(p); }
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind) {
    memmove(dst, src, bytes);
    return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind k, cudaStream_t) {
    return cudaMemcpy(dst, src, bytes, k);
}
cudaError_t cudaMemset(void *p, int v, size_t bytes) {
    memset(p, v, bytes);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t) { return cudaMemset(p, v, bytes); }
cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int) {
    memset(p, 0, sizeof *p);
    strcpy(p->name, "CPU emulation of the CUDA backend (tests/cuda_emu)");
    p->major = 9;
    p->multiProcessorCount = 1;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int *dev) {
    *dev = 0;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int dev) { return dev == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *a, const void *p) {
    memset(a, 0, sizeof *a);
    std::lock_guard<std::mutex> g(mem_lock);
    auto it = mem.upper_bound((uintptr_t)p);
    if (it != mem.begin()) {
        --it;
        if ((uintptr_t)p < it->first + it->second) {
            a->type = cudaMemoryTypeDevice;
            a->devicePointer = (void *)p;
            return cudaSuccess;
        }
    }
    a->type = cudaMemoryTypeUnregistered;
    return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t *s) {
    *s = (cudaStream_t)1;
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
const char *cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }
}
