"""Backbones returning named stage features.

Every backbone's ``forward(x)`` returns a dict with (at least) these keys, used for the CAM head and the
reconstructor's encoder taps:

* ``stage3``: stride-4 features;
* ``stage4``: stride-8 features (ResNet-38: BN-ReLU of b4_5, the input of b5; torchvision: layer2);
* ``stage5``: the stage before the last (ResNet-38: BN-ReLU of b5_2, the input of b6; torchvision: layer3);
* ``final``: the last feature (ResNet-38: ReLU(bn7(b7)); torchvision: layer4).

``out_channels[name]`` gives each one's channel count. ``forward(x) = tail(trunk(x))``: the trunk holds no dropout,
so with BatchNorm frozen its output is the same in train and eval mode, and one ACR iteration can share it between
its two classifier passes (train.share_classifier_trunk). BatchNorm can be frozen (eval mode, no gradients) with
:func:`freeze_batchnorm`, as the released ACR code does in both networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from acr.errors import ConfigError
from acr.registry import BACKBONES


# --------------------------------------------------------------------------------------------------------------------
# ResNet-38 (wide ResNet-38 "resnet38d" of psa / AffinityNet, output stride 8). Parameter names match psa's
# converted weights so that the community's .params/.pth files load without renaming.


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, first_dilation: int | None = None,
                 dilation: int = 1):
        super().__init__()
        self.same_shape = in_ch == out_ch and stride == 1
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, mid_ch, 3, stride, padding=first_dilation, dilation=first_dilation,
                                       bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, BN-ReLU of the input)."""
        pre = F.relu(self.bn_branch2a(x))
        branch1 = x if self.same_shape else self.conv_branch1(pre)
        b = self.conv_branch2a(pre)
        b = self.conv_branch2b1(F.relu(self.bn_branch2b1(b)))
        return branch1 + b, pre


class ResBlockBottleneck(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.relu(self.bn_branch2a(x))
        branch1 = x if self.same_shape else self.conv_branch1(pre)
        b = self.conv_branch2a(pre)
        b = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(b))))
        b = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(b))))
        return branch1 + b, pre


