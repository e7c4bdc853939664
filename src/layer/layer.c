/*
 * layer.c - the stateful layer (nn.BatchNorm / MegEngine BatchNorm / OneFlow FusedBatchNorm), built on
 * bnorm_forward and bnorm_backward. It owns parameters, gradients, running statistics, the counter,
 * and what the backward needs (saved statistics, ReLU mask, workspace, grown only when shapes grow).
 */
#include "layer_internal.h"

#include <math.h>
#include <stdlib.h>

bnorm_layer_options bnorm_layer_options_default(int64_t num_features) {
    bnorm_layer_options o;
    memset(&o, 0, sizeof o); /* padding too: callers may compare or hash options bytewise */
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
    bnorm_status st = bn_layer_check_options(F, options);
    if (st) return st;
    bnorm_layer *l = (bnorm_layer *)calloc(1, sizeof *l);
    const int64_t C = options->num_features;
    const size_t es = bnorm_dtype_size(options->param_dtype);
    char *blk = l ? (char *)calloc(8 * (size_t)C, es) : NULL;
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
    l->save_mean = blk + 6 * sz;
    l->save_invstd = blk + 7 * sz;
    bnorm_layer_reset_parameters(l);
    *out = l;
    return BNORM_STATUS_OK;
}

void bnorm_layer_destroy(bnorm_layer *l) {
    if (!l) return;
    free(l->block);
    free(l->mask);
    free(l->workspace);
    free(l);
}

bnorm_status bnorm_layer_get_options(const bnorm_layer *l, bnorm_layer_options *out) {
    bn_clear_error();
    if (!l || !out) return bn_fail(BNORM_STATUS_NULL_POINTER, "bnorm_layer_get_options", "%s is NULL", l ? "out" : "layer");
    *out = l->opt;
    return BNORM_STATUS_OK;
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

bnorm_status bnorm_layer_forward(bnorm_layer *l, const bnorm_desc *desc, const void *x, void *y,
                                 const void *addend) {
    static const char *F = "bnorm_layer_forward";
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "layer is NULL");
    bn_geom g = {0};
    bnorm_status st = bn_layer_check_desc(F, l, desc, &g);
    if (st) return st;
    if (addend && !l->opt.fused_relu)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "addend given but the layer was not created with fused_relu");
    const bnorm_layer_options *o = &l->opt;
    const int track = o->track_running_stats;
    const int batch_stats = (l->training && !o->freeze) || !track;
    const int update = l->training && track && !o->freeze;
    const int64_t C = o->num_features;

    if (o->fused_relu) {
        st = bn_grow(F, (void **)&l->mask, &l->mask_cap, bnorm_relu_mask_size(desc));
        if (st) return st;
    }
    const bnorm_comm *comm = (batch_stats && l->training && l->has_comm) ? &l->comm : NULL;
    st = bn_grow(F, &l->workspace, &l->workspace_cap, bnorm_workspace_size(desc, comm ? comm->size : 1));
    if (st) return st;

    bnorm_forward_args a = {.desc = *desc, .x = x, .y = y, .weight = l->weight, .bias = l->bias, .eps = o->eps,
                            .addend = addend, .relu = o->fused_relu, .relu_mask = o->fused_relu ? l->mask : NULL,
                            .workspace = l->workspace, .workspace_size = l->workspace_cap};
    if (batch_stats) {
        a.training = 1;
        a.save_mean = l->save_mean;
        a.save_invstd = l->save_invstd;
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
            bn_param_set(l->save_mean, o->param_dtype, c, bn_param_get(l->running_mean, o->param_dtype, c));
            bn_param_set(l->save_invstd, o->param_dtype, c,
                         bn_invstd(bn_param_get(l->running_var, o->param_dtype, c), o->eps));
        }
    }
    l->have_saved = 1;
    l->saved_global = !batch_stats;
    l->saved_synced = comm != NULL;
    l->saved_desc = *desc;
    return BNORM_STATUS_OK;
}

static int bn_desc_equal(const bnorm_desc *a, const bnorm_desc *b) {
    if (a->dtype != b->dtype || a->layout != b->layout || a->rank != b->rank) return 0;
    for (int i = 0; i < a->rank; i++)
        if (a->dims[i] != b->dims[i]) return 0;
    return 1;
}

bnorm_status bnorm_layer_backward(bnorm_layer *l, const bnorm_desc *desc, const void *x, const void *dy, void *dx,
                                  void *daddend) {
    static const char *F = "bnorm_layer_backward";
    bn_clear_error();
    if (!l) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "layer is NULL");
    bn_geom g = {0};
    bnorm_status st = bn_layer_check_desc(F, l, desc, &g);
    if (st) return st;
    if (!l->have_saved)
        return bn_fail(BNORM_STATUS_STATE, F, "no forward has run since the layer was created or its state changed");
    if (!bn_desc_equal(desc, &l->saved_desc))
        return bn_fail(BNORM_STATUS_SHAPE_MISMATCH, F, "desc differs from the last forward's descriptor");
    if (daddend && !l->opt.fused_relu)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "daddend given but the layer was not created with fused_relu");
    const int param_grads = l->opt.affine && !l->opt.freeze;
    const bnorm_comm *comm = l->saved_synced ? &l->comm : NULL;
    if (comm && !l->has_comm)
        return bn_fail(BNORM_STATUS_STATE, F, "the forward was synchronized but the communicator was removed since");
    bnorm_backward_args a = {.desc = *desc, .x = x, .dy = dy, .dx = dx, .weight = l->weight, .mean = l->save_mean,
                             .invstd = l->save_invstd, .use_global_stats = l->saved_global,
                             .relu_mask = l->opt.fused_relu ? l->mask : NULL, .daddend = daddend,
                             .dweight = param_grads ? l->weight_grad : NULL,
                             .dbias = param_grads ? l->bias_grad : NULL, .accumulate = 1, .comm = comm,
                             .reduce_param_grads = l->reduce_param_grads, .workspace = l->workspace,
                             .workspace_size = l->workspace_cap};
    return bn_error_reprefix(F, bnorm_backward(&a));
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
        if (comm->size < 1 || comm->rank < 0 || comm->rank >= comm->size)
            return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "comm rank = %d, size = %d: need 0 <= rank < size",
                           comm->rank, comm->size);
        if (!comm->allgather) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "comm->allgather is NULL");
        l->comm = *comm;
    }
    l->has_comm = comm != NULL;
    l->reduce_param_grads = reduce_param_grads != 0;
    return BNORM_STATUS_OK;
}
