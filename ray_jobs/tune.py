"""Search ACR's SRF grid size, q and loss weights with Ray Tune + Optuna; write <output-dir>/summary.json, best.yaml,
trials.csv, trials.png and the Optuna study (study.db). The last line printed is the summary's path.

    python ray_jobs/tune.py [--config FILE] [--space FILE] [--output-dir DIR|URI] [key=value ...]
    python ray_jobs/train.py --config DIR/best.yaml          # the best trial's configuration
    optuna-dashboard sqlite:///DIR/study.db                  # the study

Rerunning with the same DIR resumes an interrupted search without rerunning finished trials.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from acr.cli import parse_job_args  # noqa: E402
from acr.runtime.boundary import run_job  # noqa: E402
from acr.storage import RunFolder  # noqa: E402
from acr.tune.job import run_tune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _flags(p) -> None:
    p.add_argument("--space", type=Path, default=REPO / "search_spaces" / "demo.yaml",
                   help="search space YAML (default: %(default)s)")


def main(argv=None) -> None:
    cfg, out, args = parse_job_args(__doc__.splitlines()[0], REPO / "configs" / "tune_demo.yaml", argv, job="tune",
                                    add_args=_flags, uri_output=True)
    summary = run_tune(cfg, args.space, out)  # model.pretrained=standin: made once, before the trials
    print(f"best trial {summary['best_trial']}: CAM mIoU {summary['best_cam_miou']:.4f} on "
          f"'{summary['select_split']}' (selection), "
          + (f"{summary['best_cam_miou_reported']:.4f} on '{summary['report_split']}' (reported); "
             if summary["best_cam_miou_reported"] is not None else "")
          + f"{summary['n_trials']} trials, {summary['n_stopped_early']} stopped early; {summary['best_config']}")
    print(RunFolder(out).uri("summary.json"))


if __name__ == "__main__":
    run_job(main, "tune.py")
