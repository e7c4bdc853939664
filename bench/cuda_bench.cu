/*
 * cuda_bench.cu - bnorm_cuda_bench: the CUDA backend against cuDNN (when built with it) and the
 * device-to-device copy bandwidth, on ResNet-50's BN shapes (N = 32/64/256) and BatchNorm1d shapes.
 * NOT YET RUN ON A GPU (scripts/gpu_check.sh runs it; docs/cuda.md).
 *
 *   bnorm_cuda_bench [--quick] [--reps R] [--out PREFIX]     writes PREFIX.md (table) and PREFIX.csv
 *
 * Ops and their minimum traffic (b = bytes per element, n = elements): forward training and inference
 * 2bn (read x, write y); fused forward 3bn + n/8 (x, addend, y, the 1-bit mask); backward 3bn (x, dy,
 * dx); fused backward 4bn + n/8 (x, dy, mask, dx, daddend). GB/s = that traffic over the median time
 * of R timed runs (CUDA events, after warm-up); "copy" = the same over the measured cudaMemcpy D2D
 * bandwidth (bytes read + written) of a 1 GiB buffer. cuDNN runs its legacy BN API: training with
 * CUDNN_BATCHNORM_SPATIAL_PERSISTENT and, for NHWC float16 with C % 4 == 0, the fused
 * CUDNN_BATCHNORM_OPS_BN_ADD_ACTIVATION (which needs y in its backward and keeps its mask in a reserve
 * space); other cases have no fused cuDNN op ("-").
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>
#include <algorithm>

#include "bnorm/bnorm_cuda.h"

#ifdef BNORM_BENCH_HAVE_CUDNN
#include <cudnn.h>
#endif

#define CK(call)                                                                              \
    do {                                                                                      \
        cudaError_t e_ = (call);                                                              \
        if (e_ != cudaSuccess) {                                                              \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

/* Deterministic pseudo-random fill in [lo, hi) of n values (never zeros: see METHOD.md). */
template <typename T> __global__ void fill(T *p, long long n, float lo, float hi, unsigned seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)(i * 2654435761u) ^ seed;
        h ^= h >> 15;
        h *= 0x2c1b3c6du;
        h ^= h >> 12;
        p[i] = (T)(lo + (hi - lo) * (float)(h & 0xffffff) / 16777216.0f);
    }
}

struct shape {
    const char *set;
    long long n, c, h, w;
};

static int g_reps = 20;

/* Median time in ms of fn() over g_reps timed runs after 3 warm-ups. */
template <typename F> static double time_ms(F fn) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < 3; i++)
        if (!fn()) return -1;
    std::vector<float> t;
    for (int i = 0; i < g_reps; i++) {
        CK(cudaEventRecord(a));
        if (!fn()) return -1;
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms);
    }
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

static double copy_gbs(void) {
    const size_t bytes = 1ull << 30;
    void *a, *b;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    CK(cudaMemset(a, 1, bytes));
    double ms = time_ms([&] { return cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice) == cudaSuccess; });
    CK(cudaFree(a));
    CK(cudaFree(b));
    return 2.0 * (double)bytes / (ms * 1e-3) / 1e9;
}

enum { OP_FWD, OP_FWD_FUSED, OP_INFER, OP_BWD, OP_BWD_FUSED, NOPS };
static const char *op_name[NOPS] = {"fwd_train", "fwd_train_add_relu", "fwd_infer", "bwd", "bwd_add_relu"};

static double op_bytes(int op, double n, double b) {
    switch (op) {
    case OP_FWD: case OP_INFER: return 2 * b * n;
    case OP_FWD_FUSED: return 3 * b * n + n / 8;
    case OP_BWD: return 3 * b * n;
    default: return 4 * b * n + n / 8;
    }
}

