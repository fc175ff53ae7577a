"""Build the networks from the config."""

from __future__ import annotations

from torch import nn

from acr.config import Config, num_classes
from acr.models.classifier import Classifier
from acr.models.mctformer import MCTformerV2
from acr.models.reconstructor import Reconstructor
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


def build_reconstructor(cfg: Config) -> Reconstructor | None:
    """None for the classification-only baseline: no module is built that is never used. A ViT classifier's
    reconstructor encodes with the CNN model.vit.encoder_backbone (output stride 8)."""
    if cfg.method.reconstructor == "none":
        return None
    m = cfg.model
    backbone, stride, pretrained = ((m.vit.encoder_backbone, 8, m.vit.encoder_pretrained) if is_vit(cfg)
                                    else (m.backbone, m.output_stride, m.pretrained))
    return Reconstructor(backbone, num_classes(cfg), stride, tuple(m.encoder_taps),
                         tuple(m.encoder_tap_channels), m.decoder_depth, m.decoder_width,
                         cls_head=cfg.method.encoder_cls_weight > 0 and cfg.method.reconstructor == "adversarial",
                         cam_head=m.cam_head, cam_head_hidden=m.cam_head_hidden, freeze_bn=m.freeze_bn,
                         dropout=m.dropout, pretrained=pretrained)
