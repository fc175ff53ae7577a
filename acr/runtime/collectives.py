"""Collective operations of the training loops (identities on one worker)."""

from __future__ import annotations

import resource

import numpy as np
import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the workers."""
    if not distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def batch_denominator(count: torch.Tensor, eps: float = 0.0, at_least: float | None = None) -> torch.Tensor:
    """The denominator that makes a worker's sum its share of the mean over the global batch: (count summed over the
    workers + eps, at least `at_least`) / workers. DDP averages the workers' gradients, so their mean is the gradient
    of the global sum / (global count + eps), as one worker computes it from the whole batch."""
    workers = dist.get_world_size() if distributed() else 1
    total = count
    if workers > 1:
        total = count.detach().clone()
        dist.all_reduce(total)
    total = total + eps if eps else total
    total = total if at_least is None else total.clamp(min=at_least)
    return total / workers if workers > 1 else total


def reduce_sum_numpy(a: np.ndarray) -> np.ndarray:
    """The sum of an integer array (confusion matrices, counts) over the workers."""
    if not distributed():
        return a
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    dist.all_reduce(t)
    return t.numpy()


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every worker's `t` (same shape on each), in rank order."""
    if not distributed():
        return [t]
    gathered = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return gathered


def replica_divergence(*models: torch.nn.Module | None) -> float:
    """Largest difference between the workers' copies of the parameters (0.0 when DDP keeps them in sync), from
    one float64 fingerprint per model and worker."""
    models = [m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m
              for m in models if m is not None]
    local = torch.stack([sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(m.parameters()))
                         for m in models]).cpu()
    gathered = all_gather(local)
    return float(max((g - gathered[0]).abs().max() for g in gathered))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (the largest over workers), in MiB."""
    t = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
