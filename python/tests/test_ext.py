"""The extension's own contract: the GIL is released during compute, nothing leaks per call, layouts are
read from strides (empty tensors included)."""
import resource
import sys
import threading
import time

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

import bnorm
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
        _bnorm.forward(t, out, training=True)            # through __dlpack__
        _bnorm.forward(to_dlpack(t), to_dlpack(out), training=True)  # through a capsule
        del t, out
    assert rss_mib() - base < 150                        # a leak would keep 600 MiB


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
