"""DistributedDataParallel (gloo, 2 processes on this machine): a model with cnnboost
modules trains to the same parameters as one process on the whole batch — with
FFC, and with AB and SSM when their batch statistics are synchronised."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import cnnboost

WORLD = 2


def make_model(kind):
    torch.manual_seed(0)
    if kind == "ffc":
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), cnnboost.FFC(8, 5))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), cnnboost.AB(8), nn.ReLU(), cnnboost.SSM(8, 5, num_heads=2))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def train(model, x, y, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _worker(rank, init_file, out_dir, kind, sync):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    cnnboost.set_num_threads(1)
    model = make_model(kind)
    if sync:
        cnnboost.convert_sync_batchnorm(model)
    model = nn.parallel.DistributedDataParallel(model)
    x, y = data()
    shard = slice(rank * 4, (rank + 1) * 4)
    train(model, x[shard], y[shard])
    if rank == 0:
        torch.save(model.module.state_dict(), os.path.join(out_dir, "ddp.pt"))
    dist.barrier()  # both ranks done
    # Leave without tearing gloo down: its teardown at interpreter exit now and then
    # aborts ("terminate called without an active exception"), which says nothing
    # about the training this test checks.
    os._exit(0)


def ddp_state(kind, sync):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"), d, kind, sync), nprocs=WORLD, join=True)
        return torch.load(os.path.join(d, "ddp.pt"))


def single_state(kind):
    single = make_model(kind)
    train(single, *data())
    return single.state_dict()


@pytest.mark.parametrize("kind, sync", [("ffc", False), ("ab+ssm", True)])
def test_ddp_matches_single_process(kind, sync):
    got, want = ddp_state(kind, sync), single_state(kind)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_without_sync_batch_statistics_are_per_process():
    got, want = ddp_state("ab+ssm", False), single_state("ab+ssm")
    assert not torch.allclose(got["1.bn.running_var"], want["1.bn.running_var"], rtol=1e-5, atol=1e-6)


def test_sync_bn_is_inert_without_torch_distributed():
    m = cnnboost.convert_sync_batchnorm(make_model("ab+ssm"))
    assert m[1].sync_bn and m[3].sync_bn
    plain = make_model("ab+ssm")
    x, y = data()
    torch.testing.assert_close(m(x), plain(x))
