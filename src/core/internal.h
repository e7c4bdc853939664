/*
 * internal.h - what the parts of bnorm share but users never see: error reporting, the canonical
 * geometry every tensor is reduced to, float16/bfloat16 scalar conversions and the statistics merge.
 */
#ifndef BNORM_INTERNAL_H
#define BNORM_INTERNAL_H

#include "bnorm/bnorm.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The statistics merge and invstd below are shared with the CUDA kernels (src/cuda/): nvcc compiles
 * them for the device too; in C this is empty. */
#if defined(__CUDACC__)
#define BN_HD __host__ __device__
#else
#define BN_HD
#endif

/* Records a message for bnorm_last_error() ("<func>: <formatted text>") and returns status. */
bnorm_status bn_fail(bnorm_status status, const char *func, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* On failure, prefixes the message with "<func>: " (a public function reporting a nested call's error). */
bnorm_status bn_error_reprefix(const char *func, bnorm_status status);
/* Clears the thread's message at the start of a public call. */
void bn_clear_error(void);

/* Every tensor is viewed as [outer][C][inner]:
 *   planes mode (channels-first with inner > 1): each (o, c) plane is `inner` contiguous elements;
 *   rows mode (channels-last, or channels-first with inner == 1): `outer` rows of C contiguous values.
 * m = outer * inner values per channel. */
typedef struct bn_geom {
    int64_t outer, C, inner;
    int64_t m;
    int64_t numel;
    int planes;
    size_t esize;
} bn_geom;

/* Validates desc (naming the caller in the error) and fills g. */
bnorm_status bn_geom_init(const char *func, const char *what, const bnorm_desc *desc, bn_geom *g);

/* Relu mask: one bit per element, each plane (planes mode) or row (rows mode) starting on a byte. */
static inline int64_t bn_mask_stride(const bn_geom *g) { return ((g->planes ? g->inner : g->C) + 7) / 8; }
static inline int64_t bn_mask_bytes(const bn_geom *g) {
    return (g->planes ? g->outer * g->C : g->outer) * bn_mask_stride(g);
}

/* Exact scalar conversions (round to nearest even, NaN stays NaN and is quieted, overflow to Inf). */
float bn_f16_to_f32(uint16_t h);
uint16_t bn_f32_to_f16(float f);
float bn_bf16_to_f32(uint16_t h);
uint16_t bn_f32_to_bf16(float f);

/* Per-channel partial statistics: count, mean, and M2 = sum of squared deviations from mean. */
typedef struct bn_moments {
    double n, mean, m2;
} bn_moments;

/* Chan et al. pairwise merge of b into a; empty partials are skipped, so order alone fixes results. */
BN_HD static inline void bn_moments_merge(bn_moments *a, double nb, double meanb, double m2b) {
    if (nb <= 0) return;
    if (a->n <= 0) {
        a->n = nb; a->mean = meanb; a->m2 = m2b;
        return;
    }
    double n = a->n + nb;
    double d = meanb - a->mean;
    /* non-finite means: Inf + finite = Inf, Inf - Inf = NaN, as sum / n gives */
    a->mean = (__builtin_isfinite(a->mean) && __builtin_isfinite(meanb)) ? a->mean + d * (nb / n) : a->mean + meanb;
    a->m2 += m2b + d * d * (a->n * nb / n);
    a->n = n;
}

/* 1/sqrt(var + eps), with PyTorch's rule that var + eps == 0 gives 0 (eps = 0, constant channel). */
BN_HD static inline double bn_invstd(double var, double eps) {
    double v = var + eps;
    return v == 0.0 ? 0.0 : 1.0 / __builtin_sqrt(v);
}

/* Reads/writes element i of a [C] array of parameter dtype pd (F32 or F64), through memcpy so that
 * no alignment is assumed of caller arrays. */
static inline double bn_param_get(const void *p, bnorm_dtype pd, int64_t i) {
    if (pd == BNORM_DTYPE_F64) {
        double d;
        memcpy(&d, (const char *)p + 8 * i, 8);
        return d;
    }
    float f;
    memcpy(&f, (const char *)p + 4 * i, 4);
    return (double)f;
}
static inline void bn_param_set(void *p, bnorm_dtype pd, int64_t i, double v) {
    if (pd == BNORM_DTYPE_F64) {
        memcpy((char *)p + 8 * i, &v, 8);
    } else {
        float f = (float)v;
        memcpy((char *)p + 4 * i, &f, 4);
    }
}

/* Argument rules of the functional level shared by every backend (plan.c): the configuration and
 * the data checks of a plan, in one call. func names the public function in the messages. */
bnorm_status bn_forward_check(const char *func, const bnorm_forward_args *a, bn_geom *g);
bnorm_status bn_backward_check(const char *func, const bnorm_backward_args *a, bn_geom *g);

/* Copies a caller's struct whose first member is `size_t struct_size` into dst (lib_size bytes, the
 * library's sizeof), following the ABI policy of bnorm.h: 0 means v1_size; bytes beyond the caller's
 * size are zero; a larger caller struct must have an all-zero unknown tail. */
bnorm_status bn_struct_in(const char *func, const char *what, const void *src, void *dst, size_t lib_size,
                          size_t v1_size);
#define BN_V1_SIZE(type, last) (offsetof(type, last) + sizeof(((type *)0)->last))
#define BN_FWD_V1 BN_V1_SIZE(bnorm_forward_args, save_mean_lo)
#define BN_BWD_V1 BN_V1_SIZE(bnorm_backward_args, mean_lo)

/* The synchronized-statistics exchange shared by every backend (comm.c): BN_COMM_HDR doubles of
 * header (protocol, operation, C, dtype, layout, flags) lead every rank's contribution, so a group
 * whose ranks disagree gets BNORM_STATUS_COMM_MISMATCH. Payload after the header: the count, then
 * three blocks of C doubles (forward: mean, M2, zeros; backward: sum g, sum g*(x - mean), and for
 * float64 data the sums of x - mean), the same size for both operations, so ranks running different
 * operations disagree on the header, never on the size. Ranks of different backends can share a group. */
enum { BN_COMM_HDR = 8, BN_COMM_FORWARD = 1, BN_COMM_BACKWARD = 2 };
#define BN_COMM_COUNT(C) (BN_COMM_HDR + 1 + 3 * (size_t)(C))
bnorm_status bn_comm_check(const char *func, const bnorm_comm *c);
void bn_comm_header(double *h, int op, const bnorm_desc *d, int flags);
/* Optional header-only validation (c->validate), then the all-gather of count doubles (header
 * included) into recv (c->size * count doubles), and the headers compared. */
bnorm_status bn_comm_exchange(const char *func, const bnorm_comm *c, double *send, size_t count, double *recv);

#endif
