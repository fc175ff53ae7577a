"""Convert a VOC, COCO or the embedded synthetic dataset into Parquet shards (one row per image) with a manifest.

    python ray_jobs/prepare_data.py [--output-dir OUT] [--splits S ...] [--verify] data.format=voc|coco|synthetic \
        data.root=DIR [key=value ...]

OUT defaults to the cache folder that train.py uses for the same data and settings, so a later `train.py` with the
same `data.*` keys reuses the shards; or pass `data.shards=OUT` (also an s3:// URI after uploading OUT) to train.py.
Rerunning keeps complete shards and rewrites incomplete or stale ones. The last line printed is OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from acr.cli import parse_job_args  # noqa: E402
from acr.config import num_classes  # noqa: E402
from acr.data.shards import find_corrupt_rows, write_shards  # noqa: E402
from acr.data.sources import dataset_root, shards_cache_dir  # noqa: E402
from acr.runtime.boundary import run_job  # noqa: E402


def _flags(p) -> None:
    p.add_argument("--splits", nargs="+", default=None, help="splits to write (default: every split of the source)")
    p.add_argument("--verify", action="store_true", help="afterwards decode every row of every split and report")


def main(argv=None) -> None:
    cfg, out, args = parse_job_args(__doc__.splitlines()[0], None, argv, job="prepare_data", add_args=_flags,
                                    default_output=False)
    d = cfg.data
    root = dataset_root(cfg)
    out = Path(out) if out else shards_cache_dir(cfg, root)
    manifest = write_shards(d.format, root, out, num_classes(cfg), d.shard_rows, args.splits, d.labels,
                            d.labels_file, d.coco_crowd, d.skip_corrupt)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['rows']} images in {len(info['shards'])} shard(s), {info['masks']} with masks"
              + (f", {len(info['skipped'])} skipped as corrupt" if info["skipped"] else ""))
        if args.verify:
            bad = find_corrupt_rows(str(out), manifest, split)
            print(f"  verify: {len(bad)} undecodable row(s)" + "".join(f"\n    {b['reason']}" for b in bad))
    print(out.resolve())


if __name__ == "__main__":
    run_job(main, "prepare_data.py")
