/*
 * kernel_impl.h - the CPU kernels, written once. kernels.c includes this file once per dtype with
 *   KT        the storage type of tensor elements,
 *   KA        the compute type (float, or double for float64 data),
 *   KLD(v)    storage -> compute conversion, KST(a) compute -> storage conversion,
 *   KN(name)  the instantiated function name,
 * and kernels.c itself is compiled once per instruction set (scalar, AVX2, AVX-512), so these loops
 * are vectorized for each target by the compiler (the `omp simd` pragmas allow the reassociation that
 * reductions need; the order is fixed at compile time, so results are reproducible).
 */

/* The mean enters every kernel as hi + lo (two values of the compute type): x - hi is exact when x
 * is near the mean (Sterbenz), so x - hi - lo keeps the deviation accurate to its own last bit even
 * when |mean| is much larger than the spread: float32 data get float32-accurate outputs. */

/* Reductions keep BN_ACC independent double partial sums (an array the compiler maps onto several
 * vector registers), so the adds of consecutive vectors do not wait on each other's latency; the
 * partials are then added in a fixed order. The summation order depends only on n (and the instruction
 * set's build), so results stay reproducible. */
#ifndef BN_ACC_DEFINED
#define BN_ACC_DEFINED
enum { BN_ACC = BN_STATS_LANES };
/* acc + d * d with one rounding where the target has FMA (the build is ISO C, which does not
 * contract a * b + c on its own); a plain multiply-add in the scalar build. */
#if defined(__FMA__) && defined(__GNUC__)
#define BN_SQ_ACC(acc, d) ((acc) = __builtin_fma((d), (d), (acc)))
#else
#define BN_SQ_ACC(acc, d) ((acc) += (d) * (d))
#endif
/* Pairwise total of the partials (destroys v): a fixed tree, vectorized. */
static inline double bn_acc_total(double *v) {
    for (int w = BN_ACC / 2; w >= 1; w /= 2) {
#pragma omp simd
        for (int j = 0; j < w; j++) v[j] += v[j + w];
    }
    return v[0];
}
#endif

/* Two-pass moments with the compensating term s1 (Chan, Golub & LeVeque's corrected two-pass):
 * m2 = sum (x - r)^2 - (sum (x - r))^2 / n stays exact even though r is the rounded mean. Used for
 * float64 data and as the fallback of the one-pass seg_stats below. */
static void KN(seg_stats2)(const KT *x, int64_t n, double *mean, double *m2) {
    /* short planes (7x7, 14x14) go straight to the single-accumulator loops: less fixed cost */
    const int64_t nb = n < 4 * BN_ACC ? 0 : n - n % BN_ACC;
    double v0[BN_ACC], v1[BN_ACC], v2[BN_ACC];
    if (nb)
        for (int j = 0; j < BN_ACC; j++) v0[j] = v1[j] = v2[j] = 0;
    for (int64_t i = 0; i < nb; i += BN_ACC) {
#pragma omp simd
        for (int j = 0; j < BN_ACC; j++) v0[j] += (double)KLD(x[i + j]);
    }
    double s = nb ? bn_acc_total(v0) : 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = nb; i < n; i++) s += (double)KLD(x[i]);
    KA r = (KA)(s / (double)n);
    for (int64_t i = 0; i < nb; i += BN_ACC) {
#pragma omp simd
        for (int j = 0; j < BN_ACC; j++) {
            double d = (double)(KLD(x[i + j]) - r);
            v1[j] += d;
            v2[j] += d * d;
        }
    }
    double s1 = nb ? bn_acc_total(v1) : 0.0, s2 = nb ? bn_acc_total(v2) : 0.0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = nb; i < n; i++) {
        double d = (double)(KLD(x[i]) - r);
        s1 += d;
        s2 += d * d;
    }
    *mean = __builtin_isfinite((double)r) ? (double)r + s1 / (double)n : (double)r; /* +-Inf: the mean is that Inf */
    *m2 = s2 - s1 * s1 / (double)n;
    if (*m2 < 0) *m2 = 0;
}

/* Moments of a plane in one pass (float32/float16/bfloat16 data; float64 data keep the two passes).
 * With the shift K = x[0], every value is read once: d = x - K is formed in double (float32 values
 * have 24-bit significands, so the difference is exact unless the two are more than 2^29 apart, and
 * then it is off by at most 2^-53 of itself), s1 = sum d and s2 = sum d^2 are accumulated in double,
 * and mean = K + s1 / n, m2 = s2 - s1^2 / n.
 * Why this is accurate, unlike the unshifted E[x^2] - E[x]^2 that the numerics contract forbids: the
 * subtraction s2 - s1^2 / n cancels (mean - K)^2 against the variance, not mean^2. Since
 * s2 = m2 + n (mean - K)^2, it loses a factor s2 / m2 = 1 + n (mean - K)^2 / m2 of relative accuracy.
 * K is one of the n values, so (K - mean)^2 <= sum (x - mean)^2 = m2 and that factor is at most 1 + n
 * whatever the data: accumulated in double (2^-53), m2 keeps a relative accuracy of about
 * (n + 1) 2^-52 even in the worst case (an outlier as K), far inside float32's 2^-24 for any plane.
 * For ordinary data K lies within a few standard deviations of the mean and the factor is a few
 * units: 1e6 + N(0,1) loses nothing, where the unshifted form would cancel 1e12 against 1.
 * Non-finite sums (an Inf or NaN anywhere, K included, or an overflow) are recomputed by the two-pass
 * path, so those planes get exactly the results they had before. */
static void KN(seg_stats)(const void *xv, int64_t n, double *mean, double *m2) {
    const KT *x = (const KT *)xv;
    if (sizeof(KA) > sizeof(float)) {
        KN(seg_stats2)(x, n, mean, m2);
        return;
    }
    const double k = (double)KLD(x[0]);
    const int64_t nb = n < 4 * BN_ACC ? 0 : n - n % BN_ACC;
    double v1[BN_ACC], v2[BN_ACC];
    if (nb)
        for (int j = 0; j < BN_ACC; j++) v1[j] = v2[j] = 0;
    for (int64_t i = 0; i < nb; i += BN_ACC) {
#pragma omp simd
        for (int j = 0; j < BN_ACC; j++) {
            double d = (double)KLD(x[i + j]) - k;
            v1[j] += d;
            BN_SQ_ACC(v2[j], d);
        }
    }
    double s1 = nb ? bn_acc_total(v1) : 0.0, s2 = nb ? bn_acc_total(v2) : 0.0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = nb; i < n; i++) {
        double d = (double)KLD(x[i]) - k;
        s1 += d;
        BN_SQ_ACC(s2, d);
    }
    if (!__builtin_isfinite(s2) || !__builtin_isfinite(s1)) { /* also catches a non-finite K */
        KN(seg_stats2)(x, n, mean, m2);
        return;
    }
    *mean = k + s1 / (double)n;
    *m2 = s2 - s1 * s1 / (double)n;
    if (*m2 < 0) *m2 = 0;
}

/* The channel schedule's statistics (float32/16/bf16 data): one shift k for all planes of a channel
 * (its first value) and lane accumulators that live across the planes, so a plane costs its loop only,
 * with no reduction, division or merge of its own (on 28x28 planes those were about half of
 * seg_stats' time). The accuracy argument of seg_stats holds with n the channel's count; the driver
 * folds the lanes in a fixed order and recomputes channels whose sums are not finite with seg_stats. */
static void KN(seg_stats_acc)(const void *xv, int64_t n, double k, double *acc) {
    const KT *x = (const KT *)xv;
    const int64_t nb = n - n % BN_ACC;
    double v1[BN_ACC], v2[BN_ACC];
#pragma omp simd
    for (int j = 0; j < BN_ACC; j++) {
        v1[j] = acc[j];
        v2[j] = acc[BN_ACC + j];
    }
    for (int64_t i = 0; i < nb; i += BN_ACC) {
#pragma omp simd
        for (int j = 0; j < BN_ACC; j++) {
            double d = (double)KLD(x[i + j]) - k;
            v1[j] += d;
            BN_SQ_ACC(v2[j], d);
        }
    }
#pragma omp simd
    for (int64_t i = nb; i < n; i++) {
        double d = (double)KLD(x[i]) - k;
        v1[i - nb] += d;
        BN_SQ_ACC(v2[i - nb], d);
    }
#pragma omp simd
    for (int j = 0; j < BN_ACC; j++) {
        acc[j] = v1[j];
        acc[BN_ACC + j] = v2[j];
    }
}

static inline KA KN(relu)(KA z) { return z <= (KA)0 ? (KA)0 : z; }

#ifndef BN_LOOPS_DEFINED
#define BN_LOOPS_DEFINED
/* The element-wise loops, written once for scalar and per-value coefficients: MH, ML, SC, SH, K1, K2,
 * K3 are expressions in i (a variable, or an array element such as sc[i]), so every kernel evaluates
 * the identical expression and gives identical results. They use KT/KA/KLD/KST/KN of the including
 * instantiation. dx and dadd may be identical to dy: every lane reads its g before writing. */
