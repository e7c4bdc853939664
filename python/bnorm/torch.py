"""bnorm.torch: drop-in torch.nn batch-norm modules for CPU tensors, computed by bnorm.

    model = bnorm.torch.convert(model)        # every nn.BatchNorm*d / nn.SyncBatchNorm, in place
    bn = bnorm.torch.BatchNorm2d(64)          # subclass of torch.nn.BatchNorm2d: same arguments,
                                              # parameters, buffers, state_dict, train()/eval()
    y = bnorm.torch.FusedBatchNorm2d(64)(x, addend)   # ReLU(BN(x) + addend) in one pass

Gradients come from a torch.autograd.Function over bnorm_forward/bnorm_backward that saves per call
what its backward needs, so a module used twice in one graph is differentiated correctly. Inputs are
read in place when contiguous (torch.contiguous_format) or channels-last (channels_last,
channels_last_3d, or any rank whose strides put C innermost); other strides are copied once with
.contiguous(). float32, float64, float16 and bfloat16 inputs; float16/bfloat16 compute in float32 with
float32 parameters (parameters of another dtype are converted for the call). Tensors on other devices
(CUDA, meta) raise a ValueError: keep torch's modules for them.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.dlpack import to_dlpack as _to_dlpack

from . import _bnorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FusedBatchNorm1d", "FusedBatchNorm2d",
           "FusedBatchNorm3d", "SyncBatchNorm", "convert", "batch_norm", "torch_comm"]


def _is_channels_last(t):
    """C innermost, then the spatial dims in order, then N (dims of size 1 ignored)."""
    if t.dim() < 3:
        return False
    shape, stride = t.shape, t.stride()
    order = [1] + list(range(t.dim() - 1, 1, -1)) + [0]
    expect = 1
    for i in order:
        if shape[i] != 1 and stride[i] != expect:
            return False
        expect *= shape[i]
    return True


def _prepare(x):
    # no detach needed: autograd.Function.forward runs without grad recording, and the C call reads
    # the memory through to_dlpack, which (unlike tensor.__dlpack__) accepts tensors requiring grad.
    if x.is_contiguous() or _is_channels_last(x):
        return x
    return x.contiguous()


def _like(t, ref):
    """t with ref's exact strides (copied once when they differ)."""
    if t.stride() == ref.stride() and t.dtype == ref.dtype:
        return t
    out = torch.empty_like(ref)
    out.copy_(t)
    return out


def _dl(t):
    """The tensor as a DLPack capsule for the extension (a C call; tensor.__dlpack__ is Python code and
    cost more than the whole small-tensor batch norm)."""
    return None if t is None else _to_dlpack(t)


def _pdtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param(t, pdt):
    if t is None:
        return None
    return t if t.dtype == pdt else t.to(pdt)


def _forward(x, weight, bias, addend, running_mean, running_var, training, momentum, eps, relu, comm, save):
    """The forward of bnorm.torch: y, and with save what the backward needs (x as read, the parameters,
    the saved statistics, the mask), or None."""
    xd = _prepare(x)
    pdt = _pdtype(xd.dtype)
    c = xd.shape[1]
    w, b = _param(weight, pdt), _param(bias, pdt)
    ad = None if addend is None else _like(addend, xd)
    y = torch.empty_like(xd)
    cx = _dl(xd)
    mask = torch.empty(_bnorm.relu_mask_size(cx), dtype=torch.uint8) if relu and save else None
    if training:
        rm, rv = _param(running_mean, pdt), _param(running_var, pdt)
        mean = invstd = mean_lo = None
        if save:
            mean = torch.empty(c, dtype=pdt)
            invstd = torch.empty(c, dtype=pdt)
            mean_lo = torch.empty(c, dtype=pdt)  # the mean in full precision: hi + lo
        _bnorm.forward(cx, _dl(y), weight=_dl(w), bias=_dl(b), running_mean=_dl(rm), running_var=_dl(rv),
                       save_mean=_dl(mean), save_invstd=_dl(invstd), save_mean_lo=_dl(mean_lo), addend=_dl(ad),
                       relu_mask=_dl(mask), training=True, momentum=momentum, eps=eps, relu=relu, comm=comm)
        for buf, tmp in ((running_mean, rm), (running_var, rv)):
            if buf is not None and tmp is not buf and tmp.data_ptr() != buf.data_ptr():
                buf.copy_(tmp)
    else:
        mean_lo = None
        if save:
            mean = _param(running_mean, pdt).clone()
            invstd = _param(running_var, pdt).clone()  # the variance: the backward adds eps
        else:
            mean, invstd = _param(running_mean, pdt), _param(running_var, pdt)
        _bnorm.forward(cx, _dl(y), weight=_dl(w), bias=_dl(b), running_mean=_dl(mean),
                       running_var=_dl(invstd), addend=_dl(ad), relu_mask=_dl(mask), training=False, eps=eps,
                       relu=relu)
    return y, ((xd, w, mean, invstd, mask, mean_lo) if save else None)


