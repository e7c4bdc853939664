/*
 * backend.cu - bnorm_cuda_forward / bnorm_cuda_backward (bnorm_cuda.h): validation by the core's
 * rules (check.c), device-pointer checks, the work split (a function of the shape only), the kernel
 * launches of kernels.cuh on the caller's stream, and, with a communicator, the exchange through the
 * core (comm.c) and the core's Chan merge in rank order on the host.
 *
 * Forward (training): stats -> merge -> [exchange] -> finalize -> apply: x is read twice (a
 * two-phase design, 3 passes of DRAM traffic; docs/cuda.md says what a single-pass kernel would gain).
 * Backward: reduce -> merge -> [exchange] -> finalize -> apply.
 */
#include "kernels.cuh"

/* kernel<<<grid, block, 0, stream>>>(args), written so that the CPU emulation of the kernels
 * (tests/cuda_emu/, BNORM_CUDA_EMULATE) can run the same source as plain C++. */
#define BN_UNPAREN(...) __VA_ARGS__
#ifndef BN_LAUNCH
#define BN_LAUNCH(kernel, grid, block, stream, ...) BN_UNPAREN kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

#include <stdlib.h>

extern "C" {
#include "bnorm/bnorm_cuda.h"
}

/* ---------------------------------------------------------------------------------------------- */
/* Plans, geometry, workspace                                                                      */
/* ---------------------------------------------------------------------------------------------- */

/* Blocks of the reductions: enough to fill a large GPU (about 2048 blocks) when the data allow, and
 * at least about 16 values per thread, so the per-block merge stays a small part of the work. */
enum { BN_CU_TARGET_BLOCKS = 2048, BN_CU_MIN_PER_THREAD = 16 };

static long long bn_cdiv(long long a, long long b) { return (a + b - 1) / b; }

static bn_kplan bn_cuda_plan(const bn_geom *g) {
    bn_kplan p;
    if (g->planes) {
        p.tx = 1;
        p.ty = BN_CU_THREADS;
        p.tiles = g->C;
        const long long work = g->m;
        long long want = bn_cdiv(BN_CU_TARGET_BLOCKS, p.tiles);
        long long most = bn_cdiv(work, (long long)BN_CU_THREADS * BN_CU_MIN_PER_THREAD);
        p.nchunk = work == 0 ? 0 : (want < most ? want : most);
        if (work > 0 && p.nchunk < 1) p.nchunk = 1;
        p.chunk = p.nchunk ? bn_cdiv(work, p.nchunk) : 0;
    } else {
        p.tx = 1;
        while (p.tx < g->C && p.tx < 32) p.tx <<= 1;
        p.ty = BN_CU_THREADS / p.tx;
        p.tiles = bn_cdiv(g->C, p.tx);
        const long long work = g->outer;
        long long want = bn_cdiv(BN_CU_TARGET_BLOCKS, p.tiles);
        long long most = bn_cdiv(work, (long long)p.ty * BN_CU_MIN_PER_THREAD);
        p.nchunk = work == 0 ? 0 : (want < most ? want : most);
        if (work > 0 && p.nchunk < 1) p.nchunk = 1;
        p.chunk = p.nchunk ? bn_cdiv(work, p.nchunk) : 0;
    }
    return p;
}

static bn_kgeom bn_cuda_kgeom(const bn_geom *g) {
    bn_kgeom k;
    k.outer = g->outer;
    k.C = g->C;
    k.inner = g->inner;
    k.m = g->m;
    k.planes = g->planes;
    k.L = g->planes ? g->inner : g->C;
    k.U = (k.L + 7) / 8;
    k.S = g->m == 0 ? 0 : (g->planes ? g->outer * g->C : g->outer);
    return k;
}

/* Workspace in doubles: forward = partials 3 * nchunk * C, mean and M2 (2C), coefficients (4C);
 * backward = partials 2 * nchunk * C, local and global sums (4C), coefficients (5C). */
static size_t bn_cuda_ws_doubles(const bn_geom *g) {
    const bn_kplan p = bn_cuda_plan(g);
    const size_t C = (size_t)g->C, nc = (size_t)p.nchunk;
    const size_t fwd = 3 * nc * C + 6 * C, bwd = 2 * nc * C + 9 * C;
    return fwd > bwd ? fwd : bwd;
}

