"""Build the networks from the config."""

from __future__ import annotations

from torch import nn

from acr.config import Config, num_classes
from acr.models.classifier import Classifier
from acr.models.mctformer import MCTformerV2
from acr.models.reconstructor import Reconstructor
from acr.models.vit import VIT_SIZES, ViTFeatureMaps
from acr.models.weights import load_vit_weights
from acr.registry import BACKBONES


def is_vit(cfg: Config) -> bool:
    return BACKBONES[cfg.model.backbone].transformer


def build_classifier(cfg: Config) -> nn.Module:
    """The ResNet classifier (acr.models.classifier), or MCTformer-v2 for a ViT backbone."""
    m = cfg.model
    if is_vit(cfg):
        v = m.vit
        return MCTformerV2(m.backbone, num_classes(cfg), cfg.augment.crop_size, v.train_cam, v.cam,
                           v.attention_layers, v.affinity_refine, v.drop_path if m.dropout else 0.0, m.pretrained)
    return Classifier(m.backbone, num_classes(cfg), m.output_stride, m.cam_head, m.cam_head_hidden, m.freeze_bn,
                      m.dropout, m.pretrained)


def vit_encoder(cfg: Config) -> bool:
    """The reconstructor's encoder is a ViT's blocks (model.vit.encoder: vit_blocks), not a CNN."""
    return is_vit(cfg) and cfg.model.vit.encoder == "vit_blocks"


def encoder_weights(cfg: Config) -> str | None:
    """The weights file the reconstructor's encoder starts from: a ViT classifier's CNN encoder has its own
    (model.vit.encoder_pretrained); a CNN classifier's, and a ViT-blocks encoder, take model.pretrained."""
    return cfg.model.vit.encoder_pretrained if is_vit(cfg) and not vit_encoder(cfg) else cfg.model.pretrained


def build_reconstructor(cfg: Config) -> Reconstructor | None:
    """None for the classification-only baseline: no module is built that is never used. A ViT classifier's
    reconstructor encodes with the CNN model.vit.encoder_backbone (output stride 8) or, with model.vit.encoder
    vit_blocks, with a DeiT of its own size whose blocks give the taps (acr.models.vit.ViTFeatureMaps)."""
    if cfg.method.reconstructor == "none":
        return None
    m = cfg.model
    if vit_encoder(cfg):
        backbone = ViTFeatureMaps(VIT_SIZES[m.backbone], cfg.augment.crop_size, m.vit.drop_path if m.dropout else 0.0)
        if m.pretrained:
            load_vit_weights(backbone, m.pretrained, m.backbone)
        stride, pretrained = m.output_stride, None
    else:
        backbone, stride, pretrained = ((m.vit.encoder_backbone, 8, m.vit.encoder_pretrained) if is_vit(cfg)
                                        else (m.backbone, m.output_stride, m.pretrained))
    return Reconstructor(backbone, num_classes(cfg), stride, tuple(m.encoder_taps),
                         tuple(m.encoder_tap_channels), m.decoder_depth, m.decoder_width,
                         cls_head=cfg.method.encoder_cls_weight > 0 and cfg.method.reconstructor == "adversarial",
                         cam_head=m.cam_head, cam_head_hidden=m.cam_head_hidden, freeze_bn=m.freeze_bn,
                         dropout=m.dropout, pretrained=pretrained)
