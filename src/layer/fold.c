/*
 * fold.c - inference folding of an eval layer: its per-channel affine map (y = scale * x + shift), and
 * the same map pushed into the preceding convolution or linear layer, as PyTorch's fuse_conv_bn_eval.
 * Each value is computed in float64 from the stored parameters and rounded once to the parameter dtype,
 * so results are within one float32 rounding of PyTorch's float32 arithmetic.
 */
#include "layer_internal.h"

/* Caller arrays need no alignment (bnorm.h), so they are accessed through memcpy. */
static double bn_user_get(const void *p, bnorm_dtype pd, int64_t i) {
    if (pd == BNORM_DTYPE_F64) {
        double v;
        memcpy(&v, (const char *)p + (size_t)i * 8, 8);
        return v;
    }
    float v;
    memcpy(&v, (const char *)p + (size_t)i * 4, 4);
    return (double)v;
}
static void bn_user_set(void *p, bnorm_dtype pd, int64_t i, double v) {
    if (pd == BNORM_DTYPE_F64) {
        memcpy((char *)p + (size_t)i * 8, &v, 8);
    } else {
        float f = (float)v;
        memcpy((char *)p + (size_t)i * 4, &f, 4);
    }
}

/* Shared checks: the layer must normalize with its running statistics. */
static bnorm_status bn_fold_check(const char *F, const bnorm_layer *l) {
    if (!l->opt.track_running_stats)
        return bn_fail(BNORM_STATUS_UNSUPPORTED, F,
                       "the layer has no running statistics (track_running_stats = 0): it normalizes with batch "
                       "statistics even in eval, so it cannot be folded");
    if (l->training && !l->opt.freeze)
        return bn_fail(BNORM_STATUS_STATE, F,
                       "the layer is in training mode (it normalizes with batch statistics): call "
                       "bnorm_layer_set_training(layer, 0) first");
    return BNORM_STATUS_OK;
}

/* scale_c = weight_c * invstd_c with the forward's rule invstd = 0 when var + eps == 0. */
static double bn_fold_scale(const bnorm_layer *l, int64_t c) {
    const bnorm_dtype pd = l->opt.param_dtype;
    double w = l->weight ? bn_param_get(l->weight, pd, c) : 1.0;
    return w * bn_invstd(bn_param_get(l->running_var, pd, c), l->opt.eps);
}

bnorm_status bnorm_layer_fold_scale_shift(const bnorm_layer *l, void *scale, void *shift) {
    static const char *F = "bnorm_layer_fold_scale_shift";
    bn_clear_error();
    if (!l || !scale || !shift)
        return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", !l ? "layer" : !scale ? "scale" : "shift");
    bnorm_status st = bn_fold_check(F, l);
    if (st) return st;
    const bnorm_dtype pd = l->opt.param_dtype;
    for (int64_t c = 0; c < l->opt.num_features; c++) {
        double s = bn_fold_scale(l, c);
        double b = l->bias ? bn_param_get(l->bias, pd, c) : 0.0;
        double m = bn_param_get(l->running_mean, pd, c);
        bn_user_set(scale, pd, c, s);
        bn_user_set(shift, pd, c, b - m * s);
    }
    return BNORM_STATUS_OK;
}

bnorm_status bnorm_layer_fold_into(const bnorm_layer *l, int64_t c_out, int64_t k, const void *weight_in,
                                   const void *bias_in, void *weight_out, void *bias_out) {
    static const char *F = "bnorm_layer_fold_into";
    bn_clear_error();
    if (!l || !weight_in || !weight_out || !bias_out)
        return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL",
                       !l ? "layer" : !weight_in ? "weight_in" : !weight_out ? "weight_out" : "bias_out");
    bnorm_status st = bn_fold_check(F, l);
    if (st) return st;
    if (c_out != l->opt.num_features)
        return bn_fail(BNORM_STATUS_SHAPE_MISMATCH, F, "c_out = %lld but the layer has num_features = %lld",
                       (long long)c_out, (long long)l->opt.num_features);
    if (k < 1) return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "k = %lld: must be >= 1", (long long)k);
    const bnorm_dtype pd = l->opt.param_dtype;
    if ((uint64_t)k > (uint64_t)INT64_MAX / (uint64_t)c_out ||
        (uint64_t)(c_out * k) > SIZE_MAX / bnorm_dtype_size(pd))
        return bn_fail(BNORM_STATUS_OVERFLOW, F, "c_out * k = %lld * %lld: the weight's byte size overflows",
                       (long long)c_out, (long long)k);
    for (int64_t c = 0; c < c_out; c++) {
        /* each value is read before it is written: weight and bias may be updated in place */
        double s = bn_fold_scale(l, c);
        for (int64_t j = 0; j < k; j++)
            bn_user_set(weight_out, pd, c * k + j, bn_user_get(weight_in, pd, c * k + j) * s);
        double b = bias_in ? bn_user_get(bias_in, pd, c) : 0.0;
        double beta = l->bias ? bn_param_get(l->bias, pd, c) : 0.0;
        bn_user_set(bias_out, pd, c, (b - bn_param_get(l->running_mean, pd, c)) * s + beta);
    }
    return BNORM_STATUS_OK;
}
