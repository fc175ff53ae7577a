"""ACR: adversarial learning of a classifier F and a reconstructor G = (G_E, G_D) (Kweon et al., CVPR 2023).

Each equation of the paper is one function below, named after what it computes, with the equation number in its
docstring. Where the authors' released code differs from the paper, the difference is an argument whose values name
the two behaviours (see acr.config.MethodConfig). One training iteration is :func:`ru_phase` (updates G only) then
:func:`cu_phase` (updates F only). This module knows nothing of Ray; it receives modules that may be DDP-wrapped.

Shapes: B batch, C classes (no background channel), h x w CAM/feature resolution, H x W crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from acr.config import MethodConfig

# ---------------------------------------------------------------------------------------------------------------------
# Building blocks


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def sample_target(labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Target class t_b drawn uniformly among the classes present in image b (paper Sec. 4.1, as in OC-CSE).

    `u` (B,) are uniforms in [0, 1) from the data pipeline's per-image generator, so the draw does not depend on the
    worker. Returns (B,) class indices. An image without any label raises ValueError.
    """
    present = labels > 0.5
    counts = present.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("sample_target: an image has no class label")
    k = torch.clamp((u * counts).long(), max=counts - 1)  # which present class, 0-based
    order = torch.cumsum(present.long(), 1) - 1  # rank of each present class
    hit = present & (order == k[:, None])
    return hit.float().argmax(1)


