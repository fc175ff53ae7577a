"""The whole paper pipeline in one command: [1] CAMs (Ray Tune search, or one training run) -> [2] pseudo-labels
(CAMs -> CRF -> IRN -> masks) -> [3] DeepLab on the pseudo-labels -> [4] DeepLab on the ground truth (upper bound)
-> report.md / report.json / report.png with the paper's numbers beside ours. The last line printed is the report's
path.

    python ray_jobs/pipeline.py [--config FILE] [--output-dir DIR] [key=value ...]

Each stage writes into its own folder of DIR (1_cams, 2_pseudo_labels, 3_deeplab, 4_deeplab_gt). Rerunning with
the same DIR skips the finished stages (those with a summary.json) and continues an interrupted one from its own
files. Existing outputs replace stages: pipeline.checkpoint=CKPT_OR_RUN_DIR (no stage 1), pipeline.labels=DIR (no
stage 2); pipeline.search=false trains once instead of searching; pipeline.upper_bound=false skips stage 4.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from acr.cli import parse_job_args  # noqa: E402
from acr.pipeline.job import run_pipeline  # noqa: E402
from acr.runtime.boundary import run_job  # noqa: E402
from acr.storage import RunFolder  # noqa: E402
from acr.train.job import resolve_pretrained  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline_demo.yaml"


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def main(argv=None) -> None:
    cfg, out, _ = parse_job_args(__doc__.splitlines()[0], DEFAULT_CONFIG, argv, job="pipeline", uri_output=True)
    # model/segment.pretrained=standin: made once (first use)
    cfg = resolve_pretrained(cfg, segment=True, storage=RunFolder(out))
    report = run_pipeline(cfg, out)
    ps = report["stages"].get("pseudo_labels", {})
    print(f"pseudo-labels: seed {pct(ps.get('seed_miou'))}, +CRF {pct(ps.get('crf_miou'))}, mask "
          f"{pct(ps.get('mask_miou'))} mIoU %; DeepLab on '{report['val_split']}' from pseudo-labels "
          f"{pct(report['val_miou_pseudo'])} / MS+flip {pct(report['val_miou_pseudo_ms'])} / +CRF "
          f"{pct(report['val_miou_pseudo_crf'])}, from the ground truth {pct(report['val_miou_gt'])} / "
          f"{pct(report['val_miou_gt_ms'])} / {pct(report['val_miou_gt_crf'])} (paper, VOC val: "
          f"{report['paper']['voc_val']})")
    print(RunFolder(out).uri("report.md"))


if __name__ == "__main__":
    run_job(main, "pipeline.py")
