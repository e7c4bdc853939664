"""bnorm.torch: drop-in torch.nn batch-norm modules for CPU tensors, computed by bnorm.

    model = bnorm.torch.convert(model)        # every nn.BatchNorm*d / nn.SyncBatchNorm, in place
    bn = bnorm.torch.BatchNorm2d(64)          # subclass of torch.nn.BatchNorm2d: same arguments,
                                              # parameters, buffers, state_dict, train()/eval()
    y = bnorm.torch.FusedBatchNorm2d(64)(x, addend)   # ReLU(BN(x) + addend) in one pass

Gradients: each call that autograd will differentiate saves what its backward needs, so a module used
twice in one graph is differentiated correctly. Where the package was built with torch's C++ headers
(Debian's libtorch-dev and pybind11-dev), the backward is a native autograd node (bnorm._autograd:
BnormBackward, as torch's own modules have); elsewhere, and for synchronized calls, a
torch.autograd.Function written in Python (about 8 us more a backward). BNORM_TORCH_NATIVE=0 in the
environment selects the Function everywhere. Inputs are
read in place when contiguous (torch.contiguous_format) or channels-last (channels_last,
channels_last_3d, or any rank whose strides put C innermost); other strides are copied once with
.contiguous(). float32, float64, float16 and bfloat16 inputs; float16/bfloat16 compute in float32 with
float32 parameters (parameters of another dtype are converted for the call). Tensors on other devices
(CUDA, meta) raise a ValueError: keep torch's modules for them.
"""
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from . import _bnorm

try:
    from . import _autograd as _native
except ImportError:  # built without torch's C++ headers
    _native = None
if os.environ.get("BNORM_TORCH_NATIVE", "auto") == "0":
    _native = None

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FusedBatchNorm1d", "FusedBatchNorm2d",
           "FusedBatchNorm3d", "SyncBatchNorm", "convert", "batch_norm", "torch_comm"]


_bnorm.register_torch(torch.Tensor, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64)
# From here on the extension reads torch tensors through data_ptr(), shape, stride() and dtype (about
# 0.1 us a tensor; a DLPack export cost 0.45 us), tensors requiring grad included.


def _like(t, ref):
    """t with ref's exact strides and dtype (copied once when they differ)."""
    if t.dtype == ref.dtype and t.stride() == ref.stride():
        return t
    out = torch.empty_like(ref)
    out.copy_(t.detach())
    return out


def _forward(x, weight, bias, addend, running_mean, running_var, training, momentum, eps, relu, comm, nbt,
             save):
    """The forward of bnorm.torch: y, and with save what the backward needs (x as read, the weight, the
    saved statistics packed in one tensor, the ReLU mask), or None. nbt: num_batches_tracked or None;
    the C call counts it after a successful training call, and momentum None means 1 / (nbt + 1)."""
    # conversions detach: the caller's graph (the Function's or the native node) differentiates the call
    xd = x if x.is_contiguous() or _bnorm.is_dense(x) else x.detach().contiguous()
    pdt = torch.float64 if xd.dtype == torch.float64 else torch.float32
    w = weight if weight is None or weight.dtype == pdt else weight.detach().to(pdt)
    b = bias if bias is None or bias.dtype == pdt else bias.detach().to(pdt)
    rm = running_mean if running_mean is None or running_mean.dtype == pdt else running_mean.to(pdt)
    rv = running_var if running_var is None or running_var.dtype == pdt else running_var.to(pdt)
    ad = None if addend is None else _like(addend, xd)
    y = torch.empty_like(xd)
    mask = torch.empty(_bnorm.relu_mask_size(xd), dtype=torch.uint8) if relu and save else None
    if training:
        # saved: mean (hi), invstd, mean (lo): the mean in full precision is hi + lo
        sv = torch.empty(3 * xd.shape[1], dtype=pdt) if save else None
        _bnorm.forward_fast(xd, y, w, b, rm, rv, sv, ad, mask, True, momentum, eps, relu, comm, nbt)
        if rm is not running_mean:
            running_mean.copy_(rm)
        if rv is not running_var:
            running_var.copy_(rv)
    else:
        sv = torch.cat((rm, rv)) if save else None  # saved: mean, var (the backward adds eps)
        _bnorm.forward_fast(xd, y, w, b, rm, rv, None, ad, mask, False, 0.0, eps, relu, None, None)
    return y, ((xd, w, sv, mask) if save else None)