#define BN_SIMD _Pragma("omp simd")
/* out = (x - MH - ML) * SC + SH [+ add] [ReLU] */
#define BN_APPLY_LOOPS(out, x, add, n, relu, MH, ML, SC, SH)                                                 \
    do {                                                                                                     \
        if ((add) && (relu)) {                                                                               \
            BN_SIMD for (int64_t i = 0; i < (n); i++)                                                        \
                (out)[i] = KST(KN(relu)((KLD((x)[i]) - (MH) - (ML)) * (SC) + (SH) + KLD((add)[i])));         \
        } else if (add) {                                                                                    \
            BN_SIMD for (int64_t i = 0; i < (n); i++)                                                        \
                (out)[i] = KST((KLD((x)[i]) - (MH) - (ML)) * (SC) + (SH) + KLD((add)[i]));                   \
        } else if (relu) {                                                                                   \
            BN_SIMD for (int64_t i = 0; i < (n); i++)                                                        \
                (out)[i] = KST(KN(relu)((KLD((x)[i]) - (MH) - (ML)) * (SC) + (SH)));                         \
        } else {                                                                                             \
            BN_SIMD for (int64_t i = 0; i < (n); i++) (out)[i] = KST((KLD((x)[i]) - (MH) - (ML)) * (SC) + (SH)); \
        }                                                                                                    \
    } while (0)
/* z (compute type) = (x - MH - ML) * SC + SH [+ add], before the mask and the ReLU */
#define BN_Z_LOOPS(z, x, add, n, MH, ML, SC, SH)                                                             \
    do {                                                                                                     \
        if (add) {                                                                                           \
            BN_SIMD for (int64_t i = 0; i < (n); i++)                                                        \
                (z)[i] = (KLD((x)[i]) - (MH) - (ML)) * (SC) + (SH) + KLD((add)[i]);                          \
        } else {                                                                                             \
            BN_SIMD for (int64_t i = 0; i < (n); i++) (z)[i] = (KLD((x)[i]) - (MH) - (ML)) * (SC) + (SH);    \
        }                                                                                                    \
    } while (0)
/* g = dy [* m]; dadd = g (with a mask); dx = DX, an expression in g_ and i */
#define BN_BWD_LOOPS_E(dx, dadd, dy, m, n, DX)                                                               \
    do {                                                                                                     \
        if ((m) && (dx) && (dadd)) {                                                                         \
            BN_SIMD for (int64_t i = 0; i < (n); i++) {                                                      \
                KA g_ = (m)[i] ? KLD((dy)[i]) : (KA)0;                                                       \
                KA v_ = (DX);                                                                                \
                (dadd)[i] = KST(g_);                                                                         \
                (dx)[i] = KST(v_);                                                                           \
            }                                                                                                \
        } else if ((m) && (dadd)) {                                                                          \
            BN_SIMD for (int64_t i = 0; i < (n); i++)(dadd)[i] = KST((m)[i] ? KLD((dy)[i]) : (KA)0);         \
        } else if ((m) && (dx)) {                                                                            \
            BN_SIMD for (int64_t i = 0; i < (n); i++) {                                                      \
                KA g_ = (m)[i] ? KLD((dy)[i]) : (KA)0;                                                       \
                (dx)[i] = KST(DX);                                                                           \
            }                                                                                                \
        } else if (dx) {                                                                                     \
            BN_SIMD for (int64_t i = 0; i < (n); i++) {                                                      \
                KA g_ = KLD((dy)[i]);                                                                        \
                (dx)[i] = KST(DX);                                                                           \
            }                                                                                                \
        }                                                                                                    \
    } while (0)
/* dx = g * K1 - K2 - (x - MH - ML) * K3; without x (NULL: the backward with global statistics, whose
 * K2 and K3 are 0) dx = g * K1, which reads neither x nor, for NaN or Inf in x, gives NaN: the
 * gradient of y = (x - mean) * K1 + shift with respect to x is K1 whatever x is (PyTorch's eval
 * backward is the same product). */
#define BN_BWD_LOOPS(dx, dadd, x, dy, m, n, MH, ML, K1, K2, K3)                                              \
    do {                                                                                                     \
        if (x) BN_BWD_LOOPS_E(dx, dadd, dy, m, n, g_ * (K1) - (K2) - (KLD((x)[i]) - (MH) - (ML)) * (K3));   \
        else BN_BWD_LOOPS_E(dx, dadd, dy, m, n, g_ * (K1));                                                  \
    } while (0)
#endif

/* Apply kernels work in chunks of BN_CHUNK values (a multiple of 8, so a chunk's mask bits start on a
 * byte). With `stream`, a chunk is computed into a small staging buffer (L1) and then written with
 * streaming stores (bn_stream_copy): the output bypasses the caches, so it neither costs a
 * read-for-ownership nor evicts the input the caller still wants in cache. Without it, outputs are
 * written directly. Either way the arithmetic is the same expression, so results are identical. */
#ifndef BN_CHUNK
#define BN_CHUNK 256
#endif
/* Staging buffers and expanded coefficients start on a 64-byte line: a staged chunk is copied out with
 * 64-byte loads, which split lines otherwise. Unaligned, where the compiler happened to put them in
 * the stack frame decided it (session 9: a change elsewhere in rows_apply moved its staging buffer off
 * a line and made misaligned streamed NHWC inference 1.1-1.6x slower). */
#ifndef BN_KALIGN
#if defined(__GNUC__)
#define BN_KALIGN __attribute__((aligned(64)))
#else
#define BN_KALIGN
#endif
#endif

#ifndef BN_CHUNK_LEN_DEFINED
#define BN_CHUNK_LEN_DEFINED
/* Length of the chunk of an output streamed through the staging buffer that starts at `out` with
 * `left` values to go. With `align`, the chunk ends on a 64-byte boundary of the output, so only the
 * first and last lines of the whole range get ordinary stores: with an output that is not 64-byte
 * aligned (malloc gives 16), chunks of BN_CHUNK values would split a line at every chunk boundary
 * between a streaming and an ordinary store, a read-for-ownership from DRAM each time. Not with a
 * mask (its chunks must start on a byte of bits). out is aligned to its element size (bnorm.h). */
static inline int64_t bn_chunk_len(const void *out, size_t es, int64_t left, int align) {
    if (align) return bn_line_piece(out, es, left, (size_t)BN_CHUNK * es);
    return left < BN_CHUNK ? left : BN_CHUNK;
}
#endif

/* y = (x - mean - mlo) * scale + shift [+ add] [ReLU] over n values, scalar coefficients. */
static inline void KN(apply_run)(const KT *x, KT *y, const KT *add, int64_t n, KA mean, KA mlo, KA scale,
                                 KA shift, int relu) {
    BN_APPLY_LOOPS(y, x, add, n, relu, mean, mlo, scale, shift);
}

/* z (compute type) of a masked chunk, then its bits and the stored output. */
static inline void KN(masked_out)(KA *z, KT *out, uint8_t *bits, int64_t len, int relu) {
    BN_GT0_BITS(z, len, bits);
    if (relu) {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) out[i] = KST(KN(relu)(z[i]));
    } else {
#pragma omp simd
        for (int64_t i = 0; i < len; i++) out[i] = KST(z[i]);
    }
}

static void KN(seg_apply)(const void *xv, void *yv, const void *addv, uint8_t *mask, int64_t n,
                          double meand, double scaled, double shiftd, int relu, int stream) {
    const KT *x = (const KT *)xv, *add = (const KT *)addv;
    KT *y = (KT *)yv;
    const KA mean = (KA)meand, mlo = (KA)(meand - (double)mean), scale = (KA)scaled, shift = (KA)shiftd;
    if (!mask && !stream) {
        KN(apply_run)(x, y, add, n, mean, mlo, scale, shift, relu);
        return;
    }
    BN_KALIGN KT stage[BN_CHUNK];
    BN_KALIGN KA z[BN_CHUNK];
    for (int64_t i0 = 0, len; i0 < n; i0 += len) {
        len = bn_chunk_len(y + i0, sizeof(KT), n - i0, stream && !mask);
        const KT *xc = x + i0, *ac = add ? add + i0 : NULL;
        KT *out = stream ? stage : y + i0;
        if (mask) {
            BN_Z_LOOPS(z, xc, ac, len, mean, mlo, scale, shift);
            KN(masked_out)(z, out, mask + (i0 >> 3), len, relu);
        } else {
            KN(apply_run)(xc, out, ac, len, mean, mlo, scale, shift, relu);
        }
        if (stream) bn_stream_copy(y + i0, stage, (size_t)len * sizeof(KT));
    }
}

/* y = (x - mean[c] - mlo[c]) * scale[c] + shift[c] [+ add] [ReLU] over np consecutive planes of inner
 * values, the first of channel c0 (channel c of plane q: (c0 + q) mod C), coefficients as compute-type
 * arrays of C. The range is walked as one flat array: streaming, in chunks that end on 64-byte lines of
 * the output (bn_chunk_len), each chunk cut at plane ends into pieces applied into the staging buffer
 * and then streamed. Reads of x and streaming writes of y thus alternate every BN_CHUNK values in
 * memory order, wherever the planes start: with small planes (7x7, 14x14) this moved about 1.3x the
 * bytes per second of a staged run of planes (docs/performance.md note 28). The expression is
 * apply_run's, so outputs are bit-identical to seg_apply's. No mask (masked planes take seg_apply). */
