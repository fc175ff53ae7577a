"""Where the configured dataset lives and how its splits are read."""

from __future__ import annotations

from pathlib import Path

from acr.config import Config, num_classes
from acr.data.synthetic import ensure_synthetic
from acr.data.voc import Record, read_class_names, read_voc_split


def dataset_root(cfg: Config) -> Path:
    """The VOC-layout folder of the configured dataset; the embedded one is generated on first use."""
    if cfg.data.format == "synthetic":
        return Path(cfg.data.root) if cfg.data.root else ensure_synthetic(cfg.synthetic, cfg.data.cache_dir)
    return Path(cfg.data.root).expanduser()


def load_split(cfg: Config, split: str, require_masks: bool = False, root: Path | None = None) -> list[Record]:
    return read_voc_split(root or dataset_root(cfg), split, num_classes(cfg), labels=cfg.data.labels,
                          labels_file=cfg.data.labels_file, require_masks=require_masks)


def class_names(cfg: Config, root: Path | None = None) -> list[str]:
    return read_class_names(root or dataset_root(cfg))
