/*
 * ref.h - the float64 reference batch norm: the oracle of every test. Written for clarity, not speed:
 * plain loops over logical indices (n, c, s), s the flattened spatial index, for either layout.
 */
#ifndef BNORM_TEST_REF_H
#define BNORM_TEST_REF_H

#include <stdint.h>

typedef struct ref_shape {
    int64_t N, C, S; /* S = product of the spatial dims (1 for rank 2) */
    int channels_last;
} ref_shape;

/* Memory offset of logical element (n, c, s). */
static inline int64_t ref_index(const ref_shape *sh, int64_t n, int64_t c, int64_t s) {
    return sh->channels_last ? (n * sh->S + s) * sh->C + c : (n * sh->C + c) * sh->S + s;
}

/* Training forward. mean[c] = (1/m) sum x; var[c] = (1/m) sum (x - mean)^2 (two passes, float64);
 * invstd = 1/sqrt(var + eps) or 0 when var + eps == 0; z = (x - mean) * invstd * w + b (+ addend);
 * y = relu ? (z <= 0 ? 0 : z) : z (so NaN stays NaN). w/b/addend may be NULL. mean/var/invstd
 * are outputs [C] (may be NULL). */
void ref_forward_train(const ref_shape *sh, const double *x, const double *w, const double *b,
                       const double *addend, int relu, double eps, double *y, double *mean, double *var,
                       double *invstd);

/* Inference forward with given statistics. */
void ref_forward_eval(const ref_shape *sh, const double *x, const double *w, const double *b,
                      const double *rmean, const double *rvar, double eps, const double *addend, int relu,
                      double *y);

/* Backward. mean/invstd: what the forward normalized with. global = statistics were constants.
 * mask: NULL, or one byte per element (memory order): 1 where the forward's z > 0 (ReLU). With a mask,
 * g = dy * mask and daddend = g. Training (global = 0):
 *   dbias = sum g, dweight = sum g * xhat,
 *   dx = w * invstd * (g - dbias/m - xhat * dweight/m).
 * Eval (global = 1): dx = g * w * invstd. Any output may be NULL. */
void ref_backward(const ref_shape *sh, const double *x, const double *dy, const double *w,
                  const double *mean, const double *invstd, int global, const unsigned char *mask,
                  double *dx, double *daddend, double *dweight, double *dbias);

#endif
