/*
 * bnorm.h - batch normalization in portable C99: the public API and its manual.
 *
 * bnorm computes batch normalization exactly as PyTorch, OneFlow and MegEngine define it:
 *
 *   per channel c, over every other dimension (count m = N * spatial):
 *     mean_c   = (1/m) sum x
 *     var_c    = (1/m) sum (x - mean_c)^2           biased: used to normalize
 *     invstd_c = 1 / sqrt(var_c + eps)              (0 when var_c + eps == 0, as PyTorch)
 *     y        = (x - mean_c) * invstd_c * weight_c + bias_c
 *   fused:  y = ReLU(BN(x) + addend)                (OneFlow FusedBatchNorm; addend optional)
 *   running statistics (training, PyTorch convention, alpha = momentum):
 *     running_mean = (1 - alpha) * running_mean + alpha * mean_c
 *     running_var  = (1 - alpha) * running_var  + alpha * var_c * m / (m - 1)   (unbiased)
 *
 * Two levels:
 *   - the functional level (bnorm_forward, bnorm_backward): stateless, like
 *     torch.nn.functional.batch_norm or a oneDNN primitive; the caller owns every buffer;
 *   - the layer (bnorm_layer_*): the nn.BatchNorm1d/2d/3d module. It owns weight, bias, their
 *     gradients, the running statistics and num_batches_tracked, and is built on the functional level.
 *
 * Conventions that hold for every function:
 *   - Every function returns a bnorm_status. On failure bnorm_last_error() names the function, the
 *     offending value and the rule, and NOTHING was written: outputs, running statistics, counters and
 *     layer state are exactly as before the call (all arguments are validated before any write).
 *   - The library never aborts, exits or prints.
 *   - Tensors are described by a bnorm_desc: logical dimensions always in the order (N, C, d1, d2, ...),
 *     whatever the memory layout. Element counts are int64; shapes whose byte size overflows are rejected.
 *   - Data types: x, y, dy, dx, addend, daddend are of the descriptor's dtype. Per-channel arrays
 *     (weight, bias, running stats, saved mean/invstd, gradients of weight/bias) are of the "parameter
 *     dtype": float64 when the data is float64, float32 otherwise (float16/bfloat16 data are storage only;
 *     all arithmetic is float32 or wider, statistics are accumulated in float64).
 *   - Tensor pointers must be aligned to their element size (as any C array of that type is); no
 *     further alignment is needed. Buffers that are not documented as aliasable must not overlap.
 *   - Thread safety: functions on distinct buffers/layers may be called concurrently from several
 *     threads. One layer must not be used from two threads at once. Each call uses the thread count it
 *     is given (args.num_threads, a plan's count) or else bnorm_get_num_threads(), read once per call.
 *   - Results are bitwise identical run to run for a given thread count, CPU instruction set and input,
 *     whether the threads are OpenMP's or a caller's pool (bnorm_threadpool).
 *   - Language: this header is C99 (and C++); the library itself is built as C11 (thread-local error
 *     messages, atomics).
 *
 * ABI policy (how the API grows without breaking built programs):
 *   - Structs the caller allocates (bnorm_forward_args, bnorm_backward_args, bnorm_layer_options,
 *     bnorm_comm, bnorm_threadpool) begin with `size_t struct_size`. New fields are only ever appended.
 *     The library reads the first struct_size bytes and treats fields beyond them as zero, so a program
 *     built against an older header keeps working with a newer library. struct_size = 0 means the
 *     layout of ABI 1 (this header, bnorm 0.2), so zero-initialised structs written for 0.2 keep
 *     working; code that uses fields added later must set struct_size = sizeof(the struct) (recommended
 *     everywhere). A struct_size larger than the library knows is accepted when the unknown tail is all
 *     zero, else BNORM_STATUS_UNSUPPORTED (a newer program asking for a feature this library lacks).
 *   - bnorm_desc is frozen (value type, embedded in other structs): extensions such as strides would
 *     come as new appended fields of the argument structs, not of bnorm_desc.
 *   - Opaque objects (bnorm_plan, bnorm_layer, bnorm_layer_context) grow freely; enums only gain values.
 *   - Only `bnorm_` symbols are exported. The soname changes whenever the ABI breaks: libbnorm.so.0.MINOR
 *     while the major version is 0, libbnorm.so.MAJOR from 1.0 on.
 *
 * Diagnostics: with the environment variable BNORM_VERBOSE=1 every forward/backward (functional call
 * or plan execution) prints one line to stderr: operation, shape, layout, dtype, schedule, instruction
 * set, threads and microseconds; BNORM_VERBOSE=2 also prints plan creations. Read once per process.
 */
#ifndef BNORM_H
#define BNORM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(BNORM_SHARED)
#  ifdef BNORM_BUILDING
#    define BNORM_API __declspec(dllexport)
#  else
#    define BNORM_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define BNORM_API __attribute__((visibility("default")))
#else
#  define BNORM_API
#endif

/* BNORM_VERSION_MAJOR, _MINOR, _PATCH, BNORM_VERSION (MAJOR * 10000 + MINOR * 100 + PATCH) and
 * BNORM_VERSION_STRING: the version of this header, generated from the CMake project version. */
#include <bnorm/bnorm_version.h>

