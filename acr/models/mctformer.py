"""MCTformer-v2 (Xu et al., "Multi-class Token Transformer for Weakly Supervised Semantic Segmentation", CVPR 2022):
a DeiT with one class token per class and a convolutional PatchCAM head on the patch tokens.

Training (xulianuwa/MCTformer at 355a4aa: engine.py `train_one_epoch`, models.py `MCTformerV2.forward`): two multi-label
soft-margin losses, one on the class-token scores (each output class token averaged over its channels; the last block's
output, without the final LayerNorm) and one on the PatchCAM scores (global average of a 3x3 conv on the patch-token
map). Localisation (`generate_attention_maps_ms`, run.sh): the class-to-patch attention of the last 3 blocks
(averaged over heads, summed over blocks) times ReLU(PatchCAM) ("fused"), refined by the patch-to-patch attention of
all blocks (`--patch-attn-refine`).

For ACR the classifier's map A_t must carry F's gradient in the CU phase: `model.vit.train_cam` chooses which map ACR
decomposes (default `patchcam`, the map trained by global pooling like the ResNet CAM the equations were written for;
MCTformer detaches PatchCAM inside its fused map, which would leave ACR's terms only the attention to act on).
`model.vit.cam` chooses the map of inference (default `fused`, MCTformer-v2's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acr.models.vit import VIT_SIZES, VisionTransformer
from acr.models.weights import load_vit_weights

CAM_KINDS = ("patchcam", "fused", "class_attention")


def head_mean(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Stack every block's attention and average over heads: (blocks, B, N, N) (MCTformer: `torch.mean(.., dim=2)`)."""
    return torch.stack(attentions).mean(dim=2)


def class_attention_maps(attn: torch.Tensor, num_classes: int, layers: int, grid: tuple[int, int]) -> torch.Tensor:
    """MCTformer's class-specific localisation maps: the attention of class token c to every patch token, summed over
    the last `layers` blocks. `attn`: :func:`head_mean`'s (blocks, B, N, N) -> (B, C, h, w)."""
    a = attn[-layers:].sum(dim=0)[:, :num_classes, num_classes:]
    return a.reshape(a.shape[0], num_classes, *grid)


def patch_affinity(attn: torch.Tensor, num_classes: int) -> torch.Tensor:
    """MCTformer's patch-level pairwise affinity: the patch-to-patch attention summed over all blocks, (B, P, P)
    with P = h w; row i says how much patch i attends to each patch j."""
    return attn[:, :, num_classes:, num_classes:].sum(dim=0)


def refine_with_affinity(maps: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """MCTformer's affinity refinement: map'_c(i) = sum_j affinity(i, j) map_c(j). (B, C, h, w) -> (B, C, h, w)."""
    b, c, h, w = maps.shape
    return (affinity[:, None] @ maps.reshape(b, c, h * w, 1)).reshape(b, c, h, w)


def fuse_maps(class_attention: torch.Tensor, patchcam: torch.Tensor) -> torch.Tensor:
    """MCTformer-v2's fused map: the class-to-patch attention times ReLU(PatchCAM), elementwise."""
    return class_attention * patchcam.clamp(min=0)


def class_token_scores(class_tokens: torch.Tensor) -> torch.Tensor:
    """MCTformer's class scores: each output class token (B, C, D) averaged over its D channels -> (B, C)."""
    return class_tokens.mean(dim=-1)


class MCTformerV2(nn.Module):
    """The classifier F of the ViT variant. `forward(image)` returns (the map ACR decomposes, logits) with logits
    (B, C, 2): the class-token and the PatchCAM scores, each trained with its own loss (acr.method.acr
    `classification_loss` sums them). :meth:`localisation_map` gives the map of inference."""

    freeze_bn = False  # no BatchNorm

    def __init__(self, variant: str, num_classes: int, image_size: int, train_cam: str = "patchcam",
                 cam: str = "fused", attention_layers: int = 3, affinity_refine: bool = True,
                 drop_path_rate: float = 0.1, pretrained: str | None = None):
        super().__init__()
        self.num_classes, self.train_cam, self.cam = num_classes, train_cam, cam
        self.attention_layers, self.affinity_refine = attention_layers, affinity_refine
        self.backbone = VisionTransformer(VIT_SIZES[variant], image_size, num_classes, drop_path_rate)
        if pretrained:
            load_vit_weights(self.backbone, pretrained, variant)
        d = self.backbone.size.embed_dim
        self.cam_head = nn.Conv2d(d, num_classes, 3, padding=1)  # PatchCAM
        nn.init.trunc_normal_(self.cam_head.weight, std=0.02)  # MCTformer: timm's _init_weights on the head
        nn.init.zeros_(self.cam_head.bias)

    def trunk(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Nothing is shared between ACR's two classifier passes (stochastic depth acts in every block)."""
        return {"image": image}

    def maps(self, image: torch.Tensor, kinds: tuple[str, ...] = CAM_KINDS, affinity: bool = True
             ) -> dict[str, torch.Tensor]:
        """PatchCAM and the class-token scores, plus the attention maps in `kinds` and, with `affinity`, the patch
        affinity: a training step computes only the map ACR decomposes (with the default `patchcam`, no attention
        map at all)."""
        out = self.backbone(image)
        c, grid, layers = self.num_classes, out["grid"], self.attention_layers
        patches = out["last_block"][:, c:]
        patchcam = self.cam_head(patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid))
        m = {"patchcam": patchcam, "scores": class_token_scores(out["last_block"][:, :c])}
        if {"fused", "class_attention"} & set(kinds):
            class_attention = class_attention_maps(head_mean(out["attentions"][-layers:]), c, layers, grid)
            m.update(class_attention=class_attention, fused=fuse_maps(class_attention, patchcam))
        if affinity:
            m["affinity"] = patch_affinity(head_mean(out["attentions"]), c)
        return m

    def forward(self, image: torch.Tensor, trunk: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.maps(image, (self.train_cam,), affinity=False)
        logits = torch.stack([m["scores"], m["patchcam"].mean(dim=(2, 3))], dim=-1)
        return m[self.train_cam], logits

    def localisation_map(self, image: torch.Tensor) -> torch.Tensor:
        """The map of inference (`model.vit.cam`), refined by the patch affinity where `model.vit.affinity_refine`."""
        p = self.backbone.size.patch_size
        h, w = image.shape[-2:]
        if h % p or w % p:  # MCTformer crops to a multiple of the patch size; resizing keeps the whole image
            size = (max(p, round(h / p) * p), max(p, round(w / p) * p))
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        m = self.maps(image, (self.cam,), self.affinity_refine)
        return refine_with_affinity(m[self.cam], m["affinity"]) if self.affinity_refine else m[self.cam]
