"""SyncBatchNorm over real processes: torch.distributed (gloo on 127.0.0.1) with 2 and 3 processes, and
mpirun + mpi4py with 2 and 3 processes; uneven and empty local batches; a rank with a different C."""
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import sync_worker

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world, args, timeout=120):
    ctx = mp.spawn(sync_worker.torch_worker, args=(world, free_port()) + args, nprocs=world, join=False)
    for p in ctx.processes:
        p.join(timeout)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a process hung"
    assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]


@pytest.mark.parametrize("sizes,channels_last", [([1, 5], False), ([3, 0, 4], True)])
def test_torch_gloo_equals_one_process(tmp_path, sizes, channels_last):
    c = 3
    run_group(len(sizes), (sizes, c, channels_last, str(tmp_path), False))
    xf, gf = sync_worker.batch(sizes, c)
    x = torch.from_numpy(xf).requires_grad_()
    ref = torch.nn.BatchNorm2d(c).double()
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2.0, c, dtype=torch.float64))
    for _ in range(2):
        y = ref(x)
        (y * torch.from_numpy(gf)).sum().backward()
    res = [torch.load(os.path.join(tmp_path, "%d.pt" % r)) for r in range(len(sizes))]
    torch.testing.assert_close(torch.cat([r["y"] for r in res]), y.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["dx"] for r in res]), x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(r["dw"] for r in res), ref.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum(r["db"] for r in res), ref.bias.grad, rtol=1e-10, atol=1e-12)
    for r in res:
        torch.testing.assert_close(r["rm"], ref.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["rv"], ref.running_var, rtol=1e-12, atol=1e-14)
        assert int(r["nbt"]) == 2


def test_torch_gloo_channel_mismatch_raises(tmp_path):
    run_group(3, ([2, 2, 2], 4, False, str(tmp_path), True))
    for r in range(3):
        msg = open(os.path.join(tmp_path, "%d.txt" % r)).read()
        assert msg.startswith("RuntimeError"), msg


MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,tcp", "--mca",
          "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo"]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
@pytest.mark.parametrize("n", [2, 3])
def test_mpi4py(n):
    pytest.importorskip("mpi4py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(MPIRUN + ["-n", str(n), sys.executable, os.path.join(HERE, "sync_worker.py")],
                       capture_output=True, text=True, timeout=180, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert out.count("OK RAISED") == n, out
