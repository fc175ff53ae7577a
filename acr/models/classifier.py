"""The classifier F: backbone + CAM head; logits are the global average of the CAM (released ACR code)."""

from __future__ import annotations

import torch
from torch import nn

from acr.models.backbones import build_backbone, freeze_batchnorm
from acr.models.weights import load_backbone_weights


def build_cam_head(in_channels: int, num_classes: int, kind: str, hidden: int) -> nn.Module:
    """`two_layer`: 1x1 conv (no bias) -> ReLU -> 1x1 conv (no bias), as the released code; `linear`: one 1x1 conv
    (the paper's text). Xavier-uniform init."""
    if kind == "two_layer":
        head = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                             nn.Conv2d(hidden, num_classes, 1, bias=False))
    elif kind == "linear":
        head = nn.Sequential(nn.Conv2d(in_channels, num_classes, 1, bias=False))
    else:
        raise ValueError(f"unknown model.cam_head '{kind}' (two_layer | linear)")
    for m in head:
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
    return head


class FrozenBNModule(nn.Module):
    """A module whose BatchNorms stay in eval mode without gradients whenever `freeze_bn` is set."""

    freeze_bn: bool = True

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self)
        return self


class Classifier(FrozenBNModule):
    def __init__(self, backbone: str, num_classes: int, output_stride: int = 8, cam_head: str = "two_layer",
                 cam_head_hidden: int = 256, freeze_bn: bool = True, dropout: bool = True,
                 pretrained: str | None = None):
        super().__init__()
        self.freeze_bn = freeze_bn
        self.backbone = build_backbone(backbone, output_stride, dropout)
        if pretrained:
            load_backbone_weights(self.backbone, pretrained, backbone)
        self.cam_head = build_cam_head(self.backbone.out_channels["final"], num_classes, cam_head, cam_head_hidden)
        self.train()

    def trunk(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone's trunk features (no dropout in them), to pass as `forward(image, trunk=...)`."""
        return self.backbone.trunk(image)

    def forward(self, image: torch.Tensor, trunk: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the raw CAM Z (B x C x h x w, may be negative) and the logits p = GAP(Z). With `trunk` (from
        :meth:`trunk` on the same image and weights) the trunk is not computed again."""
        feats = self.backbone.tail(self.backbone.trunk(image) if trunk is None else trunk)
        cam = self.cam_head(feats["final"])
        return cam, cam.mean(dim=(2, 3))

    def localisation_map(self, image: torch.Tensor) -> torch.Tensor:
        """The map of inference (acr.cam.infer_cams): the raw CAM."""
        return self(image)[0]
