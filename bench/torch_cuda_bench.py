"""torch_cuda_bench.py - PyTorch's CUDA batch norm on the shapes of bnorm_cuda_bench (run by
scripts/gpu_check.sh when torch with CUDA is present): training forward, inference forward and
training backward, float16 channels_last and float32 NCHW, median of CUDA-event timings. Writes a CSV
with the same columns as bnorm_cuda_bench's (impl = torch). Not yet run on a GPU."""
import argparse
import statistics

import torch
import torch.nn.functional as F

RN = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14), (1024, 14),
      (512, 14), (512, 7), (2048, 7)]
BN1D = [(100000, 32), (262144, 64), (65536, 256), (4096, 4096)]


def median_ms(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="torch_cuda.csv")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batches", default="32,64,256")
    args = ap.parse_args()
    dev = torch.device("cuda")
    shapes = [("resnet50", n, c, h, h) for n in map(int, args.batches.split(",")) for c, h in RN]
    shapes += [("bn1d", n, c, 1, 1) for n, c in BN1D]
    with open(args.out, "w") as f:
        f.write("set,dtype,layout,N,C,H,W,op,impl,ms,GBps,frac_copy\n")
        for st, n, c, h, w in shapes:
            for dt, layout in ((torch.float16, "NHWC"), (torch.float32, "NCHW")):
                b = 2 if dt == torch.float16 else 4
                x = torch.randn(n, c, h, w, device=dev, dtype=dt) + 1
                if layout == "NHWC":
                    x = x.contiguous(memory_format=torch.channels_last)
                if st == "bn1d":
                    x = x.view(n, c)
                weight = torch.rand(c, device=dev) + 0.5
                bias = torch.randn(c, device=dev)
                rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
                numel = x.numel()
                res = {}
                res["fwd_train"] = median_ms(lambda: F.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5), args.reps)
                res["fwd_infer"] = median_ms(lambda: F.batch_norm(x, rm, rv, weight, bias, False, 0.1, 1e-5), args.reps)
                xg = x.detach().requires_grad_(True)
                y = F.batch_norm(xg, rm, rv, weight, bias, True, 0.1, 1e-5)
                dy = torch.randn_like(y)
                res["bwd"] = median_ms(lambda: torch.autograd.grad(y, xg, dy, retain_graph=True), args.reps)
                by = {"fwd_train": 2 * b * numel, "fwd_infer": 2 * b * numel, "bwd": 3 * b * numel}
                for op, ms in res.items():
                    f.write(f"{st},{'float16' if b == 2 else 'float32'},{layout},{n},{c},{h},{w},{op},torch,"
                            f"{ms:.5f},{by[op] / (ms * 1e6):.1f},\n")
                print(st, layout, n, c, h, w, {k: round(v, 4) for k, v in res.items()}, flush=True)
                del x, xg, y, dy
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
