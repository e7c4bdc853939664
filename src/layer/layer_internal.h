/* layer_internal.h - the layer's representation, shared by layer.c and the state I/O (src/io). */
#ifndef BNORM_LAYER_INTERNAL_H
#define BNORM_LAYER_INTERNAL_H

#include "../core/internal.h"

struct bnorm_layer {
    bnorm_layer_options opt;
    int training;
    /* C values each, of opt.param_dtype; NULL where the layer does not have the tensor */
    void *weight, *bias, *running_mean, *running_var, *weight_grad, *bias_grad;
    int64_t num_batches_tracked;
    void *block; /* one allocation behind all the arrays above and the saved statistics */
    /* what the backward of the last forward needs */
    void *save_mean, *save_invstd;
    int have_saved;      /* a forward has run since creation or the last state change */
    int saved_global;    /* 1: it normalized with running statistics (eval, freeze) */
    int saved_synced;    /* 1: it used the communicator */
    bnorm_desc saved_desc;
    uint8_t *mask;
    size_t mask_cap;
    void *workspace;
    size_t workspace_cap;
    bnorm_comm comm;
    int has_comm, reduce_param_grads;
};

/* Validates options (naming func in the error). */
bnorm_status bn_layer_check_options(const char *func, const bnorm_layer_options *o);

#endif
