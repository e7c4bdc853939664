#!/usr/bin/python3
"""train_cnn.py - trains the small CNN of the C inference example (examples/cnn/cnn_infer.c) with PyTorch.

    /usr/bin/python3 examples/cnn/train_cnn.py --out DIR [--epochs N] [--seed S]

Data: the 8x8 UCI digits shipped in data/digits.csv.gz (pixels / 16), 360 held out for testing.
Network (PyTorch names, which the checkpoint keeps):
    conv1 Conv2d(1, 8, 3, padding=1) -> bn1 BatchNorm2d(8)  -> ReLU
    conv2 Conv2d(8, 16, 3, padding=1) -> bn2 BatchNorm2d(16) -> ReLU        (16 x 8 x 8 = 1024 features)
    fc1 Linear(1024, 32)               -> bn3 BatchNorm1d(32) -> ReLU
    fc2 Linear(32, 10)
Writes DIR/model.safetensors (the whole state_dict: conv/linear weights, BN weight, bias, running
statistics and num_batches_tracked) and DIR/expected.safetensors (x: the test images [360, 1, 8, 8],
logits: the eval-mode logits PyTorch computes for them [360, 10], labels [360] as I64). The files are
written with the `safetensors` package when it is installed, else by the small writer below (the format:
8-byte little-endian header length, a JSON header, then the raw little-endian tensor data).
"""
import argparse
import gzip
import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 8 * 8, 32)
        self.bn3 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.fc1(x.flatten(1))))
        return self.fc2(x)


DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def save_safetensors(tensors, path):
    """Writes {name: tensor} as a safetensors file (package if present, else by hand)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file(tensors, path)
        return
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts on a multiple of 8 bytes
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    os.replace(path + ".tmp", path)


def load_digits():
    with gzip.open(os.path.join(ROOT, "data", "digits.csv.gz"), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float64)
    x = torch.tensor(rows[:, :64] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(rows[:, 64], dtype=torch.int64)
    return x, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    x, y = load_digits()
    perm = torch.randperm(len(x))
    test, train = perm[:360], perm[360:]
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for epoch in range(a.epochs):
        net.train()
        order = train[torch.randperm(len(train))]
        total = 0.0
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"train_cnn: epoch {epoch + 1}: training loss {total / len(order):.4f}")
    net.eval()
    with torch.no_grad():
        logits = net(x[test])
    acc = (logits.argmax(1) == y[test]).float().mean().item()
    print(f"train_cnn: eval-mode test accuracy {100 * acc:.2f}% (PyTorch {torch.__version__})")
    os.makedirs(a.out, exist_ok=True)
    save_safetensors(net.state_dict(), os.path.join(a.out, "model.safetensors"))
    save_safetensors({"x": x[test], "logits": logits, "labels": y[test]}, os.path.join(a.out, "expected.safetensors"))
    print(f"train_cnn: wrote {a.out}/model.safetensors and {a.out}/expected.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
