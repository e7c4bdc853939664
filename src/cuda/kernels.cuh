/*
 * kernels.cuh - the CUDA kernels of bnorm, the same phases as the CPU's (src/cpu/kernels.h):
 * partial statistics, their merge, finalize (running statistics, coefficients), apply; backward
 * reduce, merge, finalize (parameter gradients, coefficients), apply.
 *
 * Every tensor is viewed as the core's bn_geom [outer][C][inner]:
 *   planes (channels-first, inner > 1): the m = outer * inner values of channel c lie in `outer`
 *     planes of `inner` contiguous values, plane stride C * inner;
 *   rows (channels-last, or inner == 1): `outer` rows of C contiguous values.
 * The element-wise kernels walk "units" of 8 consecutive values of one segment (a plane or a row),
 * so each unit owns exactly one byte of the relu mask (the CPU's layout: each segment starts on a byte).
 *
 * Numerics and determinism: every thread keeps shifted sums in double (shift = its first finite
 * value), turns them into (count, mean, M2) and the block merges those with Chan's formula
 * (bn_moments_merge of the core) along a fixed tree in shared memory; the per-block partials are
 * merged again in a fixed order. No atomics, and the work split depends on the shape only, so the
 * results are the same run to run and on any GPU. The source is compiled with --fmad=false: the
 * element-wise expressions round exactly as the CPU's (ISO C, no contraction), so with the same
 * coefficients the outputs are bitwise those of the CPU backend.
 */
#ifndef BNORM_CUDA_KERNELS_CUH
#define BNORM_CUDA_KERNELS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

extern "C" {
#include "../core/internal.h"
}

enum { BN_CU_THREADS = 256 };

