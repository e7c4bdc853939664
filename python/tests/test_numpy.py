"""bnorm.functional and the numpy modules (bnorm.nn, bnorm.megengine, bnorm.oneflow) against PyTorch."""
import os

import numpy as np
import pytest
import torch

import bnorm
from conftest import close, numpy_array, rand_shape

PAIRS = [(bnorm.nn.BatchNorm1d, torch.nn.BatchNorm1d, (2, 3)), (bnorm.nn.BatchNorm2d, torch.nn.BatchNorm2d, (4,)),
         (bnorm.nn.BatchNorm3d, torch.nn.BatchNorm3d, (5,))]


def torch_ref(cls, c, dtype, eps, momentum, affine, track, rng):
    ref = cls(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(rng.standard_normal(c)))
            ref.bias.copy_(torch.from_numpy(rng.standard_normal(c)))
    return ref


@pytest.mark.parametrize("case", range(24))
def test_modules_match_torch(case):
    """Random class, rank, shape, layout, dtype, options and fused/plain; several train/eval steps;
    outputs, running statistics, counters, dx, d_addend and accumulated weight/bias gradients."""
    rng = np.random.default_rng(1000 + case)
    mine_cls, torch_cls, ranks = PAIRS[case % 3]
    rank = ranks[int(rng.integers(len(ranks)))]
    shape = rand_shape(rng, rank)
    c = shape[1]
    dtype = ["float32", "float64"][(case // 3) % 2]
    momentum = [0.1, None, 0.3][(case // 6) % 3]
    affine = case % 5 != 0
    track = case % 7 != 0
    fused = case % 4 == 1
    eps = [1e-5, 1e-3][case % 2]
    tdt = getattr(torch, dtype)
    ref = torch_ref(torch_cls, c, tdt, eps, momentum, affine, track, rng)
    mine = (getattr(bnorm.nn, "Fused" + mine_cls.__name__) if fused else mine_cls)(
        c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    for step, training in enumerate([True, True, False, True, False]):
        mine.train(training)
        ref.train(training)
        cl = bool(rng.integers(2))
        x = numpy_array(rng, shape, dtype, cl)
        dy = numpy_array(rng, shape, dtype, cl)
        xt = torch.from_numpy(x).requires_grad_()
        if fused:
            a = numpy_array(rng, shape, dtype, cl)
            at = torch.from_numpy(a).requires_grad_()
            yt = torch.relu(ref(xt) + at)
            y = mine.forward(x, a)
        else:
            yt = ref(xt)
            y = mine.forward(x)
        assert bnorm._bnorm.layout(y) == bnorm._bnorm.layout(x), "the output keeps the input memory order"
        close(y, yt.detach(), dtype, 4)
        yt.backward(torch.from_numpy(dy))
        back = mine.backward(dy)
        dx, da = back if fused else (back, None)
        close(dx, xt.grad, dtype, 8)
        if fused:
            close(da, at.grad, dtype)
        if track:
            close(mine.running_mean, ref.running_mean.detach(), dtype)
            close(mine.running_var, ref.running_var.detach(), dtype)
            assert mine.num_batches_tracked == int(ref.num_batches_tracked)
        if affine:
            close(mine.weight.grad, ref.weight.grad, dtype, 50)
            close(mine.bias.grad, ref.bias.grad, dtype, 50)
    sd = mine.state_dict()
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_float16_storage(rng, rank):
    """float16 arrays against torch computing in float32 on the same (rounded) values."""
    shape = rand_shape(rng, rank)
    c = shape[1]
    for cl in (False, True):
        x = numpy_array(rng, shape, np.float16, cl)
        bn = bnorm.nn.BatchNorm(c)
        ref = torch.nn.BatchNorm1d(c) if rank < 4 else (torch.nn.BatchNorm2d(c) if rank == 4 else torch.nn.BatchNorm3d(c))
        xt = torch.from_numpy(x.astype(np.float32)).requires_grad_()
        yt = ref(xt)
        y = bn(x)
        assert y.dtype == np.float16
        close(y, yt.detach(), "float16")
        dy = numpy_array(rng, shape, np.float16, cl)
        yt.backward(torch.from_numpy(dy.astype(np.float32)))
        close(bn.backward(dy), xt.grad, "float16", 4)
        close(bn.running_var, ref.running_var.detach(), "float32")


def test_functional(rng):
    x = numpy_array(rng, (4, 3, 5), np.float32, False)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    w, b = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    trm, trv = torch.zeros(3), torch.ones(3)
    y = bnorm.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-4)
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w), torch.from_numpy(b),
                                        training=True, momentum=0.2, eps=1e-4)
    close(y, yt, "float32")
    close(rm, trm, "float32")
    close(rv, trv, "float32")
    y = bnorm.functional.batch_norm(x, rm, rv, w, b)
    close(y, torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w),
                                            torch.from_numpy(b)), "float32")
    a = numpy_array(rng, (4, 3, 5), np.float32, False)
    y = bnorm.functional.fused_batch_norm(x, rm, rv, w, b, addend=a)
    ref = torch.relu(torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w),
                                                    torch.from_numpy(b)) + torch.from_numpy(a))
    close(y, ref, "float32")
    y = bnorm.functional.batch_norm(x, None, None, training=True)
    close(y, torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True), "float32")


