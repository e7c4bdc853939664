/*
 * layer.c - the stateful layer (nn.BatchNorm / MegEngine BatchNorm / OneFlow FusedBatchNorm), built on
 * bnorm_forward and bnorm_backward. It owns parameters, gradients, running statistics, the counter,
 * and what the backward needs (saved statistics, ReLU mask, workspace, grown only when shapes grow).
 */
#include "layer_internal.h"
#include "../core/plan.h"

#define BN_LAYER_OPTIONS_V1 BN_V1_SIZE(bnorm_layer_options, fused_relu)

#include <math.h>
#include <stdlib.h>

bnorm_layer_options bnorm_layer_options_default(int64_t num_features) {
    bnorm_layer_options o;
    memset(&o, 0, sizeof o); /* padding too: callers may compare or hash options bytewise */
    o.struct_size = sizeof o;
    o.num_features = num_features;
    o.param_dtype = BNORM_DTYPE_F32;
    o.eps = 1e-5;
    o.momentum = 0.1;
    o.momentum_mode = BNORM_MOMENTUM_NEW_WEIGHT;
    o.affine = 1;
    o.track_running_stats = 1;
    return o;
}

bnorm_layer_options bnorm_layer_options_megengine(int64_t num_features) {
    bnorm_layer_options o = bnorm_layer_options_default(num_features);
    o.momentum = 0.9;
    o.momentum_mode = BNORM_MOMENTUM_KEPT_WEIGHT;
    return o;
}

bnorm_status bn_layer_check_options(const char *F, const bnorm_layer_options *o) {
    if (!o) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "options is NULL");
    if (o->num_features < 1)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "num_features = %lld: must be >= 1",
                       (long long)o->num_features);
    if (o->num_features > (int64_t)(SIZE_MAX / 64))
        return bn_fail(BNORM_STATUS_OVERFLOW, F, "num_features = %lld: too large", (long long)o->num_features);
    if (o->param_dtype != BNORM_DTYPE_F32 && o->param_dtype != BNORM_DTYPE_F64)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "param_dtype = %d: must be BNORM_DTYPE_F32 or F64",
                       (int)o->param_dtype);
    if (!(o->eps >= 0) || isinf(o->eps))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "eps = %g: must be finite and >= 0", o->eps);
    if ((unsigned)o->momentum_mode > BNORM_MOMENTUM_CUMULATIVE)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "momentum_mode = %d: not a bnorm_momentum_mode",
                       (int)o->momentum_mode);
    if (o->momentum_mode != BNORM_MOMENTUM_CUMULATIVE && !(o->momentum >= 0 && o->momentum <= 1))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "momentum = %g: must be in [0, 1]", o->momentum);
    if (o->freeze && !o->track_running_stats)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F,
                       "freeze = 1 needs track_running_stats = 1 (it normalizes with the running statistics)");
    return BNORM_STATUS_OK;
}

static void bn_fill(void *p, bnorm_dtype pd, int64_t n, double v) {
    if (!p) return;
    for (int64_t i = 0; i < n; i++) bn_param_set(p, pd, i, v);
}

bnorm_status bnorm_layer_create(const bnorm_layer_options *options, bnorm_layer **out) {
    static const char *F = "bnorm_layer_create";
    bn_clear_error();
    if (!out) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "out is NULL");
    *out = NULL;
    if (!options) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "options is NULL");
    bnorm_layer_options o;
    bnorm_status st = bn_struct_in(F, "options", options, &o, sizeof o, BN_LAYER_OPTIONS_V1);
    if (st) return st;
    options = &o;
    st = bn_layer_check_options(F, options);
    if (st) return st;
    bnorm_layer *l = (bnorm_layer *)calloc(1, sizeof *l);
    const int64_t C = options->num_features;
    const size_t es = bnorm_dtype_size(options->param_dtype);
    char *blk = l ? (char *)calloc(9 * (size_t)C, es) : NULL;
    if (!blk) {
        free(l);
        return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate a layer of %lld features", (long long)C);
    }
    l->opt = *options;
    l->training = 1;
    l->block = blk;
    size_t sz = (size_t)C * es;
    if (options->affine) {
        l->weight = blk;
        l->bias = blk + sz;
        l->weight_grad = blk + 2 * sz;
        l->bias_grad = blk + 3 * sz;
    }
    if (options->track_running_stats) {
        l->running_mean = blk + 4 * sz;
        l->running_var = blk + 5 * sz;
    }
    l->own.owner = l;
    l->own.mean = blk + 6 * sz;
    l->own.invstd = blk + 7 * sz;
    l->own.mean_lo = blk + 8 * sz;
    l->grad_weight = l->grad_bias = 1;
    bnorm_layer_reset_parameters(l);
    *out = l;
    return BNORM_STATUS_OK;
}

