/*
 * test_kernels.c - the channels-last forward and backward applies (rows_apply, rows_bwd_apply) of every
 * instruction-set variant, every dtype and every way of writing their output, bit for bit against the
 * portable (scalar) variant written through the cache.
 *
 * The apply is element-wise, so every variant and every path must give the same bits: the flat walk
 * with periodically expanded coefficients, the narrow rows with their coefficients in registers
 * (C = 16, 32, 64), the float32 rows stored from the registers with non-temporal stores (AVX-512), the
 * staged and streamed chunks, and the row-by-row walk of wide rows. The data include NaN, infinities,
 * signed zeros and values whose normalized result is -0 or rounds to 0, which the ReLU must turn into
 * +0 (and keep NaN; NaNs compare equal whatever their sign and payload). Outputs are 64-byte aligned (where the streamed paths run) and misaligned by one
 * element (where they must not). Also the masked copy of the fused backward on rows (mask_copy).
 */
#include "harness.h"

#include "core/internal.h"
#include "cpu/kernels.h"

#include <math.h>

static double pick_value(void) {
    switch (th_randint(0, 15)) {
    case 0: return NAN;
    case 1: return th_randint(0, 1) ? INFINITY : -INFINITY;
    case 2: return th_randint(0, 1) ? 0.0 : -0.0;
    case 3: return 0.5; /* equal to a mean below: x - mean = 0 */
    default: return th_normal() * 3.0;
    }
}

/* Bit for bit (the sign of zero included), except that any NaN equals any NaN: where two NaNs meet
 * (a zero scale times an infinity, plus a NaN addend), C leaves open which one's sign and payload the
 * sum keeps, and the compilers order the operands differently in different variants. */
static int same_value(double a, double b) {
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    return memcmp(&a, &b, sizeof a) == 0;
}

static size_t csize(bnorm_dtype dt) { return dt == BNORM_DTYPE_F64 ? sizeof(double) : sizeof(float); }

/* Coefficients of compute type (double for float64 data, else float). */
static void *coef(bnorm_dtype dt, int64_t C, double scale, double base) {
    void *p = malloc((size_t)C * csize(dt));
    for (int64_t c = 0; c < C; c++) {
        double v = base + scale * th_normal();
        if (c % 7 == 3) v = base; /* the exact mean of the value 0.5 below */
        if (dt == BNORM_DTYPE_F64) ((double *)p)[c] = v;
        else ((float *)p)[c] = (float)v;
    }
    return p;
}

/* One case's inputs, and which apply runs on them. */
typedef struct kcase {
    bnorm_dtype dt;
    int64_t rows, C;
    const void *x, *a; /* a: the addend (forward) or dy (backward) */
    const void *mh, *ml, *sc, *sh, *k3;
    int backward, add, relu, with_x;
} kcase;

static void run_apply(const bn_kernels *k, const kcase *c, void *y, int stream) {
    if (c->backward)
        k->rows_bwd_apply(c->with_x ? c->x : NULL, c->a, NULL, 0, y, NULL, c->rows, c->C, c->mh, c->ml, c->sc, c->sh,
                          c->k3, stream);
    else
        k->rows_apply(c->x, y, c->add ? c->a : NULL, NULL, 0, c->rows, c->C, c->mh, c->ml, c->sc, c->sh, c->relu,
                      stream);
}

/* Every variant, streamed or not, output aligned or one element off a line, against the scalar variant
 * written through the cache. */
static void check_variants(const kcase *c, const double *xv, const double *av, double *want, double *got) {
    const int64_t n = c->rows * c->C;
    const size_t es = bnorm_dtype_size(c->dt);
    th_buf W = th_alloc(c->dt, n, 0);
    run_apply(bn_kernels_variant(BNORM_ISA_SCALAR, c->dt), c, W.p, 0);
    th_load(&W, want);
    th_free(&W);
    for (int isa = BNORM_ISA_SCALAR; isa <= BNORM_ISA_AVX512; isa++) {
        const bn_kernels *k = bn_kernels_variant((bnorm_isa)isa, c->dt);
        if (!k) continue;
        for (int stream = 0; stream <= 1; stream++)
            for (int mis = 0; mis <= 1; mis++) {
                th_buf Y = th_alloc(c->dt, n, mis ? (int)es : 0);
                memset(Y.p, 0x5a, (size_t)n * es);
                run_apply(k, c, Y.p, stream);
                th_load(&Y, got);
                th_free(&Y);
                int64_t bad = -1;
                for (int64_t i = 0; i < n && bad < 0; i++)
                    if (!same_value(got[i], want[i])) bad = i;
                CHECK(bad < 0,
                      "%s %s isa=%d rows=%lld C=%lld add=%d relu=%d x=%d stream=%d misaligned=%d: value %lld is %a, "
                      "the scalar variant's %a (x %g, addend or dy %g)",
                      c->backward ? "backward" : "forward", bnorm_dtype_name(c->dt), isa, (long long)c->rows,
                      (long long)c->C, c->add, c->relu, c->with_x, stream, mis, (long long)bad,
                      bad < 0 ? 0.0 : got[bad], bad < 0 ? 0.0 : want[bad], bad < 0 ? 0.0 : xv[bad],
                      bad < 0 ? 0.0 : av[bad]);
            }
    }
}

