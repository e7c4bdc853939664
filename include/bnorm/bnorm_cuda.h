/*
 * bnorm_cuda.h - the CUDA backend: bnorm_forward / bnorm_backward on device memory, on a stream.
 *
 * Optional part of libbnorm: configure with -DBNORM_CUDA=ON (needs the CUDA toolkit; the CUDA
 * runtime is linked statically into libbnorm, so a program needs only the NVIDIA driver at run time,
 * and a machine without one gets BNORM_STATUS_DEVICE, never a failure to load). This header needs
 * neither <cuda_runtime.h> nor a CUDA compiler: a stream is passed as `void *` (a cudaStream_t
 * converts to it implicitly in C and with a cast in C++).
 *
 * STATUS: compiled for sm_90 (H100/H200) plus PTX, but NOT YET RUN ON A GPU. The tests that compare
 * every operation with the CPU backend are ready (scripts/gpu_check.sh); see docs/cuda.md.
 *
 * The same descriptors, argument structs, statuses and semantics as bnorm_forward/bnorm_backward
 * (bnorm.h is the manual), with these differences:
 *   - Every tensor (x, y, addend, dy, dx, daddend), every per-channel array (weight, bias, running
 *     statistics, saved statistics, mean/invstd/var, dweight/dbias) and relu_mask is DEVICE memory of
 *     the current device (cudaMalloc, cudaMallocAsync, cudaMallocManaged, or mapped pinned host
 *     memory), aligned to its element size (cudaMalloc's alignment is plenty). A host pointer is
 *     refused with BNORM_STATUS_INVALID_ARGUMENT before anything runs.
 *   - stream: the cudaStream_t (of the current device) the work is queued on; NULL is the legacy
 *     default stream. The call returns once the work is queued (asynchronous, as cuDNN): outputs are
 *     ready when the stream has reached that point (cudaStreamSynchronize, an event). With a comm
 *     (training forward, training backward) the call waits on the stream twice, because the exchange
 *     goes through the communicator's host-side all-gather (bnorm.h's bnorm_comm; bnorm_nccl.h builds
 *     one over NCCL).
 *   - workspace/workspace_size: device memory (8-byte aligned) of at least
 *     bnorm_cuda_workspace_size() bytes, which must stay untouched until the stream has finished the
 *     call; NULL: the call takes it with cudaMallocAsync/cudaFreeAsync on the stream.
 *   - The relu_mask has the CPU layout (bnorm_relu_mask_size bytes, one bit per element, each plane
 *     or row starting on a byte, unused bits 0): a mask made by one backend is accepted by the other.
 *   - Errors: argument errors are found before anything is queued, and then nothing is written, as on
 *     the CPU. A failing CUDA call (no device, out of memory, a launch failure) gives
 *     BNORM_STATUS_DEVICE with CUDA's message in bnorm_last_error(); outputs may then be partly
 *     written. CUDA errors of earlier, unrelated work on the device can surface here (CUDA reports
 *     them at the next call).
 *   - Numerics: float16/bfloat16 data are storage only (float32 arithmetic); per-element shifted
 *     sums are accumulated in double per thread and merged with Chan's formula in a fixed tree order,
 *     no atomics: results are bitwise the same run to run on any GPU for a given shape and input
 *     (the work split depends on the shape only). They agree with the CPU backend to rounding, and the
 *     inference forward and backward with global statistics agree bit for bit (same coefficients,
 *     same uncontracted float operations).
 *   - Thread safety: as bnorm.h; calls on different streams may run concurrently.
 */
#ifndef BNORM_CUDA_H
#define BNORM_CUDA_H

#include "bnorm/bnorm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of CUDA devices this process can use; 0 when there is none or no driver (never fails). */
BNORM_API int bnorm_cuda_device_count(void);

/* bnorm_forward on device memory, queued on stream (a cudaStream_t, or NULL). */
BNORM_API bnorm_status bnorm_cuda_forward(const bnorm_forward_args *args, void *stream);

/* bnorm_backward on device memory, queued on stream (a cudaStream_t, or NULL). */
BNORM_API bnorm_status bnorm_cuda_backward(const bnorm_backward_args *args, void *stream);

/* Bytes of device workspace a forward or backward of this descriptor needs (0 on an invalid one).
 * It depends on the shape only (comm_size is accepted for symmetry with bnorm_workspace_size and
 * ignored: the exchange buffers live in host memory). */
BNORM_API size_t bnorm_cuda_workspace_size(const bnorm_desc *desc, int comm_size);

#ifdef __cplusplus
}
#endif
#endif /* BNORM_CUDA_H */
