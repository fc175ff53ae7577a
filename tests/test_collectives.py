"""acr.runtime.collectives on a real process group of two workers (gloo, two local processes), against hand-computed
values: the global batch's denominator that makes DDP's average of the workers' losses the one-worker mean."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from acr.runtime.collectives import batch_denominator
from tests.rayhead import free_port

COUNTS = (3.0, 5.0)  # the workers' own counts: 8 in the global batch


def _worker(rank: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        count = torch.tensor(COUNTS[rank])
        out[rank] = [float(batch_denominator(count)), float(batch_denominator(count, eps=1e-5)),
                     float(batch_denominator(torch.tensor(0.0), at_least=1.0)), float(count)]
    finally:
        dist.destroy_process_group()


def test_the_denominator_is_the_global_count_over_the_workers():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), out), nprocs=2)
        got = dict(out)
    for rank in (0, 1):
        total, with_eps, empty, count = got[rank]
        assert total == 8.0 / 2 and abs(with_eps - (8.0 + 1e-5) / 2) < 1e-6  # the same on each worker
        assert empty == 1.0 / 2  # no pair anywhere: at least 1 over the global batch
        assert count == COUNTS[rank]  # the worker's own count is not changed by the all-reduce
    # on one worker: the count itself (+ eps, at least at_least)
    assert float(batch_denominator(torch.tensor(3.0))) == 3.0
    assert float(batch_denominator(torch.tensor(3.0), eps=0.5)) == 3.5
    assert float(batch_denominator(torch.tensor(0.0), at_least=1.0)) == 1.0
