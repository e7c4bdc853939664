"""bnorm.functional: torch.nn.functional.batch_norm's signature and semantics on numpy arrays.

Inputs are read in place (no copy): C-contiguous arrays are channels-first (N, C, ...); an array whose
memory is channels-last (for example np.transpose(a_nhwc, (0, 3, 1, 2))) is computed as such and the
output keeps that memory order. Other strides raise ValueError. Per-channel arrays are float32 for
float32/float16 data and float64 for float64 data.
"""
import numpy as np

from . import _bnorm

__all__ = ["batch_norm", "fused_batch_norm", "param_dtype"]


def param_dtype(dtype):
    """The dtype of weight, bias and the running statistics for data of this dtype."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _output_like(x):
    if not isinstance(x, np.ndarray):
        raise TypeError("bnorm.functional: input must be a numpy array, got %s" % type(x).__name__)
    return np.empty_like(x, order="K")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, per channel (dimension 1).

    training=True: batch statistics; running_mean/running_var (or both None) are updated in place with
    running = (1 - momentum) * running + momentum * batch (unbiased variance). training=False: the
    running statistics normalize (required). Returns a new array."""
    return fused_batch_norm(input, running_mean, running_var, weight, bias, None, training, momentum, eps,
                            relu=False)


def fused_batch_norm(input, running_mean, running_var, weight=None, bias=None, addend=None, training=False,
                     momentum=0.1, eps=1e-5, relu=True):
    """OneFlow's fused form: y = ReLU(BN(x) + addend) (addend optional; relu=False drops the ReLU)."""
    y = _output_like(input)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("bnorm.functional.batch_norm: running_mean and running_var are required when "
                         "training=False")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bnorm.functional.batch_norm: running_mean and running_var must both be given or both "
                         "be None")
    if momentum is None:
        raise ValueError("bnorm.functional.batch_norm: momentum must be a number (the module classes handle "
                         "momentum=None)")
    _bnorm.forward(input, y, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                   addend=addend, training=bool(training), momentum=float(momentum), eps=float(eps),
                   relu=bool(relu))
    return y
