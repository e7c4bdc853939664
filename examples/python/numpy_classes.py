#!/usr/bin/python3
"""numpy_classes.py - the seeds' classes on numpy arrays, no torch needed: PyTorch's BatchNorm2d,
OneFlow's FusedBatchNorm2d, MegEngine's BatchNorm2d with freeze, functional batch_norm, state files.

    /usr/bin/python3 examples/python/numpy_classes.py
"""
import os
import tempfile

import numpy as np

import bnorm

rng = np.random.default_rng(0)
x = rng.standard_normal((8, 4, 5, 5)).astype(np.float32) * 3 + 1
dy = rng.standard_normal(x.shape).astype(np.float32)

# PyTorch's nn.BatchNorm2d: training mode, batch statistics, running statistics updated
bn = bnorm.nn.BatchNorm2d(4)
y = bn(x)
print("BatchNorm2d: per-channel mean of y", np.round(y.mean(axis=(0, 2, 3)), 6))
dx = bn.backward(dy)                          # weight.grad / bias.grad accumulate
print("  running_mean", bn.running_mean, "num_batches_tracked", bn.num_batches_tracked)
print("  weight.grad", bn.weight.grad)

# channels-last memory (NHWC) is read in place: a transposed view of an (N, H, W, C) array
x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
y_cl = bn.eval()(x_nhwc.transpose(0, 3, 1, 2))
print("  eval on channels-last memory, same values:", np.allclose(y_cl, bn(x), atol=1e-6))

# OneFlow's FusedBatchNorm2d: ReLU(BN(x) + addend) in one pass
fused = bnorm.oneflow.FusedBatchNorm2d(4)
addend = rng.standard_normal(x.shape).astype(np.float32)
y = fused(x, addend)
dx, d_addend = fused.backward(dy)
print("FusedBatchNorm2d: fraction of zeros after the ReLU %.2f" % (y == 0).mean())

# MegEngine's BatchNorm2d: momentum 0.9 is the weight of the old value; freeze uses running stats
me = bnorm.megengine.BatchNorm2d(4)
me(x)
print("MegEngine BatchNorm2d running_mean (0.1 of the batch mean):", me.running_mean)
frozen = bnorm.megengine.BatchNorm2d(4, freeze=True)
frozen.load_state_dict(me.state_dict())
frozen(x)
frozen.backward(dy)
print("  freeze: running_mean unchanged:", np.array_equal(frozen.running_mean, me.running_mean),
      " weight.grad:", frozen.weight.grad)

# functional, torch's signature
rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
y = bnorm.functional.batch_norm(x, rm, rv, training=True, momentum=0.1)
print("functional.batch_norm: running_var", rv)

# state files (safetensors, PyTorch's state_dict names)
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "bn.safetensors")
    bn.save(path, prefix="layer1.bn1.")
    again = bnorm.nn.BatchNorm2d(4)
    again.load(path, prefix="layer1.bn1.")
    print("save/load round trip:", all(np.array_equal(v, again.state_dict()[k]) for k, v in bn.state_dict().items()))
