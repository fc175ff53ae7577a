"""Train DeepLab on pseudo-labels with Ray Train and evaluate it on val: single scale, multi-scale + flip, + dense CRF;
writes <output-dir>/summary.json (val_miou, val_miou_ms, val_miou_crf, per-class IoU), predictions as palette PNGs,
predictions.png and loss.png. The last line printed is the summary's path.

    python ray_jobs/segment.py labels=DIR [--config FILE] [--output-dir DIR or URI] [key=value ...]

`labels=` is short for `segment.labels=`: a pseudo-label job's folder (its masks/ are used, with the config and
split the job ran with), any folder of <id>.png label maps (with --config, default configs/demo.yaml), or `gt` for
the ground-truth masks (the fully supervised upper bound); a path or a URI. Rerunning with the same DIR continues
training from its last checkpoint and skips finished predictions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from acr.cli import output_dir  # noqa: E402
from acr.config import apply_overrides, load_config, parse_overrides, validate  # noqa: E402
from acr.runtime.boundary import run_job  # noqa: E402
from acr.segment.job import labels_job_config, run_segment  # noqa: E402
from acr.storage import RunFolder  # noqa: E402
from acr.train.job import resolve_pretrained  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config (default: the pseudo-label job's own, else configs/demo.yaml)")
    p.add_argument("--output-dir", default=None, help="the job folder (a path or a URI); rerunning with the same "
                   "folder resumes (default: outputs/segment-<time>)")
    p.add_argument("overrides", nargs="*", help="labels=DIR and dotted key=value overrides")
    args = p.parse_intermixed_args(argv)
    overrides = dict(parse_overrides([f"segment.{a}" if a.startswith("labels=") else a for a in args.overrides]))
    out = output_dir(args.output_dir, "segment", uri_output=True)
    job = labels_job_config(overrides.get("segment.labels")) if args.config is None else None
    cfg = job if job is not None else load_config(args.config or DEFAULT_CONFIG, job="segment")
    cfg = apply_overrides(cfg, overrides, source="the command line")
    validate(cfg, "segment")
    cfg = resolve_pretrained(cfg, model=False, segment=True, storage=RunFolder(out))  # segment.pretrained=standin
    summary = run_segment(cfg, out)
    print(f"DeepLab on '{summary['labels']}': val mIoU {summary['val_miou']:.4f} single scale, "
          f"{summary['val_miou_ms']:.4f} multi-scale + flip, {summary['val_miou_crf']:.4f} + CRF "
          f"({summary['val_images_scored']} images of '{summary['val_split']}')")
    print(RunFolder(out).uri("summary.json"))


if __name__ == "__main__":
    run_job(main, "segment.py")