/* Version of the library actually linked, as "MAJOR.MINOR.PATCH" and as MAJOR * 10000 + MINOR * 100 +
 * PATCH. A program built against this header may check bnorm_version() == BNORM_VERSION (while the
 * major version is 0, each minor version may change the ABI; the soname says which). */
BNORM_API const char *bnorm_version_string(void);
BNORM_API unsigned bnorm_version(void);

/* ---------------------------------------------------------------------------------------------
 * Status codes and errors
 * ------------------------------------------------------------------------------------------- */

/* X(name, value, description): one list drives the enum and bnorm_status_string(). */
#define BNORM_STATUS_LIST(X)                                                              \
    X(BNORM_STATUS_OK, 0, "success")                                                      \
    X(BNORM_STATUS_NULL_POINTER, 1, "a required pointer argument is NULL")                \
    X(BNORM_STATUS_INVALID_ARGUMENT, 2, "an argument has an invalid value")               \
    X(BNORM_STATUS_SHAPE_MISMATCH, 3, "tensor shapes or channel counts do not agree")     \
    X(BNORM_STATUS_OVERFLOW, 4, "a size overflows 64-bit arithmetic")                     \
    X(BNORM_STATUS_BATCH_TOO_SMALL, 5, "expected more than 1 value per channel when training") \
    X(BNORM_STATUS_UNSUPPORTED, 6, "the combination is not supported")                    \
    X(BNORM_STATUS_OUT_OF_MEMORY, 7, "memory allocation failed")                          \
    X(BNORM_STATUS_IO, 8, "a file could not be read or written")                          \
    X(BNORM_STATUS_FORMAT, 9, "a file is corrupt or not in the expected format")          \
    X(BNORM_STATUS_COMM, 10, "a collective communication failed")                         \
    X(BNORM_STATUS_COMM_MISMATCH, 11, "processes of the group disagree")                  \
    X(BNORM_STATUS_STATE, 12, "the call is not valid in the object's current state")      \
    X(BNORM_STATUS_DEVICE, 13, "a GPU (CUDA) operation failed")

typedef enum bnorm_status {
#define BNORM_STATUS_ENUM_ENTRY(name, value, text) name = value,
    BNORM_STATUS_LIST(BNORM_STATUS_ENUM_ENTRY)
#undef BNORM_STATUS_ENUM_ENTRY
} bnorm_status;

/* Static description of a status ("unknown status" for values outside the enum). */
BNORM_API const char *bnorm_status_string(bnorm_status status);

/* The message of the last failing call on this thread, e.g.
 * "bnorm_forward: desc.dims[1] (C) = 0: must be >= 1". Empty string if none. The pointer stays valid
 * until the next bnorm call on this thread. */
BNORM_API const char *bnorm_last_error(void);

/* ---------------------------------------------------------------------------------------------
 * Types, layouts and tensor descriptors
 * ------------------------------------------------------------------------------------------- */

typedef enum bnorm_dtype {
    BNORM_DTYPE_F32 = 0,  /* IEEE binary32 */
    BNORM_DTYPE_F64 = 1,  /* IEEE binary64; parameters are float64 too */
    BNORM_DTYPE_F16 = 2,  /* IEEE binary16, storage only: float32 arithmetic, float32 parameters */
    BNORM_DTYPE_BF16 = 3  /* bfloat16, storage only: float32 arithmetic, float32 parameters */
} bnorm_dtype;

/* Size in bytes of one element (0 for an invalid dtype). */
BNORM_API size_t bnorm_dtype_size(bnorm_dtype dtype);
/* The parameter dtype for data of this dtype: BNORM_DTYPE_F64 for F64, BNORM_DTYPE_F32 otherwise. */
BNORM_API bnorm_dtype bnorm_param_dtype(bnorm_dtype dtype);
/* "float32", "float64", "float16", "bfloat16" (NULL for an invalid dtype). */
BNORM_API const char *bnorm_dtype_name(bnorm_dtype dtype);

typedef enum bnorm_layout {
    /* NCHW-like: dims (N, C, d1..dk) stored row-major in that order. */
    BNORM_LAYOUT_CHANNELS_FIRST = 0,
    /* NHWC-like: the same logical dims stored as (N, d1..dk, C), channels innermost
     * (PyTorch's channels_last / channels_last_3d memory format). For rank 2 both layouts coincide. */
    BNORM_LAYOUT_CHANNELS_LAST = 1
} bnorm_layout;

#define BNORM_MAX_RANK 8

/* Describes x (and y, dy, dx, addend, daddend, which always share it).
 * rank in [2, BNORM_MAX_RANK]; dims[0] = N >= 0, dims[1] = C >= 1, spatial dims >= 0.
 * Example: bnorm_desc d = {.dtype = BNORM_DTYPE_F32, .layout = BNORM_LAYOUT_CHANNELS_FIRST,
 *                          .rank = 4, .dims = {32, 64, 56, 56}}; */
typedef struct bnorm_desc {
    bnorm_dtype dtype;
    bnorm_layout layout;
    int rank;
    int64_t dims[BNORM_MAX_RANK];
} bnorm_desc;

/* Checks a descriptor (rank, dims, dtype, layout, byte-size overflow). */
BNORM_API bnorm_status bnorm_desc_check(const bnorm_desc *desc);
/* Number of elements (N * C * spatial); 0 for an invalid descriptor. */
BNORM_API int64_t bnorm_desc_numel(const bnorm_desc *desc);

