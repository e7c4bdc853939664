/* harness.c - see harness.h. */
#include "harness.h"

#include <time.h>

long th_passed, th_failed;
static uint64_t th_state;

int th_finish(const char *name) {
    printf("%s: %ld passed, %ld failed\n", name, th_passed, th_failed);
    return th_failed ? 1 : 0;
}

void th_seed(uint64_t salt) {
    const char *e = getenv("BNORM_TEST_SEED");
    uint64_t s = e ? strtoull(e, NULL, 0) : (uint64_t)time(NULL);
    printf("seed: BNORM_TEST_SEED=%llu\n", (unsigned long long)s);
    th_state = s ^ (salt * 0x9e3779b97f4a7c15ull);
}

uint64_t th_next(void) { /* splitmix64 */
    uint64_t z = (th_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double th_uniform(void) { return (double)(th_next() >> 11) * (1.0 / 9007199254740992.0); }

double th_normal(void) {
    double u = th_uniform(), v = th_uniform();
    if (u < 1e-300) u = 1e-300;
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

int64_t th_randint(int64_t lo, int64_t hi) { return lo + (int64_t)(th_next() % (uint64_t)(hi - lo + 1)); }

th_buf th_alloc(bnorm_dtype dtype, int64_t n, int misalign) {
    th_buf b = {0};
    size_t es = bnorm_dtype_size(dtype);
    b.base = malloc((size_t)n * es + 128);
    b.p = (char *)b.base + ((64 - ((uintptr_t)b.base % 64)) % 64) + misalign;
    b.n = n;
    b.dtype = dtype;
    memset(b.base, 0xA5, (size_t)n * es + 128); /* poison: unwritten outputs show up as garbage */
    return b;
}

void th_free(th_buf *b) {
    free(b->base);
    b->base = b->p = NULL;
}

static uint16_t th_to_half(double v, int bf16) {
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    if (bf16) {
        if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
        return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
    }
    /* float16 via the library-independent path: round with double arithmetic */
    if (v != v) return 0x7e00;
    double a = fabs(v);
    uint16_t sign = (f < 0 || (f == 0 && signbit(f))) ? 0x8000 : 0;
    if (a >= 65520.0) return sign | 0x7c00;
    if (a < 6.103515625e-05) { /* subnormal: multiples of 2^-24 */
        double q = nearbyint(a * 16777216.0);
        return sign | (uint16_t)q;
    }
    int e;
    double fr = frexp(a, &e); /* a = fr * 2^e, fr in [0.5, 1) */
    double mant = nearbyint((fr * 2.0 - 1.0) * 1024.0);
    if (mant == 1024) { mant = 0; e++; }
    if (e - 1 + 15 >= 31) return sign | 0x7c00;
    return sign | (uint16_t)(((e - 1 + 15) << 10) | (int)mant);
}

static double th_from_half(uint16_t h, int bf16) {
    if (bf16) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    int e = (h >> 10) & 31, m = h & 1023;
    double s = (h & 0x8000) ? -1.0 : 1.0;
    if (e == 31) return m ? NAN : s * INFINITY;
    if (e == 0) return s * ldexp(m, -24);
    return s * ldexp(1024 + m, e - 25);
}

void th_store(th_buf *b, const double *v) {
    for (int64_t i = 0; i < b->n; i++) {
        switch (b->dtype) {
        case BNORM_DTYPE_F32: { float f = (float)v[i]; memcpy((char *)b->p + 4 * i, &f, 4); break; }
        case BNORM_DTYPE_F64: memcpy((char *)b->p + 8 * i, &v[i], 8); break;
        case BNORM_DTYPE_F16: { uint16_t h = th_to_half(v[i], 0); memcpy((char *)b->p + 2 * i, &h, 2); break; }
        case BNORM_DTYPE_BF16: { uint16_t h = th_to_half(v[i], 1); memcpy((char *)b->p + 2 * i, &h, 2); break; }
        }
    }
}

void th_load(const th_buf *b, double *v) {
    for (int64_t i = 0; i < b->n; i++) {
        switch (b->dtype) {
        case BNORM_DTYPE_F32: { float f; memcpy(&f, (char *)b->p + 4 * i, 4); v[i] = f; break; }
        case BNORM_DTYPE_F64: memcpy(&v[i], (char *)b->p + 8 * i, 8); break;
        case BNORM_DTYPE_F16: { uint16_t h; memcpy(&h, (char *)b->p + 2 * i, 2); v[i] = th_from_half(h, 0); break; }
        case BNORM_DTYPE_BF16: { uint16_t h; memcpy(&h, (char *)b->p + 2 * i, 2); v[i] = th_from_half(h, 1); break; }
        }
    }
}

void th_round(bnorm_dtype dtype, double *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        switch (dtype) {
        case BNORM_DTYPE_F32: v[i] = (float)v[i]; break;
        case BNORM_DTYPE_F64: break;
        case BNORM_DTYPE_F16: v[i] = th_from_half(th_to_half(v[i], 0), 0); break;
        case BNORM_DTYPE_BF16: v[i] = th_from_half(th_to_half(v[i], 1), 1); break;
        }
    }
}

double th_err(const double *a, const double *b, int64_t n, double atol, double rtol) {
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) {
            if (!(isnan(a[i]) && isnan(b[i]))) return INFINITY;
            continue;
        }
        if (isinf(a[i]) || isinf(b[i])) {
            if (a[i] != b[i]) return INFINITY;
            continue;
        }
        double e = fabs(a[i] - b[i]) / (atol + rtol * fabs(b[i]));
        if (e > worst) worst = e;
    }
    return worst;
}

double th_maxabs(const double *v, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++)
        if (isfinite(v[i]) && fabs(v[i]) > m) m = fabs(v[i]);
    return m;
}

int th_close_scaled(const double *got, const double *want, int64_t n, double tol, double floor) {
    double scale = th_maxabs(want, n);
    if (scale < floor) scale = floor;
    return th_err(got, want, n, tol * scale, tol) <= 1.0;
}
