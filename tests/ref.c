/* ref.c - the float64 reference implementation (see ref.h for the formulas). */
#include "ref.h"

#include <math.h>

static double ref_relu(double z) { return z <= 0 ? 0.0 : z; /* NaN stays NaN, as torch.relu */ }

void ref_forward_train(const ref_shape *sh, const double *x, const double *w, const double *b,
                       const double *addend, int relu, double eps, double *y, double *mean, double *var,
                       double *invstd) {
    const int64_t m = sh->N * sh->S;
    for (int64_t c = 0; c < sh->C; c++) {
        /* first pass: the mean */
        double s = 0;
        for (int64_t n = 0; n < sh->N; n++)
            for (int64_t i = 0; i < sh->S; i++) s += x[ref_index(sh, n, c, i)];
        double mu = s / (double)m;
        /* second pass: squared deviations from it (no cancellation) */
        double q = 0;
        for (int64_t n = 0; n < sh->N; n++)
            for (int64_t i = 0; i < sh->S; i++) {
                double d = x[ref_index(sh, n, c, i)] - mu;
                q += d * d;
            }
        double v = q / (double)m;
        double is = (v + eps == 0) ? 0.0 : 1.0 / sqrt(v + eps);
        if (mean) mean[c] = mu;
        if (var) var[c] = v;
        if (invstd) invstd[c] = is;
        double wc = w ? w[c] : 1.0, bc = b ? b[c] : 0.0;
        for (int64_t n = 0; n < sh->N; n++)
            for (int64_t i = 0; i < sh->S; i++) {
                int64_t k = ref_index(sh, n, c, i);
                double z = (x[k] - mu) * is * wc + bc + (addend ? addend[k] : 0.0);
                y[k] = relu ? ref_relu(z) : z;
            }
    }
}

void ref_forward_eval(const ref_shape *sh, const double *x, const double *w, const double *b,
                      const double *rmean, const double *rvar, double eps, const double *addend, int relu,
                      double *y) {
    for (int64_t c = 0; c < sh->C; c++) {
        double is = (rvar[c] + eps == 0) ? 0.0 : 1.0 / sqrt(rvar[c] + eps);
        double wc = w ? w[c] : 1.0, bc = b ? b[c] : 0.0;
        for (int64_t n = 0; n < sh->N; n++)
            for (int64_t i = 0; i < sh->S; i++) {
                int64_t k = ref_index(sh, n, c, i);
                double z = (x[k] - rmean[c]) * is * wc + bc + (addend ? addend[k] : 0.0);
                y[k] = relu ? ref_relu(z) : z;
            }
    }
}

void ref_backward(const ref_shape *sh, const double *x, const double *dy, const double *w,
                  const double *mean, const double *invstd, int global, const unsigned char *mask,
                  double *dx, double *daddend, double *dweight, double *dbias) {
    const double m = (double)(sh->N * sh->S);
    for (int64_t c = 0; c < sh->C; c++) {
        double sg = 0, sgxh = 0;
        for (int64_t n = 0; n < sh->N; n++)
            for (int64_t i = 0; i < sh->S; i++) {
                int64_t k = ref_index(sh, n, c, i);
                double g = mask ? (mask[k] ? dy[k] : 0.0) : dy[k];
                sg += g;
                sgxh += g * (x[k] - mean[c]) * invstd[c];
            }
        if (dbias) dbias[c] = sg;
        if (dweight) dweight[c] = sgxh;
        double wc = w ? w[c] : 1.0;
        for (int64_t n = 0; n < sh->N; n++)
            for (int64_t i = 0; i < sh->S; i++) {
                int64_t k = ref_index(sh, n, c, i);
                double g = mask ? (mask[k] ? dy[k] : 0.0) : dy[k];
                if (daddend) daddend[k] = g;
                if (!dx) continue;
                if (global || m <= 0) {
                    dx[k] = g * wc * invstd[c];
                } else {
                    double xhat = (x[k] - mean[c]) * invstd[c];
                    dx[k] = wc * invstd[c] * (g - sg / m - xhat * sgxh / m);
                }
            }
    }
}
