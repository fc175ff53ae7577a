"""Where the configured dataset lives, and its Parquet shards (converted from the folder on first use)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from acr.config import Config, num_classes
from acr.data.shards import SCHEMA_VERSION, check_manifest, load_manifest, write_shards
from acr.data.synthetic import GENERATOR_VERSION, default_cache_dir, ensure_synthetic


def dataset_root(cfg: Config) -> Path:
    """The VOC/COCO-layout folder of the configured dataset; the embedded one is generated on first use."""
    if cfg.data.format == "synthetic":
        return Path(cfg.data.root) if cfg.data.root else ensure_synthetic(cfg.synthetic, cfg.data.cache_dir)
    return Path(cfg.data.root).expanduser()


def shards_cache_dir(cfg: Config, root: Path) -> Path:
    """Where a folder's shards are cached: keyed by the folder and every setting that changes a row."""
    d = cfg.data
    key = {"v": SCHEMA_VERSION, "format": d.format, "root": str(Path(root).resolve()), "labels": d.labels,
           "labels_file": d.labels_file, "classes": num_classes(cfg), "crowd": d.coco_crowd, "rows": d.shard_rows,
           "skip_corrupt": d.skip_corrupt, "generator": GENERATOR_VERSION if d.format == "synthetic" else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return default_cache_dir(d.cache_dir) / "shards" / f"{d.format}-{digest}"


def ensure_shards(cfg: Config, splits: list[str] | None = None, progress: bool = True) -> tuple[str, dict]:
    """(URI, manifest) of the shards training reads: `data.shards` if given, else the `data.format` folder converted
    into the cache (complete shards are reused). The manifest is checked against the config and `splits`."""
    splits = splits or [cfg.data.train_split] + ([cfg.eval.split] if cfg.eval.enabled else [])
    if cfg.data.shards:
        uri = cfg.data.shards
        manifest = load_manifest(uri)
    else:
        root = dataset_root(cfg)
        out = shards_cache_dir(cfg, root)
        d = cfg.data
        manifest = write_shards(d.format, root, out, num_classes(cfg), d.shard_rows, list(dict.fromkeys(splits)), d.labels, d.labels_file,
                                d.coco_crowd, d.skip_corrupt, progress=progress)
        uri = str(out)
    check_manifest(manifest, uri, num_classes(cfg), list(dict.fromkeys(splits)),
                   require_masks=[cfg.eval.split] if cfg.eval.enabled else [])
    return uri, manifest
