"""Optimisers of every training loop: SGD with the released code's parameter groups, the one poly learning rate
schedule, and the one non-finite-loss policy (:func:`guarded_step`, `train.max_consecutive_nonfinite`)."""

from __future__ import annotations

import torch
from torch import nn

from acr.config import OptimConfig
from acr.errors import NonFiniteLossError
from acr.method.schedules import poly_factor

# (multiplier of lr, weight decay on?) per group of the released code (`get_parameter_groups`).
_LAYER_TYPE_GROUPS = (("conv_weight", 1.0, True), ("conv_bias", 2.0, False), ("deconv_weight", 10.0, True),
                      ("deconv_bias", 20.0, False))


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """`layer_type`: groups keyed by layer type (conv W 1x, conv b 2x / no decay, deconv W 10x, deconv b 20x / no
    decay) as the released code; `uniform`: one group at lr. Only parameters that require gradients (frozen BN is
    excluded); trained norm-layer weights and biases are grouped like conv weights and biases."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.lr_multipliers == "uniform":
        return [{"params": [p for _, p in params], "lr_mult": 1.0, "weight_decay": cfg.weight_decay, "name": "all"}]
    kinds = {}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            deconv = isinstance(module, nn.ConvTranspose2d)
            kinds[id(p)] = ("deconv_" if deconv else "conv_") + ("bias" if pname == "bias" else "weight")
    groups = []
    for key, mult, decay in _LAYER_TYPE_GROUPS:
        ps = [p for _, p in params if kinds[id(p)] == key]
        if ps:
            groups.append({"params": ps, "lr_mult": mult, "weight_decay": cfg.weight_decay if decay else 0.0,
                           "name": key})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """The classifier's optimiser (and the reconstructor's with `reconstructor_optimizer: sgd`): SGD over
    :func:`parameter_groups`."""
    momentum = cfg.weight_decay if cfg.momentum_equals_weight_decay else cfg.momentum
    groups = parameter_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum)


def build_classifier_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """`optim.classifier_optimizer`: `sgd` (:func:`build_optimizer`, the released code) or `adamw` (the ViT's, as
    MCTformer trains it with timm's create_optimizer: AdamW, no weight decay on biases, norm weights, tokens and the
    position embedding; one group at optim.lr, decayed by the one poly schedule)."""
    if cfg.classifier_optimizer == "sgd":
        return build_optimizer(model, cfg)
    decays = [(p.dim() > 1 and n.split(".")[-1] not in ("cls_token", "pos_embed"), p)
              for n, p in model.named_parameters() if p.requires_grad]
    decay, rest = [p for d, p in decays if d], [p for d, p in decays if not d]
    groups = [{"params": ps, "lr_mult": 1.0, "weight_decay": wd, "name": name, "lr": cfg.lr}
              for ps, wd, name in ((decay, cfg.adamw_weight_decay, "weights"), (rest, 0.0, "no_decay")) if ps]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def reconstructor_base_lr(cfg: OptimConfig) -> float:
    return cfg.lr if cfg.reconstructor_lr is None else cfg.reconstructor_lr


def build_reconstructor_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """`sgd`: as the classifier's, at reconstructor_base_lr with the layer multipliers; `adam`: one group at
    reconstructor_base_lr with weight decay on conv/deconv weights only (no per-layer multipliers)."""
    lr = reconstructor_base_lr(cfg)
    if cfg.reconstructor_optimizer == "sgd":
        opt = build_optimizer(model, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        return opt
    groups = parameter_groups(model, cfg)
    decay = [p for g in groups if g["weight_decay"] for p in g["params"]]
    rest = [p for g in groups if not g["weight_decay"] for p in g["params"]]
    groups = [{"params": ps, "lr_mult": 1.0, "weight_decay": wd, "name": name, "lr": lr}
              for ps, wd, name in ((decay, cfg.weight_decay, "weights"), (rest, 0.0, "biases")) if ps]
    return torch.optim.Adam(groups, lr=lr, betas=tuple(cfg.adam_betas))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Set every group's lr to base * multiplier * factor (the schedule's, acr.method.schedules); returns it."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g["lr_mult"] * factor
    return factor


def set_poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, max_step: int, power: float) -> float:
    """:func:`set_lr` with the poly factor (IRN's and DeepLab's loops); returns the factor."""
    return set_lr(optimizer, base_lr, poly_factor(step, max_step, power))


def guarded_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, reduce_mean, counters, limit: int,
                 what: str = "ACR") -> tuple[float, bool]:
    """Backward, then the optimiser step only if the loss averaged over the workers is finite (the released code
    skips such steps; every worker takes the same decision). `counters` (consecutive_nonfinite, skipped_steps) count
    the skips; more than `limit` in a row raise NonFiniteLossError (the last good checkpoint stays). Returns the
    all-reduced loss, in the loss's own precision (fp64 stays fp64; bf16 is promoted), and whether it stepped."""
    loss.backward()
    value = reduce_mean(loss.detach().to(torch.promote_types(loss.dtype, torch.float32)))
    ok = bool(torch.isfinite(value))
    if ok:
        optimizer.step()
        counters.consecutive_nonfinite = 0
    else:
        counters.skipped_steps += 1
        counters.consecutive_nonfinite += 1
        if counters.consecutive_nonfinite > limit:
            raise NonFiniteLossError(f"{counters.consecutive_nonfinite} consecutive non-finite losses ({what}, last "
                                     f"{value.item()}; train.max_consecutive_nonfinite={limit}): stopping. The last "
                                     "good checkpoint is kept.")
    return float(value), ok