extern "C" size_t bnorm_cuda_workspace_size(const bnorm_desc *desc, int comm_size) {
    (void)comm_size;
    bn_geom g;
    if (bn_geom_init("bnorm_cuda_workspace_size", "desc", desc, &g) != BNORM_STATUS_OK) return 0;
    return bn_cuda_ws_doubles(&g) * sizeof(double);
}

extern "C" int bnorm_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

/* ---------------------------------------------------------------------------------------------- */
/* Errors, pointers, scratch                                                                       */
/* ---------------------------------------------------------------------------------------------- */

static bnorm_status bn_cuda_fail(const char *func, const char *what, cudaError_t e) {
    (void)cudaGetLastError(); /* clear a non-sticky error so that later calls start clean */
    return bn_fail(BNORM_STATUS_DEVICE, func, "%s failed: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

#define BN_CU(func, call)                                       \
    do {                                                        \
        cudaError_t bn_e_ = (call);                             \
        if (bn_e_ != cudaSuccess) return bn_cuda_fail(func, #call, bn_e_); \
    } while (0)

/* A launch error shows at cudaGetLastError right after the launch. */
#define BN_CU_LAUNCHED(func, name)                                               \
    do {                                                                         \
        cudaError_t bn_e_ = cudaGetLastError();                                  \
        if (bn_e_ != cudaSuccess) return bn_cuda_fail(func, "launch of " name, bn_e_); \
    } while (0)

/* p (may be NULL) must be device-accessible memory of device dev, aligned to `align` bytes. */
static bnorm_status bn_cuda_check_ptr(const char *func, const char *what, const void *p, size_t align, int dev) {
    if (!p) return BNORM_STATUS_OK;
    if ((uintptr_t)p % align)
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "%s = %p: must be aligned to %zu bytes", what, p, align);
    cudaPointerAttributes at;
    cudaError_t e = cudaPointerGetAttributes(&at, p);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func, "%s = %p: not a device pointer (%s)", what, p,
                       cudaGetErrorString(e));
    }
    switch (at.type) {
    case cudaMemoryTypeDevice:
        if (at.device != dev)
            return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func,
                           "%s = %p: memory of device %d, but the current device is %d", what, p, at.device, dev);
        return BNORM_STATUS_OK;
    case cudaMemoryTypeManaged: return BNORM_STATUS_OK;
    case cudaMemoryTypeHost:
        if (at.devicePointer == p) return BNORM_STATUS_OK; /* mapped pinned memory (unified addressing) */
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func,
                       "%s = %p: pinned host memory that the device sees at another address (%p); pass that one",
                       what, p, at.devicePointer);
    default:
        return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func,
                       "%s = %p: not device memory (a host pointer? the CUDA backend takes device pointers)", what, p);
    }
}

/* Device workspace (the caller's, or stream-ordered allocation) and host exchange buffers; released
 * when the call returns (a stream-ordered free runs after the queued work). */
struct bn_cuda_scratch {
    cudaStream_t s;
    double *ws;
    int owned;
    double *host;
    bn_cuda_scratch(cudaStream_t st) : s(st), ws(NULL), owned(0), host(NULL) {}
    ~bn_cuda_scratch() {
        if (owned && ws) (void)cudaFreeAsync(ws, s);
        free(host);
    }
};

static bnorm_status bn_cuda_open(const char *func, bn_cuda_scratch *sc, void *ws, size_t ws_size, size_t need_doubles,
                                 int dev) {
    const size_t bytes = need_doubles * sizeof(double);
    if (ws) {
        if (ws_size < bytes)
            return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, func,
                           "workspace_size = %zu: must be >= %zu (bnorm_cuda_workspace_size)", ws_size, bytes);
        bnorm_status st = bn_cuda_check_ptr(func, "args->workspace", ws, sizeof(double), dev);
        if (st) return st;
        sc->ws = (double *)ws;
        return BNORM_STATUS_OK;
    }
    void *p = NULL;
    cudaError_t e = cudaMallocAsync(&p, bytes, sc->s);
    if (e != cudaSuccess) return bn_cuda_fail(func, "cudaMallocAsync (workspace)", e);
    sc->ws = (double *)p;
    sc->owned = 1;
    return BNORM_STATUS_OK;
}

/* The apply kernels move whole 8-value units as 16-byte vectors when every segment holds a multiple
 * of 8 values and every tensor they touch is 16-byte aligned (NULL ones do not count). */