void bnorm_layer_destroy(bnorm_layer *l) {
    if (!l) return;
    free(l->block);
    free(l->own.mask);
    free(l->workspace);
    free(l);
}

bnorm_status bnorm_layer_get_options(const bnorm_layer *l, bnorm_layer_options *out) {
    bn_clear_error();
    if (!l || !out) return bn_fail(BNORM_STATUS_NULL_POINTER, "bnorm_layer_get_options", "%s is NULL", l ? "out" : "layer");
    /* the ABI-1 fields, which every caller's struct has (out->struct_size may be uninitialised) */
    bnorm_layer_options o = l->opt;
    o.struct_size = BN_LAYER_OPTIONS_V1;
    memcpy(out, &o, BN_LAYER_OPTIONS_V1);
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_layer_set_options(bnorm_layer *l, const bnorm_layer_options *options) {
    static const char *F = "bnorm_layer_set_options";
    bn_clear_error();
    if (!l || !options) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", l ? "options" : "layer");
    bnorm_layer_options o;
    bnorm_status st = bn_struct_in(F, "options", options, &o, sizeof o, BN_LAYER_OPTIONS_V1);
    if (st) return st;
    st = bn_layer_check_options(F, &o);
    if (st) return st;
    if (o.num_features != l->opt.num_features || o.param_dtype != l->opt.param_dtype ||
        !o.affine != !l->opt.affine || !o.track_running_stats != !l->opt.track_running_stats)
        return bn_fail(BNORM_STATUS_SHAPE_MISMATCH, F,
                       "num_features, param_dtype, affine and track_running_stats cannot change (layer: %lld, %s, %d, "
                       "%d; options: %lld, %s, %d, %d)",
                       (long long)l->opt.num_features, bnorm_dtype_name(l->opt.param_dtype), l->opt.affine,
                       l->opt.track_running_stats, (long long)o.num_features, bnorm_dtype_name(o.param_dtype),
                       o.affine, o.track_running_stats);
    if (!o.fused_relu != !l->opt.fused_relu) l->have_saved = 0; /* the saved mask no longer matches */
    l->opt.eps = o.eps;
    l->opt.momentum = o.momentum;
    l->opt.momentum_mode = o.momentum_mode;
    l->opt.freeze = o.freeze;
    l->opt.fused_relu = o.fused_relu;
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_layer_set_requires_grad(bnorm_layer *l, int weight, int bias) {
    static const char *F = "bnorm_layer_set_requires_grad";
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "layer is NULL");
    if ((weight || bias) && !l->opt.affine)
        return bn_fail(BNORM_STATUS_UNSUPPORTED, F, "the layer has no weight and bias (affine = 0)");
    l->grad_weight = weight != 0;
    l->grad_bias = bias != 0;
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_layer_set_threads(bnorm_layer *l, int num_threads, const bnorm_threadpool *pool) {
    static const char *F = "bnorm_layer_set_threads";
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "layer is NULL");
    if (num_threads < 0 || num_threads > 4096)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "num_threads = %d: must be in [0, 4096]", num_threads);
    bnorm_threadpool p;
    memset(&p, 0, sizeof p);
    if (pool) {
        bnorm_status st = bn_struct_in(F, "threadpool", pool, &p, sizeof p, sizeof p);
        if (st) return st;
        if (!p.parallel_for) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "threadpool->parallel_for is NULL");
    }
    l->num_threads = num_threads;
    l->pool = p;
    l->has_pool = pool != NULL;
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_layer_context_create(const bnorm_layer *l, bnorm_layer_context **out) {
    static const char *F = "bnorm_layer_context_create";
    bn_clear_error();
    if (!out) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "out is NULL");
    *out = NULL;
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "layer is NULL");
    const size_t sz = (size_t)l->opt.num_features * bnorm_dtype_size(l->opt.param_dtype);
    bnorm_layer_context *c = (bnorm_layer_context *)calloc(1, sizeof *c);
    char *blk = c ? (char *)calloc(3, sz) : NULL;
    if (!blk) {
        free(c);
        return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate a context for %lld features",
                       (long long)l->opt.num_features);
    }
    c->owner = l;
    c->block = blk;
    c->mean = blk;
    c->invstd = blk + sz;
    c->mean_lo = blk + 2 * sz;
    *out = c;
    return BNORM_STATUS_OK;
}

