/*
 * simd.h - the few operations the kernels cannot express as portable `omp simd` loops, each with one
 * definition per instruction set (chosen by the compiler flags kernels.c is built with: __AVX512F__,
 * __AVX2__, or neither for the portable build). kernel_impl.h is written once against these:
 *
 *   bn_stream_copy(dst, src, bytes)   copies a staged chunk to its destination with non-temporal
 *                                     (streaming) stores for the 64-byte-aligned middle and ordinary
 *                                     stores for a misaligned head/tail; any alignment works.
 *   bn_stream_fence()                 orders the streaming stores; the driver issues it once per thread
 *                                     after that thread's last streaming store (kernels never fence).
 *   bn_gt0_bits_f32/_f64(z, n, bits) bit j of bits = (z[j] > 0), n values, ceil(n/8) bytes written
 *                                     (the unused high bits of the last byte are 0).
 *   bn_bits_to_u8(bits, n, out)       out[j] = bit j of bits (0 or 1), n values.
 *   bn_mask_copy(src, bits, n, dst, es)
 *                                     dst[j] = bit j of bits ? src[j] : 0 (all bits zero), n elements
 *                                     of es = 2, 4 or 8 bytes copied as bit patterns.
 *
 * Every definition gives identical results (they only move or compare values).
 */
#ifndef BNORM_CPU_SIMD_H
#define BNORM_CPU_SIMD_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Non-temporal copy (any alignment: the unaligned head and tail use ordinary stores). The SSE2 form
 * is what the driver (compiled for the baseline x86-64 ISA) gets: it streams the staged runs too. */
static inline void bn_stream_copy(void *dstv, const void *srcv, size_t bytes) {
    char *dst = (char *)dstv;
    const char *src = (const char *)srcv;
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
    size_t head = (size_t)(-(uintptr_t)dst & 63);
    if (head > bytes) head = bytes;
    memcpy(dst, src, head);
    dst += head, src += head, bytes -= head;
    size_t body = bytes & ~(size_t)63;
    for (size_t i = 0; i < body; i += 64) {
#if defined(__AVX512F__)
        _mm512_stream_si512((__m512i *)(void *)(dst + i), _mm512_loadu_si512((const void *)(src + i)));
#elif !defined(__AVX2__)
        for (size_t q = 0; q < 64; q += 16)
            _mm_stream_si128((__m128i *)(void *)(dst + i + q), _mm_loadu_si128((const __m128i *)(const void *)(src + i + q)));
#else
        _mm256_stream_si256((__m256i *)(void *)(dst + i), _mm256_loadu_si256((const __m256i *)(const void *)(src + i)));
        _mm256_stream_si256((__m256i *)(void *)(dst + i + 32),
                            _mm256_loadu_si256((const __m256i *)(const void *)(src + i + 32)));
#endif
    }
    memcpy(dst + body, src + body, bytes - body);
#else
    memcpy(dst, src, bytes);
#endif
}

/* Values in the next piece of an output written piece by piece, starting at out with `left` values to
 * go: about `piece` bytes, ending on a 64-byte line of the output (the values up to the next line, then
 * whole lines), so consecutive pieces never split a line between two streaming writes. out is aligned
 * to its element size es. */
static inline int64_t bn_line_piece(const void *out, size_t es, int64_t left, size_t piece) {
    const size_t head = (size_t)(-(uintptr_t)out & 63);
    int64_t len = (int64_t)((head >= piece ? piece : head + (piece - head) / 64 * 64) / es);
    if (len < 1) len = (int64_t)(piece / es);
    return left < len ? left : len;
}

/* Rows of exactly w float32 values (w = 16, 32 or 64, a constant where it is inlined; y 64-byte
 * aligned, so every row is whole lines): y = (x - mh - ml) * sc + sh [+ add] [ReLU], written with
 * non-temporal stores straight from the registers, the coefficients kept in registers. The expression
 * and its roundings are kernel_impl.h's BN_APPLY_LOOPS (the build does not contract a * b + c), and the
 * ReLU is its z <= 0 ? +0 : z (NaN kept), so results equal the portable loops' bit for bit
 * (test_kernels). Staging a row and copying it costs more: EPYC, NHWC 32x64x56x56 inference in
 * isolation, 2 threads, 0.71-0.78 ms staged in chunks of 256, 0.59-0.60 ms from the registers. */
