/*
 * bnorm_mpi.h - synchronized batch norm over MPI: a bnorm_comm built from an MPI_Comm.
 *
 * Optional part of bnorm: configure with -DBNORM_MPI=ON and link bnorm::bnorm_mpi (libbnorm_mpi).
 * Include it after <mpi.h> or alone (it includes <mpi.h>). The library never calls MPI_Init or
 * MPI_Finalize: MPI must be initialized before bnorm_mpi_comm_create and finalized after
 * bnorm_mpi_comm_destroy, by the application.
 *
 * Usage (every rank of comm runs the same code):
 *
 *     bnorm_comm *sync = NULL;
 *     if (bnorm_mpi_comm_create(MPI_COMM_WORLD, NULL, &sync) != BNORM_STATUS_OK) { ...bnorm_mpi_last_error()... }
 *     bnorm_layer_set_comm(layer, sync, 0);              // convert_sync_batchnorm: state is kept
 *     ... bnorm_layer_forward / bnorm_layer_backward on the local slice of the batch ...
 *     // or, at the functional level: args.comm = sync;
 *     bnorm_mpi_comm_destroy(sync);                      // after the last call that uses it
 *
 * What it does:
 *   - The user's communicator is duplicated (MPI_Comm_dup, collective over comm), so the library's
 *     collectives never match the application's own messages or collectives. The duplicate has the
 *     error handler MPI_ERRORS_RETURN: an MPI failure becomes BNORM_STATUS_COMM from bnorm_forward /
 *     bnorm_backward with MPI's own text (MPI_Error_string) in bnorm_last_error(), never an abort
 *     inside the library (MPI_Comm_dup itself runs under comm's handler, MPI_ERRORS_ARE_FATAL by default).
 *     Open MPI raises the errors of a nonblocking collective (MPI_Test, MPI_Wait) on MPI_COMM_WORLD's
 *     handler instead, so while the library posts and waits on its requests it sets MPI_COMM_WORLD's
 *     handler to MPI_ERRORS_RETURN and restores the application's right after (a thread calling MPI on
 *     MPI_COMM_WORLD at that moment, under MPI_THREAD_MULTIPLE, would get its errors returned too).
 *   - The all-gather is MPI_Iallgather followed by a polling loop (MPI_Test, then short sleeps that grow
 *     to 1 ms) bounded by options.timeout_seconds. Ranks are ordered as in comm. With a timeout, a
 *     completed all-gather is confirmed by an MPI_Ibarrier under the same timeout before its data are
 *     used, so that a rank arriving after the others gave up cannot complete the step alone (below).
 *   - Per forward/backward, with options.validate (the default): an all-gather of 8 doubles (the
 *     operation, C, dtype, layout and flags of every rank) and then the data all-gather. With
 *     validate = 0 ("one-collective mode"): the data all-gather only; see "What is detected".
 *
 * What is detected (every rank gets the error; nothing is written: outputs, running statistics,
 * saved statistics and the layer's counters are as before the call):
 *   - a rank with a different C, dtype, layout, ReLU flag, running-statistics tracking, or
 *     a rank calling backward while another calls forward: BNORM_STATUS_COMM_MISMATCH naming both
 *     ranks and the field. In one-collective mode a different C changes the size of the data
 *     all-gather: a rank whose receive is too small gets MPI_ERR_TRUNCATE as BNORM_STATUS_COMM, the
 *     others time out on the confirmation (BNORM_STATUS_COMM; with timeout_seconds = 0 their wait is
 *     not bounded), without naming the field; every other disagreement is still reported as a
 *     mismatch because the header travels inside the data.
 *   - a rank that never makes the call (it returned early on an argument error, took another code
 *     path, crashed, or is stuck): the others wait timeout_seconds, then get BNORM_STATUS_COMM with
 *     "timed out". This is the only signal MPI offers for a missing participant.
 *   - a rank that makes the call after the others timed out: it completes their pending all-gather
 *     but not the confirmation, and gets BNORM_STATUS_COMM ("did not confirm it") after
 *     timeout_seconds, with nothing written. Every rank of a step gets the same outcome, except when a
 *     rank is held up for timeout_seconds inside the confirmation itself: it fails and the others
 *     succeed on this step and fail on their next call. Either way each rank's communicator reports
 *     the failure on its next call at the latest.
 *   - a global count of one value per channel (over all ranks): BNORM_STATUS_BATCH_TOO_SMALL on every rank.
 * What cannot be detected:
 *   - ranks that make the same calls on different layers (a layer order that differs between ranks
 *     but with equal C, dtype and flags): the statistics are silently merged across layers. Keep the
 *     order of synchronized calls identical on every rank (the same rule as MPI collectives).
 *   - a rank that is merely slower than timeout_seconds: it is reported as missing. Choose the timeout
 *     well above the longest expected imbalance between ranks (checkpointing, data loading).
 *
 * After a timeout (of the all-gather or of its confirmation) or an MPI error the communicator object is
 * POISONED on that rank ("unusable" in the message): the pending
 * MPI_Iallgather cannot be cancelled (MPI has no cancel for collectives), so its buffers stay owned
 * by MPI and every later call through this bnorm_comm fails at once with BNORM_STATUS_COMM (no new
 * collective is posted, so a late rank meets at most the one pending collective and then times out
 * itself rather than receiving data from a different step). The group as a whole is then in an
 * inconsistent state; the usual response is to report the error and MPI_Abort. bnorm_mpi_comm_destroy
 * still works: it frees the duplicate communicator (pending operations complete or are dropped by MPI)
 * and deliberately leaks the few buffers of the pending collective, because MPI may still write them.
 *
 * Parameter gradients: as PyTorch's SyncBatchNorm, dweight/dbias (a layer's weight.grad/bias.grad)
 * are this rank's contribution; sum them over ranks as for any other parameter in data-parallel
 * training (an MPI_Allreduce), or pass reduce_param_grads = 1 (bnorm_backward_args, or
 * bnorm_layer_set_comm) to receive the group's sums on every rank.
 *
 * Threads: a bnorm_comm from this header may be used by one thread at a time (MPI collectives on one
 * communicator must be issued in the same order on every rank anyway). The library calls MPI only
 * from the thread that called bnorm_forward/bnorm_backward and outside its OpenMP regions, so
 * MPI_THREAD_FUNNELED suffices when that is the main thread, MPI_THREAD_SERIALIZED otherwise.
 */
