"""One ACR training iteration: RU phase (optimiser of G), then CU phase (optimiser of F), with poly LR and the
non-finite-loss guard. `reduce_mean` averages a tensor over workers (identity on one worker), so every worker takes
the same skip decision."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from acr.config import Config
from acr.method.acr import Batch, classifier_trunk, cu_phase, ru_phase, sample_target
from acr.method.optim import guarded_step, reconstructor_base_lr, set_lr
from acr.method.schedules import lr_factor


@dataclass
class StepCounters:
    cls_steps: int = 0  # optimiser steps taken by F (a skipped step does not count, as in the released code)
    rec_steps: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0


def bf16_is_fast(device: torch.device) -> bool:
    """Whether `device` has bf16 kernels: CUDA, or a CPU where oneDNN has them (AVX512-BF16 or AMX; without them bf16
    convolutions fall back to a path hundreds of times slower)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether train.precision `precision` means bf16 autocast on `device`."""
    return (precision == "bf16" or (precision == "auto" and device.type == "cuda")
            or (precision == "bf16_where_fast" and bf16_is_fast(device)))


def autocast_context(device: torch.device, precision: str):
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def memory_layout(cfg: Config) -> torch.memory_format:
    """The layout of the networks and images in training (train.channels_last)."""
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def shares_trunk(cfg: Config) -> bool:
    """Whether an iteration computes the classifier's trunk once for both phases (train.share_classifier_trunk):
    only where both phases run the classifier and its BatchNorm is frozen (otherwise train and eval mode differ)."""
    return (cfg.train.share_classifier_trunk and cfg.model.freeze_bn and cfg.method.train_classifier
            and cfg.method.reconstructor == "adversarial")


def train_step(classifier: nn.Module, reconstructor: nn.Module | None, opt_cls: torch.optim.Optimizer,
               opt_rec: torch.optim.Optimizer | None, batch: dict, cfg: Config, q: float, max_step: int,
               counters: StepCounters, reduce_mean: Callable[[torch.Tensor], torch.Tensor], device: torch.device
               ) -> dict[str, float]:
    labels = batch["labels"]
    b = Batch(image=batch["image"].contiguous(memory_format=memory_layout(cfg)), labels=labels,
              target=sample_target(labels, batch["target_u"]), grid_u=batch["grid_u"])
    out: dict[str, float] = {}
    stats: dict[str, torch.Tensor] = {}
    limit = cfg.train.max_consecutive_nonfinite
    trunk = None
    if cfg.method.reconstructor == "adversarial":
        set_lr(opt_rec, reconstructor_base_lr(cfg.optim), lr_factor(cfg, counters.rec_steps, max_step))
        opt_rec.zero_grad(set_to_none=True)
        with autocast_context(device, cfg.train.precision):
            if shares_trunk(cfg):
                trunk = classifier_trunk(classifier, b.image)
            loss_ru, s = ru_phase(classifier, reconstructor, b, cfg.method, q, trunk)
        stats.update(s)
        out["ru/loss"], ok = guarded_step(loss_ru, opt_rec, reduce_mean, counters, limit)
        opt_rec.zero_grad(set_to_none=True)  # G's gradients are not needed (nor kept in memory) during CU
        counters.rec_steps += ok
    if not cfg.method.train_classifier:  # reconstructor pre-training against a frozen classifier
        for k, v in stats.items():
            out.setdefault(k, float(v))
        return out
    set_lr(opt_cls, cfg.optim.lr, lr_factor(cfg, counters.cls_steps, max_step))
    opt_cls.zero_grad(set_to_none=True)
    # During the adversarial warm-up the classifier is trained with L_cls alone (its reconstructor keeps learning).
    adversary = reconstructor if counters.cls_steps >= cfg.method.adversarial_warmup_steps else None
    with autocast_context(device, cfg.train.precision):
        loss_cu, s = cu_phase(classifier, adversary, b, cfg.method, trunk)
    stats.update(s)
    out["cu/loss"], ok = guarded_step(loss_cu, opt_cls, reduce_mean, counters, limit)
    opt_cls.zero_grad(set_to_none=True)
    counters.cls_steps += ok
    for k, v in stats.items():
        out.setdefault(k, float(v))  # local values; the loop averages them over workers per epoch
    return out
