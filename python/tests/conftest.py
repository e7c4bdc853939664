"""Shared helpers of the bnorm Python tests (run with /usr/bin/python3 -m pytest python/tests)."""
import numpy as np
import pytest

# Tolerances per dtype, stated once: (rtol, atol) for values of unit scale.
TOL = {"float64": (1e-9, 1e-10), "float32": (2e-4, 2e-5), "float16": (2e-2, 2e-2), "bfloat16": (5e-2, 5e-2)}


def rand_shape(rng, rank):
    n = int(rng.integers(2, 6))
    c = int(rng.integers(1, 10))
    spatial = [int(rng.integers(1, 6)) for _ in range(rank - 2)]
    return (n, c, *spatial)


def numpy_array(rng, shape, dtype, channels_last):
    """A random array of logical shape (N, C, ...): C-contiguous, or with channels-last memory."""
    if channels_last and len(shape) > 2:
        phys = (shape[0], *shape[2:], shape[1])
        a = rng.standard_normal(phys).astype(dtype) * 2 + 0.5
        return np.moveaxis(a, -1, 1)
    return (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)


def _f64(a):
    if hasattr(a, "detach"):
        return a.detach().to(dtype=__import__("torch").float64).numpy()
    return np.asarray(a, np.float64)


def close(a, b, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    a, b = _f64(a), _f64(b)
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol * scale)


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % (2**32))