/* Storage type T <-> compute type A (float, or double for float64 data); P is the parameter type. */
template <typename T> struct bn_io;
template <> struct bn_io<float> {
    typedef float A;
    typedef float P;
    static __device__ __forceinline__ float ld(const float *p) { return *p; }
    static __device__ __forceinline__ void st(float *p, float v) { *p = v; }
};
template <> struct bn_io<double> {
    typedef double A;
    typedef double P;
    static __device__ __forceinline__ double ld(const double *p) { return *p; }
    static __device__ __forceinline__ void st(double *p, double v) { *p = v; }
};
template <> struct bn_io<__half> {
    typedef float A;
    typedef float P;
    static __device__ __forceinline__ float ld(const __half *p) { return __half2float(*p); }
    static __device__ __forceinline__ void st(__half *p, float v) { *p = __float2half_rn(v); }
};
template <> struct bn_io<__nv_bfloat16> {
    typedef float A;
    typedef float P;
    static __device__ __forceinline__ float ld(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
    static __device__ __forceinline__ void st(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }
};

/* The geometry as the kernels use it. L: values per segment, U: mask bytes (units) per segment, S:
 * segments. */
struct bn_kgeom {
    long long outer, C, inner, m, L, U, S;
    int planes;
};

/* The reduction split, a function of the shape only: blocks of tx * ty = 256 threads; a block
 * reduces one "tile" (planes: one channel, tx = 1; rows: tx consecutive channels) over one chunk of
 * its values (planes: `chunk` consecutive values of the channel's m; rows: `chunk` rows). */
struct bn_kplan {
    long long tiles, nchunk, chunk;
    int tx, ty;
};

/* A unit's 8 values moved as 16-byte vectors (one for 2-byte types, two for float, four for double)
 * when the launch found every segment a multiple of 8 values and every tensor 16-byte aligned: a warp
 * then reads and writes whole contiguous lines. Otherwise the values go one by one. */
template <typename T> __device__ __forceinline__ void bn_k_load8(const T *p, int vec, int len, T *v) {
    if (vec) {
        uint4 raw[sizeof(T) / 2];
        const uint4 *q = reinterpret_cast<const uint4 *>(p);
#pragma unroll
        for (int i = 0; i < (int)(sizeof(T) / 2); i++) raw[i] = q[i];
        memcpy(v, raw, sizeof raw);
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (j < len) v[j] = p[j];
    }
}
template <typename T> __device__ __forceinline__ void bn_k_store8(T *p, int vec, int len, const T *v) {
    if (vec) {
        uint4 raw[sizeof(T) / 2];
        memcpy(raw, v, sizeof raw);
        uint4 *q = reinterpret_cast<uint4 *>(p);
#pragma unroll
        for (int i = 0; i < (int)(sizeof(T) / 2); i++) q[i] = raw[i];
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (j < len) p[j] = v[j];
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Forward statistics                                                                              */
/* ---------------------------------------------------------------------------------------------- */

/* Moments of one thread's values from its shifted sums (n >= 1). */
__device__ __forceinline__ void bn_k_moments(double n, double k, double s1, double s2, double *mean, double *m2) {
    *mean = k + s1 / n;
    double v = s2 - s1 * s1 / n;
    *m2 = v < 0 ? 0 : v;
}

/* Merges the 256 per-thread moments of sh along a fixed tree over ty (for each tx). */
__device__ __forceinline__ void bn_k_tree_moments(double (*sh)[BN_CU_THREADS], int t, int tx, int ty, int ntx, int nty) {
    (void)tx;
    for (int s = nty / 2; s > 0; s >>= 1) {
        if (ty < s) {
            bn_moments a = {sh[0][t], sh[1][t], sh[2][t]};
            const int u = t + s * ntx;
            bn_moments_merge(&a, sh[0][u], sh[1][u], sh[2][u]);
            sh[0][t] = a.n;
            sh[1][t] = a.mean;
            sh[2][t] = a.m2;
        }
        __syncthreads();
    }
}

/* part[(k * C + c) * 3 + {0, 1, 2}] = (count, mean, M2) of chunk k of channel c. */
template <typename T>
__global__ void __launch_bounds__(BN_CU_THREADS) bn_k_stats(const T *x, bn_kgeom g, bn_kplan p, double *part) {
    typedef bn_io<T> io;
    typedef typename io::A A;
    __shared__ double sh[3][BN_CU_THREADS];
    const int tx = threadIdx.x, ty = threadIdx.y, t = ty * p.tx + tx;
    const long long total = p.tiles * p.nchunk;
    for (long long bid = blockIdx.x; bid < total; bid += gridDim.x) {
        const long long tile = bid / p.nchunk, k = bid - tile * p.nchunk;
        const long long c = g.planes ? tile : tile * p.tx + tx;
        double n = 0, mean = 0, m2 = 0;
        if (g.planes) {
            const long long j0 = k * p.chunk, j1 = min(g.m, j0 + p.chunk);
            long long j = j0 + t;
            if (j < j1) {
                /* element j of the channel: plane o = j / inner, offset i = j % inner; stepped by 256
                   without a division per element */
                const long long ps = g.C * g.inner, q = BN_CU_THREADS / g.inner, r = BN_CU_THREADS % g.inner;
                long long i = j % g.inner;
                long long off = (j / g.inner) * ps + i;
                const T *xc = x + c * g.inner;
                A k0 = io::ld(xc + off);
                if (!isfinite(k0)) k0 = 0;
                const double kd = (double)k0;
                double s1 = 0, s2 = 0, cnt = 0;
                for (; j < j1; j += BN_CU_THREADS) {
                    const double d = (double)io::ld(xc + off) - kd;
                    s1 += d;
                    s2 = fma(d, d, s2);
                    cnt += 1;
                    i += r;
                    off += q * ps + r;
                    if (i >= g.inner) {
                        i -= g.inner;
                        off += ps - g.inner;
                    }
                }
                n = cnt;
                bn_k_moments(n, kd, s1, s2, &mean, &m2);
            }
        } else if (c < g.C) {
            const long long r0 = k * p.chunk, r1 = min(g.outer, r0 + p.chunk);
            long long r = r0 + ty;
            if (r < r1) {
                A k0 = io::ld(x + r * g.C + c);
                if (!isfinite(k0)) k0 = 0;
                const double kd = (double)k0;
                double s1 = 0, s2 = 0, cnt = 0;
                for (; r < r1; r += p.ty) {
                    const double d = (double)io::ld(x + r * g.C + c) - kd;
                    s1 += d;
                    s2 = fma(d, d, s2);
                    cnt += 1;
                }
                n = cnt;
                bn_k_moments(n, kd, s1, s2, &mean, &m2);
            }
        }
        sh[0][t] = n;
        sh[1][t] = mean;
        sh[2][t] = m2;
        __syncthreads();
        bn_k_tree_moments(sh, t, tx, ty, p.tx, p.ty);
        if (ty == 0 && c < g.C) {
            double *q = part + (k * g.C + c) * 3;
            q[0] = sh[0][t];
            q[1] = sh[1][t];
            q[2] = sh[2][t];
        }
        __syncthreads();
    }
}

/* Channel c's chunks merged in a fixed order: thread t takes chunks t, t + 256, ... in order, then
 * the fixed tree. Writes mean[c] and m2[c]. One block per channel (1-D blocks of 256). */
__global__ void __launch_bounds__(BN_CU_THREADS) bn_k_merge_moments(const double *part, long long nchunk, long long C,
                                                                   double *mean, double *m2) {
    __shared__ double sh[3][BN_CU_THREADS];
    const int t = threadIdx.x;
    for (long long c = blockIdx.x; c < C; c += gridDim.x) {
        bn_moments a = {0, 0, 0};
        for (long long k = t; k < nchunk; k += BN_CU_THREADS) {
            const double *q = part + (k * C + c) * 3;
            bn_moments_merge(&a, q[0], q[1], q[2]);
        }
        sh[0][t] = a.n;
        sh[1][t] = a.mean;
        sh[2][t] = a.m2;
        __syncthreads();
        bn_k_tree_moments(sh, t, 0, t, 1, BN_CU_THREADS);
        if (t == 0) {
            mean[c] = sh[1][0];
            m2[c] = sh[2][0];
        }
        __syncthreads();
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Forward finalize and apply                                                                      */
/* ---------------------------------------------------------------------------------------------- */

template <typename P, typename A> struct bn_fwd_fin {
    const P *weight, *bias;
    P *running_mean, *running_var, *save_mean, *save_invstd;
    const double *mean, *m2; /* merged statistics (training) */
    double n, eps, momentum;
    int training;
    long long C;
    A *mh, *ml, *scale, *shift; /* coefficients of the apply: mean as hi + lo */
};

/* Per channel: the statistics are final (training) or given (inference): saved statistics, running
 * update (PyTorch's, unbiased variance), coefficients; the CPU driver's formulas in the same order. */
template <typename P, typename A> __global__ void bn_k_fwd_finalize(bn_fwd_fin<P, A> f) {
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < f.C; c += (long long)gridDim.x * blockDim.x) {
        double mean, invstd;
        if (f.training) {
            mean = f.mean[c];
            const double m2 = f.m2[c];
            invstd = bn_invstd(m2 / f.n, f.eps);
            if (f.save_mean) f.save_mean[c] = (P)mean;
            if (f.save_invstd) f.save_invstd[c] = (P)invstd;
            if (f.running_mean) {
                const double al = f.momentum, rm = (double)f.running_mean[c], rv = (double)f.running_var[c];
                f.running_mean[c] = (P)((1 - al) * rm + al * mean);
                f.running_var[c] = (P)((1 - al) * rv + al * (m2 / (f.n - 1)));
            }
        } else {
            mean = (double)f.running_mean[c];
            invstd = bn_invstd((double)f.running_var[c], f.eps);
        }
        const double w = f.weight ? (double)f.weight[c] : 1.0;
        const A h = (A)mean;
        f.mh[c] = h;
        f.ml[c] = (A)(mean - (double)h);
        f.scale[c] = (A)(w * invstd);
        f.shift[c] = f.bias ? (A)(double)f.bias[c] : (A)0;
    }
}

/* y = (x - mh - ml) * scale + shift [+ add] [ReLU]; mask bit = z > 0. y may be x or add. */
template <typename T>
__global__ void __launch_bounds__(BN_CU_THREADS)
    bn_k_fwd_apply(const T *x, T *y, const T *add, uint8_t *mask, bn_kgeom g, const typename bn_io<T>::A *mh,
                   const typename bn_io<T>::A *ml, const typename bn_io<T>::A *sc, const typename bn_io<T>::A *sf,
                   int relu, int vec) {
    typedef bn_io<T> io;
    typedef typename io::A A;
    const long long units = g.S * g.U;
    for (long long u = blockIdx.x * (long long)blockDim.x + threadIdx.x; u < units; u += (long long)gridDim.x * blockDim.x) {
        const long long seg = u / g.U, kb = u - seg * g.U, p0 = kb * 8, base = seg * g.L + p0;
        const int len = (int)min(8LL, g.L - p0);
        T xv[8], av[8], yv[8];
        bn_k_load8(x + base, vec, len, xv);
        if (add) bn_k_load8(add + base, vec, len, av);
        unsigned bits = 0;
        A h = 0, l = 0, s = 0, b = 0;
        if (g.planes) {
            const long long c = seg % g.C;
            h = mh[c], l = ml[c], s = sc[c], b = sf[c];
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            if (j < len) {
                if (!g.planes) {
                    const long long c = p0 + j;
                    h = mh[c], l = ml[c], s = sc[c], b = sf[c];
                }
                A z = (io::ld(xv + j) - h - l) * s + b;
                if (add) z = z + io::ld(av + j);
                if (z > 0) bits |= 1u << j;
                if (relu && z <= 0) z = 0;
                io::st(yv + j, z);
            }
        }
        bn_k_store8(y + base, vec, len, yv);
        if (mask) mask[u] = (uint8_t)bits;
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Backward                                                                                        */
/* ---------------------------------------------------------------------------------------------- */

__device__ __forceinline__ int bn_k_bit(const uint8_t *mask, long long seg, long long U, long long pos) {
    return (mask[seg * U + (pos >> 3)] >> (pos & 7)) & 1;
}

/* Fixed-tree sum over ty of the two sums in sh. */
__device__ __forceinline__ void bn_k_tree_sums(double (*sh)[BN_CU_THREADS], int t, int ty, int ntx, int nty) {
    for (int s = nty / 2; s > 0; s >>= 1) {
        if (ty < s) {
            sh[0][t] += sh[0][t + s * ntx];
            sh[1][t] += sh[1][t + s * ntx];
        }
        __syncthreads();
    }
}

/* part[(k * C + c) * 2 + {0, 1}] = sum g, sum g * (x - mean) of chunk k of channel c; g = dy [* mask]. */
template <typename T>
__global__ void __launch_bounds__(BN_CU_THREADS)
    bn_k_bwd_reduce(const T *x, const T *dy, const uint8_t *mask, bn_kgeom g, bn_kplan p,
                    const typename bn_io<T>::A *mh, const typename bn_io<T>::A *ml, double *part) {
    typedef bn_io<T> io;
    typedef typename io::A A;
    __shared__ double sh[2][BN_CU_THREADS];
    const int tx = threadIdx.x, ty = threadIdx.y, t = ty * p.tx + tx;
    const long long total = p.tiles * p.nchunk;
    for (long long bid = blockIdx.x; bid < total; bid += gridDim.x) {
        const long long tile = bid / p.nchunk, k = bid - tile * p.nchunk;
        const long long c = g.planes ? tile : tile * p.tx + tx;
        double sg = 0, sgx = 0;
        if (g.planes) {
            const long long j0 = k * p.chunk, j1 = min(g.m, j0 + p.chunk);
            long long j = j0 + t;
            if (j < j1) {
                const long long ps = g.C * g.inner, q = BN_CU_THREADS / g.inner, r = BN_CU_THREADS % g.inner;
                long long o = j / g.inner, i = j - o * g.inner;
                long long off = o * ps + i;
                const T *xc = x + c * g.inner, *gc = dy + c * g.inner;
                const A h = mh[c], l = ml[c];
                for (; j < j1; j += BN_CU_THREADS) {
                    A gv = io::ld(gc + off);
                    if (mask && !bn_k_bit(mask, o * g.C + c, g.U, i)) gv = 0;
                    const A xv = io::ld(xc + off) - h - l;
                    sg += (double)gv;
                    sgx += (double)gv * (double)xv;
                    i += r;
                    o += q;
                    off += q * ps + r;
                    if (i >= g.inner) {
                        i -= g.inner;
                        o++;
                        off += ps - g.inner;
                    }
                }
            }
        } else if (c < g.C) {
            const long long r0 = k * p.chunk, r1 = min(g.outer, r0 + p.chunk);
            const A h = mh[c], l = ml[c];
            for (long long r = r0 + ty; r < r1; r += p.ty) {
                A gv = io::ld(dy + r * g.C + c);
                if (mask && !bn_k_bit(mask, r, g.U, c)) gv = 0;
                const A xv = io::ld(x + r * g.C + c) - h - l;
                sg += (double)gv;
                sgx += (double)gv * (double)xv;
            }
        }
        sh[0][t] = sg;
        sh[1][t] = sgx;
        __syncthreads();
        bn_k_tree_sums(sh, t, ty, p.tx, p.ty);
        if (ty == 0 && c < g.C) {
            part[(k * g.C + c) * 2] = sh[0][t];
            part[(k * g.C + c) * 2 + 1] = sh[1][t];
        }
        __syncthreads();
    }
}

/* Channel c's chunk sums added in a fixed order into sg[c], sgx[c]. One block per channel. */
__global__ void __launch_bounds__(BN_CU_THREADS) bn_k_merge_sums(const double *part, long long nchunk, long long C,
                                                                double *sg, double *sgx) {
    __shared__ double sh[2][BN_CU_THREADS];
    const int t = threadIdx.x;
    for (long long c = blockIdx.x; c < C; c += gridDim.x) {
        double a = 0, b = 0;
        for (long long k = t; k < nchunk; k += BN_CU_THREADS) {
            a += part[(k * C + c) * 2];
            b += part[(k * C + c) * 2 + 1];
        }
        sh[0][t] = a;
        sh[1][t] = b;
        __syncthreads();
        bn_k_tree_sums(sh, t, t, 1, BN_CU_THREADS);
        if (t == 0) {
            sg[c] = sh[0][0];
            sgx[c] = sh[1][0];
        }
        __syncthreads();
    }
}

template <typename P, typename A> struct bn_bwd_fin {
    const P *weight, *mean, *invstd, *var;
    P *dweight, *dbias;
    const double *psg, *psgx; /* sums for the parameter gradients (local, or global on request) */
    const double *gsg, *gsgx; /* global sums for dx */
    double n, eps;
    int use_global_stats, accumulate, param_grads;
    long long C;
    A *mh, *ml, *k1, *k2, *k3;
};

/* Per channel: parameter gradients and the coefficients of dx = g * k1 - k2 - (x - mean) * k3,
 * the CPU driver's formulas in the same order. */
template <typename P, typename A> __global__ void bn_k_bwd_finalize(bn_bwd_fin<P, A> f) {
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < f.C; c += (long long)gridDim.x * blockDim.x) {
        const double mean = (double)f.mean[c];
        const double invstd = f.invstd ? (double)f.invstd[c] : bn_invstd((double)f.var[c], f.eps);
        if (f.param_grads) {
            if (f.dweight) f.dweight[c] = (P)((f.accumulate ? (double)f.dweight[c] : 0) + f.psgx[c] * invstd);
            if (f.dbias) f.dbias[c] = (P)((f.accumulate ? (double)f.dbias[c] : 0) + f.psg[c]);
        }
        const double w = f.weight ? (double)f.weight[c] : 1.0;
        const double k1 = w * invstd;
        double k2 = 0, k3 = 0;
        if (!f.use_global_stats && f.n > 0) {
            k2 = k1 * f.gsg[c] / f.n;
            k3 = k1 * invstd * invstd * f.gsgx[c] / f.n;
        }
        const A h = (A)mean;
        f.mh[c] = h;
        f.ml[c] = (A)(mean - (double)h);
        f.k1[c] = (A)k1;
        f.k2[c] = (A)k2;
        f.k3[c] = (A)k3;
    }
}

/* g = dy [* mask]; dadd = g (with a mask); dx = g * k1 - k2 - (x - mh - ml) * k3, or g * k1 without
 * x (global statistics). dx and dadd may be dy: each value is read before it is written. */
template <typename T>
__global__ void __launch_bounds__(BN_CU_THREADS)
    bn_k_bwd_apply(const T *x, const T *dy, const uint8_t *mask, T *dx, T *dadd, bn_kgeom g,
                   const typename bn_io<T>::A *mh, const typename bn_io<T>::A *ml, const typename bn_io<T>::A *k1,
                   const typename bn_io<T>::A *k2, const typename bn_io<T>::A *k3, int vec) {
    typedef bn_io<T> io;
    typedef typename io::A A;
    const long long units = g.S * g.U;
    for (long long u = blockIdx.x * (long long)blockDim.x + threadIdx.x; u < units; u += (long long)gridDim.x * blockDim.x) {
        const long long seg = u / g.U, kb = u - seg * g.U, p0 = kb * 8, base = seg * g.L + p0;
        const int len = (int)min(8LL, g.L - p0);
        const unsigned bits = mask ? mask[u] : 0xffu;
        T gvv[8], xv[8], dxv[8], dav[8];
        bn_k_load8(dy + base, vec, len, gvv);
        if (x) bn_k_load8(x + base, vec, len, xv);
        A h = 0, l = 0, a1 = 0, a2 = 0, a3 = 0;
        if (g.planes) {
            const long long c = seg % g.C;
            h = mh[c], l = ml[c], a1 = k1[c], a2 = k2[c], a3 = k3[c];
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            if (j < len) {
                if (!g.planes) {
                    const long long c = p0 + j;
                    h = mh[c], l = ml[c], a1 = k1[c], a2 = k2[c], a3 = k3[c];
                }
                const A gv = ((bits >> j) & 1) ? io::ld(gvv + j) : (A)0;
                io::st(dav + j, gv);
                const A v = x ? gv * a1 - a2 - (io::ld(xv + j) - h - l) * a3 : gv * a1;
                io::st(dxv + j, v);
            }
        }
        /* dx and dadd may be dy: all of the unit was read above */
        if (mask && dadd) bn_k_store8(dadd + base, vec, len, dav);
        if (dx) bn_k_store8(dx + base, vec, len, dxv);
    }
}

#endif
