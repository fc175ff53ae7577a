"""SGD with poly learning rate and the released code's parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from acr.config import OptimConfig
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
    momentum = cfg.weight_decay if cfg.momentum_equals_weight_decay else cfg.momentum
    groups = parameter_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum)


def set_poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, max_step: int, power: float) -> float:
    """Set every group's lr to base * multiplier * poly factor; returns the factor."""
    f = poly_factor(step, max_step, power)
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g["lr_mult"] * f
    return f
