/*
 * kernels.c - instantiates kernel_impl.h for the four dtypes. CMake compiles this file once per
 * instruction set with BN_ISA set to scalar, avx2 or avx512 (and the matching -m flags), giving the
 * tables bn_kernels_scalar, bn_kernels_avx2, bn_kernels_avx512.
 *
 * float16: with F16C (the AVX2 and AVX-512 builds) the compiler's _Float16 conversions become
 * vcvtph2ps/vcvtps2ph, which round exactly as IEEE says; the scalar build uses the exact software
 * conversion of half.c. bfloat16: integer shifts and round-to-nearest-even in integer SIMD in every
 * build. AVX512-BF16's vcvtneps2bf16 is deliberately not used: it flushes subnormal inputs to zero,
 * which would break bit-exactness with the scalar reference.
 */
#include "kernels.h"

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
#include "kernel_impl.h"
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

/* float16 */
#if defined(__F16C__) && defined(__FLT16_MAX__)
#define KT _Float16
#define KLD(v) ((float)(v))
#define KST(a) ((_Float16)(a))
#else
#define KT uint16_t
#define KLD(v) bn_f16_to_f32(v)
#define KST(a) bn_f32_to_f16(a)
#endif
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
    {seg_stats_##sfx,       seg_apply_##sfx,       seg_bwd_reduce_##sfx, seg_bwd_apply_##sfx,          \
     rows_sum_##sfx,        rows_dev_##sfx,        rows_apply_##sfx,     rows_bwd_reduce_##sfx,        \
     rows_bwd_apply_##sfx,  to_f32_##sfx,          from_f32_##sfx}

const bn_kernels BN_TABLE[4] = {
    [BNORM_DTYPE_F32] = BN_TABLE_ENTRY(f32),
    [BNORM_DTYPE_F64] = BN_TABLE_ENTRY(f64),
    [BNORM_DTYPE_F16] = BN_TABLE_ENTRY(f16),
    [BNORM_DTYPE_BF16] = BN_TABLE_ENTRY(bf16),
};