def _needs_grad(x, w, b, a):
    """Whether autograd will differentiate through a call on these tensors."""
    return torch.is_grad_enabled() and (x.requires_grad or (w is not None and w.requires_grad) or
                                        (b is not None and b.requires_grad) or (a is not None and a.requires_grad))


def _backward(ctx, dy):
    xd, w = ctx.saved_tensors
    sv, mask, global_stats, eps, comm, has_addend, w_dtype = ctx.bnorm
    need_x, need_w, need_b, need_a = ctx.needs_input_grad[:4]
    dyd = _like(dy, xd)
    pdt = sv.dtype
    c = xd.shape[1]
    dx = torch.empty_like(xd) if need_x or comm is not None else None
    da = torch.empty_like(xd) if need_a and has_addend else None
    if w is not None:  # the weight as the call read it: C values of the parameter dtype (empty_like is cheaper)
        dw = torch.empty_like(w) if need_w else None
        db = torch.empty_like(w) if need_b else None
    else:
        dw = None
        db = torch.empty(c, dtype=pdt) if need_b else None
    _bnorm.backward_fast(xd, dyd, dx, w, sv, mask, da, dw, db, global_stats, eps, comm)
    if w_dtype is not None and w_dtype != pdt:
        dw = None if dw is None else dw.to(w_dtype)
        db = None if db is None else db.to(w_dtype)
    return (dx if need_x else None), dw, db, da, None, None, None, None, None, None, None, None


_backward_once = once_differentiable(_backward)


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, addend, running_mean, running_var, training, momentum, eps, relu, comm, nbt):
        y, (xd, w, sv, mask) = _forward(x, weight, bias, addend, running_mean, running_var, training, momentum, eps,
                                        relu, comm, nbt, True)
        # x and the weight through save_for_backward (autograd checks they are not modified in place before the
        # backward); the statistics and the mask are this call's own
        ctx.save_for_backward(xd, w)
        ctx.bnorm = (sv, mask, not training, eps, comm, addend is not None, None if weight is None else weight.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: once_differentiable makes a second backward raise
            return _backward_once(ctx, dy)
        return _backward(ctx, dy)


def _apply(x, weight, bias, addend, running_mean, running_var, training, momentum, eps, relu, comm, nbt):
    """The forward with a graph for autograd: a native BnormBackward node on y where bnorm._autograd is
    built and the call is not synchronized, else the Python Function."""
    if _native is None or comm is not None:
        return _Function.apply(x, weight, bias, addend, running_mean, running_var, training, momentum, eps, relu,
                               comm, nbt)
    y, (xd, w, sv, mask) = _forward(x, weight, bias, addend, running_mean, running_var, training, momentum, eps,
                                    relu, None, nbt, True)
    _native.attach(y, x, weight, bias, addend, xd, w, sv, mask, not training, eps)
    return y


def _check_device(t, who):
    if not t.is_cpu:
        raise ValueError("%s: bnorm computes on CPU tensors only, got a tensor on '%s'; keep torch's own module "
                         "for that device (do not convert it)" % (who, t.device.type))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, addend=None, relu=False, comm=None):
    """torch.nn.functional.batch_norm on CPU tensors with autograd, plus the fused ReLU(BN(x) + addend)
    (relu=True, addend optional) and a bnorm communicator (comm, training only)."""
    _check_device(input, "bnorm.torch.batch_norm")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("bnorm.torch.batch_norm: running_mean and running_var are required when training=False")
    if not _needs_grad(input, weight, bias, addend):  # nothing to differentiate: no graph, nothing saved
        return _forward(input, weight, bias, addend, running_mean, running_var, bool(training), float(momentum),
                        float(eps), bool(relu), comm, None, False)[0]
    return _apply(input, weight, bias, addend, running_mean, running_var, bool(training), float(momentum),
                  float(eps), bool(relu), comm, None)