def _needs_grad(*ts):
    """Whether autograd will differentiate through a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, addend, running_mean, running_var, training, momentum, eps, relu, comm):
        y, saved = _forward(x, weight, bias, addend, running_mean, running_var, training, momentum, eps, relu,
                            comm, True)
        ctx.global_stats = not training
        ctx.eps = eps
        ctx.comm = comm
        ctx.has_addend = addend is not None
        ctx.w_dtype = None if weight is None else weight.dtype
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xd, w, mean, stat, mask, mean_lo = ctx.saved_tensors
        need_x, need_w, need_b, need_a = ctx.needs_input_grad[:4]
        dyd = _like(dy, xd)
        pdt = _pdtype(xd.dtype)
        c = xd.shape[1]
        dx = torch.empty_like(xd) if need_x or ctx.comm is not None else None
        da = torch.empty_like(xd) if need_a and ctx.has_addend else None
        dw = torch.empty(c, dtype=pdt) if need_w else None
        db = torch.empty(c, dtype=pdt) if need_b else None
        if ctx.global_stats:
            _bnorm.backward(_dl(xd), _dl(dyd), dx=_dl(dx), weight=_dl(w), mean=_dl(mean), var=_dl(stat), eps=ctx.eps,
                            use_global_stats=True, relu_mask=_dl(mask), daddend=_dl(da), dweight=_dl(dw),
                            dbias=_dl(db))
        else:
            _bnorm.backward(_dl(xd), _dl(dyd), dx=_dl(dx), weight=_dl(w), mean=_dl(mean), mean_lo=_dl(mean_lo),
                            invstd=_dl(stat), relu_mask=_dl(mask), daddend=_dl(da), dweight=_dl(dw), dbias=_dl(db),
                            comm=ctx.comm)
        if dw is not None and ctx.w_dtype != pdt:
            dw = dw.to(ctx.w_dtype)
        if db is not None and ctx.w_dtype != pdt:
            db = db.to(ctx.w_dtype)
        return (dx if need_x else None), dw, db, da, None, None, None, None, None, None, None


def _check_device(t, who):
    if t.device.type != "cpu":
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
                        float(eps), bool(relu), comm, False)[0]
    return _Function.apply(input, weight, bias, addend, running_mean, running_var, bool(training),
                           float(momentum), float(eps), bool(relu), comm)


class _Mixin:
    """forward() of torch's _BatchNorm, computed by bnorm; fused when _relu."""

    _relu = False

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
        _check_device(input, type(self).__name__)
        self._check_input_dim(input)
        eaf = 0.0 if self.momentum is None else self.momentum
        counting = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if counting:
            n = int(self.num_batches_tracked) + 1
            eaf = 1.0 / n if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        rm = self.running_mean if track else None
        rv = self.running_var if track else None
        comm = self._bnorm_comm() if bn_training else None
        w, b = self.weight, self.bias
        if _needs_grad(input, w, b, addend):
            y = _Function.apply(input, w, b, addend, rm, rv, bn_training, float(eaf), float(self.eps), bool(relu), comm)
        else:  # inference under no_grad, frozen parameters and input: no graph, nothing saved
            y = _forward(input, w, b, addend, rm, rv, bn_training, float(eaf), float(self.eps), bool(relu), comm,
                         False)[0]
        if counting:
            self.num_batches_tracked.add_(1)
        return y


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
