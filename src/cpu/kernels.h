/*
 * kernels.h - the CPU kernel table. The driver (driver.c) splits work and calls these on contiguous
 * pieces; kernels never thread and never allocate. One table per (instruction set, dtype).
 *
 * "seg" kernels work on one contiguous plane of n values of a single channel (channels-first);
 * "rows" kernels on `rows` consecutive rows of C channel values (channels-last, or rank 2).
 * Per-channel arrays passed as const void * are of the compute type: float for F32/F16/BF16 data,
 * double for F64. Means come as hi + lo pairs (double arguments are split inside; arrays come as two
 * arrays) so that x - mean is accurate even when the mean is large. Accumulators are always double. Masks hold one bit per element, a plane or a row
 * starting on a byte (row r of a rows kernel at mask + r * mstride).
 * `stream` (apply kernels): write the outputs with non-temporal stores (large tensors whose output is
 * not re-read soon); any alignment works, results are identical either way. Kernels do not fence:
 * the driver issues bn_stream_fence once per thread after its last streaming kernel (a fence per call
 * cost 10-17% on 28x28 planes, docs/performance.md note 24).
 */
#ifndef BNORM_CPU_KERNELS_H
#define BNORM_CPU_KERNELS_H

#include "../core/internal.h"

/* Lanes of the double accumulators of the reductions (kernel_impl.h's BN_ACC). */
enum { BN_STATS_LANES = 32 };

typedef struct bn_kernels {
    /* Moments of x[0..n): *mean, *m2 = sum (x - mean)^2. n >= 1. One pass shifted by x[0] (two passes
     * for float64 data and for planes with non-finite sums); see kernel_impl.h. */
    void (*seg_stats)(const void *x, int64_t n, double *mean, double *m2);
    /* Shifted sums of a plane added to a channel's lane accumulators: for d = x - k (in double),
     * acc[j] += d and acc[BN_STATS_LANES + j] += d^2 for the values i with i mod BN_STATS_LANES = j.
     * The caller folds the lanes once per channel. Not for float64 data. */
    void (*seg_stats_acc)(const void *x, int64_t n, double k, double *acc);
    /* y = (x - mean) * scale + shift [+ add]; relu: y = max(z, 0) with NaN kept; mask (if not NULL)
     * bit = z > 0. */
    void (*seg_apply)(const void *x, void *y, const void *add, uint8_t *mask, int64_t n, double mean,
                      double scale, double shift, int relu, int stream);
    /* seg_apply's expression over np consecutive planes of inner values, the first of channel c0, with
     * per-channel coefficient arrays of C (compute type, mean as hi + lo); no mask. One flat walk. */
    void (*planes_apply)(const void *x, void *y, const void *add, int64_t np, int64_t inner, int64_t C, int64_t c0,
                         const void *mean, const void *mean_lo, const void *scale, const void *shift, int relu,
                         int stream);
    /* g = dy [* mask bit]; *sg += sum g; *sgx += sum g * (x - mean). */
    void (*seg_bwd_reduce)(const void *x, const void *dy, const uint8_t *mask, int64_t n, double mean,
                           double *sg, double *sgx);
    /* g = dy [* mask bit]; dadd = g (if not NULL); dx = g * k1 - k2 - (x - mean) * k3 (if not NULL). */
    void (*seg_bwd_apply)(const void *x, const void *dy, const uint8_t *mask, void *dx, void *dadd,
                          int64_t n, double mean, double k1, double k2, double k3, int stream);
    /* acc[c] += sum over rows of x[r][c]. */
    void (*rows_sum)(const void *x, int64_t rows, int64_t C, double *acc);
    /* s1[c] += sum (x - ref[c]), s2[c] += sum (x - ref[c])^2; ref of compute type. */
    void (*rows_dev)(const void *x, int64_t rows, int64_t C, const void *ref, double *s1, double *s2);
    /* Shifted one-pass sums: s1[c] += sum (x - k[c]), s2[c] += sum (x - k[c])^2; k of compute type.
     * Not for float64 data (which keep rows_sum + rows_dev). */
    void (*rows_stats)(const void *x, int64_t rows, int64_t C, const void *k, double *s1, double *s2);
    void (*rows_apply)(const void *x, void *y, const void *add, uint8_t *mask, int64_t mstride,
                       int64_t rows, int64_t C, const void *mean, const void *mean_lo, const void *scale,
                       const void *shift, int relu, int stream);
    void (*rows_bwd_reduce)(const void *x, const void *dy, const uint8_t *mask, int64_t mstride,
                            int64_t rows, int64_t C, const void *mean, const void *mean_lo, double *sg,
                            double *sgx);
    void (*rows_bwd_apply)(const void *x, const void *dy, const uint8_t *mask, int64_t mstride, void *dx,
                           void *dadd, int64_t rows, int64_t C, const void *mean, const void *mean_lo,
                           const void *k1, const void *k2, const void *k3, int stream);
    /* Runs of small planes (kernel_impl.h): n = np * inner contiguous values, per-channel quantities
     * expanded to one entry per value (compute type). run_stats is NULL for float64 data. */
    void (*run_stats)(const void *x, int64_t n, const void *k, double *s1, double *s2);
    void (*run_apply)(const void *x, void *y, const void *add, uint8_t *mask, int64_t mstride, int64_t np,
                      int64_t inner, const void *mh, const void *ml, const void *sc, const void *sh, int relu);
    void (*run_mask_u8)(const uint8_t *mask, int64_t mstride, int64_t np, int64_t inner, uint8_t *m);
    void (*run_bwd_reduce)(const void *x, const void *dy, const uint8_t *m, int64_t n, const void *mh,
                           const void *ml, double *ag, double *agx);
    void (*run_bwd_apply)(const void *x, const void *dy, const uint8_t *m, void *dx, void *dadd, int64_t n,
                          const void *mh, const void *ml, const void *k1, const void *k2, const void *k3);
    /* Storage <-> float32 conversion of n values (identity copies for F32; NULL for F64). */
    void (*to_f32)(const void *src, float *dst, int64_t n);
    void (*from_f32)(const float *src, void *dst, int64_t n);
    /* out = mask bit ? dy : 0 over n contiguous values with contiguous mask bits (the masked gradient of
     * the fused ReLU, written once for the rows backward; driver.c, bn_bwd_masked_rows). */
    void (*mask_copy)(const void *dy, const uint8_t *mask, int64_t n, void *out);
} bn_kernels;

