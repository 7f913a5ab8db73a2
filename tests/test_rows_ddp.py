"""RowCentric under DistributedDataParallel (gloo, 2 CPU processes) gives single-process grads."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from memtile.rows import wrap

WORLD = 2


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, 1, 2, dilation=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2 * WORLD, 3, 41, 23, generator=gen), torch.randint(0, 3, (2 * WORLD,),
                                                                           generator=gen)


def _worker(rank: int, port: int, strategy: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        net = model()
        ddp = nn.parallel.DistributedDataParallel(wrap(net, rows=3, strategy=strategy,
                                                       bn="frozen"))
        x, t = batch()
        mine = slice(2 * rank, 2 * rank + 2)
        # each rank's loss is the mean over its half: DDP averages, so the sum is the global mean
        nn.functional.cross_entropy(ddp(x[mine]), t[mine]).backward()
        if rank == 0:
            torch.save([p.grad for p in net.parameters()], out)
        # both ranks done with gloo before either tears it down: without it, a rank leaving
        # while the other's gloo threads still talk to it aborted ("terminate called without
        # an active exception") in 6 of 14 runs
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # and no interpreter teardown after it, where the abort still came in 1 of 32 runs
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["overl", "2ps"])
def test_ddp_gradients_equal_single_process(strategy, tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(_free_port(), strategy, out), nprocs=WORLD, join=True)
    got = torch.load(out)
    net = model()
    for m in net.modules():  # ordinary training with the same frozen statistics
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x, t = batch()
    nn.functional.cross_entropy(net(x), t).backward()
    for g, p in zip(got, net.parameters(), strict=True):
        assert ((g - p.grad).abs().max() / p.grad.abs().max()).item() <= 1e-5