int main(int argc, char **argv) {
    const char *out = "cuda_bench";
    int quick = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) g_reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--quick] [--reps R] [--out PREFIX]\n", argv[0]);
            return 2;
        }
    }
    if (bnorm_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    cudaDeviceProp pr;
    CK(cudaGetDeviceProperties(&pr, 0));
    const double copy = copy_gbs();
    printf("device: %s, %d SMs; D2D copy %.0f GB/s (read + write)\n", pr.name, pr.multiProcessorCount, copy);

    /* ResNet-50 (torchvision v1.5) BN shapes (C, H) and BatchNorm1d (N, C) */
    const long long rn[][2] = {{64, 112}, {64, 56}, {256, 56}, {128, 56}, {128, 28}, {512, 28},
                               {256, 28}, {256, 14}, {1024, 14}, {512, 14}, {512, 7},  {2048, 7}};
    const long long bn1d[][2] = {{100000, 32}, {262144, 64}, {65536, 256}, {4096, 4096}};
    const long long batches[] = {32, 64, 256};
    std::vector<shape> shapes;
    for (long long n : batches) {
        if (quick && n != 32) continue;
        for (auto &s : rn) shapes.push_back({"resnet50", n, s[0], s[1], s[1]});
    }
    for (auto &s : bn1d) shapes.push_back({"bn1d", s[0], s[1], 1, 1});

    FILE *csv = NULL, *md = NULL;
    char path[1024];
    snprintf(path, sizeof path, "%s.csv", out);
    csv = fopen(path, "w");
    snprintf(path, sizeof path, "%s.md", out);
    md = fopen(path, "w");
    if (!csv || !md) {
        fprintf(stderr, "cannot write %s.{csv,md}\n", out);
        return 1;
    }
    fprintf(csv, "set,dtype,layout,N,C,H,W,op,impl,ms,GBps,frac_copy\n");
    fprintf(md, "Device: %s (%d SMs). D2D copy: %.0f GB/s (read + write). Median of %d runs.\n\n", pr.name,
            pr.multiProcessorCount, copy, g_reps);
    fprintf(md, "| shape | dtype layout | op | bnorm ms | bnorm GB/s | of copy | cuDNN ms | cuDNN GB/s | bnorm/cuDNN |\n");
    fprintf(md, "|---|---|---|---|---|---|---|---|---|\n");

#ifdef BNORM_BENCH_HAVE_CUDNN
    cudnnHandle_t hd;
    if (cudnnCreate(&hd) != CUDNN_STATUS_SUCCESS) {
        fprintf(stderr, "cudnnCreate failed\n");
        return 1;
    }
#endif
    struct cfg {
        bnorm_dtype dt;
        bnorm_layout lay;
        const char *name;
    } cfgs[] = {{BNORM_DTYPE_F16, BNORM_LAYOUT_CHANNELS_LAST, "f16 NHWC"}, {BNORM_DTYPE_F32, BNORM_LAYOUT_CHANNELS_FIRST, "f32 NCHW"}};
    for (const shape &s : shapes)
        for (const cfg &cf : cfgs) {
            const long long n = s.n * s.c * s.h * s.w;
            const size_t es = bnorm_dtype_size(cf.dt), tb = (size_t)n * es;
            bnorm_desc d = {cf.dt, cf.lay, 4, {s.n, s.c, s.h, s.w}};
            void *x, *y, *z, *dy, *dx, *dz, *mask, *ws;
            float *w, *b, *rm, *rv, *sm, *si, *dw, *db;
            const size_t mb = bnorm_relu_mask_size(&d), wsb = bnorm_cuda_workspace_size(&d, 1);
            CK(cudaMalloc(&x, tb)); CK(cudaMalloc(&y, tb)); CK(cudaMalloc(&z, tb)); CK(cudaMalloc(&dy, tb));
            CK(cudaMalloc(&dx, tb)); CK(cudaMalloc(&dz, tb)); CK(cudaMalloc(&mask, mb)); CK(cudaMalloc(&ws, wsb));
            float **pp[] = {&w, &b, &rm, &rv, &sm, &si, &dw, &db};
            for (float **p : pp) CK(cudaMalloc((void **)p, (size_t)s.c * 4));
            if (cf.dt == BNORM_DTYPE_F16) {
                fill<<<1024, 256>>>((__half *)x, n, -1.f, 3.f, 1u);
                fill<<<1024, 256>>>((__half *)z, n, -1.f, 1.f, 2u);
                fill<<<1024, 256>>>((__half *)dy, n, -1.f, 1.f, 3u);
            } else {
                fill<<<1024, 256>>>((float *)x, n, -1.f, 3.f, 1u);
                fill<<<1024, 256>>>((float *)z, n, -1.f, 1.f, 2u);
                fill<<<1024, 256>>>((float *)dy, n, -1.f, 1.f, 3u);
            }
            fill<<<1, 256>>>(w, s.c, 0.5f, 1.5f, 4u);
            fill<<<1, 256>>>(b, s.c, -0.5f, 0.5f, 5u);
            fill<<<1, 256>>>(rm, s.c, -0.1f, 0.1f, 6u);
            fill<<<1, 256>>>(rv, s.c, 0.5f, 1.5f, 7u);
            CK(cudaDeviceSynchronize());
            double ours[NOPS], theirs[NOPS];
            for (int op = 0; op < NOPS; op++) {
                ours[op] = theirs[op] = -1;
                const int fused = op == OP_FWD_FUSED || op == OP_BWD_FUSED;
                /* field by field (C++17 has no designated initialisers; positional ones break when
                   the struct grows, see the ABI policy in bnorm.h) */
                bnorm_forward_args fa;
                memset(&fa, 0, sizeof fa);
                fa.struct_size = sizeof fa;
                fa.desc = d, fa.x = x, fa.y = y, fa.weight = w, fa.bias = b, fa.eps = 1e-5;
                fa.training = op != OP_INFER, fa.running_mean = rm, fa.running_var = rv, fa.momentum = 0.1;
                fa.save_mean = op == OP_INFER ? NULL : sm, fa.save_invstd = op == OP_INFER ? NULL : si;
                fa.addend = fused ? z : NULL, fa.relu = fused, fa.relu_mask = fused ? mask : NULL;
                fa.workspace = ws, fa.workspace_size = wsb;
                if (op == OP_FWD || op == OP_FWD_FUSED || op == OP_INFER) {
                    ours[op] = time_ms([&] { return bnorm_cuda_forward(&fa, NULL) == BNORM_STATUS_OK; });
                } else {
                    fa.training = 1;
                    if (bnorm_cuda_forward(&fa, NULL) != BNORM_STATUS_OK) ours[op] = -1;
                    bnorm_backward_args ba;
                    memset(&ba, 0, sizeof ba);
                    ba.struct_size = sizeof ba;
                    ba.desc = d, ba.x = x, ba.dy = dy, ba.dx = dx, ba.weight = w, ba.mean = sm, ba.invstd = si;
                    ba.eps = 1e-5, ba.relu_mask = fused ? mask : NULL, ba.daddend = fused ? dz : NULL;
                    ba.dweight = dw, ba.dbias = db, ba.workspace = ws, ba.workspace_size = wsb;
                    ours[op] = time_ms([&] { return bnorm_cuda_backward(&ba, NULL) == BNORM_STATUS_OK; });
                }
                if (ours[op] < 0) fprintf(stderr, "bnorm %s failed: %s\n", op_name[op], bnorm_last_error());
#ifdef BNORM_BENCH_HAVE_CUDNN
                const int nhwc = cf.lay == BNORM_LAYOUT_CHANNELS_LAST;
                const int can_fuse = nhwc && cf.dt == BNORM_DTYPE_F16 && s.c % 4 == 0;
                if (fused && !can_fuse) continue;
                cudnnTensorDescriptor_t xd, pd;
                cudnnCreateTensorDescriptor(&xd);
                cudnnCreateTensorDescriptor(&pd);
                cudnnSetTensor4dDescriptor(xd, nhwc ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW,
                                           cf.dt == BNORM_DTYPE_F16 ? CUDNN_DATA_HALF : CUDNN_DATA_FLOAT, (int)s.n, (int)s.c,
                                           (int)s.h, (int)s.w);
                const cudnnBatchNormMode_t mode = op == OP_INFER ? CUDNN_BATCHNORM_SPATIAL : CUDNN_BATCHNORM_SPATIAL_PERSISTENT;
                cudnnDeriveBNTensorDescriptor(pd, xd, mode);
                cudnnActivationDescriptor_t ad;
                cudnnCreateActivationDescriptor(&ad);
                cudnnSetActivationDescriptor(ad, CUDNN_ACTIVATION_RELU, CUDNN_PROPAGATE_NAN, 0.0);
                const cudnnBatchNormOps_t ops = fused ? CUDNN_BATCHNORM_OPS_BN_ADD_ACTIVATION : CUDNN_BATCHNORM_OPS_BN;
                cudnnActivationDescriptor_t act = fused ? ad : NULL;
                const float one = 1, zero = 0;
                size_t fws = 0, bws = 0, rs = 0;
                cudnnStatus_t cs = cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize(hd, mode, ops, xd, fused ? xd : NULL, xd, pd, act, &fws);
                if (cs == CUDNN_STATUS_SUCCESS)
                    cs = cudnnGetBatchNormalizationBackwardExWorkspaceSize(hd, mode, ops, xd, xd, xd, fused ? xd : NULL, xd, pd, act, &bws);
                if (cs == CUDNN_STATUS_SUCCESS) cs = cudnnGetBatchNormalizationTrainingExReserveSpaceSize(hd, mode, ops, act, xd, &rs);
                void *cws = NULL, *res = NULL;
                if (cs == CUDNN_STATUS_SUCCESS) {
                    CK(cudaMalloc(&cws, std::max(fws, bws) + 16));
                    CK(cudaMalloc(&res, rs + 16));
                    auto fwd = [&] {
                        return cudnnBatchNormalizationForwardTrainingEx(hd, mode, ops, &one, &zero, xd, x, fused ? xd : NULL,
                                                                        fused ? z : NULL, xd, y, pd, w, b, 0.1, rm, rv, 1e-5, sm,
                                                                        si, act, cws, fws, res, rs) == CUDNN_STATUS_SUCCESS;
                    };
                    if (op == OP_INFER) {
                        theirs[op] = time_ms([&] {
                            return cudnnBatchNormalizationForwardInference(hd, mode, &one, &zero, xd, x, xd, y, pd, w, b, rm, rv,
                                                                           1e-5) == CUDNN_STATUS_SUCCESS;
                        });
                    } else if (op == OP_FWD || op == OP_FWD_FUSED) {
                        theirs[op] = time_ms(fwd);
                    } else if (fwd()) {
                        theirs[op] = time_ms([&] {
                            return cudnnBatchNormalizationBackwardEx(hd, mode, ops, &one, &zero, &one, &zero, xd, x, xd, y, xd, dy,
                                                                     fused ? xd : NULL, fused ? dz : NULL, xd, dx, pd, w, b, dw, db,
                                                                     1e-5, sm, si, act, cws, bws, res, rs) == CUDNN_STATUS_SUCCESS;
                        });
                    }
                    CK(cudaFree(cws));
                    CK(cudaFree(res));
                }
                if (theirs[op] < 0) fprintf(stderr, "cuDNN %s failed (%s)\n", op_name[op], cudnnGetErrorString(cs));
                cudnnDestroyActivationDescriptor(ad);
                cudnnDestroyTensorDescriptor(xd);
                cudnnDestroyTensorDescriptor(pd);
#endif
            }
            for (int op = 0; op < NOPS; op++) {
                const double by = op_bytes(op, (double)n, (double)es);
                const double g1 = ours[op] > 0 ? by / (ours[op] * 1e-3) / 1e9 : 0;
                const double g2 = theirs[op] > 0 ? by / (theirs[op] * 1e-3) / 1e9 : 0;
                fprintf(csv, "%s,%s,%s,%lld,%lld,%lld,%lld,%s,bnorm,%.5f,%.1f,%.3f\n", s.set, bnorm_dtype_name(cf.dt),
                        cf.lay ? "NHWC" : "NCHW", s.n, s.c, s.h, s.w, op_name[op], ours[op], g1, g1 / copy);
                if (theirs[op] > 0)
                    fprintf(csv, "%s,%s,%s,%lld,%lld,%lld,%lld,%s,cudnn,%.5f,%.1f,%.3f\n", s.set, bnorm_dtype_name(cf.dt),
                            cf.lay ? "NHWC" : "NCHW", s.n, s.c, s.h, s.w, op_name[op], theirs[op], g2, g2 / copy);
                char cd[64] = "-", cg[64] = "-", ratio[64] = "-";
                if (theirs[op] > 0) {
                    snprintf(cd, sizeof cd, "%.4f", theirs[op]);
                    snprintf(cg, sizeof cg, "%.0f", g2);
                    if (ours[op] > 0) snprintf(ratio, sizeof ratio, "%.2fx", theirs[op] / ours[op]);
                }
                fprintf(md, "| %lld,%lld,%lld,%lld | %s | %s | %.4f | %.0f | %.2f | %s | %s | %s |\n", s.n, s.c, s.h, s.w,
                        cf.name, op_name[op], ours[op], g1, g1 / copy, cd, cg, ratio);
            }
            printf("%-8s %s (%lld,%lld,%lld,%lld): fwd %.0f GB/s (%.2f of copy), bwd %.0f GB/s\n", s.set, cf.name, s.n, s.c,
                   s.h, s.w, ours[OP_FWD] > 0 ? op_bytes(OP_FWD, (double)n, (double)es) / (ours[OP_FWD] * 1e6) : 0,
                   ours[OP_FWD] > 0 ? op_bytes(OP_FWD, (double)n, (double)es) / (ours[OP_FWD] * 1e6) / copy : 0,
                   ours[OP_BWD] > 0 ? op_bytes(OP_BWD, (double)n, (double)es) / (ours[OP_BWD] * 1e6) : 0);
            fflush(md);
            fflush(csv);
            void *all[] = {x, y, z, dy, dx, dz, mask, ws, w, b, rm, rv, sm, si, dw, db};
            for (void *p : all) CK(cudaFree(p));
        }
    fclose(csv);
    fclose(md);
#ifdef BNORM_BENCH_HAVE_CUDNN
    cudnnDestroy(hd);
#endif
    printf("wrote %s.md and %s.csv\n", out, out);
    return 0;
}
