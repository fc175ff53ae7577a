import pytest
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from acr.config import OptimConfig, SRFConfig, load_config
from acr.method.optim import (build_optimizer, build_reconstructor_optimizer, parameter_groups, reconstructor_base_lr,
                              set_poly_lr)
from acr.method.schedules import cosine_warmup_factor, lr_factor, poly_factor, srf_probability


def test_poly_factor_and_frozen_tail():
    assert poly_factor(0, 100, 0.9) == 1.0
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert poly_factor(1000, 100, 0.9) == poly_factor(99, 100, 0.9) == pytest.approx(0.01**0.9)


def test_cosine_warmup_by_hand_and_as_timms_scheduler_runs_it_for_mctformer():
    # warm-up 0.1 -> 1 over 2 steps, then 0.2 + 0.8 (1 + cos(pi t / 8)) / 2; the last value kept after the end
    assert cosine_warmup_factor(0, 8, 2, 0.1, 0.2) == pytest.approx(0.1)
    assert cosine_warmup_factor(1, 8, 2, 0.1, 0.2) == pytest.approx(0.55)
    assert cosine_warmup_factor(4, 8, 2, 0.1, 0.2) == pytest.approx(0.6)  # cos(pi / 2) = 0
    assert cosine_warmup_factor(100, 8, 2, 0.1, 0.2) == cosine_warmup_factor(7, 8, 2, 0.1, 0.2)

    cfg = load_config(None, ["optim.lr_schedule=cosine_warmup", "optim.lr=5e-4", "train.epochs=60"])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=5e-4)
    timm = CosineLRScheduler(opt, t_initial=60, lr_min=1e-5, warmup_t=5, warmup_lr_init=1e-6)  # MCTformer main.py
    for epoch in range(60):  # one step per epoch: our per-step schedule is timm's per-epoch one
        assert 5e-4 * lr_factor(cfg, epoch, 60) == pytest.approx(timm._get_lr(epoch)[0], rel=1e-12), epoch
    assert lr_factor(load_config(None, []), 30, 60) == poly_factor(30, 60, 0.9)  # the released code's: unchanged


def test_srf_probability_released_schedule_and_fixed():
    released = SRFConfig(q_schedule="per_epoch", q_start=0.8, q_per_epoch=-0.01)
    assert srf_probability(released, 0) == pytest.approx(0.8)
    assert srf_probability(released, 39) == pytest.approx(0.41)
    assert srf_probability(released, 80) == 0.0 and srf_probability(released, 99) == 0.0
    assert srf_probability(SRFConfig(q_schedule="fixed", q_start=0.6), 30) == 0.6


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)  # weight 1x, bias 2x
        self.deconv = nn.ConvTranspose2d(2, 1, 2, bias=False)  # 10x
        self.bn = nn.BatchNorm2d(2)
        self.bn.requires_grad_(False)  # frozen: in no group


def test_layer_type_groups_and_momentum_bug_switch():
    net = _Net()
    groups = {g["name"]: g for g in parameter_groups(net, OptimConfig())}
    assert set(groups) == {"conv_weight", "conv_bias", "deconv_weight"}
    assert groups["conv_bias"]["lr_mult"] == 2.0 and groups["conv_bias"]["weight_decay"] == 0.0
    assert groups["deconv_weight"]["lr_mult"] == 10.0 and groups["deconv_weight"]["weight_decay"] == 5e-4
    bugged = build_optimizer(net, OptimConfig(momentum_equals_weight_decay=True))
    assert bugged.defaults["momentum"] == 5e-4  # the released code's positional-argument bug
    fixed = build_optimizer(net, OptimConfig())
    assert fixed.defaults["momentum"] == 0.9
    set_poly_lr(fixed, 0.01, 50, 100, 0.9)
    lrs = {g["name"]: g["lr"] for g in fixed.param_groups}
    assert lrs["deconv_weight"] == pytest.approx(0.1 * 0.5**0.9)
    uniform = parameter_groups(net, OptimConfig(lr_multipliers="uniform"))
    assert len(uniform) == 1 and len(uniform[0]["params"]) == 3
    assert all(p.requires_grad for p in uniform[0]["params"])
    assert not any(p is net.bn.weight for g in groups.values() for p in g["params"])
    _ = torch  # noqa


def test_reconstructor_optimizer_adam_and_its_own_learning_rate():

    net = _Net()
    cfg = OptimConfig(reconstructor_optimizer="adam", reconstructor_lr=2e-4, adam_betas=[0.5, 0.999])
    opt = build_reconstructor_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.5, 0.999)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["weights"]["weight_decay"] == 5e-4 and groups["biases"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["biases"]["params"]} == {id(net.conv.bias)}
    set_poly_lr(opt, reconstructor_base_lr(cfg), 50, 100, 0.9)
    assert all(g["lr"] == pytest.approx(2e-4 * 0.5**0.9) for g in opt.param_groups)  # no layer multipliers
    sgd = build_reconstructor_optimizer(net, OptimConfig(reconstructor_lr=0.1))
    assert {g["name"]: g["lr"] for g in sgd.param_groups}["deconv_weight"] == pytest.approx(1.0)
