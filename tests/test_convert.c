/*
 * test_convert.c - the float16/bfloat16 <-> float32 conversion kernels of every instruction-set
 * variant, bit for bit against the scalar references of src/core/half.c; and those references
 * against an independent rounding written here with exact double arithmetic (so a wrong reference
 * cannot make every variant look right).
 *
 * Inputs of from_f32: all 65536 16-bit values converted up, every midpoint between neighbouring
 * representable values and the floats just either side of it, the overflow threshold, subnormals,
 * signed zeros, infinities, NaNs with payloads, and 1e6 random float32 bit patterns.
 */
#include "harness.h"

#include "core/internal.h"
#include "cpu/kernels.h"

#include <float.h>

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ---------------------------------------------------------------------------------------------
 * Independent model: decode with ldexp, round with the quotient by the unit in the last place
 * (exact in double: a float has 24 significant bits), nearbyint (ties to even), re-encode.
 * NaN rule (IEEE 754 leaves the payload open; the library follows F16C): sign kept, result quiet,
 * the top payload bits kept.
 * ------------------------------------------------------------------------------------------- */

typedef struct fmt16 {
    int man_bits;  /* stored significand bits: 10 (float16) or 7 (bfloat16) */
    int emin;      /* exponent of the smallest normal: -14 or -126 */
    int emax;      /* exponent of the largest finite: 15 or 127 */
} fmt16;
static const fmt16 FMT_F16 = {10, -14, 15}, FMT_BF16 = {7, -126, 127};

static double model_decode(const fmt16 *f, uint16_t h) {
    int eb = 15 - f->man_bits; /* exponent field width: 5 or 8 */
    int bias = (1 << (eb - 1)) - 1;
    int e = (h >> f->man_bits) & ((1 << eb) - 1);
    int m = h & ((1 << f->man_bits) - 1);
    double s = (h & 0x8000) ? -1.0 : 1.0;
    if (e == (1 << eb) - 1) return m ? NAN : s * INFINITY;
    if (e == 0) return s * ldexp(m, f->emin - f->man_bits);
    return s * ldexp((1 << f->man_bits) + m, e - bias - f->man_bits);
}

/* float32 bits of the decoded value; NaN: quiet, sign and payload kept. */
static uint32_t model_to_f32(const fmt16 *f, uint16_t h) {
    int eb = 15 - f->man_bits;
    int e = (h >> f->man_bits) & ((1 << eb) - 1);
    uint32_t m = h & ((1u << f->man_bits) - 1);
    if (e == (1 << eb) - 1 && m)
        return ((uint32_t)(h & 0x8000) << 16) | 0x7fc00000u | (m << (23 - f->man_bits));
    return f2u((float)model_decode(f, h));
}