def test_megengine_momentum_and_freeze(rng):
    """MegEngine's formulas: running = M * running + (1 - M) * batch (unbiased var); freeze normalizes with
    the running statistics in training mode, never updates them, and gives weight/bias no gradient."""
    x = numpy_array(rng, (6, 4, 3, 3), np.float64, False)
    bn = bnorm.megengine.BatchNorm2d(4, momentum=0.9, dtype=np.float64)
    bn(x)
    mean = x.mean(axis=(0, 2, 3))
    var_u = x.var(axis=(0, 2, 3), ddof=1)
    close(bn.running_mean, 0.1 * mean, "float64")
    close(bn.running_var, 0.9 + 0.1 * var_u, "float64")
    fz = bnorm.megengine.BatchNorm2d(4, freeze=True, dtype=np.float64)
    fz.running_mean[...] = rng.standard_normal(4)
    fz.running_var[...] = rng.random(4) + 0.5
    fz.weight[...] = rng.standard_normal(4)
    fz.bias[...] = rng.standard_normal(4)
    rm0, rv0 = fz.running_mean.copy(), fz.running_var.copy()
    y = fz(x)
    s = fz.weight / np.sqrt(fz.running_var + fz.eps)
    b = fz.bias - fz.running_mean * s
    close(y, x * s[None, :, None, None] + b[None, :, None, None], "float64")
    assert np.array_equal(fz.running_mean, rm0) and np.array_equal(fz.running_var, rv0)
    dy = numpy_array(rng, x.shape, np.float64, False)
    close(fz.backward(dy), dy * s[None, :, None, None], "float64")
    assert fz.weight.grad is None and fz.bias.grad is None
    with pytest.raises(ValueError):
        bnorm.megengine.BatchNorm2d(4, freeze=True, track_running_stats=False)


def test_grads_accumulate_and_zero_grad(rng):
    x = numpy_array(rng, (5, 3, 4), np.float64, False)
    dy = numpy_array(rng, x.shape, np.float64, False)
    bn = bnorm.nn.BatchNorm1d(3, dtype=np.float64)
    bn(x)
    bn.backward(dy)
    g1 = bn.weight.grad.copy()
    bn(x)
    bn.backward(dy)
    close(bn.weight.grad, 2 * g1, "float64")
    bn.zero_grad()
    assert bn.weight.grad is None


def test_state_dict_and_files(tmp_path, rng):
    bn = bnorm.oneflow.FusedBatchNorm2d(5, momentum=None)
    for _ in range(3):
        bn(numpy_array(rng, (4, 5, 3, 3), np.float32, True))
    bn.weight[...] = rng.standard_normal(5)
    bn.eps = 1e-3
    path = os.path.join(tmp_path, "bn.safetensors")
    bn.save(path, "layer1.bn.")
    other = bnorm.oneflow.FusedBatchNorm2d(5)
    other.load(path, "layer1.bn.")
    for k, v in bn.state_dict().items():
        assert np.array_equal(v, other.state_dict()[k]), k
    assert other.momentum is None and other.eps == 1e-3
    # torch state_dict names both ways, strict
    t = torch.nn.BatchNorm2d(5)
    t.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()}, strict=True)
    m = bnorm.megengine.BatchNorm2d(5)
    m.load_state_dict(t.state_dict())
    assert np.array_equal(m.running_var, bn.running_var)
    # MegEngine's (1, C, 1, 1) shapes
    m.load_state_dict({"weight": np.ones((1, 5, 1, 1)), "bias": np.zeros((1, 5, 1, 1)),
                       "running_mean": np.zeros((1, 5, 1, 1)), "running_var": np.ones((1, 5, 1, 1))})
    # a wrong prefix or a missing file: exceptions, state unchanged
    before = other.state_dict()
    with pytest.raises(ValueError):
        other.load(path, "nope.")
    with pytest.raises(OSError):
        other.load(os.path.join(tmp_path, "missing.safetensors"))
    with pytest.raises(KeyError):
        other.load_state_dict({"weight": np.ones(5)})
    with pytest.raises(ValueError):
        other.load_state_dict(dict(before, running_mean=np.zeros(4)))
    for k, v in before.items():
        assert np.array_equal(v, other.state_dict()[k]), k