/* ---------------------------------------------------------------------------------------------
 * Threads and instruction sets
 * ------------------------------------------------------------------------------------------- */

/* The default thread count of calls that do not name one (args.num_threads = 0, plans created with 0).
 * n > 0 sets a process-wide count (thread-safe; a call reads it once, so a change never affects a call
 * in progress). n <= 0 restores the default: what OpenMP says the calling thread wants
 * (omp_get_max_threads(): OMP_NUM_THREADS and omp_set_num_threads() are honoured), and 1 when called
 * inside an OpenMP parallel region, so one call per host thread does not oversubscribe. Without OpenMP
 * the library is single-threaded. bnorm_get_num_threads() returns the count a call made now by this
 * thread would use. */
BNORM_API void bnorm_set_num_threads(int n);
BNORM_API int bnorm_get_num_threads(void);

/* A caller's thread pool (TBB, a framework's pool) to run bnorm's parallel work on instead of OpenMP:
 * parallel_for must call task(task_ctx, i) once for every i in [0, n), on any threads, in any order,
 * concurrently or not, and return when all n calls have returned. The tasks never wait for each other,
 * so running them one after another is correct too. Results are bitwise those of OpenMP with n threads.
 * The pool must not call back into bnorm from a task. */
typedef void (*bnorm_task_fn)(void *task_ctx, int index);
typedef struct bnorm_threadpool {
    size_t struct_size; /* sizeof(bnorm_threadpool), or 0 (see the ABI policy) */
    void (*parallel_for)(void *pool_ctx, int n, bnorm_task_fn task, void *task_ctx);
    void *pool_ctx;
} bnorm_threadpool;

/* Kernel variants. The best one the CPU supports is chosen at first use; the environment variable
 * BNORM_ISA=scalar|avx2|avx512 caps it (a cap above what the CPU has is lowered to what it has). */
typedef enum bnorm_isa {
    BNORM_ISA_SCALAR = 0, /* portable C, always built */
    BNORM_ISA_AVX2 = 1,   /* x86-64 AVX2 + FMA + F16C */
    BNORM_ISA_AVX512 = 2  /* x86-64 AVX-512 F/BW/VL (+BF16 conversions where present) */
} bnorm_isa;

/* The variant in use. */
BNORM_API bnorm_isa bnorm_get_isa(void);
/* Caps the variant (tests and benchmarks); fails with UNSUPPORTED if the CPU lacks it. */
BNORM_API bnorm_status bnorm_set_isa(bnorm_isa isa);
/* "scalar", "avx2", "avx512". */
BNORM_API const char *bnorm_isa_name(bnorm_isa isa);

/* ---------------------------------------------------------------------------------------------
 * Communicators (synchronized batch norm)
 *
 * Statistics over all processes of a group: pass a bnorm_comm in the forward/backward arguments. The
 * library only needs an all-gather: every rank contributes `count` doubles and receives the
 * contributions of all ranks, ordered by rank (recv holds size * count doubles). Merging in rank order
 * on every rank makes results identical on all ranks. bnorm_mpi.h builds one from an MPI_Comm; users of
 * another engine fill the struct themselves. The callback returns 0 on success; on failure it returns
 * non-zero and may write a message (NUL-terminated, at most msg_cap bytes) into msg.
 * Every rank must make the same sequence of calls (forward, backward) with the same C, dtype and mode;
 * ranks whose local batch is empty (N = 0) must still call.
 * ------------------------------------------------------------------------------------------- */
typedef struct bnorm_comm {
    size_t struct_size; /* sizeof(bnorm_comm), or 0 (see the ABI policy) */
    int rank;  /* this process, 0 <= rank < size */
    int size;  /* processes in the group, >= 1 */
    /* Nonzero: before the data exchange, one extra all-gather of 8 doubles per rank checks that every
     * rank agrees on the operation, C, dtype, layout and flags, so a rank with a different C gets
     * BNORM_STATUS_COMM_MISMATCH instead of an all-gather of mismatched sizes (which MPI cannot
     * diagnose). Zero: exactly one collective per forward and per backward; the same header still
     * travels inside the data exchange, so disagreements other than C are still reported. */
    int validate;
    int (*allgather)(void *ctx, const double *send, int64_t count, double *recv, char *msg,
                     size_t msg_cap);
    void *ctx; /* passed to allgather */
} bnorm_comm;

/* ---------------------------------------------------------------------------------------------
 * Functional level
 * ------------------------------------------------------------------------------------------- */

