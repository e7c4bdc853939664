#!/usr/bin/python3
"""cnn_digits.py - a small ResNet-style CNN trained on the shipped digits data (data/digits.csv.gz, 1797
8x8 images), twice from the same initial weights: with torch's BatchNorm and after
bnorm.torch.convert(model). Prints per-epoch loss and accuracy of both, and both training times.

    /usr/bin/python3 examples/python/cnn_digits.py [--epochs 5] [--channels-last]
"""
import argparse
import copy
import gzip
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bnorm.torch as bt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_digits():
    with gzip.open(os.path.join(ROOT, "data", "digits.csv.gz"), "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(a[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    return x, torch.from_numpy(a[:, 64].astype(np.int64))


class Block(nn.Module):
    """Residual block; after convert, its last BN computes ReLU(BN(out) + x) in one pass."""

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


def model(c=32):
    return nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), Block(c), Block(c),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels-last", action="store_true")
    a = ap.parse_args()
    x, t = load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(t), generator=g)
    x, t = x[perm], t[perm]
    ntest = len(t) // 5
    xtr, ttr, xte, tte = x[ntest:], t[ntest:], x[:ntest], t[:ntest]
    if a.channels_last:
        xtr = xtr.contiguous(memory_format=torch.channels_last)
        xte = xte.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    plain = model()
    converted = bt.convert(copy.deepcopy(plain))
    times = {}
    for name, m in (("torch", plain), ("bnorm", converted)):
        if a.channels_last:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        order = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        for epoch in range(a.epochs):
            m.train()
            idx = torch.randperm(len(ttr), generator=order)
            total = 0.0
            for i in range(0, len(idx) - 1, a.batch):
                b = idx[i:i + a.batch]
                opt.zero_grad()
                loss = F.cross_entropy(m(xtr[b]), ttr[b])
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            m.eval()
            with torch.no_grad():
                acc = (m(xte).argmax(1) == tte).float().mean().item()
            print("%s  epoch %d  train loss %.4f  test accuracy %.3f" % (name, epoch + 1, total / len(ttr), acc),
                  flush=True)
        times[name] = time.perf_counter() - t0
    print("training time: torch %.2f s, bnorm (convert) %.2f s" % (times["torch"], times["bnorm"]))


if __name__ == "__main__":
    main()