void bnorm_layer_context_destroy(bnorm_layer_context *c) {
    if (!c) return;
    free(c->block);
    free(c->mask);
    free(c);
}

bnorm_status bnorm_layer_set_training(bnorm_layer *l, int training) {
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, "bnorm_layer_set_training", "layer is NULL");
    l->training = training != 0;
    return BNORM_STATUS_OK;
}

int bnorm_layer_is_training(const bnorm_layer *l) { return l ? l->training : 0; }

/* Grows a buffer owned by the layer (never shrinks; no allocation when shapes repeat). */
static bnorm_status bn_grow(const char *F, void **p, size_t *cap, size_t need) {
    if (need <= *cap) return BNORM_STATUS_OK;
    void *q = malloc(need);
    if (!q) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate %zu bytes", need);
    if (*p) memcpy(q, *p, *cap); /* a forward that fails later must not lose the last forward's mask */
    free(*p);
    *p = q;
    *cap = need;
    return BNORM_STATUS_OK;
}

static bnorm_status bn_layer_check_desc(const char *F, const bnorm_layer *l, const bnorm_desc *desc, bn_geom *g) {
    bnorm_status st = bn_geom_init(F, "desc", desc, g);
    if (st) return st;
    if (g->C != l->opt.num_features)
        return bn_fail(BNORM_STATUS_SHAPE_MISMATCH, F, "desc->dims[1] (C) = %lld but the layer has num_features = %lld",
                       (long long)g->C, (long long)l->opt.num_features);
    if (bnorm_param_dtype(desc->dtype) != l->opt.param_dtype)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F,
                       "desc->dtype = %s does not go with %s parameters (float64 data needs float64 "
                       "parameters; float32/float16/bfloat16 data need float32 parameters)",
                       bnorm_dtype_name(desc->dtype), bnorm_dtype_name(l->opt.param_dtype));
    return BNORM_STATUS_OK;
}

/* The thread count of one layer call, read once; the workspace is sized for exactly that count. */
static int bn_layer_threads(const bnorm_layer *l, const bn_geom *g) {
    return l->num_threads > 0 ? l->num_threads : bn_default_threads(g);
}

static int bn_desc_equal(const bnorm_desc *a, const bnorm_desc *b);

/* Sizing the workspace means planning a forward and a backward: done only when the shape, the thread
 * count or the communicator size differ from the last call's (training loops repeat one shape). */
static bnorm_status bn_layer_workspace(const char *F, bnorm_layer *l, const bnorm_desc *desc, int comm_size, int nt) {
    if (l->ws_key_valid && l->ws_key_nt == nt && l->ws_key_comm == comm_size && bn_desc_equal(desc, &l->ws_key_desc))
        return BNORM_STATUS_OK;
    size_t need = bn_workspace_bytes(desc, comm_size, nt);
    if (!need) return bn_fail(BNORM_STATUS_OVERFLOW, F, "the workspace for this shape and %d threads overflows", nt);
    bnorm_status st = bn_grow(F, &l->workspace, &l->workspace_cap, need);
    if (st) return st;
    l->ws_key_valid = 1;
    l->ws_key_nt = nt;
    l->ws_key_comm = comm_size;
    l->ws_key_desc = *desc;
    return BNORM_STATUS_OK;
}

/* A fingerprint of x: up to 64 values at evenly spaced positions (and the count), so a backward can
 * tell that it got another input than the forward (another forward ran since) even when the caller
 * passes a fresh copy of the same input. */