/* A case's random data: x and the addend (or dy) as doubles and stored in dtype, and room for results. */
typedef struct kdata {
    double *xv, *av, *got, *want;
    th_buf X, A;
} kdata;

static kdata kdata_make(bnorm_dtype dt, int64_t n) {
    kdata d;
    d.xv = malloc(sizeof(double) * (size_t)n);
    d.av = malloc(sizeof(double) * (size_t)n);
    d.got = malloc(sizeof(double) * (size_t)n);
    d.want = malloc(sizeof(double) * (size_t)n);
    for (int64_t i = 0; i < n; i++) {
        d.xv[i] = pick_value();
        d.av[i] = th_randint(0, 3) == 0 ? pick_value() : th_normal();
    }
    d.X = th_alloc(dt, n, 0);
    d.A = th_alloc(dt, n, 0);
    th_store(&d.X, d.xv);
    th_store(&d.A, d.av);
    return d;
}

static void kdata_free(kdata *d) {
    th_free(&d->X);
    th_free(&d->A);
    free(d->xv);
    free(d->av);
    free(d->got);
    free(d->want);
}

static void one_case(bnorm_dtype dt, int64_t rows, int64_t C) {
    kdata d = kdata_make(dt, rows * C);
    double *xv = d.xv, *av = d.av, *got = d.got, *want = d.want;
    void *mh = coef(dt, C, 0.0, 0.5), *ml = coef(dt, C, 1e-9, 0.0), *sc = coef(dt, C, 1.0, 0.0),
         *sh = coef(dt, C, 0.5, 0.0), *k3 = coef(dt, C, 0.3, 0.0);
    kcase c = {dt, rows, C, d.X.p, d.A.p, mh, ml, sc, sh, k3, 0, 0, 0, 1};
    for (int variant = 0; variant < 4; variant++) { /* the forward: y = (x - mh - ml) * sc + sh [+ add] [ReLU] */
        c.add = variant & 1;
        c.relu = (variant >> 1) & 1;
        check_variants(&c, xv, av, want, got);
    }
    /* the backward apply: dx = dy * k1 - k2 - (x - mh - ml) * k3 (k1, k2 = sc, sh), and dy * k1 without x
       (eval); A is dy */
    c.backward = 1;
    c.add = c.relu = 0;
    for (c.with_x = 0; c.with_x <= 1; c.with_x++) check_variants(&c, xv, av, want, got);
    kdata_free(&d);
    free(mh);
    free(ml);
    free(sc);
    free(sh);
    free(k3);
}

/* mask_copy (the fused backward's masked gradient on rows): out = bit ? dy : 0, byte for byte against a
 * plain loop, for every variant and dtype, at lengths around the vector widths, an output offset by one
 * element, and nothing written past n. */
static void test_mask_copy(void) {
    const bnorm_dtype dts[] = {BNORM_DTYPE_F32, BNORM_DTYPE_F64, BNORM_DTYPE_F16, BNORM_DTYPE_BF16};
    const int64_t lens[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 200, 1031};
    for (size_t d = 0; d < 4; d++) {
        const size_t es = bnorm_dtype_size(dts[d]);
        for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
            const int64_t n = lens[li];
            unsigned char *src = malloc(es * (size_t)(n + 1)), *want = malloc(es * (size_t)(n + 2));
            unsigned char *got = malloc(es * (size_t)(n + 2)), *bits = calloc((size_t)(n + 7) / 8 + 1, 1);
            for (size_t i = 0; i < es * (size_t)n; i++) src[i] = (unsigned char)th_randint(0, 255);
            for (int64_t i = 0; i < n; i++) /* runs of ones and zeros as well as random bits */
                if (i % 40 < 10 ? 1 : i % 40 < 20 ? 0 : th_randint(0, 1)) bits[i >> 3] |= (unsigned char)(1u << (i & 7));
            memset(want, 0xAB, es * (size_t)(n + 2));
            for (int64_t i = 0; i < n; i++) {
                if ((bits[i >> 3] >> (i & 7)) & 1) memcpy(want + es * (size_t)(i + 1), src + es * (size_t)i, es);
                else memset(want + es * (size_t)(i + 1), 0, es);
            }
            for (int isa = BNORM_ISA_SCALAR; isa <= BNORM_ISA_AVX512; isa++) {
                const bn_kernels *k = bn_kernels_variant((bnorm_isa)isa, dts[d]);
                if (!k) continue;
                memset(got, 0xAB, es * (size_t)(n + 2));
                k->mask_copy(src, bits, n, got + es); /* one element in: misaligned for every vector width */
                CHECK(memcmp(got, want, es * (size_t)(n + 2)) == 0, "mask_copy %s isa=%d n=%lld differs",
                      bnorm_dtype_name(dts[d]), isa, (long long)n);
            }
            free(src);
            free(want);
            free(got);
            free(bits);
        }
    }
}