static void KN(planes_apply)(const void *xv, void *yv, const void *addv, int64_t np, int64_t inner, int64_t C,
                             int64_t c0, const void *meanv, const void *mlov, const void *scalev,
                             const void *shiftv, int relu, int stream) {
    const KT *x = (const KT *)xv, *add = (const KT *)addv;
    KT *y = (KT *)yv;
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov, *scale = (const KA *)scalev, *shift = (const KA *)shiftv;
    BN_KALIGN KT stage[BN_CHUNK];
    const int64_t n = np * inner;
    int64_t c = c0, off = 0; /* channel and offset in the plane of position i0 */
    for (int64_t i0 = 0, len; i0 < n; i0 += len) {
        len = stream ? bn_chunk_len(y + i0, sizeof(KT), n - i0, 1) : n - i0;
        KT *out = stream ? stage : y + i0;
        for (int64_t p = i0; p < i0 + len;) {
            const int64_t seg = inner - off < i0 + len - p ? inner - off : i0 + len - p;
            KN(apply_run)(x + p, out + (p - i0), add ? add + p : NULL, seg, mean[c], mlo[c], scale[c], shift[c], relu);
            p += seg;
            off += seg;
            if (off == inner) {
                off = 0;
                c = c + 1 == C ? 0 : c + 1;
            }
        }
        if (stream) bn_stream_copy(y + i0, stage, (size_t)len * sizeof(KT));
    }
}

#define KBIT(mask, i) (((mask)[(i) >> 3] >> ((i)&7)) & 1)

static void KN(seg_bwd_reduce)(const void *xv, const void *dyv, const uint8_t *mask, int64_t n,
                               double meand, double *sg, double *sgx) {
    const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
    const KA mean = (KA)meand, mlo = (KA)(meand - (double)mean);
    double a = 0, b = 0;
    if (mask) {
        /* masked g of a chunk first (mask_copy), then the sums in BN_ACC lanes like the unmasked walk (a
           single vector accumulator per sum was bound by the latency of its adds) */
        BN_KALIGN KT gk[BN_CHUNK];
        double va[BN_ACC], vb[BN_ACC];
        for (int j = 0; j < BN_ACC; j++) va[j] = vb[j] = 0;
        for (int64_t i0 = 0; i0 < n; i0 += BN_CHUNK) {
            const int64_t len = n - i0 < BN_CHUNK ? n - i0 : BN_CHUNK, lb = len - len % BN_ACC;
            const KT *xc = x + i0;
            bn_mask_copy(dy + i0, mask + (i0 >> 3), len, gk, sizeof(KT));
            for (int64_t i = 0; i < lb; i += BN_ACC) {
#pragma omp simd
                for (int j = 0; j < BN_ACC; j++) {
                    double g = (double)KLD(gk[i + j]);
                    va[j] += g;
                    vb[j] += g * (double)(KLD(xc[i + j]) - mean - mlo);
                }
            }
#pragma omp simd reduction(+ : a, b)
            for (int64_t i = lb; i < len; i++) {
                double g = (double)KLD(gk[i]);
                a += g;
                b += g * (double)(KLD(xc[i]) - mean - mlo);
            }
        }
        a += bn_acc_total(va);
        b += bn_acc_total(vb);
    } else {
        const int64_t nb = n < 4 * BN_ACC ? 0 : n - n % BN_ACC;
        double va[BN_ACC], vb[BN_ACC];
        if (nb)
            for (int j = 0; j < BN_ACC; j++) va[j] = vb[j] = 0;
        for (int64_t i = 0; i < nb; i += BN_ACC) {
#pragma omp simd
            for (int j = 0; j < BN_ACC; j++) {
                double g = (double)KLD(dy[i + j]);
                va[j] += g;
                vb[j] += g * (double)(KLD(x[i + j]) - mean - mlo);
            }
        }
        if (nb) {
            a = bn_acc_total(va);
            b = bn_acc_total(vb);
        }
#pragma omp simd reduction(+ : a, b)
        for (int64_t i = nb; i < n; i++) {
            double g = (double)KLD(dy[i]);
            a += g;
            b += g * (double)(KLD(x[i]) - mean - mlo);
        }
    }
    *sg += a;
    *sgx += b;
}

/* One chunk of the backward apply: g = dy [* mask]; dadd = g; dx = g * k1 - k2 - (x - mean) * k3.
 * dx and dadd may be identical to dy: every lane reads its g before writing. */
static inline void KN(bwd_run)(const KT *x, const KT *dy, const uint8_t *m, KT *dx, KT *dadd, int64_t n, KA mean,
                               KA mlo, KA k1, KA k2, KA k3) {
    BN_BWD_LOOPS(dx, dadd, x, dy, m, n, mean, mlo, k1, k2, k3);
}

static void KN(seg_bwd_apply)(const void *xv, const void *dyv, const uint8_t *mask, void *dxv, void *daddv,
                              int64_t n, double meand, double k1d, double k2d, double k3d, int stream) {
    const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
    KT *dx = (KT *)dxv, *dadd = (KT *)daddv;
    const KA mean = (KA)meand, mlo = (KA)(meand - (double)mean), k1 = (KA)k1d, k2 = (KA)k2d, k3 = (KA)k3d;
    if (!mask && !stream) {
        KN(bwd_run)(x, dy, NULL, dx, NULL, n, mean, mlo, k1, k2, k3);
        return;
    }
    uint8_t m[BN_CHUNK];
    BN_KALIGN KT sdx[BN_CHUNK];
    BN_KALIGN KT sda[BN_CHUNK];
    for (int64_t i0 = 0, len; i0 < n; i0 += len) {
        len = bn_chunk_len(dx ? dx + i0 : NULL, sizeof(KT), n - i0, stream && !mask && dx);
        if (mask) bn_bits_to_u8(mask + (i0 >> 3), len, m);
        KT *odx = dx ? (stream ? sdx : dx + i0) : NULL;
        KT *oda = mask && dadd ? (stream ? sda : dadd + i0) : NULL;
        KN(bwd_run)(x ? x + i0 : NULL, dy + i0, mask ? m : NULL, odx, oda, len, mean, mlo, k1, k2, k3);
        if (stream) {
            if (odx) bn_stream_copy(dx + i0, sdx, (size_t)len * sizeof(KT));
            if (oda) bn_stream_copy(dadd + i0, sda, (size_t)len * sizeof(KT));
        }
    }
}

/* g = mask ? dy : 0 over n contiguous values whose bits are contiguous (bit patterns: the masked
 * kernels' KST(KLD(dy)), except that a signaling NaN of float16/bfloat16 storage keeps its payload). */
static void KN(mask_copy)(const void *dyv, const uint8_t *mask, int64_t n, void *outv) {
    bn_mask_copy(dyv, mask, n, outv, sizeof(KT));
}

static void KN(rows_sum)(const void *xv, int64_t rows, int64_t C, double *acc) {
    const KT *x = (const KT *)xv;
    for (int64_t r = 0; r < rows; r++) {
        const KT *xr = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) acc[c] += (double)KLD(xr[c]);
    }
}

static void KN(rows_dev)(const void *xv, int64_t rows, int64_t C, const void *refv, double *s1, double *s2) {
    const KT *x = (const KT *)xv;
    const KA *ref = (const KA *)refv;
    for (int64_t r = 0; r < rows; r++) {
        const KT *xr = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            double d = (double)(KLD(xr[c]) - ref[c]);
            s1[c] += d;
            s2[c] += d * d;
        }
    }
}

/* Row kernels keep a block of BN_RB channels' double accumulators in registers across a group of
 * rows (channel block outer, rows inner) instead of loading and storing accumulator arrays for every
 * row. A group is a contiguous piece of about row_group_bytes (tuning.c; it stays in L1 while its channel blocks
 * are swept); the next group is prefetched while one is processed. */
#ifndef BN_RB_DEFINED
#define BN_RB_DEFINED
enum { BN_RB = 16 }; /* the group's bytes: bn_tuning's row_group_bytes (a third of the L1 data cache) */
#ifndef BN_ROWS_REGBLOCK /* 0: the per-row accumulator loops (kept for comparisons in the benchmark) */
#define BN_ROWS_REGBLOCK 1
#endif
static inline int64_t bn_row_group(int64_t C, size_t esize) {
    int64_t rg = (int64_t)(bn_tuning_get()->row_group_bytes / ((size_t)C * esize));
    return rg < 4 ? 4 : rg;
}
static inline void bn_prefetch_bytes(const void *p, size_t bytes) {
#if defined(__GNUC__)
    const char *c = (const char *)p;
#ifndef BN_NO_PF
    for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
#else
    (void)c; (void)bytes;
#endif
#else
    (void)p;
    (void)bytes;
#endif
}
/* Wide rows (a row of at least BN_PF_SPREAD bytes; 0: never): the next group's prefetches are
 * spread over the channel blocks of the current group (part `part` of `parts` of the `bytes` at p).
 * Issued all at once, a 32 KiB group (C = 2048) is 512 prefetches that fill the line-fill buffers and
 * stall the core until the group has arrived, so reading and computing alternate instead of
 * overlapping (perf: 43% of rows_stats' cycles on that loop for C = 2048). For narrow rows (C = 64, 256
 * measured, float32) the burst was faster: there the spread issues the prefetches too late.
 * Prefetching never changes results (docs/performance.md, note 14). */