static uint16_t model_from_f32(const fmt16 *f, float x) {
    uint32_t u = f2u(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint16_t inf = (uint16_t)(((1u << (15 - f->man_bits)) - 1) << f->man_bits);
    if (isnan(x)) {
        uint16_t payload = (uint16_t)((u & 0x7fffffu) >> (23 - f->man_bits));
        return (uint16_t)(sign | inf | (1u << (f->man_bits - 1)) | payload);
    }
    double a = fabs((double)x);
    if (isinf(x)) return (uint16_t)(sign | inf);
    if (a == 0) return sign;
    int e;
    frexp(a, &e); /* a in [2^(e-1), 2^e) */
    int exp = e - 1 < f->emin ? f->emin : e - 1;
    double ulp = ldexp(1.0, exp - f->man_bits);
    double q = nearbyint(a / ulp); /* exact quotient, rounded to nearest even */
    double r = q * ulp;
    double maxfin = ldexp(2.0 - ldexp(1.0, -f->man_bits), f->emax);
    if (r > maxfin) return (uint16_t)(sign | inf);
    /* encode the representable value r */
    if (r < ldexp(1.0, f->emin)) return (uint16_t)(sign | (uint16_t)(r / ldexp(1.0, f->emin - f->man_bits)));
    frexp(r, &e);
    int biased = e - 1 + (1 << (14 - f->man_bits)) - 1;
    double mant = r / ldexp(1.0, e - 1) - 1.0; /* [0, 1) */
    return (uint16_t)(sign | (biased << f->man_bits) | (int)(mant * (1 << f->man_bits)));
}

/* ------------------------------------------------------------------------------------------- */

static float *inputs;      /* the float32 inputs of from_f32 */
static int64_t n_inputs;

static void add_input(float v) { inputs[n_inputs++] = v; }

/* Midpoints between neighbouring values (and the floats next to them) of a format, both signs. */
static void add_midpoints(const fmt16 *f, int is_bf16) {
    for (uint32_t h = 0; h < 0x7fff; h++) {
        uint16_t next = (uint16_t)(h + 1);
        double a = model_decode(f, (uint16_t)h), b;
        if (isnan(a) || isinf(a)) continue;
        if (((next >> f->man_bits) & ((1 << (15 - f->man_bits)) - 1)) == (1 << (15 - f->man_bits)) - 1)
            b = ldexp(1.0, f->emax + 1); /* past the largest finite: the overflow threshold */
        else
            b = model_decode(f, next);
        float mid = (float)((a + b) / 2);
        if ((double)mid != (a + b) / 2) { /* every midpoint is exact in float32 */
            CHECK(0, "%s midpoint of %#x not exact in float32", is_bf16 ? "bf16" : "f16", h);
            continue;
        }
        float below = nextafterf(mid, 0), above = nextafterf(mid, INFINITY);
        add_input(mid); add_input(-mid);
        add_input(below); add_input(-below);
        add_input(above); add_input(-above);
    }
}

static void build_inputs(void) {
    int64_t cap = 65536 * 2 + 2 * 0x7fff * 6 * 2 + 1000000 + 1000;
    inputs = malloc(sizeof(float) * (size_t)cap);
    for (uint32_t h = 0; h < 65536; h++) {
        add_input(bn_f16_to_f32((uint16_t)h));
        add_input(bn_bf16_to_f32((uint16_t)h));
    }
    add_midpoints(&FMT_F16, 0);
    add_midpoints(&FMT_BF16, 1);
    const float special[] = {65504.0f, 65519.99f, 65520.0f, 65519.998f, 65535.0f, 65536.0f, 1e30f, FLT_MAX,
                             0.0f, -0.0f, 6.1035156e-05f, 6.097555e-05f, 5.9604645e-08f, 2.9802322e-08f,
                             2.9802326e-08f, 1e-9f, FLT_MIN, 1e-45f, 3.3895314e38f, 3.3961776e38f};
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) {
        add_input(special[i]);
        add_input(-special[i]);
    }
    const uint32_t bits[] = {0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fa00000u,
                             0x7fbfffffu, 0x7fffffffu, 0xffffe000u, 0x7f802000u, 0xff801fffu, 0x7fc0abcdu,
                             0x00000001u, 0x807fffffu, 0x00800000u, 0x477fefffu, 0x477ff000u, 0x477fe000u};
    for (size_t i = 0; i < sizeof bits / sizeof bits[0]; i++) add_input(u2f(bits[i]));
    for (int i = 0; i < 1000000; i++) add_input(u2f((uint32_t)th_next()));
}

