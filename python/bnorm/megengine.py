"""bnorm.megengine: MegEngine's module.BatchNorm1d/2d convention on numpy arrays.

momentum is the weight of the OLD running value (default 0.9): running = momentum * running +
(1 - momentum) * batch (unbiased variance), PyTorch's alpha = 1 - momentum. freeze=True normalizes with
the running statistics in training and eval, never updates them and gives weight/bias no gradient
(dx = dy * weight / sqrt(running_var + eps)). Otherwise the classes are bnorm.nn's (forward/backward,
state_dict with PyTorch's names, which also accepts MegEngine's (1, C, 1, 1) shapes).
"""
import numpy as np

from . import nn as _nn

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _MegEngineBatchNorm(_nn.BatchNorm):
    _kept_weight = True

    def __init__(self, num_features, eps=1e-5, momentum=0.9, affine=True, track_running_stats=True,
                 freeze=False, dtype=np.float32):
        if momentum is None:
            raise ValueError("%s: momentum must be a number (MegEngine has no cumulative average)"
                             % type(self).__name__)
        if freeze and not track_running_stats:
            raise ValueError("%s: freeze=True needs track_running_stats=True" % type(self).__name__)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype)
        self.freeze = bool(freeze)

    def extra_repr(self):
        return super().extra_repr() + ", freeze=%s" % self.freeze


class BatchNorm1d(_MegEngineBatchNorm):
    """MegEngine module.BatchNorm1d: (N, C) or (N, C, L)."""
    _ranks = (2, 3)


class BatchNorm2d(_MegEngineBatchNorm):
    """MegEngine module.BatchNorm2d: (N, C, H, W)."""
    _ranks = (4,)