#ifndef BN_PF_SPREAD
#define BN_PF_SPREAD 4096
#endif
/* The register-blocked backward sums need groups of at least this many rows (else the per-row walk). */
#ifndef BN_RB_BWD_MINROWS
#define BN_RB_BWD_MINROWS 16
#endif
/* Row-by-row sums keep per-channel accumulators in memory: each row costs a load and a store of two
 * doubles per channel. When the accumulators and coefficients of a row (acc_bytes per channel) take
 * more than a quarter of the L1 data cache, the row is "wide" and the walk adds several rows per pass
 * instead (the accumulators' loads and stores, which bound it, divided by their number): on the EPYC,
 * float32 backward sums in isolation at 2 threads, C = 1024 went from 26-31 to 52-60 GB/s and C = 2048
 * from 30-34 to 64-79 GB/s with four rows, while up to C = 512 one row per pass stays faster (52-74
 * against 31-51 GB/s; docs/performance.md, tuning rule). Wide rows take BN_STATS_PASS rows a pass for
 * the statistics and four for the backward sums and apply. */
static inline int bn_rows_wide(int64_t C, size_t acc_bytes) {
    return (size_t)C * acc_bytes > bn_tuning_get()->l1d_or_default / 4;
}
/* Rows a pass of the wide-row statistics (session 11, EPYC, 2 threads, float32): in isolation with the
 * caches evicted (medians of 15), C = 1024 and 2048 took 0.65-0.70 ms with four rows a pass (their sums
 * added pairwise), 0.47-0.49 with eight and 0.445 with sixteen, against 0.26-0.30 ms for a plain read
 * of the same 25.7 MB; the whole NHWC training forward, in-process A/B against four rows (bnorm_ab, 15
 * rounds, 3 runs each): 32x1024x14x14 1.12-1.16x, 32x2048x7x7 1.02-1.19x, 4096x1024 1.10-1.17x. A pass
 * adds its rows into two registers per channel vector in row order, then once into the accumulators.
 * The backward sums stay at four rows: eight measured 1.10-1.18x faster in isolation but 0.92-1.05x in
 * the whole backward (docs/performance.md, session 11). */
#ifndef BN_STATS_PASS
#define BN_STATS_PASS 16
#endif
static inline int bn_pf_spread(int64_t row_bytes) { return BN_PF_SPREAD > 0 && row_bytes >= BN_PF_SPREAD; }
static inline void bn_prefetch_part(const void *p, size_t bytes, int64_t part, int64_t parts) {
    if (!p) return;
    const size_t lines = (bytes + 63) / 64, per = (lines + (size_t)parts - 1) / (size_t)parts;
    size_t l0 = (size_t)part * per, l1 = l0 + per;
    if (l1 > lines) l1 = lines;
    if (l0 >= l1) return;
    const size_t end = l1 * 64 < bytes ? l1 * 64 : bytes;
    bn_prefetch_bytes((const char *)p + l0 * 64, end - l0 * 64);
}
#endif

#ifndef BN_NARROW_DEFINED
#define BN_NARROW_DEFINED
/* Narrow rows whose double accumulators fit in vector registers (C = 16, 32, 64 with AVX-512: two
 * accumulators of 64 doubles are 16 of its 32 registers; C = 16 with AVX2): every row is read whole, in
 * order, and the accumulators never go to memory. Row by row with accumulators in memory, each row of
 * 64 float32 (256 bytes) costs a load and a store of 1 KiB of accumulators; in columns of 16 channels
 * (the block walk) each row is one line at a 256-byte stride. EPYC (Zen 5), isolated statistics of
 * NHWC 32x64x56x56, caches evicted: 1 thread 1.79 -> 0.92 ms, 2 threads 1.05 -> 0.37 ms
 * (docs/performance.md, session 9). The sums are added in the row-by-row order, so results equal the
 * row walk's bit for bit. */
#if defined(__AVX512F__)
#define BN_NARROW_MAX 64
#elif defined(__AVX2__)
#define BN_NARROW_MAX 16
#else
#define BN_NARROW_MAX 0
#endif
#if defined(__GNUC__)
#define BN_NOINLINE __attribute__((noinline)) /* a function of its own: its registers are its own */
#else
#define BN_NOINLINE
#endif
static inline int bn_narrow_regs(int64_t C) {
    return BN_ROWS_REGBLOCK && (C == 16 || C == 32 || C == 64) && C <= BN_NARROW_MAX;
}
/* Whether every row of C values of es bytes at out starts on a 64-byte line (streamed rows can then
 * be stored row by row, whole lines from the registers or a row's staging). */
static inline int bn_rows_on_lines(const void *out, int64_t C, size_t es) {
    return ((uintptr_t)out & 63) == 0 && ((size_t)C * es) % 64 == 0;
}
/* A piece of len values of an output at out, split for stores from the registers: *pre values up to the
 * first line, *body whole 64-byte lines (values of es bytes, 16 floats a line), the rest after them. */
static inline void bn_line_split(const void *out, size_t es, int64_t len, int64_t *pre, int64_t *body) {
    int64_t p = (int64_t)((-(uintptr_t)out & 63) / es);
    if (p > len) p = len;
    *pre = p;
    *body = (len - p) / (int64_t)(64 / es) * (int64_t)(64 / es);
}
#endif

/* Streamed float32 rows of any multiple of 16 channels (64-byte aligned output) are stored from the
 * registers too (simd.h's bn_nt_wide_rows_f32 / bn_nt_wide_bwd_rows_f32) instead of staged in chunks of
 * BN_CHUNK and copied. EPYC, in-process A/B (bnorm_ab, 7 rounds, 1 and 2 threads): NHWC inference
 * 32x256x56x56 1.06-1.11x, 32x512x28x28 1.21-1.35x, 32x1024x14x14 1.25x, NWC 64x256x1024 1.18-1.19x;
 * training forward 0.98-1.17x; backward 1.05-1.36x (docs/performance.md, session 9). Session 7 had
 * measured direct streaming stores as slower at C = 2048 in isolation; that shape's output (12.8 MiB)
 * is not streamed on AMD. 0: the staged chunks (kept for comparisons). */
#ifndef BN_NT_WIDE
#define BN_NT_WIDE 1
#endif
/* float32 on AVX-512, streamed: rows stored from the registers (simd.h). */
#undef BN_NT_ROWS
#undef BN_NT_BWD_ROWS
#if defined(BN_KT_F32) && defined(BN_HAVE_NT_ROWS_F32)
#define BN_NT_ROWS(W)                                                                                        \
    if (stream) {                                                                                            \
        bn_nt_rows_f32(x, y, add, rows, W, mean, mlo, scale, shift, relu);                                   \
        return;                                                                                              \
    }
#define BN_NT_BWD_ROWS(W)                                                                                    \
    if (stream) {                                                                                            \
        bn_nt_bwd_rows_f32(x, dy, dx, rows, W, mean, mlo, k1, k2, k3);                                       \
        return;                                                                                              \
    }