/* The scalar references against the model. */
static void check_references(void) {
    long bad_up16 = 0, bad_upbf = 0, bad_dn16 = 0, bad_dnbf = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        uint32_t got = f2u(bn_f16_to_f32((uint16_t)h)), want = model_to_f32(&FMT_F16, (uint16_t)h);
        if (got != want && bad_up16++ < 5) CHECK(0, "bn_f16_to_f32(%#06x) = %#010x, model %#010x", h, got, want);
        got = f2u(bn_bf16_to_f32((uint16_t)h));
        /* bfloat16 -> float32 is a plain shift (a signalling NaN stays signalling, as the hardware's) */
        want = (uint32_t)h << 16;
        if (!isnan(model_decode(&FMT_BF16, (uint16_t)h))) want = f2u((float)model_decode(&FMT_BF16, (uint16_t)h));
        if (got != want && bad_upbf++ < 5) CHECK(0, "bn_bf16_to_f32(%#06x) = %#010x, model %#010x", h, got, want);
    }
    for (int64_t i = 0; i < n_inputs; i++) {
        float v = inputs[i];
        uint16_t got = bn_f32_to_f16(v), want = model_from_f32(&FMT_F16, v);
        if (got != want && bad_dn16++ < 5)
            CHECK(0, "bn_f32_to_f16(%.9g = %#010x) = %#06x, model %#06x", v, f2u(v), got, want);
        got = bn_f32_to_bf16(v);
        want = model_from_f32(&FMT_BF16, v);
        if (got != want && bad_dnbf++ < 5)
            CHECK(0, "bn_f32_to_bf16(%.9g = %#010x) = %#06x, model %#06x", v, f2u(v), got, want);
    }
    CHECK(bad_up16 == 0, "%ld float16 -> float32 mismatches", bad_up16);
    CHECK(bad_upbf == 0, "%ld bfloat16 -> float32 mismatches", bad_upbf);
    CHECK(bad_dn16 == 0, "%ld float32 -> float16 mismatches", bad_dn16);
    CHECK(bad_dnbf == 0, "%ld float32 -> bfloat16 mismatches", bad_dnbf);
    /* a few values stated outright */
    CHECK(bn_f32_to_f16(65504.0f) == 0x7bff && bn_f32_to_f16(65519.99f) == 0x7bff, "largest finite");
    CHECK(bn_f32_to_f16(65520.0f) == 0x7c00 && bn_f32_to_f16(-65520.0f) == 0xfc00, "overflow to Inf");
    CHECK(bn_f32_to_f16(2.9802322e-08f) == 0x0000 && bn_f32_to_f16(2.9802326e-08f) == 0x0001, "half of 2^-24");
    CHECK(bn_f32_to_f16(-0.0f) == 0x8000 && bn_f32_to_bf16(-0.0f) == 0x8000, "negative zero");
    CHECK(bn_f32_to_bf16(1.00390625f) == 0x3f80 && bn_f32_to_bf16(1.01171875f) == 0x3f82, "bf16 ties to even");
}

/* One variant against the scalar references, over the whole arrays and over short misaligned pieces
 * (the vector loops' tails). */
