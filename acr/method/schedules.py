"""Schedules: poly learning rate and the SRF remnant probability q."""

from __future__ import annotations

from acr.config import SRFConfig


def poly_factor(step: int, max_step: int, power: float) -> float:
    """(1 - step / max_step) ** power for step < max_step; afterwards the last value is kept (released code)."""
    step = min(step, max_step - 1)
    return (1.0 - step / max_step) ** power


def srf_probability(cfg: SRFConfig, epoch: int) -> float:
    """q: probability that an SRF grid cell carries a remnant. `fixed`: q_start; `per_epoch`: q_start +
    q_per_epoch * epoch clipped to [0, 1] (released code: 0.80 - 0.01 * epoch, i.e. 1[U < 20 + epoch] masks a cell)."""
    if cfg.q_schedule == "fixed":
        return cfg.q_start
    return min(1.0, max(0.0, cfg.q_start + cfg.q_per_epoch * epoch))
