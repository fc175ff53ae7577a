"""The reconstructor G = (G_E, G_D).

G_E: a second backbone whose stage outputs ("taps") are projected by bias-free 1x1 convs and concatenated into the
feature X (released code: stage4 -> 64, stage5 -> 128, final -> 256 channels, all at stride 8). Taps of different
resolutions are resized to the finest one. G_E may keep a classification head (the released code trains it with BCE).

G_D: the pix2pix U-Net (`decoder_depth` levels of 4x4 stride-2 convs with InstanceNorm, LeakyReLU, dropout 0.5 on
the deep levels; transposed convs back up with skip concatenation; nearest x2 + 3x3 conv, no output activation).
Input side: a multiple of 2**decoder_depth (the released 8 levels: 256 and 512 work, 320 and 384 do not).
If its input is smaller than the image (decomposition at feature resolution), it is bilinearly upsampled first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from acr.models.backbones import build_backbone
from acr.models.classifier import FrozenBNModule, build_cam_head
from acr.models.weights import load_backbone_weights


class InstanceNorm(nn.Module):
    """pix2pix's InstanceNorm2d (no affine, no running statistics) as a GroupNorm with one group per channel: the same
    function (equal to 1e-15 in float64), but PyTorch's CPU GroupNorm keeps the channels_last layout, where
    InstanceNorm2d returns NCHW and makes the next convolution convert its input, and its gradient, back."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.channels, eps=self.eps)


class Dropout(nn.Dropout):
    """nn.Dropout whose mask is drawn in the logical (NCHW) order whatever the input's memory layout: PyTorch's CPU
    dropout draws in memory order, so a channels_last input would get other masks from the same RNG state than the
    NCHW input of the released code. The same draws and values as nn.Dropout on an NCHW input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or x.is_contiguous():
            return super().forward(x)
        noise = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p).div_(1 - self.p)
        return x * noise  # in x's layout


class UNetDecoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int = 3, depth: int = 8, width: int = 64, dropout: bool = True):
        super().__init__()
        p = 0.5 if dropout else 0.0
        chans = [width * min(2**i, 8) for i in range(depth)]  # 64,128,256,512,512,...
        self.downs = nn.ModuleList()
        prev = in_channels
        for i, ch in enumerate(chans):
            layers: list[nn.Module] = [nn.Conv2d(prev, ch, 4, 2, 1, bias=False)]
            if 0 < i < depth - 1:
                layers.append(InstanceNorm(ch))
            layers.append(nn.LeakyReLU(0.2))
            if i >= 3 and p:
                layers.append(Dropout(p))
            self.downs.append(nn.Sequential(*layers))
            prev = ch
        self.ups = nn.ModuleList()
        for j in range(depth - 1):
            level = depth - 2 - j  # the down level whose resolution this up step produces
            out = chans[level]
            layers = [nn.ConvTranspose2d(prev, out, 4, 2, 1, bias=False), InstanceNorm(out), nn.ReLU(inplace=True)]
            if level >= 3 and p:
                layers.append(Dropout(p))
            self.ups.append(nn.Sequential(*layers))
            prev = out * 2
        self.final = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(prev, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips.pop()
        for up in self.ups:
            x = torch.cat([up(x), skips.pop()], dim=1)
        return self.final(x)


class Reconstructor(FrozenBNModule):
    def __init__(self, backbone: str | nn.Module, num_classes: int, output_stride: int = 8,
                 taps=("stage4", "stage5", "final"),
                 tap_channels=(64, 128, 256), decoder_depth: int = 8, decoder_width: int = 64,
                 cls_head: bool = True, cam_head: str = "two_layer", cam_head_hidden: int = 256,
                 freeze_bn: bool = True, dropout: bool = True, pretrained: str | None = None):
        super().__init__()
        self.freeze_bn = freeze_bn
        # a CNN of acr.registry.BACKBONES by name, or a built backbone of maps (acr.models.vit.ViTFeatureMaps)
        self.backbone = backbone if isinstance(backbone, nn.Module) else build_backbone(backbone, output_stride, dropout)
        if pretrained:
            load_backbone_weights(self.backbone, pretrained, backbone)
        unknown = [t for t in taps if t not in self.backbone.out_channels]
        if unknown:
            raise ValueError(f"model.encoder_taps: unknown tap(s) {unknown} (available: "
                             f"{', '.join(self.backbone.out_channels)})")
        self.taps = nn.ModuleDict({t: nn.Conv2d(self.backbone.out_channels[t], c, 1, bias=False)
                                   for t, c in zip(taps, tap_channels)})
        self.cls_head = (build_cam_head(self.backbone.out_channels["final"], num_classes, cam_head, cam_head_hidden)
                         if cls_head else None)
        self.feature_channels = sum(tap_channels)
        self.decoder = UNetDecoder(self.feature_channels, 3, decoder_depth, decoder_width, dropout)
        self.train()

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """G_E: (encoder class logits or None, X at the finest tap resolution)."""
        feats = self.backbone(image)
        logits = self.cls_head(feats["final"]).mean(dim=(2, 3)) if self.cls_head is not None else None
        projected = [proj(feats[name]) for name, proj in self.taps.items()]
        size = max((p.shape[-2:] for p in projected), key=lambda s: s[0] * s[1])
        x = torch.cat([p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                       for p in projected], dim=1)
        return logits, x

    def decode(self, inputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """G_D on a batch of (masked) features; upsampled to `size` first if they are smaller."""
        if inputs.shape[-2:] != tuple(size):
            inputs = F.interpolate(inputs, size=size, mode="bilinear", align_corners=False)
        return self.decoder(inputs)

    def forward(self, image: torch.Tensor,
                compose: Callable[[torch.Tensor], list[torch.Tensor]] | None = None):
        """One pass through G_E and, if `compose` is given, through G_D on each batch of decoder inputs that
        `compose(X)` returns (a list). A single forward per phase keeps DDP's gradient hooks exact."""
        logits, x = self.encode(image)
        recons = [self.decode(inp, image.shape[-2:]) for inp in compose(x)] if compose is not None else None
        return logits, x, recons
