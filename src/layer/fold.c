/* fold.c - inference folding: placeholder until implemented. */
#include "layer_internal.h"

bnorm_status bnorm_layer_fold_scale_shift(const bnorm_layer *layer, void *scale, void *shift) {
    (void)layer; (void)scale; (void)shift;
    return bn_fail(BNORM_STATUS_UNSUPPORTED, "bnorm_layer_fold_scale_shift", "not implemented yet");
}

bnorm_status bnorm_layer_fold_into(const bnorm_layer *layer, int64_t c_out, int64_t k, const void *weight_in,
                                   const void *bias_in, void *weight_out, void *bias_out) {
    (void)layer; (void)c_out; (void)k; (void)weight_in; (void)bias_in; (void)weight_out; (void)bias_out;
    return bn_fail(BNORM_STATUS_UNSUPPORTED, "bnorm_layer_fold_into", "not implemented yet");
}
