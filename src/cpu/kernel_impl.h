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

/* Two-pass moments with the compensating term s1 (Chan, Golub & LeVeque's corrected two-pass):
 * m2 = sum (x - r)^2 - (sum (x - r))^2 / n stays exact even though r is the rounded mean. */
static void KN(seg_stats)(const void *xv, int64_t n, double *mean, double *m2) {
    const KT *x = (const KT *)xv;
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += (double)KLD(x[i]);
    KA r = (KA)(s / (double)n);
    double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < n; i++) {
        double d = (double)(KLD(x[i]) - r);
        s1 += d;
        s2 += d * d;
    }
    *mean = (double)r + s1 / (double)n;
    *m2 = s2 - s1 * s1 / (double)n;
    if (*m2 < 0) *m2 = 0;
}

static inline KA KN(relu)(KA z) { return z <= (KA)0 ? (KA)0 : z; }

static void KN(seg_apply)(const void *xv, void *yv, const void *addv, uint8_t *mask, int64_t n,
                          double meand, double scaled, double shiftd, int relu) {
    const KT *x = (const KT *)xv, *add = (const KT *)addv;
    KT *y = (KT *)yv;
    const KA mean = (KA)meand, mlo = (KA)(meand - (double)mean), scale = (KA)scaled, shift = (KA)shiftd;
    if (!mask) {
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
        return;
    }
    /* with a mask: 8 values per mask byte */
    for (int64_t i0 = 0; i0 < n; i0 += 8) {
        int64_t len = n - i0 < 8 ? n - i0 : 8;
        unsigned bits = 0;
        for (int64_t j = 0; j < len; j++) {
            KA z = (KLD(x[i0 + j]) - mean - mlo) * scale + shift;
            if (add) z += KLD(add[i0 + j]);
            bits |= (unsigned)(z > (KA)0) << j;
            y[i0 + j] = KST(relu ? KN(relu)(z) : z);
        }
        mask[i0 >> 3] = (uint8_t)bits;
    }
}

#define KBIT(mask, i) (((mask)[(i) >> 3] >> ((i)&7)) & 1)

static void KN(seg_bwd_reduce)(const void *xv, const void *dyv, const uint8_t *mask, int64_t n,
                               double meand, double *sg, double *sgx) {
    const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
    const KA mean = (KA)meand, mlo = (KA)(meand - (double)mean);
    double a = 0, b = 0;
    if (mask) {
#pragma omp simd reduction(+ : a, b)
        for (int64_t i = 0; i < n; i++) {
            double g = KBIT(mask, i) ? (double)KLD(dy[i]) : 0.0;
            a += g;
            b += g * (double)(KLD(x[i]) - mean - mlo);
        }
    } else {
#pragma omp simd reduction(+ : a, b)
        for (int64_t i = 0; i < n; i++) {
            double g = (double)KLD(dy[i]);
            a += g;
            b += g * (double)(KLD(x[i]) - mean - mlo);
        }
    }
    *sg += a;
    *sgx += b;
}