static uint64_t bn_x_signature(const void *x, int64_t numel, size_t es) {
    uint64_t h = 1469598103934665603ull ^ (uint64_t)numel;
    if (!x || numel <= 0) return h;
    const int64_t k = numel < 64 ? numel : 64;
    for (int64_t i = 0; i < k; i++) {
        const unsigned char *p = (const unsigned char *)x + (size_t)(k > 1 ? i * (numel - 1) / (k - 1) : 0) * es;
        for (size_t b = 0; b < es; b++) h = (h ^ p[b]) * 1099511628211ull;
    }
    return h;
}

static int bn_ctx_valid(const bnorm_layer *l, const bnorm_layer_context *c) {
    return c == &l->own ? l->have_saved : c->have;
}

static bnorm_status bn_layer_forward(const char *F, bnorm_layer *l, bnorm_layer_context *ctx, const bnorm_desc *desc,
                                     const void *x, void *y, const void *addend) {
    bn_geom g = {0};
    bnorm_status st = bn_layer_check_desc(F, l, desc, &g);
    if (st) return st;
    if (ctx->owner != l) return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "ctx belongs to another layer");
    if (addend && !l->opt.fused_relu)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "addend given but the layer was not created with fused_relu");
    const bnorm_layer_options *o = &l->opt;
    const int track = o->track_running_stats;
    const int batch_stats = (l->training && !o->freeze) || !track;
    const int update = l->training && track && !o->freeze;
    const int64_t C = o->num_features;
    const int nt = bn_layer_threads(l, &g);

    if (o->fused_relu) {
        st = bn_grow(F, (void **)&ctx->mask, &ctx->mask_cap, bnorm_relu_mask_size(desc));
        if (st) return st;
    }
    const bnorm_comm *comm = (batch_stats && l->training && l->has_comm) ? &l->comm : NULL;
    st = bn_layer_workspace(F, l, desc, comm ? comm->size : 1, nt);
    if (st) return st;

    bnorm_forward_args a = {.struct_size = sizeof a, .desc = *desc, .x = x, .y = y, .weight = l->weight,
                            .bias = l->bias, .eps = o->eps, .addend = addend, .relu = o->fused_relu,
                            .relu_mask = o->fused_relu ? ctx->mask : NULL, .workspace = l->workspace,
                            .workspace_size = l->workspace_cap, .num_threads = nt,
                            .threadpool = l->has_pool ? &l->pool : NULL};
    if (batch_stats) {
        a.training = 1;
        a.save_mean = ctx->mean;
        a.save_mean_lo = ctx->mean_lo;
        a.save_invstd = ctx->invstd;
        a.comm = comm;
        if (update) {
            a.running_mean = l->running_mean;
            a.running_var = l->running_var;
            switch (o->momentum_mode) {
            case BNORM_MOMENTUM_NEW_WEIGHT: a.momentum = o->momentum; break;
            case BNORM_MOMENTUM_KEPT_WEIGHT: a.momentum = 1.0 - o->momentum; break;
            case BNORM_MOMENTUM_CUMULATIVE: a.momentum = 1.0 / ((double)l->num_batches_tracked + 1.0); break;
            }
        }
    } else {
        a.training = 0;
        a.running_mean = l->running_mean;
        a.running_var = l->running_var;
    }
    st = bnorm_forward(&a);
    if (st) return bn_error_reprefix(F, st);
    if (update && l->num_batches_tracked < INT64_MAX) l->num_batches_tracked++; /* saturates (bnorm.h) */
    if (!batch_stats) { /* the backward treats the running statistics as constants */
        for (int64_t c = 0; c < C; c++) {
            bn_param_set(ctx->mean, o->param_dtype, c, bn_param_get(l->running_mean, o->param_dtype, c));
            bn_param_set(ctx->mean_lo, o->param_dtype, c, 0.0);
            bn_param_set(ctx->invstd, o->param_dtype, c,
                         bn_invstd(bn_param_get(l->running_var, o->param_dtype, c), o->eps));
        }
    }
    if (ctx == &l->own) l->have_saved = 1;
    else ctx->have = 1;
    ctx->global = !batch_stats;
    ctx->synced = comm != NULL;
    ctx->relu = o->fused_relu != 0;
    ctx->desc = *desc;
    ctx->xsig = bn_x_signature(x, g.numel, g.esize);
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_layer_forward(bnorm_layer *l, const bnorm_desc *desc, const void *x, void *y,
                                 const void *addend) {
    static const char *F = "bnorm_layer_forward";
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "layer is NULL");
    return bn_layer_forward(F, l, &l->own, desc, x, y, addend);
}

