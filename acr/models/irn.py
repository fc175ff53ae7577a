"""IRN's class-boundary branch on a frozen backbone (Ahn, Cho & Kwak, CVPR 2019; net/resnet50_irn.py): the network
of IRN's maths in acr.refine.irn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class IRNet(nn.Module):
    """IRN's class boundary branch (net/resnet50_irn.py fc_edge1..6) on a frozen backbone: for each of the backbone's
    features stem (IRN's x1: conv1-bn-relu-maxpool, stride 4; torchvision ResNets), stage3 (stride 4), stage4, stage5,
    final: Conv1x1(c -> width, no bias) + GroupNorm(4, width), bilinear upsampling to the stage3 size, ReLU;
    concatenated; Conv1x1(n width -> 1) and sigmoid. ResNet-38 has no stem tap (its stride-4 features start at b3):
    four branches. The backbone has no gradients and stays in eval mode (IRN's Net.train / .detach())."""

    TAPS = ("stem", "stage3", "stage4", "stage5", "final")

    def __init__(self, backbone: nn.Module, width: int = 32):
        super().__init__()
        if width % 4:
            raise ValueError(f"IRNet: width must be a multiple of 4 (GroupNorm(4, width)), got {width}")
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.features = tuple(name for name in self.TAPS if name in backbone.out_channels)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(backbone.out_channels[name], width, 1, bias=False), nn.GroupNorm(4, width))
            for name in self.features)
        self.fuse = nn.Conv2d(len(self.features) * width, 1, 1, bias=True)
        self.backbone.eval()

    def train(self, mode: bool = True) -> IRNet:
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The boundary branch's parameters (the backbone's are frozen)."""
        return [*self.branches.parameters(), *self.fuse.parameters()]

    def boundary_branch(self) -> nn.Module:
        """The trained part alone (its state dict has IRNet's names, `branches.*` and `fuse.*`): what a checkpoint
        holds, the frozen backbone coming from the classifier's checkpoint."""
        return nn.ModuleDict({"branches": self.branches, "fuse": self.fuse})

    def forward(self, image: Tensor) -> Tensor:
        """`image` (B, 3, H, W) -> (B, H4, W4) class boundary probabilities at the stage3 (stride-4) resolution."""
        return torch.sigmoid(self.logits(image))

    def logits(self, image: Tensor) -> Tensor:
        """The boundary logits (B, H4, W4) before the sigmoid (IRN's EdgeDisplacement averages an image's and its
        flip's logits, then applies the sigmoid)."""
        with torch.no_grad():
            features = self.backbone(image)
        size = features["stage3"].shape[-2:]
        maps = []
        for name, branch in zip(self.features, self.branches):
            f = branch(features[name].detach())
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            maps.append(F.relu(f))
        return self.fuse(torch.cat(maps, 1))[:, 0]
