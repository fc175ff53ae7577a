"""Pseudo-label masks from a trained ACR checkpoint: multi-scale CAMs -> dense CRF -> IRN -> masks, on Ray (Ray Data
actor pools for inference, Ray Train for IRN); writes <output-dir>/masks/<id>.png, summary.json (seed_miou,
crf_miou, mask_miou where ground truth exists), table3.md and levels.png. The last line printed is the summary's path.

    python ray_jobs/pseudo_labels.py checkpoint=PATH_OR_TUNE_DIR [--output-dir DIR or URI] [key=value ...]

`checkpoint=` is short for `pseudo.checkpoint=`: a checkpoint folder, a train.py output folder or a tune.py output
folder (its best trial); a local path or a URI. The job runs with the checkpoint's training config; `key=value`
overrides it (e.g. `pseudo.split=train_aug pseudo.conf_fg_threshold=0.35`). Rerunning with the same DIR skips
finished images and continues IRN's training from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from acr.cli import output_dir  # noqa: E402
from acr.config import Config, apply_overrides, parse_overrides  # noqa: E402
from acr.pseudo.job import job_config, run_pseudo_labels  # noqa: E402
from acr.runtime.boundary import run_job  # noqa: E402
from acr.storage import RunFolder  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default=None, help="the job folder (a path or a URI such as s3://bucket/pseudo); "
                   "rerunning with the same folder resumes (default: outputs/pseudo_labels-<time>)")
    p.add_argument("overrides", nargs="*", help="checkpoint=PATH and dotted key=value overrides")
    args = p.parse_intermixed_args(argv)
    overrides = dict(parse_overrides([f"pseudo.{a}" if a.startswith("checkpoint=") else a for a in args.overrides]))
    out = output_dir(args.output_dir, "pseudo_labels", uri_output=True)
    given = apply_overrides(Config(), {k: v for k, v in overrides.items() if k.startswith("pseudo.")})
    summary = run_pseudo_labels(job_config(given, overrides), out)
    if summary.get("mask_miou") is not None:
        print(f"seed {summary['seed_miou']:.4f}, +CRF {summary['crf_miou']:.4f}, mask {summary['mask_miou']:.4f} "
              f"mIoU on {summary['images_with_ground_truth']} images of '{summary['split']}'")
    print(RunFolder(out).uri("summary.json"))


if __name__ == "__main__":
    run_job(main, "pseudo_labels.py")