/* Schedule parameters of this CPU (tuning.c), settled once per process. */
enum { BN_VENDOR_OTHER = 0, BN_VENDOR_INTEL = 1, BN_VENDOR_AMD = 2 };
typedef struct bn_tuning {
    int vendor;
    size_t l1d, l2, l3;       /* bytes; 0: unknown or implausible */
    size_t l1d_or_default;    /* l1d, or 48 KiB when unknown */
    const char *source;       /* "cpuid", "sysconf" or "defaults" */
    size_t l2_budget;         /* channel schedule: bytes of a block of channels' slices */
    size_t row_group_bytes;   /* row kernels: bytes of a group of rows walked in column blocks */
    size_t apply_piece_bytes; /* split schedule: rows applied per piece, back to front */
    int apply_back_to_front;  /* training forward on rows: apply back to front (1) or front to back */
    size_t row_walk_max_bytes; /* rows of at most this many bytes are walked row by row (0: never) */
    size_t stream_rows_min_bytes; /* rows outputs of at least this many bytes are streamed */
    size_t stream_rows_bwd_min_bytes; /* the same for the backward's dx */
    size_t stream_planes_min_bytes; /* the same for planes (channels-first) */
    int stream_planes_inference; /* 0: inference on planes (one flat walk) never streams */
    char text[384];           /* the above, for BNORM_VERBOSE */
} bn_tuning;
const bn_tuning *bn_tuning_get(void);

/* Tables indexed by bnorm_dtype, one per instruction set (NULL entries where not built). */
extern const bn_kernels bn_kernels_scalar[4];
extern const bn_kernels bn_kernels_avx2[4];
extern const bn_kernels bn_kernels_avx512[4];

/* The table in use for dtype (after CPU detection and the BNORM_ISA cap). */
const bn_kernels *bn_kernels_for(bnorm_dtype dtype);
/* The table of a given variant, or NULL if not built or not supported by this CPU. */
const bn_kernels *bn_kernels_variant(bnorm_isa isa, bnorm_dtype dtype);

#endif