static void KN(seg_bwd_apply)(const void *xv, const void *dyv, const uint8_t *mask, void *dxv, void *daddv,
                              int64_t n, double meand, double k1d, double k2d, double k3d) {
    const KT *x = (const KT *)xv, *dy = (const KT *)dyv;
    KT *dx = (KT *)dxv, *dadd = (KT *)daddv;
    const KA mean = (KA)meand, mlo = (KA)(meand - (double)mean), k1 = (KA)k1d, k2 = (KA)k2d, k3 = (KA)k3d;
    if (mask) {
        /* dx and dadd may alias dy: read g before either write */
        for (int64_t i = 0; i < n; i++) {
            KA g = KBIT(mask, i) ? KLD(dy[i]) : (KA)0;
            if (dadd) dadd[i] = KST(g);
            if (dx) dx[i] = KST(g * k1 - k2 - (KLD(x[i]) - mean - mlo) * k3);
        }
    } else if (dx) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dx[i] = KST(KLD(dy[i]) * k1 - k2 - (KLD(x[i]) - mean - mlo) * k3);
    }
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
                           const void *scalev, const void *shiftv, int relu) {
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov, *scale = (const KA *)scalev, *shift = (const KA *)shiftv;
    for (int64_t r = 0; r < rows; r++) {
        const KT *xr = (const KT *)xv + r * C;
        const KT *ar = addv ? (const KT *)addv + r * C : NULL;
        KT *yr = (KT *)yv + r * C;
        if (mask) {
            uint8_t *mr = mask + r * mstride;
            for (int64_t c0 = 0; c0 < C; c0 += 8) {
                int64_t len = C - c0 < 8 ? C - c0 : 8;
                unsigned bits = 0;
                for (int64_t j = 0; j < len; j++) {
                    int64_t c = c0 + j;
                    KA z = (KLD(xr[c]) - mean[c] - mlo[c]) * scale[c] + shift[c];
                    if (ar) z += KLD(ar[c]);
                    bits |= (unsigned)(z > (KA)0) << j;
                    yr[c] = KST(relu ? KN(relu)(z) : z);
                }
                mr[c0 >> 3] = (uint8_t)bits;
            }
        } else if (ar && relu) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++)
                yr[c] = KST(KN(relu)((KLD(xr[c]) - mean[c] - mlo[c]) * scale[c] + shift[c] + KLD(ar[c])));
        } else if (ar) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) yr[c] = KST((KLD(xr[c]) - mean[c] - mlo[c]) * scale[c] + shift[c] + KLD(ar[c]));
        } else if (relu) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) yr[c] = KST(KN(relu)((KLD(xr[c]) - mean[c] - mlo[c]) * scale[c] + shift[c]));
        } else {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) yr[c] = KST((KLD(xr[c]) - mean[c] - mlo[c]) * scale[c] + shift[c]);
        }
    }
}

static void KN(rows_bwd_reduce)(const void *xv, const void *dyv, const uint8_t *mask, int64_t mstride,
                                int64_t rows, int64_t C, const void *meanv, const void *mlov, double *sg,
                                double *sgx) {
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov;
    for (int64_t r = 0; r < rows; r++) {
        const KT *xr = (const KT *)xv + r * C, *gr = (const KT *)dyv + r * C;
        if (mask) {
            const uint8_t *mr = mask + r * mstride;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                double g = KBIT(mr, c) ? (double)KLD(gr[c]) : 0.0;
                sg[c] += g;
                sgx[c] += g * (double)(KLD(xr[c]) - mean[c] - mlo[c]);
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
                               const void *mlov, const void *k1v, const void *k2v, const void *k3v) {
    const KA *mean = (const KA *)meanv, *mlo = (const KA *)mlov, *k1 = (const KA *)k1v, *k2 = (const KA *)k2v, *k3 = (const KA *)k3v;
    for (int64_t r = 0; r < rows; r++) {
        const KT *xr = (const KT *)xv + r * C, *gr = (const KT *)dyv + r * C;
        KT *dxr = dxv ? (KT *)dxv + r * C : NULL;
        KT *dar = daddv ? (KT *)daddv + r * C : NULL;
        if (mask) {
            const uint8_t *mr = mask + r * mstride;
            for (int64_t c = 0; c < C; c++) {
                KA g = KBIT(mr, c) ? KLD(gr[c]) : (KA)0;
                if (dar) dar[c] = KST(g);
                if (dxr) dxr[c] = KST(g * k1[c] - k2[c] - (KLD(xr[c]) - mean[c] - mlo[c]) * k3[c]);
            }
        } else if (dxr) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++)
                dxr[c] = KST(KLD(gr[c]) * k1[c] - k2[c] - (KLD(xr[c]) - mean[c] - mlo[c]) * k3[c]);
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
