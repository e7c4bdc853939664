"""Bad input: clear exceptions, and nothing changed."""
import numpy as np
import pytest
import torch

import bnorm
import bnorm.torch as bt
from bnorm import _bnorm


def snapshot(bn):
    return {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}


def unchanged(bn, before):
    after = bn.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert np.array_equal(before[k], after[k]), k


@pytest.fixture
def bn():
    m = bnorm.nn.BatchNorm2d(3)
    m(np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32))
    return m


def test_wrong_dtype(bn):
    before = snapshot(bn)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        bn(np.zeros((2, 3, 2, 2), np.int32))
    with pytest.raises(TypeError, match="weight must be float64"):
        bn(np.zeros((2, 3, 2, 2), np.float64))  # float32 parameters with float64 data
    unchanged(bn, before)


def test_wrong_channels(bn):
    before = snapshot(bn)
    with pytest.raises(ValueError, match="C = 4"):
        bn(np.zeros((2, 4, 2, 2), np.float32))
    unchanged(bn, before)


def test_wrong_rank(bn):
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="rank 2 to 8"):
        bnorm.functional.batch_norm(np.zeros(3, np.float32), None, None, training=True)


def test_non_contiguous(bn):
    before = snapshot(bn)
    x = np.zeros((2, 3, 4, 4), np.float32)[:, :, ::2, :]
    with pytest.raises(ValueError, match="not contiguous"):
        bn(x)
    unchanged(bn, before)
    with pytest.raises(ValueError, match="not contiguous"):
        _bnorm.forward(np.zeros((3, 2), np.float32).T, np.zeros((2, 3), np.float32), training=True)


def test_read_only_buffers():
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean is read-only"):
        bnorm.functional.batch_norm(x, rm, rv, training=True)
    assert np.array_equal(rv, np.ones(3))
    # read only is fine where nothing is written (inference statistics, inputs)
    x.flags.writeable = False
    bnorm.functional.batch_norm(x, rm, rv)
    y = np.zeros_like(x)
    y.flags.writeable = False
    with pytest.raises(ValueError, match="y is read-only"):
        _bnorm.forward(x, y, running_mean=rm, running_var=rv)


def test_batch_too_small_keeps_state(bn):
    before = snapshot(bn)
    with pytest.raises(ValueError, match="more than 1 value per channel|BATCH|1 value"):
        bn(np.ones((1, 3, 1, 1), np.float32))
    unchanged(bn, before)
    t = bt.BatchNorm2d(3)
    with pytest.raises(ValueError):
        t(torch.ones(1, 3, 1, 1))
    assert int(t.num_batches_tracked) == 0 and torch.equal(t.running_var, torch.ones(3))


def test_bad_options():
    with pytest.raises(ValueError, match="eps"):
        bnorm.functional.batch_norm(np.ones((4, 3), np.float32), None, None, training=True, eps=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        bnorm.functional.batch_norm(np.ones((4, 3), np.float32), np.zeros(3, np.float32), np.ones(3, np.float32),
                                    training=True, momentum=2.0)
    with pytest.raises(TypeError, match="numpy array or a CPU torch tensor"):
        _bnorm.forward([[1.0, 2.0]], np.zeros((1, 2), np.float32))


class FakeCuda:
    """Looks like a CUDA tensor to DLPack consumers."""

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):
        raise AssertionError("must not be exported")


def test_cuda_tensors_refused():
    with pytest.raises(ValueError, match="not on the CPU"):
        _bnorm.forward(FakeCuda(), np.zeros((2, 2), np.float32))
    m = bt.BatchNorm2d(3)
    with pytest.raises(ValueError, match="CPU tensors only"):
        m(torch.empty(2, 3, 4, 4, device="meta"))
    assert int(m.num_batches_tracked) == 0


def test_torch_wrong_input_keeps_state():
    m = bt.BatchNorm2d(3)
    m(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError):
        m(torch.randn(4, 5, 2, 2))
    with pytest.raises(TypeError):
        m(torch.zeros(4, 3, 2, 2, dtype=torch.int64))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_backward_without_forward():
    with pytest.raises(RuntimeError, match="no forward"):
        bnorm.nn.BatchNorm1d(2).backward(np.zeros((2, 2), np.float32))


def test_allgather_exception_becomes_runtime_error(bn):
    before = snapshot(bn)

    def broken(send):
        raise KeyError("network down")

    bn._comm = (0, 2, broken, False)
    with pytest.raises(RuntimeError, match="network down") as e:
        bn(np.zeros((4, 3, 2, 2), np.float32))
    assert isinstance(e.value.__cause__, KeyError)
    unchanged(bn, before)
    bn._comm = (0, 2, lambda send: b"short", False)
    with pytest.raises(RuntimeError, match="returned 5 bytes"):
        bn(np.zeros((4, 3, 2, 2), np.float32))
    unchanged(bn, before)


def test_relu_mask_too_small_forward_and_backward():
    """A ReLU mask smaller than relu_mask_size(x) is refused by both calls, with the size it needs."""
    x = np.random.default_rng(0).random((4, 3, 5, 5)).astype(np.float32)
    y = np.empty_like(x)
    small = np.zeros(2, np.uint8)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="relu_mask must be a contiguous buffer of at least 48 bytes"):
        _bnorm.forward(x, y, running_mean=rm, running_var=rv, training=True, relu=True, relu_mask=small)
    with pytest.raises(ValueError, match="relu_mask must be a contiguous buffer of at least 48 bytes"):
        _bnorm.backward(x, x, dx=y, mean=rm, invstd=rv, relu_mask=small)
