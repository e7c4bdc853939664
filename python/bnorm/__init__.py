"""bnorm: batch normalization exactly as PyTorch, OneFlow and MegEngine define it, computed by the bnorm
C library (a CPython extension over include/bnorm/bnorm.h).

    bnorm.functional   batch_norm / fused_batch_norm on numpy arrays (torch's signature)
    bnorm.nn           numpy modules: BatchNorm1d/2d/3d, FusedBatchNorm1d/2d/3d, SyncBatchNorm (mpi4py)
    bnorm.megengine    MegEngine's BatchNorm1d/2d (momentum 0.9 of the old value, freeze)
    bnorm.oneflow      OneFlow's names (BatchNorm*, FusedBatchNorm*, SyncBatchNorm) on numpy
    bnorm.torch        torch.nn modules with autograd for CPU tensors, convert(), SyncBatchNorm (gloo)

Threads: bnorm.set_num_threads(n) (process-wide; n <= 0 restores the default).
"""
from . import _bnorm
from ._bnorm import get_isa, get_num_threads, set_isa, set_num_threads
from . import functional, nn, megengine, oneflow  # noqa: E402

library_version = _bnorm.version
__version__ = library_version  # one version: the C library's (CMake's project version)

__all__ = ["functional", "nn", "megengine", "oneflow", "set_num_threads", "get_num_threads", "get_isa",
           "set_isa", "library_version"]


def __getattr__(name):
    # bnorm.torch needs torch: imported on first use only.
    if name == "torch":
        import importlib
        return importlib.import_module("bnorm.torch")
    raise AttributeError("module 'bnorm' has no attribute %r" % name)