#else
#define BN_NT_ROWS(W)
#define BN_NT_BWD_ROWS(W)
#endif
/* The narrow-row kernels for one width W (a constant, so the accumulator arrays live in registers). */
#define BN_NARROW_KERNELS(W)                                                                                 \
    BN_NOINLINE static void KN(rows_stats_w##W)(const KT *x, int64_t rows, const KA *k, double *s1, double *s2) {       \
        double a1[W], a2[W], kk[W];                                                                          \
        BN_SIMD for (int c = 0; c < W; c++) {                                                                \
            a1[c] = s1[c];                                                                                   \
            a2[c] = s2[c];                                                                                   \
            kk[c] = (double)k[c];                                                                            \
        }                                                                                                    \
        for (int64_t r = 0; r < rows; r++) {                                                                 \
            const KT *xr = x + r * W;                                                                        \
            BN_SIMD for (int c = 0; c < W; c++) {                                                            \
                const double d = (double)KLD(xr[c]) - kk[c];                                                 \
                a1[c] += d;                                                                                  \
                BN_SQ_ACC(a2[c], d);                                                                         \
            }                                                                                                \
        }                                                                                                    \
        BN_SIMD for (int c = 0; c < W; c++) {                                                                \
            s1[c] = a1[c];                                                                                   \
            s2[c] = a2[c];                                                                                   \
        }                                                                                                    \
    }                                                                                                        \
    BN_NOINLINE static void KN(rows_bwd_reduce_w##W)(const KT *x, const KT *dy, int64_t rows, const KA *mean,           \
                                         const KA *mlo, double *sg, double *sgx) {                          \
        double a[W], b[W];                                                                                   \
        BN_SIMD for (int c = 0; c < W; c++) {                                                                \
            a[c] = sg[c];                                                                                    \
            b[c] = sgx[c];                                                                                   \
        }                                                                                                    \
        for (int64_t r = 0; r < rows; r++) {                                                                 \
            const KT *xr = x + r * W, *gr = dy + r * W;                                                      \
            BN_SIMD for (int c = 0; c < W; c++) {                                                            \
                const double g = (double)KLD(gr[c]);                                                         \
                a[c] += g;                                                                                   \
                b[c] += g * (double)(KLD(xr[c]) - mean[c] - mlo[c]);                                         \
            }                                                                                                \
        }                                                                                                    \
        BN_SIMD for (int c = 0; c < W; c++) {                                                                \
            sg[c] = a[c];                                                                                    \
            sgx[c] = b[c];                                                                                   \
        }                                                                                                    \
    }                                                                                                        \
    /* y = (x - mean - mlo) * scale + shift [+ add] [ReLU] over rows of W values, no mask: the four  \
       coefficients stay in registers, and rows are written directly (streamed: y is 64-byte aligned   \
       and a row is whole lines, so each row is staged alone, or with float32 on AVX-512 stored from  \
       the registers). EPYC, NHWC 32x64x56x56 inference in isolation, 2 threads: 0.71-0.78 ms with   \
       the flat walk's expanded coefficients and staged chunks, 0.61-0.65 ms with the coefficients in  \
       registers written through the cache, 0.55-0.59 ms stored from the registers (streamed). */      \
    BN_NOINLINE static void KN(rows_apply_w##W)(const KT *x, KT *y, const KT *add, int64_t rows, const KA *mean, \
                                                const KA *mlo, const KA *scale, const KA *shift, int relu,   \
                                                int stream) {                                                \
        BN_NT_ROWS(W)                                                                                        \
        BN_KALIGN KA mh[W], ml[W], sc[W], sh[W];                                                             \
        BN_KALIGN KT st[W];                                                                                  \
        BN_SIMD for (int c = 0; c < W; c++) {                                                                \
            mh[c] = mean[c];                                                                                 \
            ml[c] = mlo[c];                                                                                  \
            sc[c] = scale[c];                                                                                \
            sh[c] = shift[c];                                                                                \
        }                                                                                                    \
        for (int64_t r = 0; r < rows; r++) {                                                                 \
            const KT *xr = x + r * W, *ar = add ? add + r * W : NULL;                                        \
            KT *yr = y + r * W, *out = stream ? st : yr;                                                     \
            BN_APPLY_LOOPS(out, xr, ar, W, relu, mh[i], ml[i], sc[i], sh[i]);                                \
            if (stream) bn_stream_copy(yr, st, (size_t)W * sizeof(KT));                                      \
        }                                                                                                    \
    }                                                                                                        \
    /* The backward apply on the same rows, without a mask: dx = g * k1 - k2 - (x - mean - mlo) * k3,  \
       or g * k1 without x; the five coefficients in registers, as rows_apply_w. */                   \
    BN_NOINLINE static void KN(rows_bwd_apply_w##W)(const KT *x, const KT *dy, KT *dx, int64_t rows,       \
                                                    const KA *mean, const KA *mlo, const KA *k1,            \
                                                    const KA *k2, const KA *k3, int stream) {               \
        BN_NT_BWD_ROWS(W)                                                                                    \
        BN_KALIGN KA mh[W], ml[W], a1[W], a2[W], a3[W];                                                      \
        BN_KALIGN KT st[W];                                                                                  \
        BN_SIMD for (int c = 0; c < W; c++) {                                                                \
            mh[c] = mean[c];                                                                                 \
            ml[c] = mlo[c];                                                                                  \
            a1[c] = k1[c];                                                                                   \
            a2[c] = k2[c];                                                                                   \
            a3[c] = k3[c];                                                                                   \
        }                                                                                                    \
        for (int64_t r = 0; r < rows; r++) {                                                                 \
            const KT *xr = x ? x + r * W : NULL, *gr = dy + r * W;                                           \
            KT *yr = dx + r * W, *out = stream ? st : yr;                                                    \
            BN_BWD_LOOPS(out, (KT *)NULL, xr, gr, (const uint8_t *)NULL, W, mh[i], ml[i], a1[i], a2[i], a3[i]); \
            if (stream) bn_stream_copy(yr, st, (size_t)W * sizeof(KT));                                      \
        }                                                                                                    \
    }
BN_NARROW_KERNELS(16)
BN_NARROW_KERNELS(32)
BN_NARROW_KERNELS(64)
#undef BN_NARROW_KERNELS

/* Shifted single-pass sums over rows (float32/16/bf16 data; see seg_stats for the accuracy argument,
 * which needs k[c] to be one of the values of channel c: the caller passes the block's first row):
 * s1[c] += sum (x - k[c]), s2[c] += sum (x - k[c])^2, in double. The caller checks the sums are
 * finite and otherwise redoes the block with rows_sum + rows_dev. */
/* The shifted sums of channels [c0, c1) of one row xr, added to s1 and s2. */
static inline void KN(row_stats_span)(const KT *xr, int64_t c0, int64_t c1, const KA *k, double *s1, double *s2) {
#pragma omp simd
    for (int64_t c = c0; c < c1; c++) {
        double d = (double)KLD(xr[c]) - (double)k[c];
        s1[c] += d;
        BN_SQ_ACC(s2[c], d);
    }
}

/* The shifted sums of nj consecutive rows from x0 (wide rows): per channel, the rows' d and d * d
 * added in row order in registers, then once into s1 and s2 (BN_STATS_PASS). */
static inline void KN(rows_stats_pass)(const KT *x0, int64_t nj, int64_t C, const KA *k, double *s1, double *s2) {
#pragma omp simd
    for (int64_t c = 0; c < C; c++) {
        const double kc = (double)k[c];
        double a = 0, b = 0;
        for (int64_t j = 0; j < nj; j++) {
            const double d = (double)KLD(x0[j * C + c]) - kc;
            a += d;
            BN_SQ_ACC(b, d);
        }
        s1[c] += a;
        s2[c] += b;
    }
}

static void KN(rows_stats)(const void *xv, int64_t rows, int64_t C, const void *kv, double *s1, double *s2) {
    const KT *x = (const KT *)xv;
    const KA *k = (const KA *)kv;
    if (bn_narrow_regs(C)) {
        if (C == 64) KN(rows_stats_w64)(x, rows, k, s1, s2);
        else if (C == 32) KN(rows_stats_w32)(x, rows, k, s1, s2);
        else KN(rows_stats_w16)(x, rows, k, s1, s2);
        return;
    }
    if (!BN_ROWS_REGBLOCK || (size_t)C * sizeof(KT) <= bn_tuning_get()->row_walk_max_bytes) { /* row by row */
        int64_t rq = 0;
        if (bn_rows_wide(C, 2 * sizeof(double) + sizeof(KA))) { /* BN_STATS_PASS rows a pass */
            for (; rq + BN_STATS_PASS <= rows; rq += BN_STATS_PASS)
                KN(rows_stats_pass)(x + rq * C, BN_STATS_PASS, C, k, s1, s2);
            if (rq < rows) KN(rows_stats_pass)(x + rq * C, rows - rq, C, k, s1, s2);
            return;
        }
        for (int64_t r = 0; r < rows; r++) KN(row_stats_span)(x + r * C, 0, C, k, s1, s2);
        return;
    }
    const int64_t cfull = C - C % BN_RB, rg = bn_row_group(C, sizeof(KT));
    for (int64_t r0 = 0; r0 < rows; r0 += rg) {
        const int64_t nr = rows - r0 < rg ? rows - r0 : rg;
        const KT *xg = x + r0 * C, *pf = NULL;
        size_t pfb = 0;
        if (r0 + nr < rows) {
            const int64_t nn = rows - r0 - nr < rg ? rows - r0 - nr : rg;
            pf = xg + nr * C;
            pfb = (size_t)(nn * C) * sizeof(KT);
            if (!bn_pf_spread(C * (int64_t)sizeof(KT)) || cfull == 0) { /* all at once */
                bn_prefetch_bytes(pf, pfb);
                pf = NULL;
            }
        }
        for (int64_t c0 = 0; c0 < cfull; c0 += BN_RB) {
            double a1[BN_RB], a2[BN_RB], kk[BN_RB];
            bn_prefetch_part(pf, pfb, c0 / BN_RB, cfull / BN_RB);
#pragma omp simd
            for (int j = 0; j < BN_RB; j++) {
                a1[j] = a2[j] = 0;
                kk[j] = (double)k[c0 + j];
            }
            for (int64_t r = 0; r < nr; r++) {
                const KT *xr = xg + r * C + c0;
#pragma omp simd
                for (int j = 0; j < BN_RB; j++) {
                    double d = (double)KLD(xr[j]) - kk[j];
                    a1[j] += d;
                    BN_SQ_ACC(a2[j], d);
                }
            }
#pragma omp simd
            for (int j = 0; j < BN_RB; j++) {
                s1[c0 + j] += a1[j];
                s2[c0 + j] += a2[j];
            }
        }
        if (cfull < C)
            for (int64_t r = 0; r < nr; r++) KN(row_stats_span)(xg + r * C, cfull, C, k, s1, s2);
    }
}

static void KN(run_apply)(const void *xv, void *yv, const void *addv, uint8_t *mask, int64_t mstride, int64_t np,
                          int64_t inner, const void *mhv, const void *mlv, const void *scv, const void *shv, int relu);
static void KN(run_bwd_apply)(const void *xv, const void *dyv, const uint8_t *m, void *dxv, void *daddv, int64_t n,
                              const void *mhv, const void *mlv, const void *k1v, const void *k2v, const void *k3v);

#ifndef BN_PERIOD_DEFINED
#define BN_PERIOD_DEFINED
/* Periodic expansion of per-channel coefficients for narrow rows (C <= BN_CHUNK): e[j] = v[j % C] for
 * j < C - 1 + BN_CHUNK, so a chunk of at most BN_CHUNK values that starts at channel c reads e + c as
 * one value per element, one flat loop instead of a call per row of C values. */
enum { BN_PERIOD = 2 * BN_CHUNK };
#endif
static inline const KA *KN(expand_period)(const KA *v, int64_t C, KA *e) {
    for (int64_t j0 = 0; j0 < C - 1 + BN_CHUNK; j0 += C) {
        const int64_t len = C - 1 + BN_CHUNK - j0 < C ? C - 1 + BN_CHUNK - j0 : C;
        for (int64_t j = 0; j < len; j++) e[j0 + j] = v[j];
    }
    return e;
}

