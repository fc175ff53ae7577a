"""Train ACR on Ray Train, evaluate its CAMs, and write <output-dir>/summary.json (its path is the last line printed).

    python ray_jobs/train.py [--config FILE] [--output-dir DIR or URI, e.g. s3://bucket/runs/voc] [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python ray_jobs/train.py ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from acr.cli import parse_job_args  # noqa: E402
from acr.runtime.boundary import run_job  # noqa: E402
from acr.train.job import run_training  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def main(argv=None) -> None:
    cfg, output_dir, _ = parse_job_args(__doc__.splitlines()[0], DEFAULT_CONFIG, argv, job="train", uri_output=True)
    summary = run_training(cfg, output_dir)
    if "cam_miou" in summary:
        print(f"CAM mIoU {summary['cam_miou']:.4f} (precision {summary['precision']:.4f}, recall "
              f"{summary['recall']:.4f}, threshold {summary['threshold']:.2f}"
              + (f", at the {summary['threshold_at_edge']} end of eval.thresholds" if summary.get("threshold_at_edge")
                 else "") + "); floors: all background "
              f"{summary['floor_background_miou']:.4f}, whole image {summary['floor_whole_image_miou']:.4f}")
    print(f"{summary['output_dir']}/summary.json")


if __name__ == "__main__":
    run_job(main, "train.py")
