/* check.c - the argument rules of bnorm_forward/bnorm_backward that do not depend on the backend:
 * the CUDA backend uses them as they are, so a call is accepted or refused, with the same message, by
 * either backend. (The CPU driver still holds its own copy of these rules until the backend seam of
 * issue 16 lands; the two must stay identical.) */
#include "internal.h"

#include <math.h>

bnorm_status bn_comm_check(const char *func, const bnorm_comm *c) {
    if (c->size < 1 || c->rank < 0 || c->rank >= c->size)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "comm rank = %d, size = %d: need 0 <= rank < size",
                       c->rank, c->size);
    if (!c->allgather) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "comm->allgather is NULL");
    return BNORM_STATUS_OK;
}

bnorm_status bn_forward_check(const char *func, const bnorm_forward_args *a, bn_geom *g) {
    if (!a) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "args is NULL");
    bnorm_status st = bn_geom_init(func, "args->desc", &a->desc, g);
    if (st) return st;
    if (g->numel > 0 && !a->x) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "args->x is NULL");
    if (g->numel > 0 && !a->y) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "args->y is NULL");
    if (!(a->eps >= 0) || isinf(a->eps))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "args->eps = %g: must be finite and >= 0", a->eps);
    if (a->training) {
        if (!a->running_mean != !a->running_var)
            return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func,
                           "running_mean is %s but running_var is %s: pass both or neither",
                           a->running_mean ? "set" : "NULL", a->running_var ? "set" : "NULL");
        if (a->running_mean && !(a->momentum >= 0 && a->momentum <= 1))
            return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "args->momentum = %g: must be in [0, 1]",
                           a->momentum);
        if (a->comm) {
            st = bn_comm_check(func, a->comm);
            if (st) return st;
        }
    } else {
        if (!a->running_mean || !a->running_var)
            return bn_fail(BNORM_STATUS_NULL_POINTER, func,
                           "inference (training = 0) needs running_mean and running_var");
        if (a->save_mean || a->save_invstd)
            return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func,
                           "save_mean/save_invstd are training outputs; pass NULL in inference");
    }
    if (a->relu_mask && !a->relu)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "relu_mask is set but relu = 0");
    return BNORM_STATUS_OK;
}

bnorm_status bn_backward_check(const char *func, const bnorm_backward_args *a, bn_geom *g) {
    if (!a) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "args is NULL");
    bnorm_status st = bn_geom_init(func, "args->desc", &a->desc, g);
    if (st) return st;
    if (g->numel > 0 && !a->x) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "args->x is NULL");
    if (g->numel > 0 && !a->dy) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "args->dy is NULL");
    if (!a->mean) return bn_fail(BNORM_STATUS_NULL_POINTER, func, "args->mean is NULL");
    if (!a->invstd == !a->var)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "pass exactly one of args->invstd and args->var (got %s)",
                       a->invstd ? "both" : "neither");
    if (a->var && (!(a->eps >= 0) || isinf(a->eps)))
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "args->eps = %g: must be finite and >= 0", a->eps);
    if (a->daddend && !a->relu_mask)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func,
                       "daddend needs relu_mask (without a ReLU the addend's gradient is dy itself)");
    if (a->comm && !a->use_global_stats) {
        st = bn_comm_check(func, a->comm);
        if (st) return st;
    }
    return BNORM_STATUS_OK;
}
