"""bnorm.torch's native backward node (bnorm._autograd) against the Python autograd.Function: the same
bits, and autograd's own rules (saved tensors modified in place, a second backward, create_graph,
gradients asked for only some inputs, dtype conversions)."""
import os

import pytest
import torch
from torch import nn

import bnorm.torch as bt
from conftest import close

if bt._native is None:
    if os.environ.get("BNORM_REQUIRE_NATIVE") == "1":  # scripts/test.sh installs libtorch-dev: it must be built
        raise RuntimeError("BNORM_REQUIRE_NATIVE=1 but bnorm._autograd was not built")
    pytest.skip("bnorm._autograd not built (no libtorch-dev / pybind11-dev)", allow_module_level=True)


def layout(t, cl):
    if not cl:
        return t.contiguous()
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.transpose(1, -1).contiguous().transpose(1, -1)


def run(native, monkeypatch, mod, x, dy, addend=None):
    """Forward + backward with the chosen path; the gradients of x, addend and the parameters."""
    monkeypatch.setattr(bt, "_native", native)
    x = x.detach().clone().requires_grad_()
    a = None if addend is None else addend.detach().clone().requires_grad_()
    mod.zero_grad(set_to_none=True)
    y = mod(x, a) if a is not None else mod(x)
    y.backward(dy)
    return (y.detach(), x.grad, None if a is None else a.grad,
            None if mod.weight is None else mod.weight.grad, None if mod.bias is None else mod.bias.grad,
            mod.running_mean.clone() if mod.running_mean is not None else None)


@pytest.mark.parametrize("case", range(16))
def test_same_bits_as_function(case, monkeypatch):
    native = bt._native
    gen = torch.Generator().manual_seed(100 + case)
    rank = 2 + case % 4
    shape = [(17, 5), (6, 7, 9), (4, 8, 5, 3), (3, 6, 2, 3, 4)][rank - 2]
    dtype = [torch.float32, torch.float64, torch.float16, torch.bfloat16][(case // 4) % 4]
    cl = case % 2 == 1
    fused = case % 3 == 0 and rank == 4
    training = case % 5 != 4
    cls = {2: bt.BatchNorm1d, 3: bt.BatchNorm1d, 4: bt.FusedBatchNorm2d if fused else bt.BatchNorm2d,
           5: bt.BatchNorm3d}[rank]
    x = layout(torch.randn(shape, generator=gen) * 3 + 1, cl).to(dtype)
    dy = layout(torch.randn(shape, generator=gen), not cl).to(dtype)  # the other layout: copied into x's
    a = layout(torch.randn(shape, generator=gen), cl).to(dtype) if fused else None
    out = []
    for path in (native, None):
        torch.manual_seed(0)
        mod = cls(shape[1], momentum=None if case % 3 == 2 else 0.1)
        with torch.no_grad():
            mod.weight.normal_(generator=torch.Generator().manual_seed(case))
            mod.bias.normal_(generator=torch.Generator().manual_seed(case + 1))
        mod.train(training)
        out.append(run(path, monkeypatch, mod, x, dy, a))
    for i, (p, q) in enumerate(zip(*out)):
        assert (p is None) == (q is None), i
        if p is not None:
            assert p.dtype == q.dtype and p.shape == q.shape and p.stride() == q.stride(), i
            assert torch.equal(p, q), "output %d differs between the native node and the Function" % i


def test_node_and_saved_tensor_rules():
    m = bt.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = m(x)
    assert y.grad_fn.name() == "BnormBackward"
    # x modified in place after the forward: autograd refuses, as with torch's own modules
    x2 = torch.randn(4, 3, 5, 5).requires_grad_()
    h = x2 * 1.0
    y2 = m(h)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y2.sum().backward()
    # a second backward without retain_graph: the saved tensors were released
    y.sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()
    # with retain_graph, gradients accumulate
    x3 = torch.randn(4, 3, 5, 5, requires_grad=True)
    y3 = m(x3)
    g = torch.randn_like(y3)
    y3.backward(g, retain_graph=True)
    first = x3.grad.clone()
    y3.backward(g)
    close(x3.grad, 2 * first, "float32")


def test_double_backward_raises():
    m = bt.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad((m(x) ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        gx.sum().backward()


def test_gradients_for_some_inputs_only():
    m = bt.BatchNorm2d(3)
    r = nn.BatchNorm2d(3)
    r.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).pow(2).sum(), x)
    (gr,) = torch.autograd.grad(r(x).pow(2).sum(), x)
    close(gx, gr, "float32", 10)
    assert m.weight.grad is None and m.bias.grad is None
    (gw,) = torch.autograd.grad(m(x).pow(2).sum(), m.weight)
    (grw,) = torch.autograd.grad(r(x).pow(2).sum(), r.weight)
    close(gw, grw, "float32", 10)
    assert x.grad is None


def test_inplace_relu_after_and_parameter_dtype():
    """nn.ReLU(inplace=True) on the output (the usual conv-BN-ReLU), and float64 parameters for float32 data:
    the gradients come back in the parameters' dtype."""
    m = bt.BatchNorm2d(4)
    m.weight.data = m.weight.data.double().normal_()
    m.bias.data = m.bias.data.double()
    r = nn.BatchNorm2d(4)
    with torch.no_grad():
        r.weight.copy_(m.weight)
    x = torch.randn(5, 4, 3, 3, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    torch.relu_(m(x)).sum().backward()
    torch.relu_(r(xr)).sum().backward()
    assert m.weight.grad.dtype == torch.float64 and m.bias.grad.dtype == torch.float64
    close(x.grad, xr.grad, "float32", 10)
    close(m.weight.grad, r.weight.grad, "float32", 10)
    close(m.bias.grad, r.bias.grad, "float32", 10)