/* The backward apply of four rows at once (row stride C in, ostride out) over len values of the
 * channels at mh..: each channel's five coefficients are loaded once for the four rows. The per-value
 * expression is BN_BWD_LOOPS's, so results equal the one-row kernels'. (The same for the forward
 * apply, four coefficients and one input, measured slower on the EPYC: inference on NHWC
 * 32x1024x14x14 0.56-1.21 -> 0.97-1.65 ms, 4096x1024 0.36-0.62 -> 0.56-0.93 ms.) */
static inline void KN(bwd_apply4)(const KT *x, const KT *dy, int64_t C, KT *dx, int64_t ostride, int64_t len,
                                  const KA *mh, const KA *ml, const KA *k1, const KA *k2, const KA *k3) {
    if (x) {
        BN_SIMD for (int64_t i = 0; i < len; i++) {
            const KA mh_ = mh[i], ml_ = ml[i], a_ = k1[i], b_ = k2[i], c_ = k3[i];
            for (int q = 0; q < 4; q++) {
                const KA g_ = KLD(dy[q * C + i]);
                dx[q * ostride + i] = KST(g_ * a_ - b_ - (KLD(x[q * C + i]) - mh_ - ml_) * c_);
            }
        }
    } else {
        BN_SIMD for (int64_t i = 0; i < len; i++) {
            const KA a_ = k1[i];
            for (int q = 0; q < 4; q++) dx[q * ostride + i] = KST(KLD(dy[q * C + i]) * a_);
        }
    }
}

/* Whether every low part of the mean is +0 (not -0: x - mh - (-0) turns a -0 into +0): then
 * x - mh - ml is x - mh bit for bit, and the wide rows read one array fewer. Inference always has it
 * (its mean is the running mean, of the compute type or narrower); a training mean rarely. */
static inline int KN(lo_zero)(const KA *ml, int64_t C) {
    for (int64_t c = 0; c < C; c++)
        if (ml[c] != 0 || signbit(ml[c])) return 0;
    return 1;
}

/* Streaming without a mask, the rows kernels walk the whole range as one flat array in chunks that end
 * on 64-byte lines of the output (bn_chunk_len), each chunk cut at row boundaries into pieces with
 * their coefficient offsets: with rows that are not a multiple of 64 bytes (C = 64 float16, or an
 * output that is not 64-byte aligned) chunking row by row would leave a partial line at every row.
 * Narrow rows (C <= BN_CHUNK) take this flat walk also without streaming, with periodically expanded
 * coefficients (expand_period): one loop per chunk instead of a call per row (C = 64: four rows). */
static void KN(rows_apply)(const void *xv, void *yv, const void *addv, uint8_t *mask, int64_t mstride,
                           int64_t rows, int64_t C, const void *meanv, const void *mlov,
                           const void *scalev, const void *shiftv, int relu, int stream) {
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov, *scale = (const KA *)scalev, *shift = (const KA *)shiftv;
    BN_KALIGN KT stage[BN_CHUNK];
    BN_KALIGN KA z[BN_CHUNK];
    const int narrow = C <= BN_CHUNK;
    if (!mask && bn_narrow_regs(C) && (!stream || bn_rows_on_lines(yv, C, sizeof(KT)))) {
        const KT *x = (const KT *)xv, *add = (const KT *)addv;
        KT *y = (KT *)yv;
        if (C == 64) KN(rows_apply_w64)(x, y, add, rows, mean, mlo, scale, shift, relu, stream);
        else if (C == 32) KN(rows_apply_w32)(x, y, add, rows, mean, mlo, scale, shift, relu, stream);
        else KN(rows_apply_w16)(x, y, add, rows, mean, mlo, scale, shift, relu, stream);
        return;
    }
#if defined(BN_KT_F32) && defined(BN_HAVE_NT_ROWS_F32) && BN_NT_WIDE
    if (stream && !mask && bn_rows_on_lines(yv, C, sizeof(KT))) {
        bn_nt_wide_rows_f32((const float *)xv, (float *)yv, (const float *)addv, rows, C, mean,
                            KN(lo_zero)(mlo, C) ? NULL : mlo, scale, shift, relu);
        return;
    }
#endif
    if ((stream || narrow) && !mask) {
        const KT *x = (const KT *)xv, *add = (const KT *)addv;
        KT *y = (KT *)yv;
        const int64_t n = rows * C;
        /* the coefficients as read: per channel (a chunk is cut where a row ends), or expanded
           periodically for narrow rows (span C - 1 + BN_CHUNK: a chunk is never cut) */
        BN_KALIGN KA e[4][BN_PERIOD];
        const KA *cf[4] = {mean, mlo, scale, shift};
        int64_t span = C;
        if (narrow) {
            for (int k = 0; k < 4; k++) cf[k] = KN(expand_period)(cf[k], C, e[k]);
            span = C - 1 + BN_CHUNK;
        }
#if defined(BN_KT_F32) && defined(BN_HAVE_NT_ROWS_F32) && BN_NT_WIDE
        /* float32 narrow rows at any alignment, streamed: each chunk's whole lines stored from the
           registers, its partial first and last lines (only at the ends of the range) through the cache */
        if (stream && narrow) {
            for (int64_t i0 = 0, len; i0 < n; i0 += len) {
                len = bn_chunk_len(y + i0, sizeof(KT), n - i0, 1);
                const int64_t c = i0 % C;
                int64_t pre, body;
                bn_line_split(y + i0, sizeof(KT), len, &pre, &body);
                const int64_t post = len - pre - body;
                if (pre)
                    KN(run_apply)(x + i0, y + i0, add ? add + i0 : NULL, NULL, 0, 1, pre, cf[0] + c, cf[1] + c,
                                  cf[2] + c, cf[3] + c, relu);
                if (body)
                    bn_nt_wide_rows_f32(x + i0 + pre, y + i0 + pre, add ? add + i0 + pre : NULL, 1, body,
                                        cf[0] + c + pre, cf[1] + c + pre, cf[2] + c + pre, cf[3] + c + pre, relu);
                if (post) {
                    const int64_t q = i0 + pre + body, cq = c + pre + body;
                    KN(run_apply)(x + q, y + q, add ? add + q : NULL, NULL, 0, 1, post, cf[0] + cq, cf[1] + cq,
                                  cf[2] + cq, cf[3] + cq, relu);
                }
            }
            return;
        }
#endif
        for (int64_t i0 = 0, len; i0 < n; i0 += len) {
            len = bn_chunk_len(y + i0, sizeof(KT), n - i0, stream);
            KT *out = stream ? stage : y + i0;
            for (int64_t p = i0, c = i0 % C; p < i0 + len; c = 0) {
                const int64_t seg = span - c < i0 + len - p ? span - c : i0 + len - p;
                KN(run_apply)(x + p, out + (p - i0), add ? add + p : NULL, NULL, 0, 1, seg, cf[0] + c, cf[1] + c,
                              cf[2] + c, cf[3] + c, relu);
                p += seg;
            }
            if (stream) bn_stream_copy(y + i0, stage, (size_t)len * sizeof(KT));
        }
        return;
    }
    const int lo0 = !mask && KN(lo_zero)(mlo, C);
    for (int64_t r = 0; r < rows; r++) {
        const KT *xr = (const KT *)xv + r * C;
        const KT *ar = addv ? (const KT *)addv + r * C : NULL;
        KT *yr = (KT *)yv + r * C;
        for (int64_t c0 = 0, len; c0 < C; c0 += len) {
            len = stream || mask ? bn_chunk_len(yr + c0, sizeof(KT), C - c0, stream && !mask) : C - c0;
            const KT *xc = xr + c0, *ac = ar ? ar + c0 : NULL;
            const KA *mc = mean + c0, *lc = mlo + c0, *sc = scale + c0, *bc = shift + c0;
            KT *out = stream ? stage : yr + c0;
            if (mask) {
                BN_Z_LOOPS(z, xc, ac, len, mc[i], lc[i], sc[i], bc[i]);
                KN(masked_out)(z, out, mask + r * mstride + (c0 >> 3), len, relu);
            } else {
                if (lo0) BN_APPLY_LOOPS(out, xc, ac, len, relu, mc[i], (KA)0, sc[i], bc[i]); /* same bits */
                else BN_APPLY_LOOPS(out, xc, ac, len, relu, mc[i], lc[i], sc[i], bc[i]);
            }
            if (stream) bn_stream_copy(yr + c0, stage, (size_t)len * sizeof(KT));
        }
    }
}

static void KN(rows_bwd_reduce_rb)(const void *xv, const void *dyv, int64_t rows, int64_t C, const void *meanv,
                                   const void *mlov, double *sg, double *sgx);

