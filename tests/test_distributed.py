"""DistributedDataParallel (gloo, 2 processes on this machine): a model with cnnboost
modules trains to the same parameters as one process on the whole batch."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import cnnboost

WORLD = 2


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), cnnboost.FFC(8, 5))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def train(model, x, y, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    cnnboost.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(make_model())
    x, y = data()
    shard = slice(rank * 4, (rank + 1) * 4)
    train(model, x[shard], y[shard])
    if rank == 0:
        torch.save(model.module.state_dict(), os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


def test_ddp_matches_single_process():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"), d), nprocs=WORLD, join=True)
        ddp_state = torch.load(os.path.join(d, "ddp.pt"))
    single = make_model()
    train(single, *data())
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6, msg=k)
