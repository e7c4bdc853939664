"""bnorm.nn: batch-norm modules on numpy arrays (no autograd: forward() then backward()).

    bn = bnorm.nn.BatchNorm2d(64)            # PyTorch's arguments and defaults
    y = bn.forward(x)                         # or bn(x); training mode by default
    dx = bn.backward(dy)                      # backward of the last forward; grads ACCUMULATE into
    bn.weight.grad, bn.bias.grad              # .weight.grad / .bias.grad (zero_grad() clears them)

Parameters and buffers carry PyTorch's names (weight, bias, running_mean, running_var,
num_batches_tracked) in state_dict()/load_state_dict(); save()/load() use the library's safetensors
files. A call that raises leaves every array, statistic and counter as it was.
"""
import numpy as np

from . import _bnorm
from .functional import param_dtype

__all__ = ["Parameter", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FusedBatchNorm1d",
           "FusedBatchNorm2d", "FusedBatchNorm3d", "SyncBatchNorm", "mpi_comm"]


class Parameter(np.ndarray):
    """A numpy array with a .grad attribute (the accumulated gradient, or None)."""

    def __new__(cls, data):
        obj = np.array(data, copy=True).view(cls)
        obj.grad = None
        return obj

    def __array_finalize__(self, obj):
        self.grad = None


def mpi_comm(comm, validate=True):
    """A bnorm communicator over an mpi4py communicator (one Allgather of doubles per call)."""
    rank, size = comm.Get_rank(), comm.Get_size()

    def allgather(send):
        s = np.frombuffer(send, dtype=np.float64)
        r = np.empty(size * s.size, dtype=np.float64)
        comm.Allgather(s, r)
        return r

    return (rank, size, allgather, bool(validate))


