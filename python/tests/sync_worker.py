"""Workers of test_sync.py: one process of a SyncBatchNorm group (torch.distributed gloo, or mpi4py when
run as a script under mpirun). Each checks its slice against one process on the whole batch."""
import os
import sys

import numpy as np


def batch(sizes, c, seed=5):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    return rng.standard_normal((n, c, 4, 3)) * 2 + 1, rng.standard_normal((n, c, 4, 3))


def torch_worker(rank, world, port, sizes, c, channels_last, outdir, mismatch):
    import torch
    import torch.distributed as dist

    import bnorm
    import bnorm.torch as bt
    torch.set_num_threads(1)
    bnorm.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank, world_size=world)
    try:
        if mismatch:
            cc = c + 1 if rank == 1 else c
            bn = bt.SyncBatchNorm(cc).double()
            try:
                bn(torch.randn(3, cc, 2, 2, dtype=torch.float64))
                msg = "no error"
            except RuntimeError as e:
                msg = "RuntimeError: %s" % e
            with open(os.path.join(outdir, "%d.txt" % rank), "w") as f:
                f.write(msg)
            return
        xf, gf = batch(sizes, c)
        lo = sum(sizes[:rank])
        x = torch.from_numpy(xf[lo:lo + sizes[rank]].copy())
        g = torch.from_numpy(gf[lo:lo + sizes[rank]].copy())
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        bn = bt.SyncBatchNorm(c).double()
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, c, dtype=torch.float64))
        for _ in range(2):
            y = bn(x)
            (y * g).sum().backward()
        torch.save({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                    "rm": bn.running_mean, "rv": bn.running_var, "nbt": bn.num_batches_tracked},
                   os.path.join(outdir, "%d.pt" % rank))
    finally:
        dist.destroy_process_group()


def mpi_main():
    from mpi4py import MPI

    import bnorm
    bnorm.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    sizes = [3, 0, 5, 2][:size] if size > 1 else [4]
    c = 5
    xf, gf = batch(sizes, c, seed=11)
    lo = sum(sizes[:rank])
    x, g = xf[lo:lo + sizes[rank]].copy(), gf[lo:lo + sizes[rank]].copy()
    bn = bnorm.nn.SyncBatchNorm(c, dtype=np.float64, comm=comm)
    ref = bnorm.nn.BatchNorm2d(c, dtype=np.float64)
    for m in (bn, ref):
        m.weight[...] = np.linspace(0.5, 2.0, c)
    for _ in range(2):
        y = bn.forward(x)
        dx = bn.backward(g)
        yr = ref.forward(xf)
        dxr = ref.backward(gf)
    ok = np.allclose(y, yr[lo:lo + sizes[rank]], rtol=1e-12, atol=1e-12)
    ok &= np.allclose(dx, dxr[lo:lo + sizes[rank]], rtol=1e-10, atol=1e-12)
    ok &= np.allclose(bn.running_mean, ref.running_mean, rtol=1e-12) and np.allclose(bn.running_var, ref.running_var)
    dw = np.empty(size * c)
    comm.Allgather(bn.weight.grad, dw)
    ok &= np.allclose(dw.reshape(size, c).sum(0), ref.weight.grad, rtol=1e-10, atol=1e-12)
    # a rank with a different C: every rank raises (validate=True), none hangs
    cc = c + 1 if rank == 1 else c
    bad = bnorm.nn.SyncBatchNorm(cc, comm=comm)
    try:
        bad(np.ones((2, cc, 2), np.float32))
        raised = False
    except RuntimeError as e:
        raised = "disagree" in str(e) or "mismatch" in str(e).lower() or "differ" in str(e)
        if not raised:
            print("rank %d: unexpected message: %s" % (rank, e))
    print("rank %d: %s %s" % (rank, "OK" if ok else "WRONG", "RAISED" if raised else "NO-RAISE"), flush=True)
    return 0 if ok and raised else 1


if __name__ == "__main__":
    sys.exit(mpi_main())