static int bn_cuda_vec(const bn_kgeom *g, const void *a, const void *b, const void *c, const void *d) {
    const uintptr_t any = (uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d;
    return g->L % 8 == 0 && any % 16 == 0;
}

static unsigned bn_cuda_grid(long long blocks) {
    if (blocks < 1) return 1;
    return (unsigned)(blocks < (1LL << 20) ? blocks : (1LL << 20));
}

static bnorm_status bn_cuda_device(const char *func, int *dev) {
    cudaError_t e = cudaGetDevice(dev);
    if (e != cudaSuccess) return bn_cuda_fail(func, "cudaGetDevice", e);
    return BNORM_STATUS_OK;
}

/* ---------------------------------------------------------------------------------------------- */
/* Forward                                                                                         */
/* ---------------------------------------------------------------------------------------------- */

template <typename T>
static bnorm_status bn_cuda_fwd(const char *F, const bnorm_forward_args *a, const bn_geom *g, cudaStream_t s,
                                bn_cuda_scratch *sc) {
    typedef typename bn_io<T>::A A;
    typedef typename bn_io<T>::P P;
    const bnorm_comm *comm = a->training ? a->comm : NULL;
    const bn_kgeom kg = bn_cuda_kgeom(g);
    const bn_kplan p = bn_cuda_plan(g);
    const long long C = g->C;
    double *part = sc->ws, *gmean = part + 3 * p.nchunk * C, *gm2 = gmean + C, *cf = gm2 + C;
    A *mh = (A *)cf, *ml = (A *)(cf + C), *scale = (A *)(cf + 2 * C), *shift = (A *)(cf + 3 * C);
    double n_total = (double)g->m;

    if (a->training) {
        if (g->m > 0) {
            dim3 blk(p.tx, p.ty);
            BN_LAUNCH((bn_k_stats<T>), bn_cuda_grid(p.tiles * p.nchunk), blk, s, (const T *)a->x, kg, p, part);
            BN_CU_LAUNCHED(F, "bn_k_stats");
            BN_LAUNCH((bn_k_merge_moments), bn_cuda_grid(C), BN_CU_THREADS, s, part, p.nchunk, C, gmean, gm2);
            BN_CU_LAUNCHED(F, "bn_k_merge_moments");
        }
        if (comm) {
            /* payload (internal.h): header, local count, means, M2s, a third block left zero */
            const size_t cnt = BN_COMM_COUNT(C);
            sc->host = (double *)calloc(cnt * (size_t)(comm->size + 1), sizeof(double));
            if (!sc->host) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate the exchange buffers");
            double *send = sc->host, *recv = send + cnt;
            bn_comm_header(send, BN_COMM_FORWARD, &a->desc, (a->relu ? 1 : 0) | (a->running_mean ? 4 : 0));
            send[BN_COMM_HDR] = (double)g->m;
            if (g->m > 0) {
                BN_CU(F, cudaMemcpyAsync(send + BN_COMM_HDR + 1, gmean, 2 * (size_t)C * sizeof(double),
                                         cudaMemcpyDeviceToHost, s));
                BN_CU(F, cudaStreamSynchronize(s));
            }
            bnorm_status st = bn_comm_exchange(F, comm, send, cnt, recv);
            if (st) return st;
            n_total = 0;
            for (int r = 0; r < comm->size; r++) n_total += recv[(size_t)r * cnt + BN_COMM_HDR];
            /* merged statistics in rank order, written over the send area (no longer needed) */
            double *hm = send + BN_COMM_HDR + 1, *hm2 = hm + C;
            for (long long c = 0; c < C; c++) {
                bn_moments mo = {0, 0, 0};
                for (int r = 0; r < comm->size; r++) {
                    const double *q = recv + (size_t)r * cnt;
                    bn_moments_merge(&mo, q[BN_COMM_HDR], q[BN_COMM_HDR + 1 + c], q[BN_COMM_HDR + 1 + C + c]);
                }
                hm[c] = mo.mean;
                hm2[c] = mo.m2;
            }
            if (n_total == 0) return BNORM_STATUS_OK;
            if (n_total == 1)
                return bn_fail(BNORM_STATUS_BATCH_TOO_SMALL, F,
                               "expected more than 1 value per channel when training, got 1 value per channel "
                               "over all %d ranks of the group", comm->size);
            BN_CU(F, cudaMemcpyAsync(gmean, hm, 2 * (size_t)C * sizeof(double), cudaMemcpyHostToDevice, s));
        }
    }
    bn_fwd_fin<P, A> f;
    f.weight = (const P *)a->weight;
    f.bias = (const P *)a->bias;
    f.running_mean = (P *)a->running_mean;
    f.running_var = (P *)a->running_var;
    f.save_mean = (P *)a->save_mean;
    f.save_invstd = (P *)a->save_invstd;
    f.mean = gmean;
    f.m2 = gm2;
    f.n = n_total;
    f.eps = a->eps;
    f.momentum = a->momentum;
    f.training = a->training != 0;
    f.C = C;
    f.mh = mh;
    f.ml = ml;
    f.scale = scale;
    f.shift = shift;
    BN_LAUNCH((bn_k_fwd_finalize<P, A>), bn_cuda_grid(bn_cdiv(C, BN_CU_THREADS)), BN_CU_THREADS, s, f);
    BN_CU_LAUNCHED(F, "bn_k_fwd_finalize");
    if (kg.S > 0) {
        const int vec = bn_cuda_vec(&kg, a->x, a->y, a->addend, NULL);
        BN_LAUNCH((bn_k_fwd_apply<T>), bn_cuda_grid(bn_cdiv(kg.S * kg.U, BN_CU_THREADS)), BN_CU_THREADS, s,
            (const T *)a->x, (T *)a->y, (const T *)a->addend, (uint8_t *)a->relu_mask, kg, mh, ml, scale, shift,
            a->relu, vec);
        BN_CU_LAUNCHED(F, "bn_k_fwd_apply");
    }
    return BNORM_STATUS_OK;
}

extern "C" bnorm_status bnorm_cuda_forward(const bnorm_forward_args *args, void *stream) {
    static const char *F = "bnorm_cuda_forward";
    bn_clear_error();
    if (!args) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args is NULL");
    bnorm_forward_args conv; /* the caller's struct under the ABI policy (struct_size) */
    bnorm_status st = bn_struct_in(F, "args", args, &conv, sizeof conv, BN_FWD_V1);
    if (st) return st;
    const bnorm_forward_args *a = &conv;
    bn_geom g;
    st = bn_forward_check(F, a, &g);
    if (st) return st;
    if (a->save_mean_lo)
        return bn_fail(BNORM_STATUS_UNSUPPORTED, F, "save_mean_lo: the CUDA backend does not write it yet (pass NULL)");
    const bnorm_comm *comm = a->training ? a->comm : NULL;
    if (!a->training && g.numel == 0) return BNORM_STATUS_OK;
    if (a->training && !comm) {
        if (g.m == 0) return BNORM_STATUS_OK; /* empty batch: nothing to compute or update */
        if (g.m == 1)
            return bn_fail(BNORM_STATUS_BATCH_TOO_SMALL, F,
                           "expected more than 1 value per channel when training, got input of %lld "
                           "value(s) per channel (N * spatial)",
                           (long long)g.m);
    }
    int dev;
    st = bn_cuda_device(F, &dev);
    if (st) return st;
    const size_t es = g.esize, ps = bnorm_dtype_size(bnorm_param_dtype(a->desc.dtype));
    const int data = g.numel > 0;
    struct {
        const char *what;
        const void *p;
        size_t align;
    } ptrs[] = {{"args->x", data ? a->x : NULL, es},
                {"args->y", data ? a->y : NULL, es},
                {"args->addend", data ? a->addend : NULL, es},
                {"args->relu_mask", data ? a->relu_mask : NULL, 1},
                {"args->weight", a->weight, ps},
                {"args->bias", a->bias, ps},
                {"args->running_mean", a->running_mean, ps},
                {"args->running_var", a->running_var, ps},
                {"args->save_mean", a->save_mean, ps},
                {"args->save_invstd", a->save_invstd, ps}};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) {
        st = bn_cuda_check_ptr(F, ptrs[i].what, ptrs[i].p, ptrs[i].align, dev);
        if (st) return st;
    }
    cudaStream_t s = (cudaStream_t)stream;
    bn_cuda_scratch sc(s);
    st = bn_cuda_open(F, &sc, a->workspace, a->workspace_size, bn_cuda_ws_doubles(&g), dev);
    if (st) return st;
    switch (a->desc.dtype) {
    case BNORM_DTYPE_F32: return bn_cuda_fwd<float>(F, a, &g, s, &sc);
    case BNORM_DTYPE_F64: return bn_cuda_fwd<double>(F, a, &g, s, &sc);
    case BNORM_DTYPE_F16: return bn_cuda_fwd<__half>(F, a, &g, s, &sc);
    case BNORM_DTYPE_BF16: return bn_cuda_fwd<__nv_bfloat16>(F, a, &g, s, &sc);
    }
    return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "unreachable dtype");
}

