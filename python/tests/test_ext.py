"""The extension's own contract: the GIL is released during compute, nothing leaks per call, layouts are
read from strides (empty tensors included)."""
import resource
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch.utils.dlpack import to_dlpack

import bnorm
import bnorm.torch  # noqa: F401  (registers torch.Tensor with the extension)
from bnorm import _bnorm


def test_gil_released_during_compute():
    """A spinning Python thread records timestamps; this thread times the inside of 4 bnorm calls.
    With the switch interval set very long, a thread can take the GIL only when its holder releases it
    voluntarily (the spinner does, with sleep(0), every iteration; this thread only inside a call that
    releases it). So a spinner timestamp strictly inside a call proves the call released the GIL; with
    the GIL held (a planted bug) there can be none, whatever the machine's load."""
    x = np.random.default_rng(0).standard_normal((64, 64, 64, 64)).astype(np.float32)  # 64 MiB
    y = np.empty_like(x)
    threads = bnorm.get_num_threads()
    bnorm.set_num_threads(1)
    windows, ticks = [], []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0)

    old = sys.getswitchinterval()
    try:
        _bnorm.forward(x, y, training=True)  # pages of y faulted in
        sys.setswitchinterval(10.0)
        th = threading.Thread(target=spin)
        th.start()
        for _ in range(4):
            t0 = time.perf_counter()
            _bnorm.forward(x, y, training=True)
            windows.append((t0, time.perf_counter()))
        stop.set()
        th.join()
    finally:
        sys.setswitchinterval(old)
        bnorm.set_num_threads(threads)
    ticks = np.array(ticks)
    inside = sum(int(((ticks > a) & (ticks < b)).sum()) for a, b in windows)
    assert inside >= 3, (inside, len(ticks), windows)


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_no_leak_per_call():
    """Every buffer view and DLPack capsule is released: 1 MiB tensors made and dropped 300 times would
    keep 300 MiB alive if one leaked; numpy arrays keep their reference counts."""
    x = np.ones((4, 3, 8, 8), np.float32)
    y = np.empty_like(x)
    before = sys.getrefcount(x), sys.getrefcount(y)
    for _ in range(100):
        _bnorm.forward(x, y, training=True)
        try:
            _bnorm.forward(x, y, weight=np.ones(2, np.float32), training=True)
        except ValueError:
            pass
    assert (sys.getrefcount(x), sys.getrefcount(y)) == before
    base = rss_mib()
    for i in range(150):
        t = torch.full((128, 4, 32, 32), float(i))       # 2 MiB, each pair of calls on a new one
        t[0, 0, 0, 0] = 0.0
        out = torch.empty_like(t)
        _bnorm.forward(t, out, training=True)            # through the tensor's attributes
        _bnorm.forward(to_dlpack(t), to_dlpack(out), training=True)  # through a capsule
        del t, out
    assert rss_mib() - base < 150                        # a leak would keep 600 MiB
    t, out, w = torch.ones(4, 3, 8, 8), torch.empty(4, 3, 8, 8), torch.ones(3)
    nbt = torch.zeros((), dtype=torch.int64)
    before = [sys.getrefcount(o) for o in (t, out, w, nbt)]
    for _ in range(100):
        _bnorm.forward_fast(t, out, w, None, None, None, None, None, None, True, None, 1e-5, False, None, nbt)
        try:
            _bnorm.forward_fast(t, out, torch.ones(2), None, None, None, None, None, None, True, 0.1, 1e-5, False,
                                None, nbt)
        except ValueError:
            pass
    assert [sys.getrefcount(o) for o in (t, out, w, nbt)] == before
    assert int(nbt) == 100                               # counted by the successful calls only


