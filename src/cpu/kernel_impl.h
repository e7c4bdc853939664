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
enum { BN_ACC = 32 };
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
 * m2 = sum (x - r)^2 - (sum (x - r))^2 / n stays exact even though r is the rounded mean. */
static void KN(seg_stats)(const void *xv, int64_t n, double *mean, double *m2) {
    const KT *x = (const KT *)xv;
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

static inline KA KN(relu)(KA z) { return z <= (KA)0 ? (KA)0 : z; }

/* Apply kernels work in chunks of BN_CHUNK values (a multiple of 8, so a chunk's mask bits start on a
 * byte). With `stream`, a chunk is computed into a small staging buffer (L1) and then written with
 * streaming stores (bn_stream_copy): the output bypasses the caches, so it neither costs a
 * read-for-ownership nor evicts the input the caller still wants in cache. Without it, outputs are
 * written directly. Either way the arithmetic is the same expression, so results are identical. */
#ifndef BN_CHUNK
#define BN_CHUNK 256
#endif

/* y = (x - mean - mlo) * scale + shift [+ add] [ReLU] over n values, scalar coefficients. */
static inline void KN(apply_run)(const KT *x, KT *y, const KT *add, int64_t n, KA mean, KA mlo, KA scale,
                                 KA shift, int relu) {
    if (add && relu) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[i] = KST(KN(relu)((KLD(x[i]) - mean - mlo) * scale + shift + KLD(add[i])));
    } else if (add) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[i] = KST((KLD(x[i]) - mean - mlo) * scale + shift + KLD(add[i]));
    } else if (relu) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[i] = KST(KN(relu)((KLD(x[i]) - mean - mlo) * scale + shift));
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[i] = KST((KLD(x[i]) - mean - mlo) * scale + shift);
    }
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
    KT stage[BN_CHUNK];
    KA z[BN_CHUNK];
    for (int64_t i0 = 0; i0 < n; i0 += BN_CHUNK) {
        const int64_t len = n - i0 < BN_CHUNK ? n - i0 : BN_CHUNK;
        const KT *xc = x + i0, *ac = add ? add + i0 : NULL;
        KT *out = stream ? stage : y + i0;
        if (mask) {
            if (ac) {
#pragma omp simd
                for (int64_t i = 0; i < len; i++) z[i] = (KLD(xc[i]) - mean - mlo) * scale + shift + KLD(ac[i]);
            } else {
#pragma omp simd
                for (int64_t i = 0; i < len; i++) z[i] = (KLD(xc[i]) - mean - mlo) * scale + shift;
            }
            KN(masked_out)(z, out, mask + (i0 >> 3), len, relu);
        } else {
            KN(apply_run)(xc, out, ac, len, mean, mlo, scale, shift, relu);
        }
        if (stream) bn_stream_copy(y + i0, stage, (size_t)len * sizeof(KT));
    }
    if (stream) bn_stream_fence();
}

#define KBIT(mask, i) (((mask)[(i) >> 3] >> ((i)&7)) & 1)

