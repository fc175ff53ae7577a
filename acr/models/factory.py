"""Build the networks from the config."""

from __future__ import annotations

from acr.config import Config, num_classes
from acr.models.classifier import Classifier
from acr.models.reconstructor import Reconstructor


def build_classifier(cfg: Config) -> Classifier:
    m = cfg.model
    return Classifier(m.backbone, num_classes(cfg), m.output_stride, m.cam_head, m.cam_head_hidden, m.freeze_bn,
                      m.dropout, m.pretrained)


def build_reconstructor(cfg: Config) -> Reconstructor | None:
    """None for the classification-only baseline: no module is built that is never used."""
    if cfg.method.reconstructor == "none":
        return None
    m = cfg.model
    return Reconstructor(m.backbone, num_classes(cfg), m.output_stride, tuple(m.encoder_taps),
                         tuple(m.encoder_tap_channels), m.decoder_depth, m.decoder_width,
                         cls_head=cfg.method.encoder_cls_weight > 0 and cfg.method.reconstructor == "adversarial",
                         cam_head=m.cam_head, cam_head_hidden=m.cam_head_hidden, freeze_bn=m.freeze_bn,
                         dropout=m.dropout, pretrained=m.pretrained)