def test_torch_tensors_read_in_place():
    """bnorm.torch registers torch.Tensor: tensors are read through data_ptr(), shape, stride() and dtype,
    with the same checks as every other input."""
    x = torch.randn(6, 4, 5)
    y = torch.empty_like(x)
    _bnorm.forward(x.requires_grad_(), y, training=True)  # a tensor requiring grad is read like any other
    ref = torch.nn.functional.batch_norm(x.detach(), None, None, training=True)
    assert torch.allclose(y, ref, atol=1e-5)
    xcl = torch.randn(6, 5, 4).transpose(1, 2)            # NWC: C innermost, read in place
    assert _bnorm.is_dense(xcl) and not xcl.is_contiguous()
    assert not _bnorm.is_dense(torch.randn(6, 4, 5)[:, :, ::2])
    with pytest.raises(ValueError, match="not on the CPU \\(device 'meta'\\)"):
        _bnorm.forward(torch.empty(2, 3, device="meta"), torch.empty(2, 3))
    with pytest.raises(TypeError, match="dense"):
        _bnorm.forward(torch.eye(3).to_sparse(), torch.empty(3, 3))
    with pytest.raises(TypeError, match="got int64"):
        _bnorm.forward(torch.zeros(2, 3, dtype=torch.int64), torch.empty(2, 3))
    with pytest.raises(TypeError, match="got float16"):
        _bnorm.forward(torch.zeros(2, 3), torch.empty(2, 3), weight=torch.ones(3, dtype=torch.float16))
    nbt = torch.zeros((), dtype=torch.int64)
    args = [torch.randn(4, 3), torch.empty(4, 3), None, None, torch.zeros(3), torch.ones(3), None, None, None, True,
            None, 1e-5, False, None, nbt]
    _bnorm.forward_fast(*args)                             # momentum None, first batch: 1 / (0 + 1)
    assert int(nbt) == 1 and torch.allclose(args[4], args[0].mean(0))
    with pytest.raises(TypeError, match="num_batches_tracked must be one int64"):
        _bnorm.forward_fast(*args[:14], torch.zeros(()))
    with pytest.raises(ValueError, match="save must be a contiguous 1-D array of 3 x C"):
        _bnorm.forward_fast(*args[:6], torch.empty(8), *args[7:])
    with pytest.raises(TypeError, match="forward_fast takes 15 arguments"):
        _bnorm.forward_fast(*args[:14])
    assert int(nbt) == 1                                   # the failed calls counted nothing
    sv = torch.empty(9)
    x = torch.randn(4, 3)
    _bnorm.forward_fast(x, torch.empty(4, 3), None, None, None, None, sv, None, None, True, 0.1, 1e-5, False, None,
                        None)
    assert torch.allclose(sv[:3], x.mean(0)) and torch.allclose(sv[3:6], (x.var(0, unbiased=False) + 1e-5).rsqrt())
    with pytest.raises(ValueError, match="saved must be a contiguous 1-D array of 2 x C"):
        _bnorm.backward_fast(x, x, None, None, sv, None, None, None, None, True, 1e-5, None)


def test_layout_from_strides():
    assert _bnorm.layout(np.zeros((2, 3, 4, 5), np.float32)) == "channels_first"
    assert _bnorm.layout(np.zeros((2, 4, 5, 3), np.float32).transpose(0, 3, 1, 2)) == "channels_last"
    assert _bnorm.layout(np.zeros((2, 7, 3), np.float32).transpose(0, 2, 1)) == "channels_last"
    assert _bnorm.layout(torch.zeros(0, 3, 4, 5).contiguous(memory_format=torch.channels_last)) == "channels_last"
    assert _bnorm.layout(torch.zeros(0, 3, 4, 5)) == "channels_first"
    assert _bnorm.layout(torch.zeros(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)) == \
        "channels_last"
    assert _bnorm.layout(torch.zeros(4, 3, dtype=torch.bfloat16)) == "channels_first"


def test_one_version():
    """The package's version is the C library's, which is CMake's project version."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "CMakeLists.txt")) as f:
        cmake_version = re.search(r"project\(bnorm\s+VERSION\s+([0-9.]+)", f.read()).group(1)
    assert bnorm.__version__ == bnorm.library_version == cmake_version
    from importlib.metadata import version
    assert version("bnorm") == cmake_version