static void KN(seg_bwd_reduce)(const void *xv, const void *dyv, const uint8_t *mask, int64_t n,
                               double meand, double *sg, double *sgx) {
    const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
    const KA mean = (KA)meand, mlo = (KA)(meand - (double)mean);
    double a = 0, b = 0;
    if (mask) {
        /* masked g first (a select the compiler vectorizes), then the plain double reduction */
        uint8_t m[BN_CHUNK];
        KA gm[BN_CHUNK];
        for (int64_t i0 = 0; i0 < n; i0 += BN_CHUNK) {
            const int64_t len = n - i0 < BN_CHUNK ? n - i0 : BN_CHUNK;
            const KT *xc = x + i0, *gc = dy + i0;
            bn_bits_to_u8(mask + (i0 >> 3), len, m);
#pragma omp simd
            for (int64_t i = 0; i < len; i++) gm[i] = m[i] ? KLD(gc[i]) : (KA)0;
#pragma omp simd reduction(+ : a, b)
            for (int64_t i = 0; i < len; i++) {
                double g = (double)gm[i];
                a += g;
                b += g * (double)(KLD(xc[i]) - mean - mlo);
            }
        }
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
    if (m && dx && dadd) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            KA g = m[i] ? KLD(dy[i]) : (KA)0;
            KA v = g * k1 - k2 - (KLD(x[i]) - mean - mlo) * k3;
            dadd[i] = KST(g);
            dx[i] = KST(v);
        }
    } else if (m && dadd) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dadd[i] = KST(m[i] ? KLD(dy[i]) : (KA)0);
    } else if (m && dx) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            KA g = m[i] ? KLD(dy[i]) : (KA)0;
            dx[i] = KST(g * k1 - k2 - (KLD(x[i]) - mean - mlo) * k3);
        }
    } else if (dx) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dx[i] = KST(KLD(dy[i]) * k1 - k2 - (KLD(x[i]) - mean - mlo) * k3);
    }
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
    KT sdx[BN_CHUNK], sda[BN_CHUNK];
    for (int64_t i0 = 0; i0 < n; i0 += BN_CHUNK) {
        const int64_t len = n - i0 < BN_CHUNK ? n - i0 : BN_CHUNK;
        if (mask) bn_bits_to_u8(mask + (i0 >> 3), len, m);
        KT *odx = dx ? (stream ? sdx : dx + i0) : NULL;
        KT *oda = mask && dadd ? (stream ? sda : dadd + i0) : NULL;
        KN(bwd_run)(x + i0, dy + i0, mask ? m : NULL, odx, oda, len, mean, mlo, k1, k2, k3);
        if (stream) {
            if (odx) bn_stream_copy(dx + i0, sdx, (size_t)len * sizeof(KT));
            if (oda) bn_stream_copy(dadd + i0, sda, (size_t)len * sizeof(KT));
        }
    }
    if (stream) bn_stream_fence();
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

static void KN(rows_apply)(const void *xv, void *yv, const void *addv, uint8_t *mask, int64_t mstride,
                           int64_t rows, int64_t C, const void *meanv, const void *mlov,
                           const void *scalev, const void *shiftv, int relu, int stream) {
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov, *scale = (const KA *)scalev, *shift = (const KA *)shiftv;
    KT stage[BN_CHUNK];
    KA z[BN_CHUNK];
    for (int64_t r = 0; r < rows; r++) {
        const KT *xr = (const KT *)xv + r * C;
        const KT *ar = addv ? (const KT *)addv + r * C : NULL;
        KT *yr = (KT *)yv + r * C;
        for (int64_t c0 = 0; c0 < C; c0 += BN_CHUNK) {
            const int64_t len = C - c0 < BN_CHUNK ? C - c0 : BN_CHUNK;
            const KT *xc = xr + c0, *ac = ar ? ar + c0 : NULL;
            const KA *mc = mean + c0, *lc = mlo + c0, *sc = scale + c0, *bc = shift + c0;
            KT *out = stream ? stage : yr + c0;
            if (mask) {
                if (ac) {
#pragma omp simd
                    for (int64_t i = 0; i < len; i++) z[i] = (KLD(xc[i]) - mc[i] - lc[i]) * sc[i] + bc[i] + KLD(ac[i]);
                } else {
#pragma omp simd
                    for (int64_t i = 0; i < len; i++) z[i] = (KLD(xc[i]) - mc[i] - lc[i]) * sc[i] + bc[i];
                }
                KN(masked_out)(z, out, mask + r * mstride + (c0 >> 3), len, relu);
            } else if (ac && relu) {
#pragma omp simd
                for (int64_t i = 0; i < len; i++)
                    out[i] = KST(KN(relu)((KLD(xc[i]) - mc[i] - lc[i]) * sc[i] + bc[i] + KLD(ac[i])));
            } else if (ac) {
#pragma omp simd
                for (int64_t i = 0; i < len; i++) out[i] = KST((KLD(xc[i]) - mc[i] - lc[i]) * sc[i] + bc[i] + KLD(ac[i]));
            } else if (relu) {
#pragma omp simd
                for (int64_t i = 0; i < len; i++) out[i] = KST(KN(relu)((KLD(xc[i]) - mc[i] - lc[i]) * sc[i] + bc[i]));
            } else {
#pragma omp simd
                for (int64_t i = 0; i < len; i++) out[i] = KST((KLD(xc[i]) - mc[i] - lc[i]) * sc[i] + bc[i]);
            }
            if (stream) bn_stream_copy(yr + c0, stage, (size_t)len * sizeof(KT));
        }
    }
    if (stream) bn_stream_fence();
}

