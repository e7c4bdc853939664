#!/usr/bin/python3
"""python_bench.py - bnorm's Python package against PyTorch's own modules (issue 15's benchmark).

Times, in one process, interleaved call by call in rounds (order alternating per round):
  1. forward + backward (autograd, as a training step runs them) of bnorm.torch.BatchNorm2d vs
     torch.nn.BatchNorm2d on ResNet-50's nine BN shapes at N = 32, NCHW and NHWC (channels_last), and
     of BatchNorm1d on an MLP shape (4096, 1024), float32;
  2. the per-call overhead: the same on a tiny tensor (8, 16), where the kernels cost nothing (set
     "overhead": forward and backward apart, beside an empty autograd.Function, the floor of any
     Function written in Python);
  3. the training step (forward, loss, backward, SGD) of a ResNet-style CNN, plain vs bnorm.torch.convert.
Prints a Markdown table of medians (ms) and ratios torch/bnorm (> 1: bnorm faster).

Usage: /usr/bin/python3 bench/python_bench.py [--rounds R] [--reps K] [--threads T] [--sets bn,tiny,cnn,overhead]
       [--out-of-the-box]
By default freed outputs are reused without page faults (glibc mallopt, as bench/torch_bench.py and
docs/performance.md's kernel-vs-kernel method); --out-of-the-box keeps glibc's defaults.
"""
import argparse
import ctypes
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import bnorm
import bnorm.torch as bt

RESNET = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def step_fn(m, x, dy):
    def run():
        x.grad = None
        y = m(x)
        y.backward(dy)
    return run


def time_pair(fa, fb, rounds, reps):
    """Medians (seconds) of fa and fb, interleaved: each round runs reps calls of each, order alternating."""
    ta, tb = [], []
    fa()
    fb()
    for r in range(rounds):
        for f, t in ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta)):
            for _ in range(reps):
                t0 = time.perf_counter()
                f()
                t.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def bn_case(shape, cl, rounds, reps):
    c = shape[1]
    x = torch.randn(shape)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    x.requires_grad_()
    if len(shape) == 2:
        mt, mb = nn.BatchNorm1d(c), bt.BatchNorm1d(c)
    else:
        mt, mb = nn.BatchNorm2d(c), bt.BatchNorm2d(c)
    return time_pair(step_fn(mt, x, dy), step_fn(mb, x, dy), rounds, reps)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.conv2(F.relu(self.bn1(self.conv1(x))))
        if hasattr(self.bn2, "forward_add_relu"):
            return self.bn2.forward_add_relu(out, x)
        return F.relu(self.bn2(out) + x)