/* Forward pass: training (batch statistics) or inference (given statistics), optionally fused with
 * an add and a ReLU: y = ReLU(BN(x) + addend).
 *
 * Fields (unused ones may stay zero/NULL; designated initialisers recommended):
 *   desc          shape, layout and dtype of x, y and addend.                         required
 *   x             input.                                                               required
 *   y             output, overwritten. May be identical to x (in place) or to addend.  required
 *   weight, bias  [C] parameter dtype; NULL means 1 (weight) or 0 (bias), i.e. affine = false.
 *   eps           added to the variance, >= 0.
 *   training      nonzero: normalize with the batch statistics (and update running stats if given);
 *                 zero: normalize with running_mean/running_var (both required, read only).
 *   running_mean, running_var
 *                 [C] parameter dtype. Training: both NULL (not tracked) or both set, then updated in
 *                 place with momentum (PyTorch convention, weight of the new batch, in [0, 1]) and the
 *                 unbiased variance var * m / (m - 1). Inference: the statistics to normalize with.
 *   momentum      alpha in [0, 1] (training with running stats only).
 *   save_mean, save_invstd
 *                 [C] parameter dtype, training only, optional outputs (overwritten): the batch mean
 *                 and 1/sqrt(var + eps) that bnorm_backward needs.
 *   addend        optional tensor of desc (same layout) added before the ReLU. May be identical to y.
 *   relu          nonzero: apply ReLU after the (optional) add.
 *   relu_mask     optional output when relu != 0, overwritten: bit (z > 0) of every element, for the
 *                 backward. Its size is bnorm_relu_mask_size(&desc) bytes; treat it as opaque.
 *   comm          training only: compute the statistics over every rank of the group (SyncBatchNorm).
 *                 Every rank passes the same C, dtype, layout and flags. NULL: this process only.
 *   workspace, workspace_size
 *                 optional 8-byte aligned scratch, used only during the call. NULL: the call allocates
 *                 (and frees) what it needs. When given, it is checked the same way on every shape and
 *                 path (size, alignment). Size it with bnorm_workspace_size (for the default thread
 *                 count) or bnorm_plan_workspace_size. With num_threads = 0, a call whose workspace is
 *                 too small for the default count runs on as many threads as it was sized for, so a
 *                 workspace stays valid whatever the default becomes; with num_threads > 0 it must fit.
 *   num_threads   threads of this call, as given; 0: bnorm_get_num_threads() (read once), but at most
 *                 one thread per 32768 elements (tiny tensors run on the calling thread).
 *   threadpool    optional caller pool (see bnorm_threadpool); NULL: OpenMP.
 *   save_mean_lo  [C] parameter dtype, optional output with save_mean: the part of the batch mean that
 *                 save_mean's rounding dropped (mean - save_mean, rounded), so hi + lo carries the
 *                 mean to about twice the parameter precision. Pass it to bnorm_backward's mean_lo:
 *                 then a float32 backward is as accurate as the forward when the mean is large against
 *                 the spread (PyTorch's is not).
 *
 * Training with one value per channel (m = N * spatial == 1; with comm, the global m) fails with
 * BNORM_STATUS_BATCH_TOO_SMALL. N = 0 (empty batch) is valid and writes nothing, as PyTorch: the
 * running statistics are left as they are (a comm call still takes part in the collective).
 * NaN/Inf inputs propagate as in PyTorch (a NaN in a channel makes that channel's statistics NaN).
 */
typedef struct bnorm_forward_args {
    size_t struct_size; /* sizeof(bnorm_forward_args), or 0 (see the ABI policy) */
    bnorm_desc desc;
    const void *x;
    void *y;
    const void *weight;
    const void *bias;
    double eps;
    int training;
    void *running_mean;
    void *running_var;
    double momentum;
    void *save_mean;
    void *save_invstd;
    const void *addend;
    int relu;
    void *relu_mask;
    const bnorm_comm *comm;
    void *workspace;
    size_t workspace_size;
    int num_threads;
    const bnorm_threadpool *threadpool;
    void *save_mean_lo;
#ifdef BNORM_ABI_TEST_APPEND
    int64_t abi_test_appended; /* tests/abi only: a field appended after ABI 1 */
#endif
} bnorm_forward_args;

BNORM_API bnorm_status bnorm_forward(const bnorm_forward_args *args);

/* Backward pass of bnorm_forward, optionally through the fused add and ReLU.
 *
 *   desc            as in the forward.                                                 required
 *   x               the forward's input (NOT overwritten by an in-place forward).      required
 *   dy              gradient of the loss with respect to y.                            required
 *   dx              gradient for x, overwritten; NULL if not wanted. May be identical to dy.
 *   weight          [C] as in the forward; NULL means 1.
 *   mean            [C] the statistics the forward normalized with: save_mean of a training
 *                   forward, or running_mean of an inference forward.                  required
 *   invstd          [C] 1/sqrt(var + eps): save_invstd of a training forward. For the global-stats
 *                   case you may instead pass var (running_var) and eps; exactly one of invstd / var.
 *   use_global_stats
 *                   zero: training backward, the gradient flows through the batch statistics
 *                   (dx = weight*invstd*(g - mean(g) - xhat*mean(g*xhat)));
 *                   nonzero: the statistics were constants (eval mode, freeze): dx = g*weight*invstd,
 *                   which does not read x (a NaN/Inf in x leaves dx finite, as in PyTorch).
 *   relu_mask       the forward's relu_mask when the forward had relu != 0, else NULL. The gradient
 *                   passes where z = BN(x) + addend was > 0 (strictly; OneFlow's rule): g = dy * mask.
 *   daddend         gradient for the addend (= g), overwritten; NULL if not wanted. May be identical
 *                   to dy.
 *   dweight, dbias  [C] parameter dtype, NULL if not wanted. dweight = sum g*xhat, dbias = sum g.
 *   accumulate      zero: dweight/dbias are overwritten; nonzero: added to (as .grad in PyTorch).
 *   comm            training backward only: sums of g and g*xhat are reduced over the group so that
 *                   dx equals the single-process result. dweight/dbias stay LOCAL (this rank's
 *                   contribution, as PyTorch's SyncBatchNorm) unless reduce_param_grads is nonzero.
 *   reduce_param_grads  with comm: dweight/dbias are the sums over the whole group.
 *   workspace, workspace_size, num_threads, threadpool  as in the forward.
 *   mean_lo         [C] optional: the forward's save_mean_lo; the mean used is mean + mean_lo.
 */
