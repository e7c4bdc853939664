#!/usr/bin/python3
"""PyTorch <-> bnorm interop for the safetensors state files (tests/interop, docs/state.md).

  generate DIR          train a small CNN with several BatchNorm layers and write into DIR:
                        model.safetensors (the whole state_dict, written with json+struct because the
                        safetensors package is not in Debian) and expected.txt (per BN layer: its options,
                        an input and torch's eval output; fold fixtures from fuse_conv_bn_eval and
                        fuse_linear_bn_eval).
  check DIR             load every file the C side wrote (DIR/c_expected.txt names them) into a torch
                        BatchNorm with load_state_dict(strict=True) and compare eval outputs.
  run EXE DIR           generate, run `EXE DIR DIR` (the C side loads, compares, writes), check.

Text fixture lines:  L <prefix> <affine> <track> <eps> <cumulative>     one BN layer of the model
                     T <name> <rank> <dims...> <values...>               one tensor (float values)
                     F <file> <prefix> <rank> <dims...>                 (C side) a file it wrote ("" = no prefix)
Prints only failures and "N passed, N failed"; exit status 1 on any failure.
"""
import json
import os
import struct
import subprocess
import sys

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

DTYPES = {torch.float32: ("F32", "<f4"), torch.float64: ("F64", "<f8"), torch.float16: ("F16", "<f2"),
          torch.int64: ("I64", "<i8")}
NP = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
      "I64": torch.int64}
SIZES = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "I64": 8}

passed = 0
failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL", what)