static void check_variant(bnorm_isa isa, bnorm_dtype dt) {
    const bn_kernels *k = bn_kernels_variant(isa, dt);
    if (!k) return;
    const int bf = dt == BNORM_DTYPE_BF16;
    const char *name = bnorm_isa_name(isa), *tn = bnorm_dtype_name(dt);
    CHECK(k->to_f32 != NULL && k->from_f32 != NULL, "%s %s: conversion kernels missing", name, tn);
    if (!k->to_f32 || !k->from_f32) return;

    /* up: all 65536 patterns, at offsets 0..3 and in pieces of 1..37 */
    uint16_t *h = malloc(sizeof(uint16_t) * (65536 + 8));
    float *f = malloc(sizeof(float) * (65536 + 8));
    for (int off = 0; off < 4; off++) {
        for (uint32_t i = 0; i < 65536; i++) h[off + i] = (uint16_t)i;
        memset(f, 0xA5, sizeof(float) * (65536 + 8));
        k->to_f32(h + off, f + off, 65536);
        long bad = 0;
        for (uint32_t i = 0; i < 65536; i++) {
            uint32_t want = f2u(bf ? bn_bf16_to_f32((uint16_t)i) : bn_f16_to_f32((uint16_t)i));
            if (f2u(f[off + i]) != want && bad++ < 3)
                CHECK(0, "%s %s to_f32(%#06x) = %#010x, scalar %#010x", name, tn, i, f2u(f[off + i]), want);
        }
        CHECK(bad == 0, "%s %s to_f32 offset %d: %ld mismatches", name, tn, off, bad);
        CHECK(f2u(f[off + 65536]) == 0xA5A5A5A5u, "%s %s to_f32 wrote past the end", name, tn);
    }
    for (int64_t start = 0, len = 1; start + len < 65536; start += len + 1, len = len % 37 + 1) {
        float piece[40];
        memset(piece, 0xA5, sizeof piece);
        k->to_f32(h + start, piece, len);
        int ok = f2u(piece[len]) == 0xA5A5A5A5u;
        for (int64_t i = 0; i < len; i++)
            ok &= f2u(piece[i]) == f2u(bf ? bn_bf16_to_f32(h[start + i]) : bn_f16_to_f32(h[start + i]));
        if (!ok) { CHECK(0, "%s %s to_f32 piece at %lld len %lld", name, tn, (long long)start, (long long)len); break; }
    }

    /* down: every input, whole and at an odd offset */
    uint16_t *out = malloc(sizeof(uint16_t) * (size_t)(n_inputs + 8));
    float *in = malloc(sizeof(float) * (size_t)(n_inputs + 8));
    for (int off = 0; off < 2; off++) {
        memcpy(in + off, inputs, sizeof(float) * (size_t)n_inputs);
        memset(out, 0xA5, sizeof(uint16_t) * (size_t)(n_inputs + 8));
        k->from_f32(in + off, out + off, n_inputs);
        long bad = 0;
        for (int64_t i = 0; i < n_inputs; i++) {
            uint16_t want = bf ? bn_f32_to_bf16(inputs[i]) : bn_f32_to_f16(inputs[i]);
            if (out[off + i] != want && bad++ < 3)
                CHECK(0, "%s %s from_f32(%.9g = %#010x) = %#06x, scalar %#06x", name, tn, inputs[i],
                      f2u(inputs[i]), out[off + i], want);
        }
        CHECK(bad == 0, "%s %s from_f32 offset %d: %ld of %lld mismatch", name, tn, off, bad, (long long)n_inputs);
        CHECK(out[off + n_inputs] == 0xA5A5, "%s %s from_f32 wrote past the end", name, tn);
    }
    for (int64_t start = 0, len = 1; start + len < 4096; start += len + 1, len = len % 37 + 1) {
        uint16_t piece[40];
        memset(piece, 0xA5, sizeof piece);
        k->from_f32(inputs + start, piece, len);
        int ok = piece[len] == 0xA5A5;
        for (int64_t i = 0; i < len; i++)
            ok &= piece[i] == (bf ? bn_f32_to_bf16(inputs[start + i]) : bn_f32_to_f16(inputs[start + i]));
        if (!ok) { CHECK(0, "%s %s from_f32 piece at %lld len %lld", name, tn, (long long)start, (long long)len); break; }
    }
    free(h); free(f); free(out); free(in);
}

int main(void) {
    th_seed(5);
    build_inputs();
    check_references();
    int variants = 0;
    for (int isa = BNORM_ISA_SCALAR; isa <= BNORM_ISA_AVX512; isa++) {
        if (!bn_kernels_variant((bnorm_isa)isa, BNORM_DTYPE_F16)) continue;
        variants++;
        check_variant((bnorm_isa)isa, BNORM_DTYPE_F16);
        check_variant((bnorm_isa)isa, BNORM_DTYPE_BF16);
    }
    /* every variant the library would pick must have been tested */
    CHECK(variants >= (int)bnorm_get_isa() + 1, "only %d variants available but the library uses %s", variants,
          bnorm_isa_name(bnorm_get_isa()));
    free(inputs);
    return th_finish("test_convert");
}