bnorm_status bnorm_layer_forward_ctx(bnorm_layer *l, bnorm_layer_context *ctx, const bnorm_desc *desc,
                                     const void *x, void *y, const void *addend) {
    static const char *F = "bnorm_layer_forward_ctx";
    bn_clear_error();
    if (!l || !ctx) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", l ? "ctx" : "layer");
    return bn_layer_forward(F, l, ctx, desc, x, y, addend);
}

static int bn_desc_equal(const bnorm_desc *a, const bnorm_desc *b) {
    if (a->dtype != b->dtype || a->layout != b->layout || a->rank != b->rank) return 0;
    for (int i = 0; i < a->rank; i++)
        if (a->dims[i] != b->dims[i]) return 0;
    return 1;
}

static bnorm_status bn_layer_backward(const char *F, bnorm_layer *l, bnorm_layer_context *ctx, const bnorm_desc *desc,
                                      const void *x, const void *dy, void *dx, void *daddend) {
    bn_geom g = {0};
    bnorm_status st = bn_layer_check_desc(F, l, desc, &g);
    if (st) return st;
    if (ctx->owner != l) return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "ctx belongs to another layer");
    if (!bn_ctx_valid(l, ctx))
        return bn_fail(BNORM_STATUS_STATE, F, "no forward has run since the layer was created or its state changed");
    if (!bn_desc_equal(desc, &ctx->desc))
        return bn_fail(BNORM_STATUS_SHAPE_MISMATCH, F, "desc differs from the last forward's descriptor");
    if (g.numel > 0 && x && bn_x_signature(x, g.numel, g.esize) != ctx->xsig)
        return bn_fail(BNORM_STATUS_STATE, F,
                       "x is not the input of the forward whose statistics are saved (another forward ran since? "
                       "use bnorm_layer_context to keep several forwards for their backwards)");
    if (daddend && !l->opt.fused_relu)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "daddend given but the layer was not created with fused_relu");
    if (ctx->relu != (l->opt.fused_relu != 0))
        return bn_fail(BNORM_STATUS_STATE, F, "fused_relu changed since the forward");
    const int param_grads = l->opt.affine && !l->opt.freeze;
    const bnorm_comm *comm = ctx->synced ? &l->comm : NULL;
    if (comm && !l->has_comm)
        return bn_fail(BNORM_STATUS_STATE, F, "the forward was synchronized but the communicator was removed since");
    const int nt = bn_layer_threads(l, &g);
    st = bn_layer_workspace(F, l, desc, comm ? comm->size : 1, nt);
    if (st) return st;
    bnorm_backward_args a = {.struct_size = sizeof a, .desc = *desc, .x = x, .dy = dy, .dx = dx, .weight = l->weight,
                             .mean = ctx->mean, .mean_lo = ctx->mean_lo, .invstd = ctx->invstd,
                             .use_global_stats = ctx->global, .relu_mask = ctx->relu ? ctx->mask : NULL,
                             .daddend = daddend, .dweight = param_grads && l->grad_weight ? l->weight_grad : NULL,
                             .dbias = param_grads && l->grad_bias ? l->bias_grad : NULL, .accumulate = 1,
                             .comm = comm, .reduce_param_grads = l->reduce_param_grads, .workspace = l->workspace,
                             .workspace_size = l->workspace_cap, .num_threads = nt,
                             .threadpool = l->has_pool ? &l->pool : NULL};
    return bn_error_reprefix(F, bnorm_backward(&a));
}

bnorm_status bnorm_layer_backward(bnorm_layer *l, const bnorm_desc *desc, const void *x, const void *dy, void *dx,
                                  void *daddend) {
    static const char *F = "bnorm_layer_backward";
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "layer is NULL");
    return bn_layer_backward(F, l, &l->own, desc, x, dy, dx, daddend);
}

bnorm_status bnorm_layer_backward_ctx(bnorm_layer *l, bnorm_layer_context *ctx, const bnorm_desc *desc, const void *x,
                                      const void *dy, void *dx, void *daddend) {
    static const char *F = "bnorm_layer_backward_ctx";
    bn_clear_error();
    if (!l || !ctx) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", l ? "ctx" : "layer");
    return bn_layer_backward(F, l, ctx, desc, x, dy, dx, daddend);
}

