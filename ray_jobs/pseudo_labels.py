"""Pseudo-label masks from a trained ACR checkpoint: multi-scale CAMs -> dense CRF -> IRN -> masks, on Ray (Ray Data
actor pools for inference, Ray Train for IRN); writes <output-dir>/masks/<id>.png, summary.json (seed_miou,
crf_miou, mask_miou where ground truth exists), table3.md and levels.png. The last line printed is the summary's path.

    python ray_jobs/pseudo_labels.py checkpoint=PATH_OR_TUNE_DIR [--output-dir DIR] [key=value ...]

`checkpoint=` is short for `pseudo.checkpoint=`: a checkpoint folder, a train.py output folder or a tune.py output
folder (its best trial). The job runs with the checkpoint's training config; `key=value` overrides it (e.g.
`pseudo.split=train_aug pseudo.conf_fg_threshold=0.35`). Rerunning with the same DIR skips finished images.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from acr.cli import fail  # noqa: E402
from acr.config import ConfigError, Config, apply_overrides, parse_overrides  # noqa: E402
from acr.data.voc import DataError  # noqa: E402


def main(argv=None) -> None:
    import argparse
    import time

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", type=Path, default=None,
                   help="the job folder; rerunning with the same folder resumes (default: outputs/pseudo-<time>)")
    p.add_argument("overrides", nargs="*", help="checkpoint=PATH and dotted key=value overrides")
    args = p.parse_intermixed_args(argv)
    items = [f"pseudo.{a}" if a.startswith("checkpoint=") else a for a in args.overrides]
    out = args.output_dir or Path("outputs") / f"pseudo-{time.strftime('%Y%m%d-%H%M%S')}"
    from acr.distributed.batch import job_config, run_pseudo_labels

    try:
        overrides = dict(parse_overrides(items))
        cfg = job_config(apply_overrides(Config(), {k: v for k, v in overrides.items()
                                                    if k.startswith("pseudo.")}), overrides)
        summary = run_pseudo_labels(cfg, out)
    except ConfigError as exc:
        p.exit(2, f"{p.prog}: config error: {exc}\n")
    except (DataError, ValueError, RuntimeError, FloatingPointError) as exc:
        fail(exc)
    if "mask_miou" in summary:
        print(f"seed {summary['seed_miou']:.4f}, +CRF {summary['crf_miou']:.4f}, mask {summary['mask_miou']:.4f} "
              f"mIoU on {summary['images_with_ground_truth']} images of '{summary['split']}'")
    print(Path(out).resolve() / "summary.json")


if __name__ == "__main__":
    main()