static void KN(rows_bwd_reduce)(const void *xv, const void *dyv, const uint8_t *mask, int64_t mstride,
                                int64_t rows, int64_t C, const void *meanv, const void *mlov, double *sg,
                                double *sgx) {
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov;
    uint8_t m[BN_CHUNK];
    KA gm[BN_CHUNK];
    if (!mask && bn_narrow_regs(C)) {
        const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
        if (C == 64) KN(rows_bwd_reduce_w64)(x, dy, rows, mean, mlo, sg, sgx);
        else if (C == 32) KN(rows_bwd_reduce_w32)(x, dy, rows, mean, mlo, sg, sgx);
        else KN(rows_bwd_reduce_w16)(x, dy, rows, mean, mlo, sg, sgx);
        return;
    }
    /* register blocking pays only when a group holds many rows (narrow rows); with wide rows
       (C = 1024: 4 rows per group) the per-row sweep measured faster */
    if (BN_ROWS_REGBLOCK && !mask && C >= BN_RB && bn_row_group(C, 2 * sizeof(KT)) >= BN_RB_BWD_MINROWS &&
        (size_t)C * sizeof(KT) > bn_tuning_get()->row_walk_max_bytes) {
        KN(rows_bwd_reduce_rb)(xv, dyv, rows, C, meanv, mlov, sg, sgx);
        return;
    }
    int64_t r0 = 0;
    if (!mask && bn_rows_wide(C, 2 * sizeof(double) + 2 * sizeof(KA))) { /* four rows a pass */
        for (; r0 + 4 <= rows; r0 += 4) {
            const KT *x0 = (const KT *)xv + r0 * C, *g0 = (const KT *)dyv + r0 * C;
            const KT *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C, *g1 = g0 + C, *g2 = g1 + C, *g3 = g2 + C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                const KA mh = mean[c], ml = mlo[c];
                const double a0 = (double)KLD(g0[c]), a1 = (double)KLD(g1[c]);
                const double a2 = (double)KLD(g2[c]), a3 = (double)KLD(g3[c]);
                sg[c] += (a0 + a1) + (a2 + a3);
                sgx[c] += (a0 * (double)(KLD(x0[c]) - mh - ml) + a1 * (double)(KLD(x1[c]) - mh - ml)) +
                          (a2 * (double)(KLD(x2[c]) - mh - ml) + a3 * (double)(KLD(x3[c]) - mh - ml));
            }
        }
        if (r0 == rows) return;
    }
    for (int64_t r = r0; r < rows; r++) {
        const KT *xr = (const KT *)xv + r * C, *gr = (const KT *)dyv + r * C;
        if (mask) {
            for (int64_t c0 = 0; c0 < C; c0 += BN_CHUNK) {
                const int64_t len = C - c0 < BN_CHUNK ? C - c0 : BN_CHUNK;
                bn_bits_to_u8(mask + r * mstride + (c0 >> 3), len, m);
                const KT *xc = xr + c0, *gc = gr + c0;
                const KA *mc = mean + c0, *lc = mlo + c0;
                double *sgc = sg + c0, *sxc = sgx + c0;
#pragma omp simd
                for (int64_t i = 0; i < len; i++) gm[i] = m[i] ? KLD(gc[i]) : (KA)0;
#pragma omp simd
                for (int64_t i = 0; i < len; i++) {
                    double g = (double)gm[i];
                    sgc[i] += g;
                    sxc[i] += g * (double)(KLD(xc[i]) - mc[i] - lc[i]);
                }
            }
        } else {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                double g = (double)KLD(gr[c]);
                sg[c] += g;
                sgx[c] += g * (double)(KLD(xr[c]) - mean[c] - mlo[c]);
            }
        }
    }
}

/* The unmasked backward reduce with register-blocked accumulators (see rows_stats): same sums as
 * rows_bwd_reduce without a mask, in a different order. */
static void KN(rows_bwd_reduce_rb)(const void *xv, const void *dyv, int64_t rows, int64_t C, const void *meanv,
                                   const void *mlov, double *sg, double *sgx) {
    const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov;
    const int64_t cfull = C - C % BN_RB, rg = bn_row_group(C, 2 * sizeof(KT));
    for (int64_t r0 = 0; r0 < rows; r0 += rg) {
        const int64_t nr = rows - r0 < rg ? rows - r0 : rg;
        const KT *xg = x + r0 * C, *gg = dy + r0 * C;
        if (r0 + nr < rows) {
            const int64_t nn = rows - r0 - nr < rg ? rows - r0 - nr : rg;
            bn_prefetch_bytes(xg + nr * C, (size_t)(nn * C) * sizeof(KT));
            bn_prefetch_bytes(gg + nr * C, (size_t)(nn * C) * sizeof(KT));
        }
        for (int64_t c0 = 0; c0 < cfull; c0 += BN_RB) {
            double a[BN_RB], b[BN_RB];
            KA mh[BN_RB], ml[BN_RB];
#pragma omp simd
            for (int j = 0; j < BN_RB; j++) {
                a[j] = b[j] = 0;
                mh[j] = mean[c0 + j];
                ml[j] = mlo[c0 + j];
            }
            for (int64_t r = 0; r < nr; r++) {
                const KT *xr = xg + r * C + c0, *gr = gg + r * C + c0;
#pragma omp simd
                for (int j = 0; j < BN_RB; j++) {
                    double g = (double)KLD(gr[j]);
                    a[j] += g;
                    b[j] += g * (double)(KLD(xr[j]) - mh[j] - ml[j]);
                }
            }
#pragma omp simd
            for (int j = 0; j < BN_RB; j++) {
                sg[c0 + j] += a[j];
                sgx[c0 + j] += b[j];
            }
        }
        if (cfull < C)
            for (int64_t r = 0; r < nr; r++) {
                const KT *xr = xg + r * C, *gr = gg + r * C;
#pragma omp simd
                for (int64_t c = cfull; c < C; c++) {
                    double g = (double)KLD(gr[c]);
                    sg[c] += g;
                    sgx[c] += g * (double)(KLD(xr[c]) - mean[c] - mlo[c]);
                }
            }
    }
}

static void KN(rows_bwd_apply)(const void *xv, const void *dyv, const uint8_t *mask, int64_t mstride,
                               void *dxv, void *daddv, int64_t rows, int64_t C, const void *meanv,
                               const void *mlov, const void *k1v, const void *k2v, const void *k3v, int stream) {
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov, *k1 = (const KA *)k1v, *k2 = (const KA *)k2v, *k3 = (const KA *)k3v;
    uint8_t m[BN_CHUNK];
    BN_KALIGN KT sdx[BN_CHUNK];
    BN_KALIGN KT sda[BN_CHUNK];
    const int narrow = C <= BN_CHUNK;
#if defined(BN_KT_F32) && defined(BN_HAVE_NT_ROWS_F32) && BN_NT_WIDE
    if (stream && !mask && !bn_narrow_regs(C) && bn_rows_on_lines(dxv, C, sizeof(KT))) {
        if (dxv)
            bn_nt_wide_bwd_rows_f32((const float *)xv, (const float *)dyv, (float *)dxv, rows, C, mean, mlo, k1, k2,
                                    k3, bn_rows_wide(C, 5 * sizeof(KA)));
        return;
    }
#endif
    /* Wide rows: four rows per chunk of channels, each channel's five coefficients loaded once for the
       four rows (bn_rows_wide): seven loads per value one row at a time, three here, and the
       apply is bound by its loads (EPYC, float32 C = 2048, 2 threads: 0.61-0.65 -> 0.46-0.50 ms;
       C = 1024: 0.99-1.01 -> 0.81 ms). Streamed chunks start on output lines when rows are whole lines. */
    if (!mask && !narrow && bn_rows_wide(C, 5 * sizeof(KA)) && (!stream || (C * sizeof(KT)) % 64 == 0)) {
        if (!dxv) return;
        const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
        KT *dx = (KT *)dxv;
        BN_KALIGN KT st4[4][BN_CHUNK];
        int64_t r0 = 0;
        for (; r0 + 4 <= rows; r0 += 4) {
            for (int64_t c0 = 0, len; c0 < C; c0 += len) {
                len = bn_chunk_len(dx + r0 * C + c0, sizeof(KT), C - c0, stream);
                const int64_t o = r0 * C + c0;
                KN(bwd_apply4)(x ? x + o : NULL, dy + o, C, stream ? st4[0] : dx + o, stream ? BN_CHUNK : C, len,
                               mean + c0, mlo + c0, k1 + c0, k2 + c0, k3 + c0);
                if (stream)
                    for (int q = 0; q < 4; q++) bn_stream_copy(dx + o + q * C, st4[q], (size_t)len * sizeof(KT));
            }
        }
        for (; r0 < rows; r0++) {
            for (int64_t c0 = 0, len; c0 < C; c0 += len) {
                len = bn_chunk_len(dx + r0 * C + c0, sizeof(KT), C - c0, stream);
                const int64_t o = r0 * C + c0;
                KT *out = stream ? sdx : dx + o;
                KN(run_bwd_apply)(x ? x + o : NULL, dy + o, NULL, out, NULL, len, mean + c0, mlo + c0, k1 + c0,
                                  k2 + c0, k3 + c0);
                if (stream) bn_stream_copy(dx + o, sdx, (size_t)len * sizeof(KT));
            }
        }
        return;
    }
    if (!mask && bn_narrow_regs(C) && (!stream || bn_rows_on_lines(dxv, C, sizeof(KT)))) {
        if (!dxv) return;
        const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
        KT *dx = (KT *)dxv;
        if (C == 64) KN(rows_bwd_apply_w64)(x, dy, dx, rows, mean, mlo, k1, k2, k3, stream);
        else if (C == 32) KN(rows_bwd_apply_w32)(x, dy, dx, rows, mean, mlo, k1, k2, k3, stream);
        else KN(rows_bwd_apply_w16)(x, dy, dx, rows, mean, mlo, k1, k2, k3, stream);
        return;
    }
    if ((stream || narrow) && !mask) { /* flat chunks (on output lines when streaming), as rows_apply */
        if (!dxv) return;
        const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
        KT *dx = (KT *)dxv;
        const int64_t n = rows * C;
        BN_KALIGN KA e[5][BN_PERIOD]; /* as in rows_apply */
        const KA *cf[5] = {mean, mlo, k1, k2, k3};
        int64_t span = C;
        if (narrow) {
            for (int k = 0; k < 5; k++) cf[k] = KN(expand_period)(cf[k], C, e[k]);
            span = C - 1 + BN_CHUNK;
        }
#if defined(BN_KT_F32) && defined(BN_HAVE_NT_ROWS_F32) && BN_NT_WIDE
        if (stream && narrow) { /* as rows_apply: whole lines from the registers */
            for (int64_t i0 = 0, len; i0 < n; i0 += len) {
                len = bn_chunk_len(dx + i0, sizeof(KT), n - i0, 1);
                const int64_t c = i0 % C;
                int64_t pre, body;
                bn_line_split(dx + i0, sizeof(KT), len, &pre, &body);
                const int64_t post = len - pre - body;
                if (pre)
                    KN(run_bwd_apply)(x ? x + i0 : NULL, dy + i0, NULL, dx + i0, NULL, pre, cf[0] + c, cf[1] + c,
                                      cf[2] + c, cf[3] + c, cf[4] + c);
                if (body)
                    bn_nt_wide_bwd_rows_f32(x ? x + i0 + pre : NULL, dy + i0 + pre, dx + i0 + pre, 1, body,
                                            cf[0] + c + pre, cf[1] + c + pre, cf[2] + c + pre, cf[3] + c + pre,
                                            cf[4] + c + pre, 0);
                if (post) {
                    const int64_t q = i0 + pre + body, cq = c + pre + body;
                    KN(run_bwd_apply)(x ? x + q : NULL, dy + q, NULL, dx + q, NULL, post, cf[0] + cq, cf[1] + cq,
                                      cf[2] + cq, cf[3] + cq, cf[4] + cq);
                }
            }
            return;
        }
#endif
        for (int64_t i0 = 0, len; i0 < n; i0 += len) {
            len = bn_chunk_len(dx + i0, sizeof(KT), n - i0, stream);
            KT *out = stream ? sdx : dx + i0;
            for (int64_t p = i0, c = i0 % C; p < i0 + len; c = 0) {
                const int64_t seg = span - c < i0 + len - p ? span - c : i0 + len - p;
                KN(run_bwd_apply)(x ? x + p : NULL, dy + p, NULL, out + (p - i0), NULL, seg, cf[0] + c, cf[1] + c,
                                  cf[2] + c, cf[3] + c, cf[4] + c);
                p += seg;
            }
            if (stream) bn_stream_copy(dx + i0, sdx, (size_t)len * sizeof(KT));
        }
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        const KT *xr = xv ? (const KT *)xv + r * C : NULL, *gr = (const KT *)dyv + r * C;
        KT *dxr = dxv ? (KT *)dxv + r * C : NULL;
        KT *dar = mask && daddv ? (KT *)daddv + r * C : NULL;
        for (int64_t c0 = 0, len; c0 < C; c0 += len) {
            len = bn_chunk_len(dxr ? dxr + c0 : NULL, sizeof(KT), C - c0, stream && !mask && dxr);
            const KT *xc = xr ? xr + c0 : NULL, *gc = gr + c0;
            const KA *mc = mean + c0, *lc = mlo + c0, *a1 = k1 + c0, *a2 = k2 + c0, *a3 = k3 + c0;
            KT *odx = dxr ? (stream ? sdx : dxr + c0) : NULL;
            KT *oda = dar ? (stream ? sda : dar + c0) : NULL;
            if (mask) bn_bits_to_u8(mask + r * mstride + (c0 >> 3), len, m);
            const uint8_t *mm = mask ? m : NULL;
            BN_BWD_LOOPS(odx, oda, xc, gc, mm, len, mc[i], lc[i], a1[i], a2[i], a3[i]);
            if (stream) {
                if (odx) bn_stream_copy(dxr + c0, sdx, (size_t)len * sizeof(KT));
                if (oda) bn_stream_copy(dar + c0, sda, (size_t)len * sizeof(KT));
            }
        }
    }
}

