#!/usr/bin/python3
"""PyTorch side of bnorm_bench: times torch.nn.functional.batch_norm on the cases bnorm_bench asks for.

Usage: torch_bench.py REQUESTS     (every case of the file, one after the other)
       torch_bench.py --serve      (one case per line read from stdin, answered at once: bnorm_bench
                                    runs it so, to time PyTorch right beside bnorm and oneDNN per case)
REQUESTS holds one case per line:  op layout dtype threads reps warmup d0,d1,... [copy_bytes]
(in --serve mode each line starts with its index, which the answer repeats)
  op      fwd_train | fwd_infer | bwd_train | bwd_eval | fused_fwd | fused_bwd
  layout  cf (contiguous) | cl (channels_last / channels_last_3d; rank 3 uses a transposed (N,L,C) view)
  dtype   f32 | bf16 | f16
For each case it prints one line:  RESULT <line index> <median seconds>
(or SKIP <line index> <reason>). Timing uses time.perf_counter around each call; the median of reps.
With copy_bytes, every call is followed (untimed) by a copy moving that many bytes (read + written),
as bnorm_bench does after each call of bnorm and oneDNN, so all three start each call in the same
cache state (without it, tensors that fit the L3 cache would be timed warm for PyTorch only).
Kernel against kernel: before timing, glibc's malloc is told (mallopt) to keep freed memory instead
of returning it to the kernel, so torch's freshly allocated outputs reuse pages already faulted in, as
with a caching allocator or a caller's preallocated buffers (bnorm and oneDNN write into buffers
allocated once). Without it each large output is a fresh mmap whose page faults cost more than the
kernel (../docs/performance.md). BNORM_BENCH_TORCH_FRESH=1 keeps glibc's defaults (out of the box).
Backward ops call aten's native_batch_norm_backward directly (what autograd runs), so no graph overhead
is timed; the fused backward is the autograd graph of relu(batch_norm(x) + addend).
"""
import ctypes
import os
import statistics
import sys
import time

if os.environ.get("BNORM_BENCH_TORCH_FRESH") != "1":
    try:
        _libc = ctypes.CDLL("libc.so.6")
        _libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'd allocations
        _libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give freed memory back
    except OSError:
        pass

try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # no torch: the bench shows the column as missing
    print("SKIP all torch-import-failed:%s" % type(e).__name__)
    sys.exit(0)

DT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def make(dims, layout, dtype, gen):
    t = torch.randn(*dims, generator=gen).to(DT[dtype])
    if layout == "cl":
        if len(dims) == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        elif len(dims) == 5:
            t = t.contiguous(memory_format=torch.channels_last_3d)
        elif len(dims) == 3:
            t = t.transpose(1, 2).contiguous().transpose(1, 2)  # (N,C,L) view of (N,L,C) storage
    return t


_cache = {}


def tensors(dims, layout, dtype, count):
    """x, dy, addend for a case: the ops of one shape reuse them (making 100 MB of randn takes longer
    than timing the case); only the newest shape is kept."""
    key = (tuple(dims), layout, dtype)
    if key not in _cache:
        _cache.clear()
        gen = torch.Generator().manual_seed(1)
        _cache[key] = [make(dims, layout, dtype, gen) for _ in range(3)]
    return _cache[key][:count]


def run_case(op, layout, dtype, dims):
    gen = torch.Generator().manual_seed(2)
    C = dims[1]
    x, dy, addend = tensors(dims, layout, dtype, 3)
    w = torch.rand(C, generator=gen) + 0.5
    b = torch.randn(C, generator=gen)
    rm = torch.zeros(C)
    rv = torch.ones(C)
    eps = 1e-5
    if op == "fwd_train":
        return lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, eps)
    if op == "fwd_infer":
        return lambda: F.batch_norm(x, rm, rv, w, b, False, 0.1, eps)
    if op in ("bwd_train", "bwd_eval"):
        train = op == "bwd_train"
        _, sm, si = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, eps)
        if not train:
            sm, si = None, None
        return lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, w, rm, rv, sm, si, train, eps, [True, True, True])
    if op == "fused_fwd":
        return lambda: torch.relu_(F.batch_norm(x, rm, rv, w, b, True, 0.1, eps).add_(addend))
    if op == "fused_bwd":
        xg = x.detach().requires_grad_(True)
        ag = addend.detach().requires_grad_(True)
        wg = w.detach().requires_grad_(True)
        bg = b.detach().requires_grad_(True)
        out = torch.relu(F.batch_norm(xg, rm, rv, wg, bg, True, 0.1, eps) + ag)
        return lambda: torch.autograd.grad(out, (xg, ag, wg, bg), dy, retain_graph=True)
    raise ValueError(op)


def time_case(f):
    """Times one request (fields as in the file format); returns the answer's text after the index."""
    op, layout, dtype, threads, reps, warm, dims = f[:7]
    dims = [int(d) for d in dims.split(",")]
    half = int(float(f[7])) // 8 if len(f) == 8 else 0  # float32 values per copy side
    src = torch.ones(half) if half else None
    dst = torch.empty(half) if half else None
    try:
        torch.set_num_threads(int(threads))
        fn = run_case(op, layout, dtype, dims)
        for _ in range(int(warm)):
            fn()
            if half:
                dst.copy_(src)
        ts = []
        for _ in range(int(reps)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
            if half:
                dst.copy_(src)
        return "RESULT", "%.9e" % statistics.median(ts)
    except Exception as e:  # unsupported dtype/layout in this PyTorch: reported, not fatal
        return "SKIP", type(e).__name__


def serve():
    print("READY torch %s" % torch.__version__, flush=True)
    for line in sys.stdin:
        f = line.split()
        if len(f) not in (8, 9):
            print("SKIP %s bad-request" % (f[0] if f else "-1"), flush=True)
            continue
        kind, text = time_case(f[1:])
        print("%s %s %s" % (kind, f[0], text), flush=True)


def main():
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    lines = open(sys.argv[1]).read().splitlines()
    for i, line in enumerate(lines):
        f = line.split()
        if len(f) not in (7, 8):
            continue
        kind, text = time_case(f)
        print("%s %d %s" % (kind, i, text), flush=True)


if __name__ == "__main__":
    main()