#if defined(__AVX512F__)
#define BN_HAVE_NT_ROWS_F32 1
/* One vector of the forward apply: (x - mh - ml) * sc + sh [+ add] [ReLU: z <= 0 -> +0, NaN kept]. */
static inline __attribute__((always_inline)) __m512 bn_apply_vec_f32(__m512 x, __m512 mh, __m512 ml, __m512 sc,
                                                                      __m512 sh, const float *add, int relu) {
    __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(x, mh), ml), sc), sh);
    if (add) v = _mm512_add_ps(v, _mm512_loadu_ps(add));
    if (relu) v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NLE_UQ), v);
    return v;
}
/* One vector of the backward apply: g * k1 - k2 - (x - mh - ml) * k3. */
static inline __attribute__((always_inline)) __m512 bn_bwd_vec_f32(__m512 g, __m512 x, __m512 mh, __m512 ml,
                                                                    __m512 k1, __m512 k2, __m512 k3) {
    const __m512 a = _mm512_sub_ps(_mm512_mul_ps(g, k1), k2);
    return _mm512_sub_ps(a, _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(x, mh), ml), k3));
}
static inline __attribute__((always_inline)) void bn_nt_rows_f32(const float *x, float *y, const float *add,
                                                                  int64_t rows, const int w, const float *mh,
                                                                  const float *ml, const float *sc, const float *sh,
                                                                  int relu) {
    __m512 vmh[4], vml[4], vsc[4], vsh[4];
    const int nv = w / 16;
    for (int j = 0; j < nv; j++) {
        vmh[j] = _mm512_loadu_ps(mh + 16 * j);
        vml[j] = _mm512_loadu_ps(ml + 16 * j);
        vsc[j] = _mm512_loadu_ps(sc + 16 * j);
        vsh[j] = _mm512_loadu_ps(sh + 16 * j);
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * w, *ar = add ? add + r * w : NULL;
        float *yr = y + r * w;
        for (int j = 0; j < nv; j++)
            _mm512_stream_ps(yr + 16 * j, bn_apply_vec_f32(_mm512_loadu_ps(xr + 16 * j), vmh[j], vml[j], vsc[j],
                                                           vsh[j], ar ? ar + 16 * j : NULL, relu));
    }
}

/* Rows of C float32 values (C a multiple of 16, y 64-byte aligned): bn_nt_rows_f32's expression with
 * the coefficients read from memory, stored from the registers. ml == NULL: every low part of the mean
 * is +0 (inference: the running mean is a float), and x - mh - (+0) is x - mh for every x, the sign of
 * zero included, so the same bits come from one array and one subtraction fewer. That was 1.05-1.18x
 * faster at NHWC 32x2048x7x7 inference (EPYC, bnorm_ab, three runs of 15 rounds), where the four
 * arrays of 8 KiB beside the stream cost most. */
static inline void bn_nt_wide_rows_f32(const float *x, float *y, const float *add, int64_t rows, int64_t C,
                                       const float *mh, const float *ml, const float *sc, const float *sh,
                                       int relu) {
    if (!ml) {
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * C, *ar = add ? add + r * C : NULL;
            float *yr = y + r * C;
            for (int64_t j = 0; j < C; j += 16) {
                __m512 v = _mm512_add_ps(
                    _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + j), _mm512_loadu_ps(mh + j)), _mm512_loadu_ps(sc + j)),
                    _mm512_loadu_ps(sh + j));
                if (ar) v = _mm512_add_ps(v, _mm512_loadu_ps(ar + j));
                if (relu) v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NLE_UQ), v);
                _mm512_stream_ps(yr + j, v);
            }
        }
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * C, *ar = add ? add + r * C : NULL;
        float *yr = y + r * C;
        for (int64_t j = 0; j < C; j += 16)
            _mm512_stream_ps(yr + j, bn_apply_vec_f32(_mm512_loadu_ps(xr + j), _mm512_loadu_ps(mh + j),
                                                      _mm512_loadu_ps(ml + j), _mm512_loadu_ps(sc + j),
                                                      _mm512_loadu_ps(sh + j), ar ? ar + j : NULL, relu));
    }
}