#ifndef BNORM_MPI_H
#define BNORM_MPI_H

#include <mpi.h>

#include "bnorm/bnorm.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(BNORM_SHARED)
#  ifdef BNORM_MPI_BUILDING
#    define BNORM_MPI_API __declspec(dllexport)
#  else
#    define BNORM_MPI_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define BNORM_MPI_API __attribute__((visibility("default")))
#else
#  define BNORM_MPI_API
#endif

typedef struct bnorm_mpi_options {
    /* Bound on the wait for one all-gather, in seconds, and again for its confirmation barrier. > 0:
     * after that long without completion the call fails with BNORM_STATUS_COMM ("timed out" or "did
     * not confirm it") and the communicator is poisoned (see above).
     * 0: no bound and no confirmation (MPI_Wait: a rank that never calls makes the others hang, as
     * plain MPI).
     * Default 600 (NCCL's default in PyTorch is of the same order). */
    double timeout_seconds;
    /* Nonzero (default 1) sets bnorm_comm.validate: an extra 8-double all-gather before each data
     * exchange, so that a different C is reported as a mismatch. 0: one collective per forward and per
     * backward (a different C is then undetectable, see above). May also be changed later in the
     * returned struct, identically on every rank, between calls. */
    int validate;
} bnorm_mpi_options;

/* The defaults: timeout_seconds = 600, validate = 1. */
BNORM_MPI_API bnorm_mpi_options bnorm_mpi_options_default(void);

/* Creates a communicator for synchronized batch norm over the processes of comm. Collective over comm
 * (it calls MPI_Comm_dup): every rank of comm must call it. options: NULL for the defaults.
 * *out receives the communicator (NULL on failure): pass it as bnorm_forward_args.comm,
 * bnorm_backward_args.comm or to bnorm_layer_set_comm. Its rank and size are those of comm.
 * Errors: NULL_POINTER (out), INVALID_ARGUMENT (comm is MPI_COMM_NULL or an intercommunicator,
 * timeout negative or NaN), STATE (MPI not initialized or already finalized),
 * OUT_OF_MEMORY, COMM (MPI_Comm_dup failed, with MPI's message). The reason is in
 * bnorm_mpi_last_error(). */
BNORM_MPI_API bnorm_status bnorm_mpi_comm_create(MPI_Comm comm, const bnorm_mpi_options *options,
                                                 bnorm_comm **out);

/* Frees a communicator made by bnorm_mpi_comm_create (MPI_Comm_free of the duplicate: call it before
 * MPI_Finalize, on every rank, after every layer that holds a copy has stopped using it). NULL is a
 * no-op, and so is a bnorm_comm that this library did not create. */
BNORM_MPI_API void bnorm_mpi_comm_destroy(bnorm_comm *comm);

/* Nonzero if a timeout or an MPI error has poisoned this communicator (see above); 0 otherwise,
 * also for NULL or a bnorm_comm not created here. Copies of the struct (a layer's) share the state. */
BNORM_MPI_API int bnorm_mpi_comm_is_poisoned(const bnorm_comm *comm);

/* The message of the last failing bnorm_mpi_comm_create on this thread ("" if none). Failures inside
 * bnorm_forward/bnorm_backward are reported by bnorm_last_error() as for every bnorm call. */
BNORM_MPI_API const char *bnorm_mpi_last_error(void);

#ifdef __cplusplus
}
#endif
#endif /* BNORM_MPI_H */