class BatchNorm:
    """Batch norm over dimension 1 of inputs of any rank 2..8 (the base of the named classes).

    momentum: weight of the new batch (PyTorch), None for the cumulative average over
    num_batches_tracked. dtype: the parameter dtype (float32 for float32/float16 data, float64 for
    float64 data)."""

    _ranks = None          # accepted input ranks (None: any)
    _fused = False         # OneFlow FusedBatchNorm: y = ReLU(BN(x) + addend)
    _kept_weight = False   # MegEngine: momentum is the weight of the OLD value
    _comm = None

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype=np.float32):
        if int(num_features) < 1:
            raise ValueError("num_features must be >= 1, got %r" % (num_features,))
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.freeze = False
        self.training = True
        self._dtype = np.dtype(dtype)
        if self._dtype not in (np.float32, np.float64):
            raise TypeError("dtype must be float32 or float64 (the parameter dtype), got %s" % self._dtype)
        c = self.num_features
        self.weight = Parameter(np.ones(c, self._dtype)) if self.affine else None
        self.bias = Parameter(np.zeros(c, self._dtype)) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, self._dtype)
            self.running_var = np.ones(c, self._dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._saved = None

    # --- modes, parameters ---------------------------------------------------------------------
    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        return [p for p in (self.weight, self.bias) if p is not None]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0

    def to(self, dtype):
        """Converts parameters and statistics to another parameter dtype (float32 or float64)."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError("dtype must be float32 or float64, got %s" % dtype)
        for name in ("weight", "bias"):
            p = getattr(self, name)
            if p is not None:
                q = Parameter(p.astype(dtype))
                q.grad = None if p.grad is None else p.grad.astype(dtype)
                setattr(self, name, q)
        if self.track_running_stats:
            self.running_mean = self.running_mean.astype(dtype)
            self.running_var = self.running_var.astype(dtype)
        self._dtype = dtype
        return self

    def double(self):
        return self.to(np.float64)

    def float(self):
        return self.to(np.float32)

    def extra_repr(self):
        return "%d, eps=%s, momentum=%s, affine=%s, track_running_stats=%s" % (
            self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats)

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, self.extra_repr())

    # --- compute ----------------------------------------------------------------------------------
    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            raise TypeError("%s: input must be a numpy array, got %s" % (type(self).__name__, type(x).__name__))
        if self._ranks is not None and x.ndim not in self._ranks:
            raise ValueError("%s: expected %s input (got %dD input)" % (
                type(self).__name__, " or ".join("%dD" % r for r in self._ranks), x.ndim))

    def _alpha(self, nbt):
        """The weight of the new batch for this training step (nbt: the counter after it)."""
        if self.momentum is None:
            if self._kept_weight:
                raise ValueError("%s: momentum=None is not supported by this convention" % type(self).__name__)
            return 1.0 / nbt
        m = float(self.momentum)
        return 1.0 - m if self._kept_weight else m

    def forward(self, x, addend=None):
        """y = BN(x) (fused classes: ReLU(BN(x) + addend)). Keeps what backward() needs."""
        self._check_input(x)
        if addend is not None and not self._fused:
            raise TypeError("%s.forward: addend is only accepted by the Fused classes" % type(self).__name__)
        track = self.track_running_stats
        frozen = self.freeze
        update = self.training and track and not frozen
        nbt = self.num_batches_tracked + 1 if update else self.num_batches_tracked
        use_running = track and (frozen or not self.training)
        y = np.empty_like(x, order="K")
        c = self.num_features
        pdt = param_dtype(x.dtype)
        w = None if self.weight is None else np.array(self.weight, copy=True)
        b = None if self.bias is None else self.bias
        mask = np.empty(_bnorm.relu_mask_size(x), np.uint8) if self._fused else None
        comm = self._comm if (self._comm is not None and not use_running) else None
        if use_running:
            _bnorm.forward(x, y, weight=w, bias=b, running_mean=self.running_mean, running_var=self.running_var,
                           addend=addend, relu_mask=mask, relu=self._fused, training=False, eps=float(self.eps))
            saved = dict(mean=np.array(self.running_mean, copy=True), var=np.array(self.running_var, copy=True),
                         eps=float(self.eps), use_global_stats=True)
        else:
            save_mean = np.empty(c, pdt)
            save_invstd = np.empty(c, pdt)
            save_mean_lo = np.empty(c, pdt)  # the mean in full precision: hi + lo
            _bnorm.forward(x, y, weight=w, bias=b, running_mean=self.running_mean if update else None,
                           running_var=self.running_var if update else None, save_mean=save_mean,
                           save_invstd=save_invstd, save_mean_lo=save_mean_lo, addend=addend, relu_mask=mask,
                           relu=self._fused, training=True, momentum=self._alpha(nbt) if update else 0.0,
                           eps=float(self.eps), comm=comm)
            saved = dict(mean=save_mean, mean_lo=save_mean_lo, invstd=save_invstd, use_global_stats=False)
        if update:
            self.num_batches_tracked = nbt
        saved.update(x=x, weight=w, mask=mask, has_addend=addend is not None, comm=comm, frozen=frozen)
        self._saved = saved
        return y

    __call__ = forward

    def backward(self, dy):
        """Backward of the last forward: returns dx (fused with an addend: (dx, d_addend)).
        weight.grad and bias.grad accumulate (none with freeze or affine=False)."""
        s = self._saved
        if s is None:
            raise RuntimeError("%s.backward: no forward to differentiate" % type(self).__name__)
        x = s["x"]
        if not isinstance(dy, np.ndarray):
            raise TypeError("%s.backward: dy must be a numpy array" % type(self).__name__)
        dx = np.empty_like(x, order="K")
        dadd = np.empty_like(x, order="K") if s["has_addend"] else None
        want_grads = self.affine and not s["frozen"]
        c = self.num_features
        pdt = param_dtype(x.dtype)
        dw = np.empty(c, pdt) if want_grads else None
        db = np.empty(c, pdt) if want_grads else None
        if s["use_global_stats"]:
            _bnorm.backward(x, dy, dx=dx, weight=s["weight"], mean=s["mean"], var=s["var"], eps=s["eps"],
                            use_global_stats=True, relu_mask=s["mask"], daddend=dadd, dweight=dw, dbias=db)
        else:
            _bnorm.backward(x, dy, dx=dx, weight=s["weight"], mean=s["mean"], mean_lo=s["mean_lo"],
                            invstd=s["invstd"], relu_mask=s["mask"], daddend=dadd, dweight=dw, dbias=db,
                            comm=s["comm"])
        if want_grads:
            for p, g in ((self.weight, dw), (self.bias, db)):
                p.grad = g.astype(p.dtype) if p.grad is None else p.grad + g
        return (dx, dadd) if s["has_addend"] else dx

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self, prefix=""):
        """PyTorch's names; copies."""
        d = {}
        if self.affine:
            d[prefix + "weight"] = np.array(self.weight)
            d[prefix + "bias"] = np.array(self.bias)
        if self.track_running_stats:
            d[prefix + "running_mean"] = self.running_mean.copy()
            d[prefix + "running_var"] = self.running_var.copy()
            d[prefix + "num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return d

    def load_state_dict(self, state_dict, strict=True, prefix=""):
        """Loads PyTorch-named arrays (torch tensors are accepted too). Per-channel arrays of shape (C,) or
        (1, C, 1, ...) (MegEngine); everything is checked before anything changes."""
        names = (["weight", "bias"] if self.affine else []) + (
            ["running_mean", "running_var", "num_batches_tracked"] if self.track_running_stats else [])
        keys = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
        missing = [n for n in names if n not in keys and n != "num_batches_tracked"]
        unexpected = sorted(keys - set(names))
        if strict and (missing or unexpected):
            raise KeyError("%s.load_state_dict: missing keys %s, unexpected keys %s" % (
                type(self).__name__, missing, unexpected))
        new = {}
        for n in names:
            if n not in keys:
                continue
            v = state_dict[prefix + n]
            if hasattr(v, "detach"):
                v = v.detach().cpu().numpy()
            v = np.asarray(v)
            if n == "num_batches_tracked":
                if v.size != 1:
                    raise ValueError("num_batches_tracked must hold one integer, got shape %s" % (v.shape,))
                new[n] = int(v.reshape(()))
                continue
            if v.size != self.num_features or any(s != 1 for i, s in enumerate(v.shape)
                                                  if i != (1 if v.ndim > 1 else 0)):
                raise ValueError("%s.load_state_dict: %s has shape %s, expected (%d,)" % (
                    type(self).__name__, n, v.shape, self.num_features))
            new[n] = v.reshape(self.num_features).astype(self._dtype)
        for n, v in new.items():
            if n == "num_batches_tracked":
                self.num_batches_tracked = v
            else:
                getattr(self, n)[...] = v
        return missing, unexpected

    def _options(self):
        mode = "cumulative" if self.momentum is None else ("kept_weight" if self._kept_weight else "new_weight")
        return {"num_features": self.num_features, "float64": self._dtype == np.float64, "eps": float(self.eps),
                "momentum": 0.1 if self.momentum is None else float(self.momentum), "momentum_mode": mode,
                "affine": self.affine, "track_running_stats": self.track_running_stats,
                "freeze": bool(self.freeze), "fused_relu": self._fused}

    def save(self, path, prefix=""):
        """Writes the state to a safetensors file (PyTorch names under prefix; atomic replace)."""
        _bnorm.save_state(str(path), prefix, self._options(), self.weight, self.bias, self.running_mean,
                          self.running_var, int(self.num_batches_tracked or 0))

    def load(self, path, prefix=""):
        """Reads the state saved under prefix (by save(), the C library or a torch checkpoint converted to
        safetensors). eps, momentum and freeze follow the file when bnorm wrote it."""
        arrays = [None if a is None else np.array(a, copy=True)
                  for a in (self.weight, self.bias, self.running_mean, self.running_var)]
        opts, nbt = _bnorm.load_state(str(path), prefix, self._options(), *arrays)
        for name, a in zip(("weight", "bias", "running_mean", "running_var"), arrays):
            if a is not None:
                getattr(self, name)[...] = a
        if self.track_running_stats:
            self.num_batches_tracked = nbt
        self.eps = opts["eps"]
        if opts["momentum_mode"] == "cumulative":
            self.momentum = None
        elif (opts["momentum_mode"] == "kept_weight") == self._kept_weight:
            self.momentum = opts["momentum"]
        else:
            self.momentum = 1.0 - opts["momentum"]
        self.freeze = opts["freeze"] and self.track_running_stats


class BatchNorm1d(BatchNorm):
    """torch.nn.BatchNorm1d: (N, C) or (N, C, L)."""
    _ranks = (2, 3)


class BatchNorm2d(BatchNorm):
    """torch.nn.BatchNorm2d: (N, C, H, W)."""
    _ranks = (4,)


class BatchNorm3d(BatchNorm):
    """torch.nn.BatchNorm3d: (N, C, D, H, W)."""
    _ranks = (5,)


class FusedBatchNorm1d(BatchNorm1d):
    """OneFlow nn.FusedBatchNorm1d: forward(x, addend=None) = ReLU(BN(x) + addend)."""
    _fused = True


class FusedBatchNorm2d(BatchNorm2d):
    """OneFlow nn.FusedBatchNorm2d: forward(x, addend=None) = ReLU(BN(x) + addend)."""
    _fused = True


class FusedBatchNorm3d(BatchNorm3d):
    """OneFlow nn.FusedBatchNorm3d: forward(x, addend=None) = ReLU(BN(x) + addend)."""
    _fused = True


class SyncBatchNorm(BatchNorm):
    """Batch norm whose training statistics span every process of an mpi4py communicator (any rank
    2..8). Every process must call forward and backward, also with an empty local batch (N = 0).
    comm: an mpi4py communicator (default MPI.COMM_WORLD) or a ready (rank, size, allgather, validate)
    tuple. validate=True adds one small all-gather per call so that a process with a different C or
    dtype raises on every rank instead of hanging. Weight/bias gradients stay local (as PyTorch's):
    reduce them across processes with the rest of the model's gradients."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype=np.float32, comm=None, validate=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype)
        if comm is None:
            from mpi4py import MPI
            comm = MPI.COMM_WORLD
        self._comm = comm if isinstance(comm, tuple) else mpi_comm(comm, validate)
