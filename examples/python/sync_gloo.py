#!/usr/bin/python3
"""sync_gloo.py - bnorm.torch.SyncBatchNorm on 2 local processes over torch.distributed's gloo backend
(CPU tensors, which torch's own SyncBatchNorm refuses). Each process holds part of the batch (5 and 3
images); the statistics, outputs and input gradients equal one process on all 8 images.

    /usr/bin/python3 examples/python/sync_gloo.py
"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnorm.torch as bt


def say(line):
    # one write(2) per line: the two processes share the pipe, and print() may split a line in two writes
    os.write(1, (line + "\n").encode())


def worker(rank, world, port):
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6) * 2 + 1                       # the same global batch everywhere
    model = bt.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    part = x[:5] if rank == 0 else x[5:]
    y = model(part)
    y.square().sum().backward()
    bn = model[1]
    say("rank %d: local batch %d, running_mean %s" % (rank, len(part), bn.running_mean.numpy().round(4)))
    if rank == 0:
        ref = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        ref.load_state_dict({k: v for k, v in model.state_dict().items()})
        ref[1].running_mean.zero_()
        ref[1].running_var.fill_(1)
        ref[1].num_batches_tracked.zero_()
        ref(x)
        say("one process on all 8: running_mean %s" % ref[1].running_mean.numpy().round(4))
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port), nprocs=2)