static void KN(to_f32)(const void *srcv, float *dst, int64_t n) {
    const KT *src = (const KT *)srcv;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = (float)KLD(src[i]);
}

static void KN(from_f32)(const float *src, void *dstv, int64_t n) {
    KT *dst = (KT *)dstv;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = KST((KA)src[i]);
}

#undef KBIT

/* Runs of small planes (channels-first, planes under 2 KiB: 7x7, 14x14). A run is the n = np * inner
 * contiguous values of np consecutive planes; per-channel quantities come expanded, one entry per
 * value (arrays of the compute type, built once per channel block by the driver and reused for every
 * batch index), so each kernel is one flat loop over the run instead of a call, a reduction and a
 * remainder loop per plane of 49 or 196 values. */

/* s1[i] += x[i] - k[i], s2[i] += (x[i] - k[i])^2 in double, element by element (the accumulators of
 * a channel block live in L1/L2 across the batch). Not for float64 data. */
static void KN(run_stats)(const void *xv, int64_t n, const void *kv, double *s1, double *s2) {
    const KT *x = (const KT *)xv;
    const KA *k = (const KA *)kv;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        double d = (double)KLD(x[i]) - (double)k[i];
        s1[i] += d;
        BN_SQ_ACC(s2[i], d);
    }
}

/* y = (x - mh - ml) * sc + sh [+ add] [ReLU] over np planes of inner values: the expression of
 * seg_apply, so the outputs are bit-identical to it. With a mask, each plane's bits start on a byte
 * (plane j at mask + j * mstride). */
static void KN(run_apply)(const void *xv, void *yv, const void *addv, uint8_t *mask, int64_t mstride, int64_t np,
                          int64_t inner, const void *mhv, const void *mlv, const void *scv, const void *shv, int relu) {
    const KT *x = (const KT *)xv, *add = (const KT *)addv;
    const KA *mh = (const KA *)mhv, *ml = (const KA *)mlv, *sc = (const KA *)scv, *sh = (const KA *)shv;
    KT *y = (KT *)yv;
    if (!mask) {
        const int64_t n = np * inner;
        BN_APPLY_LOOPS(y, x, add, n, relu, mh[i], ml[i], sc[i], sh[i]);
        return;
    }
    BN_KALIGN KA z[BN_CHUNK];
    for (int64_t j = 0; j < np; j++) {
        for (int64_t i0 = 0; i0 < inner; i0 += BN_CHUNK) {
            const int64_t len = inner - i0 < BN_CHUNK ? inner - i0 : BN_CHUNK, o = j * inner + i0;
            const KT *ao = add ? add + o : NULL;
            BN_Z_LOOPS(z, x + o, ao, len, mh[o + i], ml[o + i], sc[o + i], sh[o + i]);
            KN(masked_out)(z, y + o, mask + j * mstride + (i0 >> 3), len, relu);
        }
    }
}

/* Expands the mask bits of np planes (plane j at mask + j * mstride) to one byte per value. */
static void KN(run_mask_u8)(const uint8_t *mask, int64_t mstride, int64_t np, int64_t inner, uint8_t *m) {
    for (int64_t j = 0; j < np; j++) bn_bits_to_u8(mask + j * mstride, inner, m + j * inner);
}

/* g = dy [* mask]; ag[i] += g, agx[i] += g * (x - mh - ml), element by element in double (the
 * expression of seg_bwd_reduce). m: the mask expanded to bytes (run_mask_u8), or NULL. */
static void KN(run_bwd_reduce)(const void *xv, const void *dyv, const uint8_t *m, int64_t n, const void *mhv,
                               const void *mlv, double *ag, double *agx) {
    const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
    const KA *mh = (const KA *)mhv, *ml = (const KA *)mlv;
    if (m) { /* the select in the compute type first: a byte select feeding double sums stays scalar */
        KA gm[BN_CHUNK];
        for (int64_t i0 = 0; i0 < n; i0 += BN_CHUNK) {
            const int64_t len = n - i0 < BN_CHUNK ? n - i0 : BN_CHUNK;
#pragma omp simd
            for (int64_t i = 0; i < len; i++) gm[i] = m[i0 + i] ? KLD(dy[i0 + i]) : (KA)0;
#pragma omp simd
            for (int64_t i = 0; i < len; i++) {
                double g = (double)gm[i];
                ag[i0 + i] += g;
                agx[i0 + i] += g * (double)(KLD(x[i0 + i]) - mh[i0 + i] - ml[i0 + i]);
            }
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            double g = (double)KLD(dy[i]);
            ag[i] += g;
            agx[i] += g * (double)(KLD(x[i]) - mh[i] - ml[i]);
        }
    }
}

/* g = dy [* m]; dadd = g (if not NULL; only with a mask); dx = g * k1 - k2 - (x - mh - ml) * k3 (if not
 * NULL), the expression of seg_bwd_apply. */
static void KN(run_bwd_apply)(const void *xv, const void *dyv, const uint8_t *m, void *dxv, void *daddv, int64_t n,
                              const void *mhv, const void *mlv, const void *k1v, const void *k2v, const void *k3v) {
    const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
    KT *dx = (KT *)dxv, *dadd = (KT *)daddv;
    const KA *mh = (const KA *)mhv, *ml = (const KA *)mlv, *k1 = (const KA *)k1v, *k2 = (const KA *)k2v,
             *k3 = (const KA *)k3v;
    BN_BWD_LOOPS(dx, dadd, x, dy, m, n, mh[i], ml[i], k1[i], k2[i], k3[i]);
}