def normalize_cam(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per image and class, over space: r = ReLU(Z); A = ReLU(r - min r - eps) / (max r - min r + eps) (released
    code's `max_norm`). Produces exact zeros where r is at its minimum; gradients flow through max and min.
    Computed in at least float32 (a bf16 CAM under autocast is promoted: it is small, and its range matters)."""
    r = F.relu(cam.to(torch.promote_types(cam.dtype, torch.float32)))
    flat = r.flatten(2)
    lo = flat.min(-1)[0][..., None, None]
    hi = flat.max(-1)[0][..., None, None]
    return F.relu(r - lo - eps) / (hi - lo + eps)


def target_cam(cam_norm: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A_t: the normalised CAM of the target class (absent classes are zeroed first). Returns (B, 1, h, w)."""
    a = cam_norm * labels[:, :, None, None]
    return a[torch.arange(a.shape[0], device=a.device), target][:, None]


def decompose(x: torch.Tensor, a_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3: X_t = A_t ⊙ X and X_nt = (1 - A_t) ⊙ X."""
    return a_t * x, (1.0 - a_t) * x


def remnant_grid(grid_u: torch.Tensor, q: float, size: tuple[int, int]) -> torch.Tensor:
    """SRF grid g (Sec. 4.2.2): g = 1 in a cell with probability q (the cell carries a remnant), one draw per cell of
    an s x s grid (`grid_u` (B, s, s) uniforms), shared by all channels, nearest-upsampled to `size`. (B, 1, *size)."""
    g = (grid_u < q).float()[:, None]
    return F.interpolate(g, size=size, mode="nearest")


def feed_remnants(x_t: torch.Tensor, x_nt: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8-9: X_t^RU = X_t + g ⊙ X_nt and X_nt^RU = X_nt + g ⊙ X_t."""
    return x_t + g * x_nt, x_nt + g * x_t


def ru_validation_masks(a_t: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10: V_t^RU = (1 - A_t) ⊙ (1 - g) and V_nt^RU = A_t ⊙ (1 - g). Without SRF (g = 0) these are the masks of
    Eq. 5-6: V_t^RU = 1 - A_t and V_nt^RU = A_t."""
    return (1.0 - a_t) * (1.0 - g), a_t * (1.0 - g)


def masked_l1(recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, normalization: str,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """|V ⊙ (I - Î)|_1 of Eq. 5, 6, 12, 13, per image then averaged over the batch.

    `tensor_size`: sum over the image / (3 H W) (the released code's `nn.L1Loss` mean over B*3*H*W);
    `mask_area`: sum over the image / (3 * sum of V) (a masked mean). `weights` (B,) zero out images (the released
    code's validity filter); the average is still over the whole batch, so that it does not depend on how the global
    batch is split among workers.
    """
    per_pixel = (mask * (image - recon.to(image.dtype)).abs()).flatten(1).sum(1)  # (B,), in the image's precision
    if normalization == "tensor_size":
        denom = torch.full_like(per_pixel, float(image[0].numel()))
    elif normalization == "mask_area":
        denom = mask.expand_as(image).flatten(1).sum(1).clamp_min(1.0)
    else:
        raise ValueError(f"unknown method.l1_normalization '{normalization}'")
    per_image = per_pixel / denom
    if weights is not None:
        per_image = per_image * weights
    return per_image.mean()


def ru_loss(loss_t: torch.Tensor, loss_nt: torch.Tensor, lambda_t: float, lambda_nt: float) -> torch.Tensor:
    """Eq. 7: L^RU = λ_t^RU L_t^RU + λ_nt^RU L_nt^RU."""
    return lambda_t * loss_t + lambda_nt * loss_nt


def cu_validation_masks(a_t: torch.Tensor, cam: torch.Tensor, target: torch.Tensor, target_mask: str,
                        nontarget_mask: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation masks of Eq. 12-13, detached.

    V_t^CU: `soft` = 1 - A_t (paper); `zero_cam` = 1[A_t == 0] (released code, hard).
    V_nt^CU: `cam` = A_t (paper); `cam_where_top` = A_t ⊙ 1[argmax_c Z_c = t] over all raw CAM channels, absent
    classes included (released code). `a_t` and `cam` must be at the same (image) resolution.
    """
    a = a_t.detach()
    if target_mask == "soft":
        v_t = 1.0 - a
    elif target_mask == "zero_cam":
        v_t = (a == 0).float()
    else:
        raise ValueError(f"unknown method.cu_target_mask '{target_mask}'")
    if nontarget_mask == "cam":
        v_nt = a
    elif nontarget_mask == "cam_where_top":
        top = cam.detach().argmax(1, keepdim=True) == target[:, None, None, None]
        v_nt = a * top.float()
    else:
        raise ValueError(f"unknown method.cu_nontarget_mask '{nontarget_mask}'")
    return v_t, v_nt


def cu_target_loss(recon_t: torch.Tensor, image: torch.Tensor, v_t: torch.Tensor, normalization: str) -> torch.Tensor:
    """Eq. 12: L_t^CU = -|V_t^CU ⊙ (I - Î_t^CU)|_1 (the classifier maximises the reconstruction error)."""
    return -masked_l1(recon_t, image, v_t, normalization)


def cu_nontarget_loss(recon_nt: torch.Tensor, image: torch.Tensor, v_nt: torch.Tensor,
                      normalization: str) -> torch.Tensor:
    """Eq. 13: L_nt^CU = -|V_nt^CU ⊙ (I - Î_nt^CU)|_1."""
    return -masked_l1(recon_nt, image, v_nt, normalization)


def cu_loss(loss_cls: torch.Tensor, loss_t: torch.Tensor, loss_nt: torch.Tensor, lambda_t: float,
            lambda_nt: float) -> torch.Tensor:
    """Eq. 14: L^CU = L_cls^CU + λ_t^CU L_t^CU + λ_nt^CU L_nt^CU."""
    return loss_cls + lambda_t * loss_t + lambda_nt * loss_nt


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cls: binary cross-entropy with logits, mean over B x C (the released code; = multilabel soft margin), in
    the labels' precision (bf16 logits under autocast are promoted). Logits (B, C, K) of a classifier with K scores
    per class (MCTformer-v2: class tokens and PatchCAM) give the sum of the K losses, as MCTformer trains them."""
    if logits.dim() == 3:
        return sum(classification_loss(logits[..., k], labels) for k in range(logits.shape[-1]))
    return F.binary_cross_entropy_with_logits(logits.to(labels.dtype), labels)


def reconstruction_target(image: torch.Tensor, kind: str) -> torch.Tensor:
    """I: the ImageNet-normalised input (`normalized`, released code) or the image in [0, 1] (`unit_range`, paper)."""
    if kind == "normalized":
        return image
    if kind == "unit_range":
        mean = image.new_tensor([0.485, 0.456, 0.406])[None, :, None, None]
        std = image.new_tensor([0.229, 0.224, 0.225])[None, :, None, None]
        return image * std + mean
    raise ValueError(f"unknown method.reconstruction_target '{kind}'")


def _upsample(t: torch.Tensor, size) -> torch.Tensor:
    return t if t.shape[-2:] == tuple(size) else F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def _resize(t: torch.Tensor, size) -> torch.Tensor:
    """Bilinear up, area-average down (a map given at image resolution, taken to the feature resolution)."""
    if t.shape[-1] > size[-1]:
        return F.adaptive_avg_pool2d(t, size)
    return _upsample(t, size)


def adversarial_losses(rec: nn.Module, x: torch.Tensor, image: torch.Tensor, a_t: torch.Tensor, cam: torch.Tensor,
                       target: torch.Tensor, cfg: MethodConfig) -> dict[str, torch.Tensor]:
    """The CU phase's reconstruction terms for a target map `a_t` (B, 1, h, w) at any resolution: {"t": L_t^CU (Eq. 12),
    "nt": L_nt^CU (Eq. 13)}, each present only where its weight is non-zero. `x` is G_E's feature of `image`, `cam`
    the classifier's raw CAM (B, C, h', w') for the released V_nt^CU. Gradients reach `a_t` through the decoder inputs
    X ⊙ A_t and X ⊙ (1 - A_t) only (the masks are detached); `rec` (unwrapped, frozen) decodes both in one pass."""
    size = image.shape[-2:]
    active = [name for w, name in ((cfg.cu_target_weight, "t"), (cfg.cu_nontarget_weight, "nt")) if w != 0]
    if not active:
        return {}
    a_img = _resize(a_t, size)
    if cfg.decompose_at == "image":
        x, a = _upsample(x, size), a_img
    else:
        a = _resize(a_t, x.shape[-2:])
    masks = dict(zip(("t", "nt"), decompose(torch.ones_like(a), a)))  # Eq. 3 on X = 1: X_t = A_t X, X_nt = (1-A_t) X
    inputs = (x[None] * torch.stack([masks[n] for n in active]).to(x.dtype)).flatten(0, 1)  # as in ru_phase
    with record_function("cu/decoder_forward"):
        recon = dict(zip(active, rec.decode(inputs, size).chunk(len(active))))
    image_target = reconstruction_target(image, cfg.reconstruction_target)
    v_t, v_nt = cu_validation_masks(a_img, _upsample(cam, size) if cfg.cu_nontarget_mask == "cam_where_top" else cam,
                                    target, cfg.cu_target_mask, cfg.cu_nontarget_mask)
    out = {}
    if "t" in recon:
        out["t"] = cu_target_loss(recon["t"], image_target, v_t, cfg.l1_normalization)
    if "nt" in recon:
        out["nt"] = cu_nontarget_loss(recon["nt"], image_target, v_nt, cfg.l1_normalization)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The two phases


@dataclass
class Batch:
    image: torch.Tensor  # (B, 3, H, W) normalised
    labels: torch.Tensor  # (B, C) multi-hot
    target: torch.Tensor  # (B,) from sample_target
    grid_u: torch.Tensor  # (B, s, s) uniforms for the SRF grid


def classifier_trunk(classifier: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """F's trunk features of `image` with gradient (BatchNorm frozen: the same in train and eval mode), computed once
    and passed to both :func:`ru_phase` (which reads them without gradient) and :func:`cu_phase` (which trains
    through them)."""
    cls = unwrap(classifier)
    cls.train()
    with record_function("ru/classifier_trunk"):
        return cls.trunk(image)


def ru_phase(classifier: nn.Module, reconstructor: nn.Module, batch: Batch, cfg: MethodConfig, q: float,
             trunk: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstructor-updating phase (Sec. 4.2): F frozen in eval mode gives A_t without gradient (from `trunk`, the
    output of :func:`classifier_trunk`, where given); G_E and every G_D pass run through `reconstructor` (the
    DDP-wrapped module) in one forward, so their gradients are averaged across workers. Returns the loss to minimise
    (gradients reach G only) and detached statistics."""
    cls = unwrap(classifier)
    cls.eval()
    unwrap(reconstructor).requires_grad_(True)
    reconstructor.train()  # re-freezes BatchNorm (no gradients) where configured
    image, size = batch.image, batch.image.shape[-2:]
    with torch.no_grad(), record_function("ru/classifier_forward"):
        cam, _ = cls(image, trunk=trunk)
        a_t = target_cam(normalize_cam(cam), batch.labels, batch.target)  # (B,1,h,w), constant
    a_img = _upsample(a_t, size)
    g_img = remnant_grid(batch.grid_u, q, size) if cfg.srf.enabled else torch.zeros_like(a_img)
    use_ae = cfg.autoencode_weight > 0

    def compose(x: torch.Tensor) -> list[torch.Tensor]:
        # Eq. 3 and 8-9 are linear in X: evaluated on X = 1 they give the masks m with X_t^RU = m_t X and
        # X_nt^RU = m_nt X (no per-term copies of a 448-channel full-resolution feature).
        if cfg.decompose_at == "image":
            x = _upsample(x, size)
            a, g = a_img, g_img
        else:
            a = _upsample(a_t, x.shape[-2:])
            g = remnant_grid(batch.grid_u, q, x.shape[-2:]) if cfg.srf.enabled else torch.zeros_like(a)
        m_t, m_nt = feed_remnants(*decompose(torch.ones_like(a), a), g)
        # [X_t^RU; X_nt^RU], (2B, D, h, w), as two products concatenated: X's gradient is then m_t G_t + m_nt G_nt,
        # elementwise (a broadcast product of X with the stacked masks instead reduces a 5-D gradient over the
        # stack, 4-7x slower on the CPU). The masks in X's precision (bf16 under autocast: no float32 copy of the
        # product, which the decoder's first convolution would cast back to bf16 anyway).
        masked = torch.cat([x * m_t.to(x.dtype), x * m_nt.to(x.dtype)])
        return ([x if cfg.autoencode_trains_encoder else x.detach()] if use_ae else []) + [masked]

    with record_function("ru/reconstructor_forward"):
        logits_e, _, recons = reconstructor(image, compose)
    recon_t, recon_nt = recons[-1].chunk(2)
    target = reconstruction_target(image, cfg.reconstruction_target)
    v_t, v_nt = ru_validation_masks(a_img, g_img)

    weights = None
    if cfg.min_valid_pixels > 0:  # released code: only images whose X_nt^RU input mask is large enough
        input_mask_nt = (1.0 - a_img) + g_img * a_img
        weights = (input_mask_nt.flatten(1).sum(1) > cfg.min_valid_pixels).float()
    loss_t = masked_l1(recon_t, target, v_t, cfg.l1_normalization)  # Eq. 5 with Eq. 10
    loss_nt = masked_l1(recon_nt, target, v_nt, cfg.l1_normalization, weights)  # Eq. 6 with Eq. 10
    loss = ru_loss(loss_t, loss_nt, cfg.ru_target_weight, cfg.ru_nontarget_weight)
    stats = {"ru/loss_t": loss_t.detach(), "ru/loss_nt": loss_nt.detach()}
    if use_ae:  # decoder-only auto-encoding of the detached feature (released code)
        loss_ae = masked_l1(recons[0], target, torch.ones_like(a_img), "tensor_size")
        loss = loss + cfg.autoencode_weight * loss_ae
        stats["ru/loss_autoencode"] = loss_ae.detach()
    if logits_e is not None and cfg.encoder_cls_weight > 0:
        loss_e = classification_loss(logits_e, batch.labels)
        loss = loss + cfg.encoder_cls_weight * loss_e
        stats["ru/loss_encoder_cls"] = loss_e.detach()
    stats["ru/loss"] = loss.detach()
    return loss, stats


def cu_phase(classifier: nn.Module, reconstructor: nn.Module | None, batch: Batch, cfg: MethodConfig,
             trunk: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Classifier-updating phase (Sec. 4.3): G is frozen (its parameters do not require gradients, no SRF) and F,
    through `classifier` (DDP-wrapped), is trained with Eq. 14, from :func:`classifier_trunk`'s `trunk` (with its
    gradient graph) where given. The reconstruction terms reach F only through A_t. With `reconstructor=None` (the
    baseline) this is plain classification."""
    classifier.train()
    image = batch.image
    with record_function("cu/classifier_forward"):
        cam, logits = classifier(image, trunk=trunk)
    loss_cls = classification_loss(logits, batch.labels)
    stats = {"cu/loss_cls": loss_cls.detach()}
    if reconstructor is None or (cfg.cu_target_weight == 0 and cfg.cu_nontarget_weight == 0):
        stats["cu/loss"] = loss_cls.detach()
        return loss_cls, stats

    rec = unwrap(reconstructor)
    rec.eval()
    rec.requires_grad_(False)
    with torch.no_grad(), record_function("cu/encoder_forward"):
        _, x = rec.encode(image)
    a_t = target_cam(normalize_cam(cam), batch.labels, batch.target)  # with gradient
    losses = adversarial_losses(rec, x, image, a_t, cam, batch.target, cfg)
    zero = loss_cls.new_zeros(())
    loss_t, loss_nt = losses.get("t", zero), losses.get("nt", zero)
    loss = cu_loss(loss_cls, loss_t, loss_nt, cfg.cu_target_weight, cfg.cu_nontarget_weight)
    stats.update({"cu/loss_t": loss_t.detach(), "cu/loss_nt": loss_nt.detach(), "cu/loss": loss.detach()})
    return loss, stats