typedef struct bnorm_backward_args {
    size_t struct_size; /* sizeof(bnorm_backward_args), or 0 (see the ABI policy) */
    bnorm_desc desc;
    const void *x;
    const void *dy;
    void *dx;
    const void *weight;
    const void *mean;
    const void *invstd;
    const void *var;
    double eps;
    int use_global_stats;
    const void *relu_mask;
    void *daddend;
    void *dweight;
    void *dbias;
    int accumulate;
    const bnorm_comm *comm;
    int reduce_param_grads;
    void *workspace;
    size_t workspace_size;
    int num_threads;
    const bnorm_threadpool *threadpool;
    const void *mean_lo;
#ifdef BNORM_ABI_TEST_APPEND
    int64_t abi_test_appended; /* tests/abi only: a field appended after ABI 1 */
#endif
} bnorm_backward_args;

BNORM_API bnorm_status bnorm_backward(const bnorm_backward_args *args);

/* Bytes of the relu_mask for a tensor of this descriptor (0 on an invalid one). */
BNORM_API size_t bnorm_relu_mask_size(const bnorm_desc *desc);

/* Bytes of workspace a forward/backward of this descriptor needs with the default thread count
 * (bnorm_get_num_threads() now) and a communicator of comm_size ranks (1 without one): enough for every
 * path of either. 0 for an invalid descriptor, comm_size > 2^20, or a size that overflows. */
BNORM_API size_t bnorm_workspace_size(const bnorm_desc *desc, int comm_size);

/* ---------------------------------------------------------------------------------------------
 * Plans: validate and choose once, execute many times (oneDNN's primitive, XNNPACK's operator)
 *
 * bnorm_plan_create_forward / _backward take an argument struct as a template: its configuration is
 * fixed in the plan (desc, training / use_global_stats, relu, whether relu_mask, running statistics,
 * comm and daddend are given, comm (the pointer; the struct it points to must outlive the plan),
 * num_threads (0: the default at creation), threadpool (pointer, likewise)); its data pointers,
 * eps, momentum and workspace are ignored. Creation validates all of that, settles the instruction
 * set, the schedule, the thread count and the workspace size, and allocates the plan's own workspace.
 *
 * bnorm_plan_forward / _backward execute with the pointers, eps, momentum, accumulate and workspace
 * of args; its configuration fields must equal the plan's (a cheap comparison; INVALID_ARGUMENT
 * otherwise), and only the pointers and scalars are validated. No allocation: the plan's workspace is
 * used unless args gives one (of at least bnorm_plan_workspace_size bytes). One plan may be executed
 * from several threads at once: a second concurrent execution without its own workspace allocates one
 * for that call. Semantics, outputs and errors are exactly those of bnorm_forward / bnorm_backward,
 * which are themselves a plan made and executed on the spot.
 * ------------------------------------------------------------------------------------------- */
typedef struct bnorm_plan bnorm_plan;

BNORM_API bnorm_status bnorm_plan_create_forward(const bnorm_forward_args *tmpl, bnorm_plan **out);
BNORM_API bnorm_status bnorm_plan_create_backward(const bnorm_backward_args *tmpl, bnorm_plan **out);
BNORM_API bnorm_status bnorm_plan_forward(bnorm_plan *plan, const bnorm_forward_args *args);
BNORM_API bnorm_status bnorm_plan_backward(bnorm_plan *plan, const bnorm_backward_args *args);
/* Workspace bytes an execution needs (0 for NULL). */
BNORM_API size_t bnorm_plan_workspace_size(const bnorm_plan *plan);
/* Threads the plan runs on. */
BNORM_API int bnorm_plan_num_threads(const bnorm_plan *plan);
/* A static name of the schedule chosen ("channel", "run", "split", "empty", ...), for diagnostics. */
BNORM_API const char *bnorm_plan_schedule(const bnorm_plan *plan);
/* Frees the plan; NULL is a no-op. */
BNORM_API void bnorm_plan_destroy(bnorm_plan *plan);

/* ---------------------------------------------------------------------------------------------
 * The layer: nn.BatchNorm1d / 2d / 3d (any rank), MegEngine BatchNorm, OneFlow FusedBatchNorm
 * ------------------------------------------------------------------------------------------- */

typedef enum bnorm_momentum_mode {
    /* PyTorch / OneFlow: running = (1 - m) * running + m * batch; default m = 0.1. */
    BNORM_MOMENTUM_NEW_WEIGHT = 0,
    /* MegEngine / ONNX / Keras: running = m * running + (1 - m) * batch; default m = 0.9. */
    BNORM_MOMENTUM_KEPT_WEIGHT = 1,
    /* PyTorch momentum=None: cumulative moving average, factor 1 / num_batches_tracked. */
    BNORM_MOMENTUM_CUMULATIVE = 2
} bnorm_momentum_mode;