def write_safetensors(path, tensors, metadata=None):
    """tensors: dict name -> tensor, written in insertion order, header padded to a multiple of 8."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs = []
    at = 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        code, fmt = DTYPES[t.dtype]
        data = t.numpy().astype(fmt).tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, e in header.items():
        b, en = e["data_offsets"]
        dt = e["dtype"]
        buf = bytearray(raw[base + b:base + en])
        if dt == "BF16":
            t = torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16) if buf else torch.zeros(0)
        else:
            t = torch.frombuffer(buf, dtype=NP[dt]) if buf else torch.zeros(0, dtype=NP[dt])
        out[name] = t.reshape(e["shape"]).clone()
    return out, meta


def tensor_line(name, t):
    shape = list(t.shape)
    vals = " ".join(repr(float(v)) for v in t.detach().double().reshape(-1).tolist())
    return "T %s %d %s %s\n" % (name, len(shape), " ".join(str(d) for d in shape), vals)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False))
        self.conv3 = nn.Conv2d(6, 5, 1)
        self.bn3 = nn.BatchNorm2d(5, momentum=None, eps=1e-3)
        self.head = nn.Linear(5, 4)
        self.bn_head = nn.BatchNorm1d(4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.layer1(x))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.bn_head(self.head(x.mean((2, 3))))


def generate(d):
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(1234)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for _ in range(3):
        x = torch.randn(6, 3, 5, 5) * 2.0 + 0.7
        loss = (net(x) - torch.arange(4.0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    sd = net.state_dict()
    write_safetensors(d + "/model.safetensors", sd, {"format": "pt"})
    lines = []
    bns = [("bn1.", net.bn1, 4), ("layer1.1.", net.layer1[1], 4), ("bn3.", net.bn3, 4), ("bn_head.", net.bn_head, 2)]
    for prefix, bn, rank in bns:
        lines.append("L %s %d %d %r %d\n" % (prefix, int(bn.affine), int(bn.track_running_stats), bn.eps,
                                              int(bn.momentum is None)))
        shape = (2, bn.num_features, 3, 2) if rank == 4 else (3, bn.num_features)
        x = torch.randn(shape) * 3.0 + 1.5
        with torch.no_grad():
            y = bn(x)
        lines.append(tensor_line(prefix + "x", x))
        lines.append(tensor_line(prefix + "y", y))
    # folding: conv (with and without bias) and linear, as torch.nn.utils.fusion does it
    for name, bn_src, cout, kind in [("conv_bias", net.bn1, 8, "conv"), ("conv_nobias", net.bn1, 8, "conv0"),
                                     ("linear", net.bn_head, 4, "linear")]:
        if kind == "linear":
            mod = nn.Linear(7, cout)
        else:
            mod = nn.Conv2d(3, cout, 3, bias=(kind == "conv"))
        bn = bn_src
        mod.eval()
        fused = (fuse_linear_bn_eval if kind == "linear" else fuse_conv_bn_eval)(mod, bn)
        lines.append("T fold.%s.eps 1 1 %r\n" % (name, bn.eps))
        lines.append(tensor_line("fold.%s.gamma" % name, bn.weight))
        lines.append(tensor_line("fold.%s.beta" % name, bn.bias))
        lines.append(tensor_line("fold.%s.rm" % name, bn.running_mean))
        lines.append(tensor_line("fold.%s.rv" % name, bn.running_var))
        lines.append(tensor_line("fold.%s.w" % name, mod.weight))
        if mod.bias is not None:
            lines.append(tensor_line("fold.%s.b" % name, mod.bias))
        lines.append(tensor_line("fold.%s.wout" % name, fused.weight))
        lines.append(tensor_line("fold.%s.bout" % name, fused.bias))
    with open(d + "/expected.txt", "w") as f:
        f.write("# generated by tests/interop/torch_interop.py (torch %s)\n" % torch.__version__)
        f.writelines(lines)


def parse_fixture(path):
    layers, tensors, files = [], {}, []
    with open(path) as f:
        for line in f:
            p = line.split()
            if not p or p[0].startswith("#"):
                continue
            if p[0] == "T":
                rank = int(p[2])
                dims = [int(v) for v in p[3:3 + rank]]
                vals = [float(v) for v in p[3 + rank:]]
                tensors[p[1]] = torch.tensor(vals, dtype=torch.float64).reshape(dims)
            elif p[0] == "F":
                rank = int(p[3])
                prefix = "" if p[2] == '""' else p[2]
                files.append((p[1], prefix, [int(v) for v in p[4:4 + rank]]))
            elif p[0] == "L":
                layers.append(p[1:])
    return layers, tensors, files


def check_c_files(d):
    _, tensors, files = parse_fixture(d + "/c_expected.txt")
    check(len(files) > 0, "the C side listed no files")
    for fname, prefix, dims in files:
        path = d + "/" + fname
        sd, meta = read_safetensors(path)
        key = lambda k: "bnorm." + prefix + k
        affine = meta[key("affine")] == "1"
        track = meta[key("track_running_stats")] == "1"
        eps = float(meta[key("eps")])
        mode = meta[key("momentum_mode")]
        momentum = None if mode == "cumulative" else float(meta[key("momentum")])
        if mode == "kept_weight":
            momentum = 1.0 - momentum
        c = int(meta[key("num_features")])
        f64 = meta[key("param_dtype")] == "float64"
        cls = nn.BatchNorm1d if len(dims) == 2 else nn.BatchNorm2d if len(dims) == 4 else nn.BatchNorm3d
        bn = cls(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
        if f64:
            bn = bn.double()
        own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        try:
            bn.load_state_dict(own, strict=True)
            ok = True
        except Exception as e:  # noqa: BLE001 - report any load failure as a test failure
            ok = False
            print("load_state_dict(strict=True) of %s failed: %s" % (fname, e))
        check(ok, "%s loads into torch with strict=True" % fname)
        if not ok:
            continue
        if track:
            check(bn.num_batches_tracked.item() == int(sd[prefix + "num_batches_tracked"].item()),
                  "%s num_batches_tracked" % fname)
        bn.eval()
        x = tensors[fname + ".x"]
        want = tensors[fname + ".y"]
        with torch.no_grad():
            y = bn(x if f64 else x.float()).double()
        tol = 1e-12 if f64 else 2e-6
        err = ((y - want).abs() / (tol + tol * want.abs())).max().item()
        check(err <= 4.0, "%s: torch eval output differs from bnorm's (normalized error %g)" % (fname, err))


def main():
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    mode = sys.argv[1]
    if mode == "generate":
        generate(sys.argv[2])
        return 0
    if mode == "check":
        check_c_files(sys.argv[2])
    elif mode == "run":
        exe, d = sys.argv[2], sys.argv[3]
        generate(d)
        r = subprocess.run([exe, d, d])
        check(r.returncode == 0, "the C side (%s) failed with status %d" % (exe, r.returncode))
        check_c_files(d)
    else:
        print(__doc__)
        return 2
    print("torch_interop: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