class ResNet38d(nn.Module):
    """WRN-38 with output stride 8 (conv1a, b2..b7, bn7), Dropout2d(0.2) in b6/b7 as in ACR's released code."""

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)
        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)
        self.b4 = ResBlock(256, 512, 512, stride=2)
        self.b4_1 = ResBlock(512, 512, 512)
        self.b4_2 = ResBlock(512, 512, 512)
        self.b4_3 = ResBlock(512, 512, 512)
        self.b4_4 = ResBlock(512, 512, 512)
        self.b4_5 = ResBlock(512, 512, 512)
        self.b5 = ResBlock(512, 512, 1024, stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)
        self.b6 = ResBlockBottleneck(1024, 2048, stride=1, dilation=4, dropout=dropout)
        self.b7 = ResBlockBottleneck(2048, 4096, dilation=4, dropout=dropout)
        self.bn7 = nn.BatchNorm2d(4096)
        self.out_channels = {"stage3": 256, "stage4": 512, "stage5": 1024, "final": 4096}
        self.output_stride = 8

    def trunk(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """conv1a..b5_2: no dropout, so with frozen BatchNorm the same in train and eval mode."""
        x = self.conv1a(x)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2"):
            x, _ = getattr(self, name)(x)
        x, stage3 = self.b4(x)  # b4's BN-ReLU input = BN-ReLU of b3_2 (stride 4)
        for name in ("b4_1", "b4_2", "b4_3", "b4_4", "b4_5"):
            x, _ = getattr(self, name)(x)
        x, stage4 = self.b5(x)
        x, _ = self.b5_1(x)
        x, _ = self.b5_2(x)
        return {"stage3": stage3, "stage4": stage4, "trunk": x}

    def tail(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """b6, b7 (with their dropout) and bn7 on :meth:`trunk`'s output."""
        x, stage5 = self.b6(feats["trunk"])
        x, _ = self.b7(x)
        return {"stage3": feats["stage3"], "stage4": feats["stage4"], "stage5": stage5, "final": F.relu(self.bn7(x))}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.tail(self.trunk(x))


# --------------------------------------------------------------------------------------------------------------------
# torchvision ResNets, dilated to output stride 8 or 16.


def _dilate_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 stage with dilated 3x3 convs (works for Basic and Bottleneck)."""
    for i, block in enumerate(layer):
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d):
                if conv.stride == (2, 2):
                    conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    d = dilation if i > 0 else max(1, dilation // 2)
                    conv.dilation, conv.padding = (d, d), (d, d)


class TorchvisionResNet(nn.Module):
    def __init__(self, name: str, output_stride: int):
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None)
        if output_stride == 8:
            _dilate_layer(net.layer3, 2)
            _dilate_layer(net.layer4, 4)
        elif output_stride == 16:
            _dilate_layer(net.layer4, 2)
        else:
            raise ConfigError(f"model.output_stride must be 8 or 16, got {output_stride}")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        self.out_channels = {"stem": 64, "stage3": 64 * expansion, "stage4": 128 * expansion,
                             "stage5": 256 * expansion, "final": 512 * expansion}
        self.output_stride = output_stride

    def trunk(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything before layer4 (no dropout anywhere: with frozen BatchNorm the same in train and eval mode)."""
        stem = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # stride 4: IRN's x1 (its boundary branch's 1st tap)
        s3 = self.layer1(stem)
        s4 = self.layer2(s3)
        return {"stem": stem, "stage3": s3, "stage4": s4, "stage5": self.layer3(s4)}

    def tail(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**feats, "final": self.layer4(feats["stage5"])}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.tail(self.trunk(x))


def _resnet38d(output_stride: int, dropout: bool) -> nn.Module:
    return ResNet38d(dropout=0.2 if dropout else 0.0)


def _torchvision(name: str):
    return lambda output_stride, dropout: TorchvisionResNet(name, output_stride)


# acr.registry.BACKBONES name -> builder(output_stride, dropout)
BUILDERS = {"resnet38d": _resnet38d, "resnet50": _torchvision("resnet50"), "resnet101": _torchvision("resnet101"),
            "resnet18": _torchvision("resnet18")}
assert set(BUILDERS) == {n for n, s in BACKBONES.items() if not s.transformer}, \
    "acr.registry.BACKBONES and the builders disagree"


def build_backbone(name: str, output_stride: int = 8, dropout: bool = True) -> nn.Module:
    """The backbone `name` of acr.registry.BACKBONES at `output_stride` (one it supports)."""
    if name in BACKBONES and BACKBONES[name].transformer:
        raise ConfigError(f"{name} is a ViT: it is the classifier's backbone only (acr.models.mctformer); the "
                          "reconstructor's encoder, IRN and DeepLab need a CNN (model.vit.encoder_backbone)")
    if name not in BUILDERS:
        raise ConfigError(f"unknown model.backbone '{name}' (available: {', '.join(BACKBONES)})")
    if output_stride not in BACKBONES[name].output_strides:
        strides = " or ".join(map(str, BACKBONES[name].output_strides))
        raise ConfigError(f"{name} has output stride {strides} only, got model.output_stride={output_stride}")
    return BUILDERS[name](output_stride, dropout)


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm in eval mode and stop its gradients (called again after each `.train()`)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, batches) -> None:
    """Estimate every BatchNorm's running mean/variance from data (cumulative average over `batches`, an iterable of
    image tensors), leaving weights untouched. Used at initialisation when no pretrained weights are given: frozen BN
    with the default statistics (mean 0, variance 1) is the identity and a randomly initialised ResNet then trains
    poorly; with data statistics every layer starts normalised, and BN can stay frozen (no batch coupling, so the
    result does not depend on how the batch is split among workers)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    for x in batches:
        module(x)
    for m, (mom, training) in zip(bns, saved):
        m.momentum = mom
        m.train(training)