typedef struct bnorm_layer_options {
    size_t struct_size;            /* sizeof(bnorm_layer_options), or 0 (see the ABI policy); the
                                      _default/_megengine functions set it */
    int64_t num_features;          /* C >= 1 */
    bnorm_dtype param_dtype;       /* F32 (data F32/F16/BF16) or F64 (data F64) */
    double eps;                    /* >= 0 */
    double momentum;               /* in [0, 1]; ignored for CUMULATIVE */
    bnorm_momentum_mode momentum_mode;
    int affine;                    /* learnable weight and bias */
    int track_running_stats;       /* keep running_mean/var and num_batches_tracked */
    int freeze;                    /* MegEngine: normalize with the running stats in train and eval,
                                      never update them, no weight/bias gradients; needs tracking */
    int fused_relu;                /* OneFlow FusedBatchNorm: y = ReLU(BN(x) + addend) */
} bnorm_layer_options;

/* PyTorch defaults: eps 1e-5, momentum 0.1 NEW_WEIGHT, affine, tracking, float32 parameters. */
BNORM_API bnorm_layer_options bnorm_layer_options_default(int64_t num_features);
/* MegEngine defaults: eps 1e-5, momentum 0.9 KEPT_WEIGHT, affine, tracking, float32 parameters. */
BNORM_API bnorm_layer_options bnorm_layer_options_megengine(int64_t num_features);

typedef struct bnorm_layer bnorm_layer;

/* Creates a layer in training mode with weight 1, bias 0, running_mean 0, running_var 1,
 * num_batches_tracked 0, gradients 0. *out receives the new layer (NULL on failure). */
BNORM_API bnorm_status bnorm_layer_create(const bnorm_layer_options *options, bnorm_layer **out);
/* Frees the layer; NULL is a no-op. */
BNORM_API void bnorm_layer_destroy(bnorm_layer *layer);
/* The layer's current options. out->struct_size says how many bytes the caller's struct has (0: the
 * ABI-1 size); that many are written. */
BNORM_API bnorm_status bnorm_layer_get_options(const bnorm_layer *layer, bnorm_layer_options *out);

/* Changes the hyper-parameters between steps, as PyTorch users assign bn.eps, bn.momentum (None:
 * CUMULATIVE) or MegEngine's freeze: eps, momentum, momentum_mode, freeze and fused_relu are taken from
 * options (validated as in bnorm_layer_create). The structure cannot change: num_features, param_dtype,
 * affine and track_running_stats must equal the layer's (else SHAPE_MISMATCH). Parameters, buffers and
 * gradients are kept; a forward saved before the change stays valid for its backward (it keeps the eps
 * and mode it ran with), except that turning fused_relu on or off invalidates it (STATE). */
BNORM_API bnorm_status bnorm_layer_set_options(bnorm_layer *layer, const bnorm_layer_options *options);

/* Which parameter gradients the backward accumulates (PyTorch's requires_grad_ on weight and bias);
 * both on at creation. Needs affine for a nonzero flag (else UNSUPPORTED). */
BNORM_API bnorm_status bnorm_layer_set_requires_grad(bnorm_layer *layer, int weight, int bias);

/* train(1) / eval(0). */
BNORM_API bnorm_status bnorm_layer_set_training(bnorm_layer *layer, int training);
BNORM_API int bnorm_layer_is_training(const bnorm_layer *layer);

/* Forward. desc.dims[1] must equal num_features and desc.dtype must match the parameter dtype
 * (F64 with F64 parameters; F32, F16 or BF16 with F32 parameters). addend: only for a fused_relu layer,
 * optional there. y may equal x or addend.
 * Training (and not freeze): batch statistics; with tracking, running statistics are updated and
 * num_batches_tracked is incremented (also for N = 0, where nothing else changes: PyTorch).
 * Eval with tracking, or freeze: running statistics. Eval without tracking: batch statistics.
 * The layer keeps what the backward needs (per-channel statistics and, when fused, the ReLU mask);
 * the caller keeps x for the backward. */
BNORM_API bnorm_status bnorm_layer_forward(bnorm_layer *layer, const bnorm_desc *desc, const void *x,
                                           void *y, const void *addend);

/* Backward of the last forward, which must have had the same desc and the same x pointer: a backward
 * whose x is not the last forward's input fails with BNORM_STATUS_STATE (a layer used twice in one
 * graph needs bnorm_layer_context; it never gets another forward's statistics silently). dx (may equal
 * dy) and daddend (fused only) are overwritten and optional (NULL). The weight and bias gradients are
 * ACCUMULATED into the layer's gradient buffers (zero them with bnorm_layer_zero_grad); none with
 * freeze or !affine, and only those set_requires_grad leaves on. The batch mean is kept in full
 * precision (hi + lo), so dx and the gradients are as accurate as the forward. */
BNORM_API bnorm_status bnorm_layer_backward(bnorm_layer *layer, const bnorm_desc *desc, const void *x,
                                            const void *dy, void *dx, void *daddend);

/* Saved contexts: what one forward leaves for its backward (statistics in full precision, the ReLU
 * mask, the mode it ran in), for layers used several times before their backwards (weight sharing,
 * siamese and recurrent networks): forward A with context a, forward B with b, then the backwards in
 * any order. A context belongs to the layer it was created for (INVALID_ARGUMENT with another), grows
 * to the largest shape it saw, and must be used by one thread at a time. A backward with a context no
 * forward has filled fails with STATE. The plain forward/backward use a context inside the layer. */
