/* desc.c - tensor descriptors: validation, overflow checks and the canonical [outer][C][inner] view. */
#include "internal.h"

size_t bnorm_dtype_size(bnorm_dtype dtype) {
    switch (dtype) {
    case BNORM_DTYPE_F32: return 4;
    case BNORM_DTYPE_F64: return 8;
    case BNORM_DTYPE_F16:
    case BNORM_DTYPE_BF16: return 2;
    }
    return 0;
}

bnorm_dtype bnorm_param_dtype(bnorm_dtype dtype) {
    return dtype == BNORM_DTYPE_F64 ? BNORM_DTYPE_F64 : BNORM_DTYPE_F32;
}

const char *bnorm_dtype_name(bnorm_dtype dtype) {
    switch (dtype) {
    case BNORM_DTYPE_F32: return "float32";
    case BNORM_DTYPE_F64: return "float64";
    case BNORM_DTYPE_F16: return "float16";
    case BNORM_DTYPE_BF16: return "bfloat16";
    }
    return NULL;
}

/* a * b into *out, false on overflow past INT64_MAX (both non-negative). */
static int mul_ok(int64_t a, int64_t b, int64_t *out) {
    if (a != 0 && b > INT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

bnorm_status bn_geom_init(const char *func, const char *what, const bnorm_desc *d, bn_geom *g) {
    if (!d) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "%s is NULL", what);
    size_t es = bnorm_dtype_size(d->dtype);
    if (es == 0)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "%s.dtype = %d: not a bnorm_dtype", what,
                       (int)d->dtype);
    if (d->layout != BNORM_LAYOUT_CHANNELS_FIRST && d->layout != BNORM_LAYOUT_CHANNELS_LAST)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "%s.layout = %d: not a bnorm_layout", what,
                       (int)d->layout);
    if (d->rank < 2 || d->rank > BNORM_MAX_RANK)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "%s.rank = %d: must be in [2, %d]", what,
                       d->rank, BNORM_MAX_RANK);
    for (int i = 0; i < d->rank; i++)
        if (d->dims[i] < 0)
            return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "%s.dims[%d] = %lld: must be >= 0", what,
                           i, (long long)d->dims[i]);
    if (d->dims[1] < 1)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "%s.dims[1] (C) = %lld: must be >= 1", what,
                       (long long)d->dims[1]);
    int64_t inner = 1, total = d->dims[0], bytes;
    for (int i = 2; i < d->rank; i++) {
        if (!mul_ok(inner, d->dims[i], &inner))
            return bn_fail(BNORM_STATUS_OVERFLOW, func, "%s: the product of the spatial dims overflows int64",
                           what);
    }
    if (!mul_ok(total, d->dims[1], &total) || !mul_ok(total, inner, &total) ||
        !mul_ok(total, (int64_t)es, &bytes) || (uint64_t)bytes > (uint64_t)(SIZE_MAX / 2))
        return bn_fail(BNORM_STATUS_OVERFLOW, func,
                       "%s: N * C * spatial * %zu bytes overflows the address space", what, es);
    g->C = d->dims[1];
    g->esize = es;
    g->numel = total;
    if (d->layout == BNORM_LAYOUT_CHANNELS_FIRST && inner > 1) {
        g->planes = 1;
        g->outer = d->dims[0];
        g->inner = inner;
    } else {
        g->planes = 0;
        g->outer = d->dims[0] * inner; /* cannot overflow: bounded by total */
        g->inner = 1;
    }
    g->m = g->outer * g->inner;
    if (d->dims[0] == 0 || inner == 0) { /* empty: keep the view consistent */
        g->outer = 0;
        g->m = 0;
    }
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_desc_check(const bnorm_desc *desc) {
    bn_clear_error();
    bn_geom g = {0};
    return bn_geom_init("bnorm_desc_check", "desc", desc, &g);
}

int64_t bnorm_desc_numel(const bnorm_desc *desc) {
    bn_geom g = {0};
    if (bn_geom_init("bnorm_desc_numel", "desc", desc, &g) != BNORM_STATUS_OK) return 0;
    return g.numel;
}

size_t bnorm_relu_mask_size(const bnorm_desc *desc) {
    bn_geom g = {0};
    if (bn_geom_init("bnorm_relu_mask_size", "desc", desc, &g) != BNORM_STATUS_OK) return 0;
    return (size_t)bn_mask_bytes(&g);
}
