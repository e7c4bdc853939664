/*
 * bnorm_nccl.h - synchronized batch norm over NCCL: a bnorm_comm built from an ncclComm_t and a stream.
 *
 * Optional part of bnorm: configure with -DBNORM_CUDA=ON -DBNORM_NCCL=ON and link bnorm::bnorm_nccl
 * (libbnorm_nccl). STATUS: compiled, NOT YET RUN ON A GPU (docs/cuda.md).
 *
 * Usage (every rank of the NCCL communicator runs the same code, each on its own GPU):
 *
 *     bnorm_comm *sync = NULL;
 *     if (bnorm_nccl_comm_create(nccl_comm, stream, 1, &sync) != BNORM_STATUS_OK) { ...bnorm_nccl_last_error()... }
 *     args.comm = sync;                                  // bnorm_cuda_forward / bnorm_cuda_backward
 *     ... one forward and one backward per step on the local slice of the batch ...
 *     bnorm_nccl_comm_destroy(sync);
 *
 * What it does, and the choice it makes: bnorm's communicator interface (bnorm.h's bnorm_comm) is an
 * all-gather of host doubles, and the backends merge what it returns on the host, in rank order, with
 * the core's Chan merge: the same code for every backend, and a group may even mix CPU and GPU ranks.
 * This communicator therefore stages through host memory: it copies the rank's contribution to the
 * device, runs ncclAllGather (ncclDouble) on `stream`, copies the result back and waits for the
 * stream. Per forward and per backward that is one all-gather of (8 + 1 + 2C) doubles per rank (plus an
 * 8-double one with validate), two small copies and a host wait: a latency of some tens of
 * microseconds, which a device-side exchange (statistics all-gathered and merged by a kernel, no host
 * wait, CUDA-graph capturable) would remove; that is future work, and the wire format would stay.
 *
 *   - The NCCL communicator stays the caller's: it is neither duplicated nor destroyed here. NCCL
 *     collectives must be issued in the same order on every rank, so do not interleave the caller's own
 *     collectives on it from another thread. The stream should be the one the backend calls use (any
 *     stream of the communicator's device works: the all-gather waits for its own copies).
 *   - The exchange runs on the communicator's device (made current for the call, then restored).
 *   - Errors become BNORM_STATUS_COMM from bnorm_cuda_forward/backward with NCCL's or CUDA's text in
 *     bnorm_last_error(). NCCL has no timeout: a rank that never calls makes the others wait (use
 *     ncclCommAbort from another thread, as with any NCCL collective). After an error, abort the NCCL
 *     communicator as NCCL requires.
 *   - validate (nonzero): an extra 8-double all-gather before each exchange checks that every rank
 *     agrees on the operation, C, dtype, layout and flags (bnorm.h's bnorm_comm.validate).
 */
#ifndef BNORM_NCCL_H
#define BNORM_NCCL_H

#include <nccl.h>

#include "bnorm/bnorm.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#  define BNORM_NCCL_API __attribute__((visibility("default")))
#else
#  define BNORM_NCCL_API
#endif

/* Creates a bnorm_comm over comm (rank and size are NCCL's) whose all-gather runs on stream.
 * Not collective: each rank creates its own. Errors: NULL_POINTER (out, comm), COMM (NCCL or CUDA
 * queries failed), OUT_OF_MEMORY; the reason is in bnorm_nccl_last_error(). */
BNORM_NCCL_API bnorm_status bnorm_nccl_comm_create(ncclComm_t comm, cudaStream_t stream, int validate,
                                                   bnorm_comm **out);

/* Frees what bnorm_nccl_comm_create made (not the NCCL communicator). NULL is a no-op. */
BNORM_NCCL_API void bnorm_nccl_comm_destroy(bnorm_comm *comm);

/* The message of the last failing bnorm_nccl_comm_create on this thread ("" if none). */
BNORM_NCCL_API const char *bnorm_nccl_last_error(void);

#ifdef __cplusplus
}
#endif
#endif /* BNORM_NCCL_H */