typedef struct bnorm_layer_context bnorm_layer_context;
BNORM_API bnorm_status bnorm_layer_context_create(const bnorm_layer *layer, bnorm_layer_context **out);
BNORM_API void bnorm_layer_context_destroy(bnorm_layer_context *ctx);
BNORM_API bnorm_status bnorm_layer_forward_ctx(bnorm_layer *layer, bnorm_layer_context *ctx,
                                               const bnorm_desc *desc, const void *x, void *y,
                                               const void *addend);
BNORM_API bnorm_status bnorm_layer_backward_ctx(bnorm_layer *layer, bnorm_layer_context *ctx,
                                                const bnorm_desc *desc, const void *x, const void *dy,
                                                void *dx, void *daddend);

/* Threads of the layer's calls: num_threads 0 = the default (read at each call), threadpool NULL =
 * OpenMP. The pool (copied) must outlive its use by the layer. */
BNORM_API bnorm_status bnorm_layer_set_threads(bnorm_layer *layer, int num_threads,
                                               const bnorm_threadpool *threadpool);

/* weight = 1, bias = 0, and reset_running_stats. */
BNORM_API bnorm_status bnorm_layer_reset_parameters(bnorm_layer *layer);
/* running_mean = 0, running_var = 1, num_batches_tracked = 0. */
BNORM_API bnorm_status bnorm_layer_reset_running_stats(bnorm_layer *layer);
/* Sets the weight and bias gradients to 0. */
BNORM_API bnorm_status bnorm_layer_zero_grad(bnorm_layer *layer);

typedef enum bnorm_tensor_id {
    BNORM_TENSOR_WEIGHT = 0,
    BNORM_TENSOR_BIAS = 1,
    BNORM_TENSOR_RUNNING_MEAN = 2,
    BNORM_TENSOR_RUNNING_VAR = 3,
    BNORM_TENSOR_WEIGHT_GRAD = 4,
    BNORM_TENSOR_BIAS_GRAD = 5
} bnorm_tensor_id;

/* Direct read/write access to a layer tensor: *data points to num_features values of the parameter
 * dtype, owned by the layer, valid until it is destroyed. UNSUPPORTED (and *data = NULL) for a
 * tensor the layer does not have (weight/bias/grads without affine; running stats without tracking).
 * INVALID_ARGUMENT for an id that is not a bnorm_tensor_id, with *data not written. */
BNORM_API bnorm_status bnorm_layer_tensor(bnorm_layer *layer, bnorm_tensor_id id, void **data);
/* "weight", "bias", "running_mean", "running_var", "weight.grad", "bias.grad". */
BNORM_API const char *bnorm_tensor_name(bnorm_tensor_id id);

/* num_batches_tracked is in [0, INT64_MAX]. It SATURATES: a training forward at INT64_MAX leaves it
 * there (no wrap to a negative count, which would make a saved file unloadable and the cumulative
 * factor 1 / (num_batches_tracked + 1) negative); at a step per microsecond it takes 292,000 years to
 * get there, so this never differs from PyTorch in practice. The setter refuses a negative value
 * (INVALID_ARGUMENT, nothing changed); a file holding one is refused by bnorm_layer_load (FORMAT). */
BNORM_API bnorm_status bnorm_layer_get_num_batches_tracked(const bnorm_layer *layer, int64_t *out);
BNORM_API bnorm_status bnorm_layer_set_num_batches_tracked(bnorm_layer *layer, int64_t value);

/* Makes the layer synchronized (PyTorch convert_sync_batchnorm): training forwards and backwards use
 * comm (copied into the layer; its ctx must outlive the layer's use). All state is kept. NULL turns
 * synchronization off again. reduce_param_grads: see bnorm_backward_args. */
BNORM_API bnorm_status bnorm_layer_set_comm(bnorm_layer *layer, const bnorm_comm *comm,
                                            int reduce_param_grads);

/* ---------------------------------------------------------------------------------------------
 * State files (safetensors, PyTorch state_dict names) and inference folding
 * ------------------------------------------------------------------------------------------- */

/* Saves the layer's state to path in the safetensors format under the tensor names of a PyTorch
 * state_dict prefixed by prefix (NULL or "" for none; e.g. "layer1.0.bn1."): weight, bias (affine),
 * running_mean, running_var, num_batches_tracked (int64 scalar) (tracking). The layer options are
 * stored in the header's __metadata__. Atomic: a temporary file in the same directory (anonymous,
 * O_TMPFILE, where the system has it; else named) is written, synced and renamed over path. */
BNORM_API bnorm_status bnorm_layer_save(const bnorm_layer *layer, const char *path, const char *prefix);

/* Loads the tensors named prefix + state_dict name from a safetensors file (a whole model's
 * checkpoint may hold many layers). Everything is validated before the layer is touched. */
BNORM_API bnorm_status bnorm_layer_load(bnorm_layer *layer, const char *path, const char *prefix);

