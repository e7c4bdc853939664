/* stats.c - per-channel finalisation shared by every backend: saved and running statistics after the
 * forward's merge, and the backward's parameter gradients and dx coefficients from its sums. */
#include "plan.h"

void bn_fwd_finalize(const bnorm_forward_args *a, bnorm_dtype pd, int64_t c, double n, double mean, double m2,
                     double *scale, double *shift) {
    double var = m2 / n;
    double invstd = bn_invstd(var, a->eps);
    if (a->save_mean) {
        bn_param_set(a->save_mean, pd, c, mean);
        if (a->save_mean_lo) /* what the rounding to the parameter dtype dropped */
            bn_param_set(a->save_mean_lo, pd, c, mean - bn_param_get(a->save_mean, pd, c));
    }
    if (a->save_invstd) bn_param_set(a->save_invstd, pd, c, invstd);
    if (a->running_mean) {
        double al = a->momentum;
        double rm = bn_param_get(a->running_mean, pd, c), rv = bn_param_get(a->running_var, pd, c);
        bn_param_set(a->running_mean, pd, c, (1 - al) * rm + al * mean);
        bn_param_set(a->running_var, pd, c, (1 - al) * rv + al * (m2 / (n - 1)));
    }
    double w = a->weight ? bn_param_get(a->weight, pd, c) : 1.0;
    *scale = w * invstd;
    *shift = a->bias ? bn_param_get(a->bias, pd, c) : 0.0;
}

double bn_bwd_mean_of(const bnorm_backward_args *a, bnorm_dtype pd, int64_t c) {
    double m = bn_param_get(a->mean, pd, c);
    return a->mean_lo ? m + bn_param_get(a->mean_lo, pd, c) : m;
}

double bn_bwd_invstd_of(const bnorm_backward_args *a, bnorm_dtype pd, int64_t c) {
    return a->invstd ? bn_param_get(a->invstd, pd, c) : bn_invstd(bn_param_get(a->var, pd, c), a->eps);
}

void bn_bwd_param_grads_of(const bnorm_backward_args *a, bnorm_dtype pd, int64_t c, double sg, double sgx,
                           double invstd) {
    if (a->dweight)
        bn_param_set(a->dweight, pd, c, (a->accumulate ? bn_param_get(a->dweight, pd, c) : 0) + sgx * invstd);
    if (a->dbias) bn_param_set(a->dbias, pd, c, (a->accumulate ? bn_param_get(a->dbias, pd, c) : 0) + sg);
}

void bn_bwd_coefs_of(const bnorm_backward_args *a, bnorm_dtype pd, int64_t c, double n_total, double sg,
                     double sgx, double invstd, double *k1, double *k2, double *k3) {
    double w = a->weight ? bn_param_get(a->weight, pd, c) : 1.0;
    *k1 = w * invstd;
    if (a->use_global_stats || n_total <= 0) {
        *k2 = *k3 = 0;
    } else {
        *k2 = *k1 * sg / n_total;
        *k3 = *k1 * invstd * invstd * sgx / n_total;
    }
}
