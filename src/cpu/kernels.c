/*
 * kernels.c - instantiates kernel_impl.h for the four dtypes. CMake compiles this file once per
 * instruction set with BN_ISA set to scalar, avx2 or avx512 (and the matching -m flags), giving the
 * tables bn_kernels_scalar, bn_kernels_avx2, bn_kernels_avx512.
 *
 * float16: exact branch-free conversions written with integer and float selects (below), which
 * vectorize in every build (the compiler's _Float16 conversions did not vectorize with GCC 12 and cost
 * a library call per element). bfloat16: integer shifts and round-to-nearest-even in integer SIMD in every
 * build. AVX512-BF16's vcvtneps2bf16 is deliberately not used: it flushes subnormal inputs to zero,
 * which would break bit-exactness with the scalar reference.
 */
#include "kernels.h"
#include <math.h>
#include "simd.h"

#ifndef BN_ISA
#error "compile kernels.c with -DBN_ISA=scalar|avx2|avx512"
#endif
#define BN_CAT2(a, b) a##b
#define BN_CAT(a, b) BN_CAT2(a, b)
#define BN_TABLE BN_CAT(bn_kernels_, BN_ISA)

static inline float bn_bf16_ld(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t bn_bf16_st(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? quiet : rounded);
}

/* float32 */
#define KT float
#define KA float
#define KLD(v) (v)
#define KST(a) (a)
#define KN(name) name##_f32
#define BN_KT_F32 1 /* float32 storage: simd.h's float32 kernels apply */
#include "kernel_impl.h"
#undef BN_KT_F32
#undef KT
#undef KA
#undef KLD
#undef KST
#undef KN

/* float64 */
#define KT double
#define KA double
#define KLD(v) (v)
#define KST(a) (a)
#define KN(name) name##_f64
#include "kernel_impl.h"
#undef KT
#undef KA
#undef KLD
#undef KST
#undef KN

/* float16: branch-free exact conversions (selects instead of branches, so the loops vectorize in
 * every build; the results are bit-identical to half.c's bn_f16_to_f32 / bn_f32_to_f16). */
static inline float bn_u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t bn_f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float bn_f16_ld(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu, man = h & 0x3ffu;
    /* normal and subnormal: the bits shifted into a float, times 2^112, exactly */
    uint32_t fin = bn_f2u(bn_u2f(em << 13) * 0x1p112f);
    uint32_t infnan = 0x7f800000u | (man ? 0x400000u | (man << 13) : 0u); /* NaN quieted, payload kept */
    return bn_u2f(sign | (em >= 0x7c00u ? infnan : fin));
}
static inline uint16_t bn_f16_st(float f) {
    uint32_t u = bn_f2u(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    uint32_t rn = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;     /* normal: nearest even at bit 13 */
    uint32_t rs = bn_f2u(bn_u2f(a) + 0.5f) - 0x3f000000u;                  /* subnormal: units of 2^-24 */
    uint32_t r = a < 0x38800000u ? rs : rn;
    r = a >= 0x477ff000u ? 0x7c00u : r;                                     /* rounds to >= 65520: Inf */
    r = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : r;             /* NaN */
    return (uint16_t)(sign | r);
}
#define KT uint16_t
#define KLD(v) bn_f16_ld(v)
#define KST(a) bn_f16_st(a)
#define KA float
#define KN(name) name##_f16
#include "kernel_impl.h"
#undef KT
#undef KA
#undef KLD
#undef KST
#undef KN

/* bfloat16 */
#define KT uint16_t
#define KA float
#define KLD(v) bn_bf16_ld(v)
#define KST(a) bn_bf16_st(a)
#define KN(name) name##_bf16
#include "kernel_impl.h"
#undef KT
#undef KA
#undef KLD
#undef KST
#undef KN

#define BN_TABLE_ENTRY(sfx)                                                                         \
    {seg_stats_##sfx,       seg_stats_acc_##sfx,   seg_apply_##sfx,       planes_apply_##sfx,       seg_bwd_reduce_##sfx, seg_bwd_apply_##sfx,          \
     rows_sum_##sfx,        rows_dev_##sfx,        rows_stats_##sfx,     rows_apply_##sfx,     rows_bwd_reduce_##sfx,        \
     rows_bwd_apply_##sfx,  run_stats_##sfx,       run_apply_##sfx,      run_mask_u8_##sfx,                \
     run_bwd_reduce_##sfx,  run_bwd_apply_##sfx,   to_f32_##sfx,         from_f32_##sfx,                   \
     mask_copy_##sfx}

const bn_kernels BN_TABLE[4] = {
    [BNORM_DTYPE_F32] = BN_TABLE_ENTRY(f32),
    [BNORM_DTYPE_F64] = BN_TABLE_ENTRY(f64),
    [BNORM_DTYPE_F16] = BN_TABLE_ENTRY(f16),
    [BNORM_DTYPE_BF16] = BN_TABLE_ENTRY(bf16),
};