bnorm_status bnorm_layer_reset_running_stats(bnorm_layer *l) {
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, "bnorm_layer_reset_running_stats", "layer is NULL");
    bn_fill(l->running_mean, l->opt.param_dtype, l->opt.num_features, 0.0);
    bn_fill(l->running_var, l->opt.param_dtype, l->opt.num_features, 1.0);
    l->num_batches_tracked = 0;
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_layer_reset_parameters(bnorm_layer *l) {
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, "bnorm_layer_reset_parameters", "layer is NULL");
    bn_fill(l->weight, l->opt.param_dtype, l->opt.num_features, 1.0);
    bn_fill(l->bias, l->opt.param_dtype, l->opt.num_features, 0.0);
    return bnorm_layer_reset_running_stats(l);
}

bnorm_status bnorm_layer_zero_grad(bnorm_layer *l) {
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, "bnorm_layer_zero_grad", "layer is NULL");
    bn_fill(l->weight_grad, l->opt.param_dtype, l->opt.num_features, 0.0);
    bn_fill(l->bias_grad, l->opt.param_dtype, l->opt.num_features, 0.0);
    return BNORM_STATUS_OK;
}

const char *bnorm_tensor_name(bnorm_tensor_id id) {
    switch (id) {
    case BNORM_TENSOR_WEIGHT: return "weight";
    case BNORM_TENSOR_BIAS: return "bias";
    case BNORM_TENSOR_RUNNING_MEAN: return "running_mean";
    case BNORM_TENSOR_RUNNING_VAR: return "running_var";
    case BNORM_TENSOR_WEIGHT_GRAD: return "weight.grad";
    case BNORM_TENSOR_BIAS_GRAD: return "bias.grad";
    }
    return NULL;
}

bnorm_status bnorm_layer_tensor(bnorm_layer *l, bnorm_tensor_id id, void **data) {
    static const char *F = "bnorm_layer_tensor";
    bn_clear_error();
    if (!l || !data) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", l ? "data" : "layer");
    void *p;
    switch (id) {
    case BNORM_TENSOR_WEIGHT: p = l->weight; break;
    case BNORM_TENSOR_BIAS: p = l->bias; break;
    case BNORM_TENSOR_RUNNING_MEAN: p = l->running_mean; break;
    case BNORM_TENSOR_RUNNING_VAR: p = l->running_var; break;
    case BNORM_TENSOR_WEIGHT_GRAD: p = l->weight_grad; break;
    case BNORM_TENSOR_BIAS_GRAD: p = l->bias_grad; break;
    default: return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "id = %d: not a bnorm_tensor_id", (int)id);
    }
    *data = p;
    if (!p)
        return bn_fail(BNORM_STATUS_UNSUPPORTED, F, "the layer has no %s (affine = %d, track_running_stats = %d)",
                       bnorm_tensor_name(id), l->opt.affine, l->opt.track_running_stats);
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_layer_get_num_batches_tracked(const bnorm_layer *l, int64_t *out) {
    bn_clear_error();
    if (!l || !out)
        return bn_fail(BNORM_STATUS_NULL_POINTER, "bnorm_layer_get_num_batches_tracked", "%s is NULL", l ? "out" : "layer");
    *out = l->num_batches_tracked;
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_layer_set_num_batches_tracked(bnorm_layer *l, int64_t v) {
    static const char *F = "bnorm_layer_set_num_batches_tracked";
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "layer is NULL");
    if (v < 0) return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "value = %lld: must be >= 0", (long long)v);
    l->num_batches_tracked = v;
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_layer_set_comm(bnorm_layer *l, const bnorm_comm *comm, int reduce_param_grads) {
    static const char *F = "bnorm_layer_set_comm";
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "layer is NULL");
    if (comm) {
        bnorm_comm c;
        bnorm_status st = bn_struct_in(F, "comm", comm, &c, sizeof c, BN_V1_SIZE(bnorm_comm, ctx));
        if (st) return st;
        st = bn_comm_check(F, &c);
        if (st) return st;
        l->comm = c;
    }
    l->has_comm = comm != NULL;
    l->reduce_param_grads = reduce_param_grads != 0;
    return BNORM_STATUS_OK;
}