/* Details of bnorm_layer_save / bnorm_layer_load (docs/state.md has the full format):
 *   - Saved tensors are of the parameter dtype (F32 or F64), shape [C]; num_batches_tracked is I64, shape [].
 *     The header is padded with spaces so that the data starts on a multiple of 8 bytes.
 *   - Metadata: for each option a string "bnorm.<prefix><key>" with key version ("1"), num_features,
 *     param_dtype ("float32"/"float64"), eps and momentum (decimal, exact round trip), momentum_mode
 *     ("new_weight"/"kept_weight"/"cumulative"), affine, track_running_stats, freeze, fused_relu ("0"/"1").
 *   - Load accepts per-channel tensors of F16, BF16, F32 or F64 (converted to the layer's parameter dtype:
 *     exact when widening, round to nearest even when narrowing, bit copies when the dtype is the same)
 *     shaped (C) or (1, C, 1, ...) as MegEngine stores them; num_batches_tracked is I64 of shape [] or
 *     [1], >= 0, and a file without it loads as 0 (old PyTorch checkpoints).
 *   - The layer's structure (num_features, param_dtype, affine, track_running_stats) never changes: the
 *     file must hold exactly the tensors the layer has (weight and bias iff affine; running_mean and
 *     running_var iff tracking), else BNORM_STATUS_SHAPE_MISMATCH, as PyTorch's strict load_state_dict;
 *     no tensor at all under prefix when the layer needs some gives BNORM_STATUS_FORMAT (wrong prefix).
 *     When the file holds bnorm options for prefix they must agree with its tensors (else FORMAT), and
 *     eps, momentum, momentum_mode, freeze and fused_relu are taken from them; without them the layer
 *     keeps its own options. Gradients and the training flag are neither saved nor loaded.
 *   - Load errors: BNORM_STATUS_IO (cannot open or read; a path that is not a regular file, such as a
 *     FIFO or a device, is refused at once without blocking), BNORM_STATUS_FORMAT (not a valid
 *     safetensors file: every tensor entry of the whole file is checked, and the tensors must tile the
 *     data area with no overlap, hole or trailing byte), BNORM_STATUS_SHAPE_MISMATCH (as above). The
 *     message names the file, the tensor and the rule. On any error the layer is unchanged.
 *   - Limits of a header, each refused with BNORM_STATUS_FORMAT after one scan and before anything is
 *     built: 100,000,000 bytes, 1,000,000 tensors, 1,000,000 __metadata__ entries, shapes of rank 64,
 *     JSON nesting 16. Within them a load or a listing takes time O(h log h) and memory a small
 *     multiple of the header's size h (plus the layer's C values), whatever the header holds.
 *   - Save errors: NULL_POINTER (layer, path), INVALID_ARGUMENT (empty path; prefix not valid UTF-8, as
 *     JSON needs), BNORM_STATUS_IO. A failure before the rename removes the temporary file
 *     ("<path>.tmp-<pid>-<n>") and leaves path as it was; a failure after the rename (closing the synced
 *     file, syncing the directory) is reported too ("saved, but ..."), but path then already holds the
 *     complete new file. A crash never leaves a partial path; with O_TMPFILE it leaves no partial
 *     temporary file either (a kill in the instant between naming the complete file and the rename
 *     leaves it complete under its temporary name), with the named fallback it can leave one. The new
 *     file gets mode 0666 minus the umask. */

/* One BN layer found in a state file by bnorm_state_list. */
typedef struct bnorm_state_entry {
    const char *prefix;            /* pass to bnorm_layer_load, e.g. "layer1.0.bn1." ("" if none) */
    bnorm_layer_options options;   /* ready for bnorm_layer_create */
    int has_options;               /* 1: options were saved by bnorm (exact); 0: inferred from the
                                      tensors (num_features, affine, tracking, param_dtype F64 if a
                                      tensor is stored as F64 else F32) with PyTorch's other defaults */
} bnorm_state_entry;

/* Lists the BN layers a safetensors file holds (the whole file is validated as by bnorm_layer_load).
 * A layer is listed when bnorm_layer_load would accept it: every prefix P with tensors P"running_mean"
 * and P"running_var" (in header order of its running_mean), then every prefix with bnorm options in
 * the metadata but no running statistics (in metadata order). Layers without running statistics that
 * bnorm did not write cannot be told apart from other modules' weight/bias and are not listed.
 * *entries receives ONE allocation holding the array and the prefix strings; release it with
 * bnorm_state_list_free (never free()). *count receives the number of entries; with none, *entries is
 * NULL. On failure *entries = NULL and *count = 0. */
BNORM_API bnorm_status bnorm_state_list(const char *path, bnorm_state_entry **entries, size_t *count);
/* Releases what bnorm_state_list returned; NULL is a no-op. */
BNORM_API void bnorm_state_list_free(bnorm_state_entry *entries);

/* Per-channel scale and shift of an eval layer: y = scale * x + shift
 * (scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale). [C] parameter dtype. */
BNORM_API bnorm_status bnorm_layer_fold_scale_shift(const bnorm_layer *layer, void *scale, void *shift);

/* Folds an eval layer into the preceding convolution or linear layer, as
 * torch.nn.utils.fusion.fuse_conv_bn_eval: weight [C_out, k] (k = product of the other dims,
 * row-major) becomes weight * scale per output channel, bias [C_out] becomes
 * (bias - running_mean) * scale + shift_bias. bias_in may be NULL (no bias: 0); bias_out required.
 * C_out must equal num_features. Arrays of the parameter dtype. weight may be updated in place. */
BNORM_API bnorm_status bnorm_layer_fold_into(const bnorm_layer *layer, int64_t c_out, int64_t k,
                                             const void *weight_in, const void *bias_in,
                                             void *weight_out, void *bias_out);

#ifdef __cplusplus
}
#endif
#endif /* BNORM_H */