class _Mixin:
    """forward() of torch's _BatchNorm, computed by bnorm; fused when _relu."""

    _relu = False
    _sync = False

    def _bnorm_comm(self):
        return None

    def forward(self, input, addend=None):
        if addend is not None and not self._relu:
            raise TypeError("%s.forward: addend is accepted by the Fused classes only (or use "
                            "forward_add_relu)" % type(self).__name__)
        return self._run(input, addend, self._relu)

    def forward_add_relu(self, input, addend=None):
        """ReLU(self(input) + addend) in one pass (the end of a residual block)."""
        return self._run(input, addend, True)

    def _run(self, input, addend, relu):
        if not input.is_cpu:
            _check_device(input, type(self).__name__)
        self._check_input_dim(input)
        # parameters and buffers straight from their dicts (nn.Module.__getattr__ costs about 0.3 us a name);
        # through the attribute where something else (a parametrization) provides them
        p, bufs = self._parameters, self._buffers
        w = p["weight"] if "weight" in p else self.weight
        b = p["bias"] if "bias" in p else self.bias
        rm = bufs["running_mean"] if "running_mean" in bufs else self.running_mean
        rv = bufs["running_var"] if "running_var" in bufs else self.running_var
        training = self.training
        bn_training = training or (rm is None and rv is None)
        nbt = None
        if training:
            if self.track_running_stats:  # counted by the C call once it succeeded (torch's add_(1))
                nbt = bufs["num_batches_tracked"] if "num_batches_tracked" in bufs else self.num_batches_tracked
            else:
                rm = rv = None
        comm = self._bnorm_comm() if bn_training and self._sync else None
        if _needs_grad(input, w, b, addend):
            return _apply(input, w, b, addend, rm, rv, bn_training, self.momentum, self.eps, relu, comm, nbt)
        # inference under no_grad, frozen parameters and input: no graph, nothing saved
        return _forward(input, w, b, addend, rm, rv, bn_training, self.momentum, self.eps, relu, comm, nbt,
                        False)[0]


class BatchNorm1d(_Mixin, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by bnorm."""


class BatchNorm2d(_Mixin, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by bnorm."""


class BatchNorm3d(_Mixin, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by bnorm."""


class FusedBatchNorm1d(BatchNorm1d):
    """OneFlow nn.FusedBatchNorm1d: forward(x, addend=None) = ReLU(BN(x) + addend)."""
    _relu = True


class FusedBatchNorm2d(BatchNorm2d):
    """OneFlow nn.FusedBatchNorm2d: forward(x, addend=None) = ReLU(BN(x) + addend)."""
    _relu = True


class FusedBatchNorm3d(BatchNorm3d):
    """OneFlow nn.FusedBatchNorm3d: forward(x, addend=None) = ReLU(BN(x) + addend)."""
    _relu = True


def torch_comm(process_group=None, validate=True):
    """A bnorm communicator over torch.distributed (any CPU backend: gloo). One all_gather per call
    (validate adds a small one that makes a process with a different C raise on every rank)."""
    group = process_group if process_group is not None else dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)

    def allgather(send):
        t = torch.frombuffer(bytearray(send), dtype=torch.float64)
        outs = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(outs, t, group=group)
        return torch.cat(outs).numpy()

    return (rank, size, allgather, bool(validate))


class SyncBatchNorm(_Mixin, nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm for CPU tensors (torch's refuses them): training statistics over every
    process of process_group (default: the whole world) through torch.distributed (gloo). Every process
    must call forward and backward, also with an empty local batch. Outside torch.distributed, or in
    eval mode, it is a plain BatchNorm. Weight/bias gradients stay local, as torch's (DDP averages
    them). bnorm_validate=False drops the small extra all-gather that turns a C mismatch into an error."""

    bnorm_validate = True
    _sync = True

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError("expected at least 2D input (got {}D input)".format(input.dim()))

    def _bnorm_comm(self):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return None
        key = (id(group), self.bnorm_validate)
        cached = getattr(self, "_bnorm_comm_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, torch_comm(group, self.bnorm_validate))
            self._bnorm_comm_cache = cached
        return cached[1]

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm, producing bnorm.torch.SyncBatchNorm."""
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group)
            _move_state(module, out)
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return out


def _move_state(old, new):
    """The new module takes the old one's parameters and buffers (the same objects, so optimizers that
    hold them keep working) and its training flag."""
    if old.affine:
        with torch.no_grad():
            new.weight = old.weight
            new.bias = old.bias
    new.running_mean = old.running_mean
    new.running_var = old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    new.training = old.training
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig


_CONVERT = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def convert(model, sync=None):
    """Replaces, in place, every torch.nn.BatchNorm1d/2d/3d of model by bnorm's module (and every
    torch.nn.SyncBatchNorm by bnorm.torch.SyncBatchNorm), keeping parameters (the same Parameter objects),
    buffers and the training flag. Returns model (or the replacement when model itself is a BN)."""
    def replace(m):
        t = type(m)
        if t in _CONVERT:
            new = _CONVERT[t](m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        elif t is nn.SyncBatchNorm:
            new = SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                m.process_group)
        else:
            return None
        _move_state(m, new)
        return new

    top = replace(model)
    if top is not None:
        return top
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            new = replace(child)
            if new is not None:
                setattr(parent, name, new)
    return model