/* The low part of the mean all +0 (inference) takes a shorter expression on wide rows, x - mh instead of
 * x - mh - ml: it must give the bits of the full one. Checked against y = (x - mh - ml) * sc + sh
 * [+ add] [ReLU] evaluated here in the compute type, with ml all +0 and all -0 (which must not take
 * the shortcut: x - mh = -0 minus -0 is +0), and mh = 0 with a shift of -0 on some channels, where
 * x = -0 gives y = -0 and the low part's sign shows. float32 and float64 (the storage types round the same expression). */
static void zero_lo_case(bnorm_dtype dt, int64_t rows, int64_t C, int neg) {
    const int64_t n = rows * C;
    const int f64 = dt == BNORM_DTYPE_F64;
    kdata d = kdata_make(dt, n);
    double *xv = d.xv, *av = d.av, *got = d.got, *want = d.want;
    th_load(&d.X, xv); /* the values as stored */
    th_load(&d.A, av);
    void *mh = coef(dt, C, 1.0, 0.5), *ml = coef(dt, C, 0.0, 0.0), *sc = coef(dt, C, 1.0, 0.0),
         *sh = coef(dt, C, 0.5, 0.0);
    for (int64_t c = 0; c < C; c++) {
        if (c % 3 == 0) { /* x = -0 gives x - mh = -0, whose sign only a shift of -0 keeps in y */
            if (f64) ((double *)mh)[c] = 0.0, ((double *)sh)[c] = -0.0;
            else ((float *)mh)[c] = 0.0f, ((float *)sh)[c] = -0.0f;
        }
        if (f64) ((double *)ml)[c] = neg ? -0.0 : 0.0;
        else ((float *)ml)[c] = neg ? -0.0f : 0.0f;
    }
    for (int variant = 0; variant < 4; variant++) {
        const int add = variant & 1, relu = variant >> 1;
        for (int64_t i = 0; i < n; i++) {
            const int64_t c = i % C;
            if (f64) {
                const double *h = mh, *l = ml, *s_ = sc, *b = sh;
                double z = (xv[i] - h[c] - l[c]) * s_[c] + b[c];
                if (add) z = z + av[i];
                want[i] = relu && !(z > 0) && !isnan(z) ? 0.0 : z;
            } else {
                const float *h = mh, *l = ml, *s_ = sc, *b = sh;
                float z = ((float)xv[i] - h[c] - l[c]) * s_[c] + b[c];
                if (add) z = z + (float)av[i];
                want[i] = relu && !(z > 0) && !isnan(z) ? 0.0 : (double)z;
            }
        }
        for (int isa = BNORM_ISA_SCALAR; isa <= BNORM_ISA_AVX512; isa++) {
            const bn_kernels *k = bn_kernels_variant((bnorm_isa)isa, dt);
            if (!k) continue;
            for (int stream = 0; stream <= 1; stream++) {
                th_buf Y = th_alloc(dt, n, 0);
                k->rows_apply(d.X.p, Y.p, add ? d.A.p : NULL, NULL, 0, rows, C, mh, ml, sc, sh, relu, stream);
                th_load(&Y, got);
                th_free(&Y);
                int64_t bad = -1;
                for (int64_t i = 0; i < n && bad < 0; i++)
                    if (!same_value(got[i], want[i])) bad = i;
                CHECK(bad < 0, "low part %s0 %s isa=%d rows=%lld C=%lld add=%d relu=%d stream=%d: value %lld is %a, "
                      "(x - mh - ml) * sc + sh gives %a (x %g)", neg ? "-" : "+", bnorm_dtype_name(dt), isa,
                      (long long)rows, (long long)C, add, relu, stream, (long long)bad, bad < 0 ? 0.0 : got[bad],
                      bad < 0 ? 0.0 : want[bad], bad < 0 ? 0.0 : xv[bad]);
            }
        }
    }
    kdata_free(&d);
    free(mh);
    free(ml);
    free(sc);
    free(sh);
}

int main(void) {
    th_seed(7);
    test_mask_copy();
    const bnorm_dtype dts[] = {BNORM_DTYPE_F32, BNORM_DTYPE_F64, BNORM_DTYPE_F16, BNORM_DTYPE_BF16};
    const int64_t chans[] = {16, 32, 64, 1, 3, 17, 48, 96, 256, 300, 1030, 2048};
    for (size_t d = 0; d < 4; d++)
        for (size_t c = 0; c < sizeof chans / sizeof chans[0]; c++) {
            const int64_t rows = th_randint(1, chans[c] >= 1024 ? 9 : 40) + (chans[c] <= 64 ? 60 : 0);
            one_case(dts[d], rows, chans[c]);
        }
    const int64_t wide[] = {256, 300, 1030, 2048};
    for (int neg = 0; neg <= 1; neg++)
        for (size_t c = 0; c < sizeof wide / sizeof wide[0]; c++) {
            zero_lo_case(BNORM_DTYPE_F32, th_randint(1, 9), wide[c], neg);
            zero_lo_case(BNORM_DTYPE_F64, th_randint(1, 9), wide[c], neg);
        }
    return th_finish("test_kernels");
}