def cnn(c=32, blocks=3, classes=10):
    layers = [nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    layers += [Block(c) for _ in range(blocks)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def cnn_case(cl, rounds, reps):
    import copy
    torch.manual_seed(0)
    plain = cnn()
    conv = bt.convert(copy.deepcopy(plain))
    x = torch.randn(64, 3, 32, 32)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
        plain = plain.to(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    t = torch.randint(0, 10, (64,))

    def step(m, opt):
        def run():
            opt.zero_grad()
            F.cross_entropy(m(x), t).backward()
            opt.step()
        return run
    o1 = torch.optim.SGD(plain.parameters(), lr=0.01)
    o2 = torch.optim.SGD(conv.parameters(), lr=0.01)
    return time_pair(step(plain, o1), step(conv, o2), rounds, reps)


class _Empty(torch.autograd.Function):
    """The least a Python autograd.Function costs: forward allocates y, backward hands dy back."""

    @staticmethod
    def forward(ctx, x, w, b):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return dy, None, None


def overhead_cases(rounds, reps):
    """Per-call cost on an (8, 16) tensor, forward and backward apart: torch.nn.BatchNorm1d,
    bnorm.torch.BatchNorm1d, and the empty autograd.Function (what any Python-level Function pays).
    Medians (seconds) per case over rounds x reps calls; returns [(name, torch, bnorm, empty)]."""
    x = torch.randn(8, 16, requires_grad=True)
    dy = torch.randn(8, 16)
    mt, mb = nn.BatchNorm1d(16), bt.BatchNorm1d(16)
    empty = lambda t: _Empty.apply(t, mt.weight, mt.bias)  # noqa: E731

    def fwd(m):
        def run():
            t0 = time.perf_counter()
            m(x)
            return time.perf_counter() - t0
        return run

    def bwd(m):
        def run():
            y = m(x)
            t0 = time.perf_counter()
            y.backward(dy)
            return time.perf_counter() - t0
        return run

    def step(m):
        def run():
            t0 = time.perf_counter()
            x.grad = None
            m(x).backward(dy)
            return time.perf_counter() - t0
        return run

    out = []
    for name, mk in (("forward", fwd), ("backward", bwd), ("forward + backward", step)):
        fs = [mk(mt), mk(mb), mk(empty)]
        meds = [[], [], []]
        for r in range(rounds):
            for j in (range(3) if r % 2 == 0 else reversed(range(3))):
                for _ in range(reps // 10):
                    fs[j]()
                meds[j].append(statistics.median(fs[j]() for _ in range(reps)))
        out.append((name, *[statistics.median(m) for m in meds]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--sets", default="bn,tiny,cnn", help="any of bn, tiny, cnn, overhead")
    ap.add_argument("--out-of-the-box", action="store_true")
    a = ap.parse_args()
    if not a.out_of_the_box:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)             # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)     # M_TRIM_THRESHOLD
    if a.threads > 0:
        torch.set_num_threads(a.threads)
        bnorm.set_num_threads(a.threads)
    sets = a.sets.split(",")
    print("CPU: %s; torch %s (%d threads), bnorm %s (%d threads, %s); float32; %d rounds x %d reps; outputs %s" % (
        cpu_model(), torch.__version__, torch.get_num_threads(), bnorm.library_version, bnorm.get_num_threads(),
        bnorm.get_isa(), a.rounds, a.reps, "glibc defaults" if a.out_of_the_box else "reused (mallopt)"))
    print()
    print("| case | layout | torch.nn ms | bnorm.torch ms | torch/bnorm |")
    print("|---|---|---:|---:|---:|")

    def row(name, layout, tt, tb):
        print("| %s | %s | %.3f | %.3f | %.2f |" % (name, layout, tt * 1e3, tb * 1e3, tt / tb), flush=True)

    with torch.no_grad():
        pass
    if "bn" in sets:
        for c, hw in RESNET:
            for cl in (False, True):
                tt, tb = bn_case((32, c, hw, hw), cl, a.rounds, a.reps)
                row("BatchNorm2d fwd+bwd (32,%d,%d,%d)" % (c, hw, hw), "NHWC" if cl else "NCHW", tt, tb)
        tt, tb = bn_case((4096, 1024), False, a.rounds, a.reps)
        row("BatchNorm1d fwd+bwd (4096,1024)", "-", tt, tb)
    if "tiny" in sets:
        tt, tb = bn_case((8, 16), False, a.rounds, a.reps * 50)
        row("per-call overhead: BatchNorm1d fwd+bwd (8,16)", "-", tt, tb)
    if "overhead" in sets:
        print()
        print("| (8,16) BatchNorm1d, per call | torch.nn us | bnorm.torch us | empty autograd.Function us |")
        print("|---|---:|---:|---:|")
        for name, tt, tb, te in overhead_cases(a.rounds, a.reps * 500):
            print("| %s | %.1f | %.1f | %.1f |" % (name, tt * 1e6, tb * 1e6, te * 1e6), flush=True)
    if "cnn" in sets:
        for cl in (False, True):
            tt, tb = cnn_case(cl, a.rounds, a.reps)
            row("CNN training step (64x3x32x32, 7 BN) plain vs convert", "NHWC" if cl else "NCHW", tt, tb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