/* The backward apply on rows of C float32 values (C a multiple of 16, dx 64-byte aligned), stored from the
 * registers: dx = g * k1 - k2 - (x - mh - ml) * k3, or g * k1 without x; with `four`, four rows per
 * pass, each vector of coefficients loaded once for the four (kernel_impl.h's bn_rows_wide). */
static inline void bn_nt_wide_bwd_rows_f32(const float *x, const float *dy, float *dx, int64_t rows, int64_t C,
                                           const float *mh, const float *ml, const float *k1, const float *k2,
                                           const float *k3, int four) {
    int64_t r = 0;
    const int q_n = four ? 4 : 1;
    for (; r + q_n <= rows; r += q_n)
        for (int64_t j = 0; j < C; j += 16) {
            const __m512 a1 = _mm512_loadu_ps(k1 + j);
            if (x) {
                const __m512 h = _mm512_loadu_ps(mh + j), l = _mm512_loadu_ps(ml + j);
                const __m512 a2 = _mm512_loadu_ps(k2 + j), a3 = _mm512_loadu_ps(k3 + j);
                for (int q = 0; q < q_n; q++) {
                    const int64_t o = (r + q) * C + j;
                    _mm512_stream_ps(dx + o, bn_bwd_vec_f32(_mm512_loadu_ps(dy + o), _mm512_loadu_ps(x + o), h, l,
                                                            a1, a2, a3));
                }
            } else {
                for (int q = 0; q < q_n; q++) {
                    const int64_t o = (r + q) * C + j;
                    _mm512_stream_ps(dx + o, _mm512_mul_ps(_mm512_loadu_ps(dy + o), a1));
                }
            }
        }
    if (r < rows) bn_nt_wide_bwd_rows_f32(x ? x + r * C : NULL, dy + r * C, dx + r * C, rows - r, C, mh, ml, k1, k2, k3, 0);
}

/* The backward apply on the same rows: dx = g * k1 - k2 - (x - mh - ml) * k3 with g = dy, or dx = g * k1
 * without x (eval), kernel_impl.h's BN_BWD_LOOPS expression, stored from the registers. */
static inline __attribute__((always_inline)) void bn_nt_bwd_rows_f32(const float *x, const float *dy, float *dx,
                                                                      int64_t rows, const int w, const float *mh,
                                                                      const float *ml, const float *k1,
                                                                      const float *k2, const float *k3) {
    __m512 vmh[4], vml[4], v1[4], v2[4], v3[4];
    const int nv = w / 16;
    for (int j = 0; j < nv; j++) {
        vmh[j] = _mm512_loadu_ps(mh + 16 * j);
        vml[j] = _mm512_loadu_ps(ml + 16 * j);
        v1[j] = _mm512_loadu_ps(k1 + 16 * j);
        v2[j] = _mm512_loadu_ps(k2 + 16 * j);
        v3[j] = _mm512_loadu_ps(k3 + 16 * j);
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *gr = dy + r * w;
        float *o = dx + r * w;
        if (x) {
            const float *xr = x + r * w;
            for (int j = 0; j < nv; j++)
                _mm512_stream_ps(o + 16 * j, bn_bwd_vec_f32(_mm512_loadu_ps(gr + 16 * j), _mm512_loadu_ps(xr + 16 * j),
                                                            vmh[j], vml[j], v1[j], v2[j], v3[j]));
        } else {
            for (int j = 0; j < nv; j++) _mm512_stream_ps(o + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(gr + 16 * j), v1[j]));
        }
    }
}
#endif

static inline void bn_stream_fence(void) {
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
    _mm_sfence();
#endif
}

static inline void bn_gt0_bits_f32(const float *z, int64_t n, uint8_t *bits) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(z + i), _mm512_setzero_ps(), _CMP_GT_OQ);
        bits[i >> 3] = (uint8_t)(k & 0xff);
        bits[(i >> 3) + 1] = (uint8_t)(k >> 8);
    }
#elif defined(__AVX2__)
    for (; i + 8 <= n; i += 8)
        bits[i >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + i), _mm256_setzero_ps(), _CMP_GT_OQ));
