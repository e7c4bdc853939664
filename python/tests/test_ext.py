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
    """A Python thread keeps running while another is inside long bnorm calls: the spinning thread
    makes progress (iterations less than 2 ms apart) during a good share of the calls' time. With the
    GIL held it could only run between calls (a share near 0). The share needs only one core free for
    part of the time, so a loaded machine does not make it fail."""
    x = np.random.default_rng(0).standard_normal((64, 64, 64, 64)).astype(np.float32)  # 64 MiB
    y = np.empty_like(x)
    threads = bnorm.get_num_threads()
    bnorm.set_num_threads(1)
    try:
        _bnorm.forward(x, y, training=True)  # pages of y faulted in
        done = threading.Event()

        def work():
            for _ in range(4):
                _bnorm.forward(x, y, training=True)
            done.set()

        th = threading.Thread(target=work)
        old = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)  # between calls the spinner gets at most this much
        progress, start = 0.0, time.perf_counter()
        last = start
        th.start()
        while not done.is_set():
            now = time.perf_counter()
            if now - last < 0.002:
                progress += now - last
            last = now
        th.join()
        total = time.perf_counter() - start
    finally:
        sys.setswitchinterval(old)
        bnorm.set_num_threads(threads)
    assert progress > 0.25 * total, (progress, total)


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
