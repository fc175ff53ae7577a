"""DeepLab for the last stage of WSSS: a dilated backbone (the same ones as the classifier) and an ASPP head.

* ``aspp_v2``: DeepLab-v2's ASPP, parallel 3x3 convolutions at rates 6/12/18/24 straight to class scores, summed
  (deeplab-pytorch's DeepLabV2 head); the paper's DeepLab on ResNet-38.
* ``aspp_v3``: torchvision's DeepLabV3 head (``torchvision.models.segmentation.deeplabv3.DeepLabHead``: ASPP with
  image pooling, 256 channels, 3x3 conv, 1x1 classifier); on resnet50/101 at output stride 8 this is torchvision's
  ``deeplabv3_resnet50/101`` without the auxiliary head.

The logits are upsampled bilinearly to the input size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from acr.models.backbones import build_backbone, freeze_batchnorm
from acr.models.weights import WeightsError, load_backbone_weights


class ASPPv2(nn.Module):
    """DeepLab-v2's atrous spatial pyramid pooling: sum of 3x3 convolutions at several rates (weights N(0, 0.01),
    biases 0, as deeplab-pytorch)."""

    def __init__(self, in_channels: int, num_classes: int, rates=(6, 12, 18, 24)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for c in self.convs:
            nn.init.normal_(c.weight, std=0.01)
            nn.init.zeros_(c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(c(x) for c in self.convs)


class DeepLab(nn.Module):
    def __init__(self, backbone: str, num_labels: int, head: str = "aspp_v2", output_stride: int = 8,
                 freeze_bn: bool = True, pretrained: str | None = None):
        """`num_labels` counts the background (C + 1)."""
        super().__init__()
        self.freeze_bn = freeze_bn
        self.backbone = build_backbone(backbone, output_stride, dropout=False)
        if pretrained:
            load_backbone_weights(self.backbone, pretrained, backbone)
        channels = self.backbone.out_channels["final"]
        if head == "aspp_v2":
            self.head = ASPPv2(channels, num_labels)
        elif head == "aspp_v3":  # torchvision's rates are for output stride 8; halved at 16 (DeepLabV3 paper)
            self.head = DeepLabHead(channels, num_labels, (12, 24, 36) if output_stride == 8 else (6, 12, 18))
        else:
            raise ValueError(f"unknown segment.head '{head}' (aspp_v2 | aspp_v3)")
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self.backbone)
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(image)["final"])
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self, lr: float, head_multiplier: float) -> list[dict]:
        """Backbone at lr, head at lr x head_multiplier (trainable parameters only); `lr_mult` is what the poly
        schedule scales (acr.method.optim.set_poly_lr)."""
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr, "lr_mult": 1.0},
                {"params": list(self.head.parameters()), "lr": lr * head_multiplier, "lr_mult": head_multiplier}]


def init_backbone_from_checkpoint(model: DeepLab, sd: dict, where: str) -> None:
    """Copy a trained CNN backbone (`sd`: its state dict, acr.checkpoint.checkpoint_backbone) into DeepLab's."""
    own = model.backbone.state_dict()
    missing = [k for k in own if k not in sd]
    bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or bad:
        raise WeightsError(f"{where} does not fit DeepLab's backbone ({len(missing)} tensors "
                           f"missing, {len(bad)} of another shape, e.g. {(missing + bad)[:2]}); set segment.backbone "
                           f"to its name")
    model.backbone.load_state_dict(sd)


def build_deeplab(segment_cfg, num_labels: int, init_backbone: dict | None = None,
                  init_where: str | Path = "") -> DeepLab:
    """DeepLab of `segment_cfg`, its backbone's weights from `init_backbone` (a state dict) where given."""
    sg = segment_cfg
    model = DeepLab(sg.backbone, num_labels, sg.head, sg.output_stride, sg.freeze_bn, sg.pretrained)
    if init_backbone is not None:
        init_backbone_from_checkpoint(model, init_backbone, str(init_where))
    return model


@torch.no_grad()
def predict_probabilities(model: nn.Module, image: torch.Tensor, scales, flip: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(single-scale, multi-scale) class probabilities (L, H, W) of a normalised (3, H, W) image: the softmax at
    scale 1, and the mean of the softmaxes over `scales` (and their horizontal flips), each resized to H x W."""
    h, w = image.shape[-2:]
    single, total, n = None, 0.0, 0
    for s in scales:
        x = image[None] if s == 1 else F.interpolate(image[None], scale_factor=s, mode="bilinear",
                                                     align_corners=False)
        p = F.softmax(model(torch.cat([x, x.flip(-1)]) if flip else x).float(), 1)
        if s == 1:
            single = p[0]
        p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        total = total + (p[0] + p[1].flip(-1) if flip else p[0])
        n += 2 if flip else 1
    if single is None:
        single = F.softmax(model(image[None]).float(), 1)[0]
    return single, total / n
