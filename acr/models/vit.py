"""A DeiT vision transformer (Touvron et al. 2021) whose blocks return their attention probabilities.

The parameter names are timm's (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.<i>.norm1 / attn.qkv /
attn.proj / norm2 / mlp.fc1 / mlp.fc2`, `norm`), so a timm-format DeiT checkpoint loads without renaming
(acr.models.weights). timm's own Attention computes a fused kernel that does not return the attention, which
MCTformer needs; tests/test_vit.py checks that this implementation gives timm's outputs with the same weights.

`num_tokens` leading tokens precede the patch tokens: 1 for DeiT, one per class for MCTformer. The position embedding
is learnt for the grid of `image_size` and resized (bicubic) for other input sizes, whose sides must be multiples of
the patch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from acr.errors import ConfigError


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    mlp_ratio: float = 4.0


# DeiT's sizes (Touvron et al. 2021, Table 1; timm deit_tiny/small/base_patch16_224).
VIT_SIZES = {"deit_tiny": ViTSize(192, 12, 3), "deit_small": ViTSize(384, 12, 6), "deit_base": ViTSize(768, 12, 12)}


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: in training, zero each sample's residual branch with probability p (rescaled by 1/(1-p))."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, attention probabilities B x heads x N x N)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d)), attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, num_heads), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, attn = self.attn(self.norm1(x))
        x = x + drop_path(out, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return x, attn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DeiT without its classification head: `forward(image)` returns the final (layer-normed) tokens, the
    un-normed output of the last block, and every block's attention."""

    def __init__(self, size: ViTSize, image_size: int, num_tokens: int = 1, drop_path_rate: float = 0.0):
        super().__init__()
        if image_size % size.patch_size:
            raise ConfigError(f"image side {image_size} is not a multiple of the ViT's patch size {size.patch_size}")
        self.size, self.num_tokens, self.grid = size, num_tokens, image_size // size.patch_size
        d = size.embed_dim
        self.patch_embed = PatchEmbed(size.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, num_tokens, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + self.grid ** 2, d))
        # stochastic depth rising linearly over the blocks (DeiT, timm)
        rates = torch.linspace(0, drop_path_rate, size.depth).tolist()
        self.blocks = nn.ModuleList(Block(d, size.num_heads, size.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.out_channels = {"final": d}
        self.output_stride = size.patch_size
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's ViT init: truncated normal (std 0.02) for the tokens, position embedding and linear weights."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def grid_of(self, image: torch.Tensor) -> tuple[int, int]:
        h, w = image.shape[-2:]
        p = self.size.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the ViT's patch size {p} (resize or crop it to "
                             f"{h - h % p}x{w - w % p})")
        return h // p, w // p

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The learnt embedding, its patch part resized (bicubic) to `grid` where that differs from the learnt one."""
        pe = self.pos_embed
        if grid == (self.grid, self.grid):
            return pe
        tokens, patches = pe[:, : self.num_tokens], pe[:, self.num_tokens:]
        patches = patches.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([tokens, patches.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, image: torch.Tensor) -> dict:
        outputs, attentions, grid = self.run_blocks(image)
        x = outputs[-1]
        return {"tokens": self.norm(x), "last_block": x, "attentions": attentions, "grid": grid}

    def run_blocks(self, image: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, int]]:
        """Every block's output tokens and attention probabilities, and the patch grid."""
        grid = self.grid_of(image)
        x = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding(grid)
        outputs, attentions = [], []
        for block in self.blocks:
            x, attn = block(x)
            outputs.append(x)
            attentions.append(attn)
        return outputs, attentions, grid


class ViTFeatureMaps(VisionTransformer):
    """A DeiT with one class token as a backbone of maps (the reconstructor's encoder G_E on ViT blocks,
    `model.vit.encoder: vit_blocks`): the patch tokens after block i as a (B, D, H/16, W/16) map `block<i>` (1-based),
    and `final`, the last block's after the final norm. Its parameters have timm's names (weights: load_vit_weights)."""

    def __init__(self, size: ViTSize, image_size: int, drop_path_rate: float = 0.0):
        super().__init__(size, image_size, 1, drop_path_rate)
        self.out_channels = {**{f"block{i + 1}": size.embed_dim for i in range(size.depth)}, "final": size.embed_dim}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs, _, grid = self.run_blocks(image)

        def as_map(x: torch.Tensor) -> torch.Tensor:
            patches = x[:, self.num_tokens:]
            return patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid)

        maps = {f"block{i + 1}": as_map(x) for i, x in enumerate(outputs)}
        maps["final"] = as_map(self.norm(outputs[-1]))
        return maps