static void KN(rows_bwd_reduce)(const void *xv, const void *dyv, const uint8_t *mask, int64_t mstride,
                                int64_t rows, int64_t C, const void *meanv, const void *mlov, double *sg,
                                double *sgx) {
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov;
    uint8_t m[BN_CHUNK];
    KA gm[BN_CHUNK];
    for (int64_t r = 0; r < rows; r++) {
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

static void KN(rows_bwd_apply)(const void *xv, const void *dyv, const uint8_t *mask, int64_t mstride,
                               void *dxv, void *daddv, int64_t rows, int64_t C, const void *meanv,
                               const void *mlov, const void *k1v, const void *k2v, const void *k3v, int stream) {
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov, *k1 = (const KA *)k1v, *k2 = (const KA *)k2v, *k3 = (const KA *)k3v;
    uint8_t m[BN_CHUNK];
    KT sdx[BN_CHUNK], sda[BN_CHUNK];
    for (int64_t r = 0; r < rows; r++) {
        const KT *xr = (const KT *)xv + r * C, *gr = (const KT *)dyv + r * C;
        KT *dxr = dxv ? (KT *)dxv + r * C : NULL;
        KT *dar = mask && daddv ? (KT *)daddv + r * C : NULL;
        for (int64_t c0 = 0; c0 < C; c0 += BN_CHUNK) {
            const int64_t len = C - c0 < BN_CHUNK ? C - c0 : BN_CHUNK;
            const KT *xc = xr + c0, *gc = gr + c0;
            const KA *mc = mean + c0, *lc = mlo + c0, *a1 = k1 + c0, *a2 = k2 + c0, *a3 = k3 + c0;
            KT *odx = dxr ? (stream ? sdx : dxr + c0) : NULL;
            KT *oda = dar ? (stream ? sda : dar + c0) : NULL;
            if (mask) {
                bn_bits_to_u8(mask + r * mstride + (c0 >> 3), len, m);
                if (odx && oda) {
#pragma omp simd
                    for (int64_t i = 0; i < len; i++) {
                        KA g = m[i] ? KLD(gc[i]) : (KA)0;
                        KA v = g * a1[i] - a2[i] - (KLD(xc[i]) - mc[i] - lc[i]) * a3[i];
                        oda[i] = KST(g);
                        odx[i] = KST(v);
                    }
                } else if (oda) {
#pragma omp simd
                    for (int64_t i = 0; i < len; i++) oda[i] = KST(m[i] ? KLD(gc[i]) : (KA)0);
                } else if (odx) {
#pragma omp simd
                    for (int64_t i = 0; i < len; i++) {
                        KA g = m[i] ? KLD(gc[i]) : (KA)0;
                        odx[i] = KST(g * a1[i] - a2[i] - (KLD(xc[i]) - mc[i] - lc[i]) * a3[i]);
                    }
                }
            } else if (odx) {
#pragma omp simd
                for (int64_t i = 0; i < len; i++)
                    odx[i] = KST(KLD(gc[i]) * a1[i] - a2[i] - (KLD(xc[i]) - mc[i] - lc[i]) * a3[i]);
            }
            if (stream) {
                if (odx) bn_stream_copy(dxr + c0, sdx, (size_t)len * sizeof(KT));
                if (oda) bn_stream_copy(dar + c0, sda, (size_t)len * sizeof(KT));
            }
        }
    }
    if (stream) bn_stream_fence();
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