/* ---------------------------------------------------------------------------------------------- */
/* Backward                                                                                        */
/* ---------------------------------------------------------------------------------------------- */

template <typename T>
static bnorm_status bn_cuda_bwd(const char *F, const bnorm_backward_args *a, const bn_geom *g, cudaStream_t s,
                                bn_cuda_scratch *sc) {
    typedef typename bn_io<T>::A A;
    typedef typename bn_io<T>::P P;
    const bnorm_comm *comm = a->use_global_stats ? NULL : a->comm;
    const int need_sums = !a->use_global_stats || a->dweight || a->dbias || comm;
    const bn_kgeom kg = bn_cuda_kgeom(g);
    const bn_kplan p = bn_cuda_plan(g);
    const long long C = g->C;
    double *part = sc->ws, *sg = part + 2 * p.nchunk * C, *sgx = sg + C, *gsg = sgx + C, *gsgx = gsg + C;
    double *cf = gsgx + C;
    A *mh = (A *)cf, *ml = (A *)(cf + C), *k1 = (A *)(cf + 2 * C), *k2 = (A *)(cf + 3 * C), *k3 = (A *)(cf + 4 * C);
    bn_bwd_fin<P, A> f;
    f.weight = (const P *)a->weight;
    f.mean = (const P *)a->mean;
    f.invstd = (const P *)a->invstd;
    f.var = (const P *)a->var;
    f.dweight = (P *)a->dweight;
    f.dbias = (P *)a->dbias;
    f.psg = sg;
    f.psgx = sgx;
    f.gsg = sg;
    f.gsgx = sgx;
    f.n = (double)g->m;
    f.eps = a->eps;
    f.use_global_stats = a->use_global_stats != 0;
    f.accumulate = a->accumulate != 0;
    f.param_grads = need_sums;
    f.C = C;
    f.mh = mh;
    f.ml = ml;
    f.k1 = k1;
    f.k2 = k2;
    f.k3 = k3;
    const unsigned cgrid = bn_cuda_grid(bn_cdiv(C, BN_CU_THREADS));

    if (need_sums) {
        if (g->m > 0) {
            /* the reduce needs mean as hi + lo: a first finalize writes the coefficients (sums not read) */
            f.param_grads = 0;
            f.use_global_stats = 1;
            BN_LAUNCH((bn_k_bwd_finalize<P, A>), cgrid, BN_CU_THREADS, s, f);
            BN_CU_LAUNCHED(F, "bn_k_bwd_finalize (mean)");
            f.param_grads = need_sums;
            f.use_global_stats = a->use_global_stats != 0;
            dim3 blk(p.tx, p.ty);
            BN_LAUNCH((bn_k_bwd_reduce<T>), bn_cuda_grid(p.tiles * p.nchunk), blk, s,
                (const T *)a->x, (const T *)a->dy, (const uint8_t *)a->relu_mask, kg, p, mh, ml, part);
            BN_CU_LAUNCHED(F, "bn_k_bwd_reduce");
            BN_LAUNCH((bn_k_merge_sums), bn_cuda_grid(C), BN_CU_THREADS, s, part, p.nchunk, C, sg, sgx);
            BN_CU_LAUNCHED(F, "bn_k_merge_sums");
        } else {
            BN_CU(F, cudaMemsetAsync(sg, 0, 2 * (size_t)C * sizeof(double), s));
        }
    }
    if (comm) {
        const size_t cnt = BN_COMM_COUNT(C);
        sc->host = (double *)calloc(cnt * (size_t)(comm->size + 1), sizeof(double));
        if (!sc->host) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate the exchange buffers");
        double *send = sc->host, *recv = send + cnt;
        /* no pointer-presence flags: a rank with an empty batch may pass NULL buffers */
        bn_comm_header(send, BN_COMM_BACKWARD, &a->desc, 0);
        send[BN_COMM_HDR] = (double)g->m;
        BN_CU(F, cudaMemcpyAsync(send + BN_COMM_HDR + 1, sg, 2 * (size_t)C * sizeof(double), cudaMemcpyDeviceToHost, s));
        BN_CU(F, cudaStreamSynchronize(s));
        bnorm_status st = bn_comm_exchange(F, comm, send, cnt, recv);
        if (st) return st;
        double n_total = 0;
        for (int r = 0; r < comm->size; r++) n_total += recv[(size_t)r * cnt + BN_COMM_HDR];
        double *hs = send + BN_COMM_HDR + 1, *hsx = hs + C;
        for (long long c = 0; c < C; c++) {
            double u = 0, v = 0;
            for (int r = 0; r < comm->size; r++) {
                u += recv[(size_t)r * cnt + BN_COMM_HDR + 1 + c];
                v += recv[(size_t)r * cnt + BN_COMM_HDR + 1 + C + c];
            }
            hs[c] = u;
            hsx[c] = v;
        }
        BN_CU(F, cudaMemcpyAsync(gsg, hs, 2 * (size_t)C * sizeof(double), cudaMemcpyHostToDevice, s));
        f.gsg = gsg;
        f.gsgx = gsgx;
        f.n = n_total;
        if (a->reduce_param_grads) {
            f.psg = gsg;
            f.psgx = gsgx;
        }
    }
    BN_LAUNCH((bn_k_bwd_finalize<P, A>), cgrid, BN_CU_THREADS, s, f);
    BN_CU_LAUNCHED(F, "bn_k_bwd_finalize");
    if (kg.S > 0 && (a->dx || a->daddend)) {
        const T *ax = a->use_global_stats ? NULL : (const T *)a->x;
        const int vec = bn_cuda_vec(&kg, ax, a->dy, a->dx, a->relu_mask ? a->daddend : NULL);
        BN_LAUNCH((bn_k_bwd_apply<T>), bn_cuda_grid(bn_cdiv(kg.S * kg.U, BN_CU_THREADS)), BN_CU_THREADS, s, ax,
            (const T *)a->dy, (const uint8_t *)a->relu_mask, (T *)a->dx, (T *)a->daddend, kg, mh, ml, k1, k2, k3, vec);
        BN_CU_LAUNCHED(F, "bn_k_bwd_apply");
    }
    return BNORM_STATUS_OK;
}

