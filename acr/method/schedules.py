"""Schedules: the learning rate (poly, or MCTformer's cosine with warm-up) and the SRF remnant probability q."""

from __future__ import annotations

import math

from acr.config import Config, SRFConfig


def poly_factor(step: int, max_step: int, power: float) -> float:
    """(1 - step / max_step) ** power for step < max_step; afterwards the last value is kept (released code)."""
    step = min(step, max_step - 1)
    return (1.0 - step / max_step) ** power


def cosine_warmup_factor(step: int, max_step: int, warmup_steps: int, warmup_factor: float,
                         min_factor: float) -> float:
    """timm's CosineLRScheduler as MCTformer's main.py runs it (`--sched cosine`, `--warmup-epochs 5`,
    `--warmup-lr 1e-6`, `--min-lr 1e-5`), as factors of the base lr and per step: linear from warmup_factor to 1 over
    the first warmup_steps, then min + (1 - min) (1 + cos(pi step / max_step)) / 2, the cosine counted from step 0
    (timm without warmup_prefix); after max_step its last value is kept. (MCTformer steps it once per epoch.)"""
    step = min(step, max_step - 1)
    if step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    return min_factor + 0.5 * (1.0 - min_factor) * (1.0 + math.cos(math.pi * step / max_step))


def lr_factor(cfg: Config, step: int, max_step: int) -> float:
    """The learning-rate factor of ACR's two networks at `step` of `max_step` (optim.schedule_epochs or
    train.epochs): `optim.lr_schedule` poly (the released code's) or cosine_warmup (MCTformer's, its warm-up and
    floor as fractions of optim.lr, so the reconstructor's follows the same shape)."""
    o = cfg.optim
    if o.lr_schedule == "poly":
        return poly_factor(step, max_step, o.poly_power)
    warmup = round(max_step * o.warmup_epochs / (o.schedule_epochs or cfg.train.epochs))
    return cosine_warmup_factor(step, max_step, warmup, o.warmup_lr / o.lr, o.min_lr / o.lr)


def srf_probability(cfg: SRFConfig, epoch: int) -> float:
    """q: probability that an SRF grid cell carries a remnant. `fixed`: q_start; `per_epoch`: q_start +
    q_per_epoch * epoch clipped to [0, 1] (released code: 0.80 - 0.01 * epoch, i.e. 1[U < 20 + epoch] masks a cell)."""
    if cfg.q_schedule == "fixed":
        return cfg.q_start
    return min(1.0, max(0.0, cfg.q_start + cfg.q_per_epoch * epoch))
