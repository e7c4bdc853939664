/* layer_internal.h - the layer's representation, shared by layer.c and the state I/O (src/io). */
#ifndef BNORM_LAYER_INTERNAL_H
#define BNORM_LAYER_INTERNAL_H

#include "../core/internal.h"

/* What one forward leaves for its backward. The mean is kept as hi + lo of the parameter dtype (the
 * forward's save_mean_lo), so the backward sees the mean the forward normalized with. */
struct bnorm_layer_context {
    const struct bnorm_layer *owner;
    void *mean, *mean_lo, *invstd; /* C values each, of the parameter dtype */
    void *block;                   /* behind the three arrays (NULL for the layer's own context) */
    int have;                      /* a forward filled it (the layer's own: see have_saved) */
    int global;                    /* 1: it normalized with running statistics (eval, freeze) */
    int synced;                    /* 1: it used the communicator */
    int relu;                      /* 1: it ran fused with a ReLU and wrote mask */
    bnorm_desc desc;
    uint64_t xsig;                 /* fingerprint of the forward's input (layer.c) */
    uint8_t *mask;
    size_t mask_cap;
};

struct bnorm_layer {
    bnorm_layer_options opt;
    int training;
    /* C values each, of opt.param_dtype; NULL where the layer does not have the tensor */
    void *weight, *bias, *running_mean, *running_var, *weight_grad, *bias_grad;
    int64_t num_batches_tracked;
    void *block; /* one allocation behind all the arrays above and the own context's statistics */
    struct bnorm_layer_context own; /* the context of the plain forward/backward */
    int have_saved;                 /* own holds a forward since creation or the last state change */
    int grad_weight, grad_bias;     /* set_requires_grad */
    void *workspace;
    size_t workspace_cap;
    bnorm_comm comm;
    int has_comm, reduce_param_grads;
    int num_threads;
    bnorm_threadpool pool;
    int has_pool;
    /* the shape, thread count and communicator size the workspace was last sized for */
    int ws_key_valid, ws_key_nt, ws_key_comm;
    bnorm_desc ws_key_desc;
};

/* Validates options (naming func in the error). */
bnorm_status bn_layer_check_options(const char *func, const bnorm_layer_options *o);

#endif