extern "C" bnorm_status bnorm_cuda_backward(const bnorm_backward_args *args, void *stream) {
    static const char *F = "bnorm_cuda_backward";
    bn_clear_error();
    if (!args) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "args is NULL");
    bnorm_backward_args conv; /* the caller's struct under the ABI policy (struct_size) */
    bnorm_status st = bn_struct_in(F, "args", args, &conv, sizeof conv, BN_BWD_V1);
    if (st) return st;
    const bnorm_backward_args *a = &conv;
    bn_geom g;
    st = bn_backward_check(F, a, &g);
    if (st) return st;
    if (a->mean_lo)
        return bn_fail(BNORM_STATUS_UNSUPPORTED, F, "mean_lo: the CUDA backend does not read it yet (pass NULL)");
    int dev;
    st = bn_cuda_device(F, &dev);
    if (st) return st;
    const size_t es = g.esize, ps = bnorm_dtype_size(bnorm_param_dtype(a->desc.dtype));
    const int data = g.numel > 0;
    struct {
        const char *what;
        const void *p;
        size_t align;
    } ptrs[] = {{"args->x", data ? a->x : NULL, es},
                {"args->dy", data ? a->dy : NULL, es},
                {"args->dx", data ? a->dx : NULL, es},
                {"args->daddend", data ? a->daddend : NULL, es},
                {"args->relu_mask", data ? a->relu_mask : NULL, 1},
                {"args->weight", a->weight, ps},
                {"args->mean", a->mean, ps},
                {"args->invstd", a->invstd, ps},
                {"args->var", a->var, ps},
                {"args->dweight", a->dweight, ps},
                {"args->dbias", a->dbias, ps}};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) {
        st = bn_cuda_check_ptr(F, ptrs[i].what, ptrs[i].p, ptrs[i].align, dev);
        if (st) return st;
    }
    cudaStream_t s = (cudaStream_t)stream;
    bn_cuda_scratch sc(s);
    st = bn_cuda_open(F, &sc, a->workspace, a->workspace_size, bn_cuda_ws_doubles(&g), dev);
    if (st) return st;
    switch (a->desc.dtype) {
    case BNORM_DTYPE_F32: return bn_cuda_bwd<float>(F, a, &g, s, &sc);
    case BNORM_DTYPE_F64: return bn_cuda_bwd<double>(F, a, &g, s, &sc);
    case BNORM_DTYPE_F16: return bn_cuda_bwd<__half>(F, a, &g, s, &sc);
    case BNORM_DTYPE_BF16: return bn_cuda_bwd<__nv_bfloat16>(F, a, &g, s, &sc);
    }
    return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "unreachable dtype");
}
