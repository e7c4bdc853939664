"""bnorm.oneflow: OneFlow's class names on numpy arrays (the same classes as bnorm.nn).

FusedBatchNorm1d/2d/3d(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True)
compute ReLU(BN(x) + addend) in one pass: forward(x, addend=None); backward(dy) returns dx, or
(dx, d_addend) when the forward had an addend. SyncBatchNorm takes an mpi4py communicator.
"""
from .nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, FusedBatchNorm1d, FusedBatchNorm2d,  # noqa: F401
                 FusedBatchNorm3d, SyncBatchNorm)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FusedBatchNorm1d", "FusedBatchNorm2d",
           "FusedBatchNorm3d", "SyncBatchNorm"]