#endif
    for (; i < n; i += 8) {
        unsigned b = 0;
        for (int64_t j = 0; j < 8 && i + j < n; j++) b |= (unsigned)(z[i + j] > 0.0f) << j;
        bits[i >> 3] = (uint8_t)b;
    }
}

static inline void bn_gt0_bits_f64(const double *z, int64_t n, uint8_t *bits) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 8 <= n; i += 8)
        bits[i >> 3] = (uint8_t)_mm512_cmp_pd_mask(_mm512_loadu_pd(z + i), _mm512_setzero_pd(), _CMP_GT_OQ);
#endif
    for (; i < n; i += 8) {
        unsigned b = 0;
        for (int64_t j = 0; j < 8 && i + j < n; j++) b |= (unsigned)(z[i + j] > 0.0) << j;
        bits[i >> 3] = (uint8_t)b;
    }
}

static inline void bn_bits_to_u8(const uint8_t *bits, int64_t n, uint8_t *out) {
    int64_t i = 0;
#if defined(__AVX512BW__)
    for (; i + 64 <= n; i += 64) {
        uint64_t k;
        memcpy(&k, bits + (i >> 3), 8);
        _mm512_storeu_si512((void *)(out + i), _mm512_maskz_set1_epi8((__mmask64)k, 1));
    }
#endif
    /* 8 at a time, any ISA: byte j of (b * 0x0101..01) & 0x8040..01 is bit j of b in place j; adding
       0x7f to each byte carries into its top bit exactly when it is nonzero (no carry across bytes) */
    for (; i + 8 <= n; i += 8) {
        uint64_t v = ((uint64_t)bits[i >> 3] * 0x0101010101010101ull) & 0x8040201008040201ull;
        v = ((v + 0x7f7f7f7f7f7f7f7full) >> 7) & 0x0101010101010101ull;
        memcpy(out + i, &v, 8);
    }
    for (; i < n; i++) out[i] = (uint8_t)((bits[i >> 3] >> (i & 7)) & 1);
}

static inline void bn_mask_copy(const void *src, const uint8_t *bits, int64_t n, void *dst, size_t es) {
    int64_t i = 0;
    const char *s = (const char *)src;
    char *d = (char *)dst;
#if defined(__AVX512F__)
    if (es == 4) {
        for (; i + 16 <= n; i += 16) {
            uint16_t k;
            memcpy(&k, bits + (i >> 3), 2);
            _mm512_storeu_si512((void *)(d + 4 * i), _mm512_maskz_loadu_epi32((__mmask16)k, s + 4 * i));
        }
    } else if (es == 8) {
        for (; i + 8 <= n; i += 8)
            _mm512_storeu_si512((void *)(d + 8 * i), _mm512_maskz_loadu_epi64((__mmask8)bits[i >> 3], s + 8 * i));
    }
#if defined(__AVX512BW__)
    else if (es == 2) {
        for (; i + 32 <= n; i += 32) {
            uint32_t k;
            memcpy(&k, bits + (i >> 3), 4);
            _mm512_storeu_si512((void *)(d + 2 * i), _mm512_maskz_loadu_epi16((__mmask32)k, s + 2 * i));
        }
    }
#endif
#elif defined(__AVX2__)
    if (es == 4) { /* lane j keeps its value when bit j of the byte is set */
        const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (; i + 8 <= n; i += 8) {
            const __m256i b = _mm256_and_si256(_mm256_set1_epi32(bits[i >> 3]), sel);
            const __m256i keep = _mm256_cmpeq_epi32(b, sel);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(s + 4 * i));
            _mm256_storeu_si256((__m256i *)(void *)(d + 4 * i), _mm256_and_si256(v, keep));
        }
    }
#endif
    for (; i < n; i++) {
        const int on = (bits[i >> 3] >> (i & 7)) & 1;
        if (on) memcpy(d + es * (size_t)i, s + es * (size_t)i, es);
        else memset(d + es * (size_t)i, 0, es);
    }
}

/* bits of z > 0 for a compute-type array (float or double) */
#define BN_GT0_BITS(z, n, bits) _Generic((z), float *: bn_gt0_bits_f32, double *: bn_gt0_bits_f64)((z), (n), (bits))

#endif
