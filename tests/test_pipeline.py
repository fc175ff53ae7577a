"""ray_jobs/pipeline.py end to end with a tiny config: killed (SIGKILL on its process group) while stage 3 trains,
rerun: the finished stages are kept untouched, the interrupted one continues, the report has val mIoU from the
pseudo-labels and from the ground truth. And the report's contents from hand-made stage summaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from acr.config import load_config
from acr.pipeline.job import PAPER, finished, make_report, needs_classifier, report_markdown
from acr.runtime.session import resume_point
from acr.storage import RunFolder
from tests.conftest import REPO, TINY_OVERRIDES

PIPELINE = [
    "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4", "train.log_every_steps=0",
    "scaling.cpus_per_worker=1", "synthetic.train_images=16", "pipeline.search=false",
    "pseudo.actors=1", "pseudo.scales=[1.0]", "pseudo.flip=false", "pseudo.irn_crop_size=64", "pseudo.irn_epochs=1",
    "pseudo.irn_batch_size=8", "pseudo.exp_times=4", "pseudo.overlays=2", "pseudo.max_images=8",
    "segment.backbone=resnet18", "segment.output_stride=16", "segment.epochs=2", "segment.max_steps_per_epoch=1",
    "segment.batch_size=2", "segment.crop_size=64", "segment.eval_scales=[1.0]", "segment.eval_flip=false",
    "segment.actors=1", "segment.overlays=2", "segment.max_val_images=4",
]


def _snapshot(folder):
    """(bytes, mtime) of every file of a stage folder."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_pipeline_killed_in_stage_3_continues_from_there(cache_dir, tmp_path):
    out = tmp_path / "pipe"
    args = [sys.executable, "ray_jobs/pipeline.py", "--config", "configs/demo.yaml", "--output-dir", str(out),
            *TINY_OVERRIDES, *PIPELINE, f"data.cache_dir={cache_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    model = RunFolder(out / "3_deeplab" / "model")  # DeepLab's Ray Train run: its first recorded checkpoint
    deadline = time.time() + 600
    while time.time() < deadline and resume_point(model) == (0, 0) and proc.poll() is None:
        time.sleep(0.5)
    assert resume_point(model) != (0, 0), (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and the Ray it started (same process group)
    proc.wait()
    assert finished(out / "3_deeplab") is None and not (out / "report.json").exists()
    kept = {name: _snapshot(out / name) for name in ("1_cams", "2_pseudo_labels")}
    epochs_before = resume_point(model)[0]  # 1, or 2 if the kill came late
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert rerun.stdout.strip().splitlines()[-1] == str(out.resolve() / "report.md")
    assert "[cams] CAMs: one training run: finished in an earlier run, kept" in rerun.stdout
    assert "[pseudo_labels] pseudo-labels: CAMs -> CRF -> IRN -> masks: finished in an earlier run, kept" in rerun.stdout
    for name, files in kept.items():  # the finished stages were not run again: every file as it was
        assert _snapshot(out / name) == files, name
    seg = json.loads((out / "3_deeplab" / "summary.json").read_text())
    assert [h["epoch"] for h in seg["history"]] == [1, 2]  # epoch 1 once: continued, not restarted
    assert seg["stages"]["train"] == ({"kept": True, "epochs": 2} if epochs_before == 2 else
                                      {"kept": False, "epochs": 1, "steps_per_epoch": 1, "resumed_from": [1, 0],
                                       "seconds": seg["stages"]["train"]["seconds"]})
    assert seg["resumes"] == ([] if epochs_before == 2 else [[1, 0]])  # the network restored once, at epoch 1
    assert seg["backbone_init"].startswith("the trained CNN of") and seg["split"] == "train"
    assert seg["train_images"] == 8  # the images the pseudo-label job labelled
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["cams"]["status"] == "kept" and report["stages"]["pseudo_labels"]["status"] == "kept"
    assert report["stages"]["deeplab"]["status"] == "ran" and report["stages"]["deeplab_gt"]["status"] == "ran"
    for key in ("val_miou_pseudo", "val_miou_pseudo_ms", "val_miou_pseudo_crf", "val_miou_gt", "val_miou_gt_crf"):
        assert 0.0 <= report[key] <= 1.0, key
    gt = json.loads((out / "4_deeplab_gt" / "summary.json").read_text())
    assert gt["labels"] == "gt" and report["val_miou_gt"] == gt["val_miou"] and report["val_miou_pseudo"] == seg[
        "val_miou"]
    assert 0.0 <= report["stages"]["pseudo_labels"]["mask_miou"] <= 1.0
    md = (out / "report.md").read_text()
    assert "| 2 pseudo-labels | mask (IRN) |" in md and "71.9" in md and "76.65" in md
    assert (out / "report.png").stat().st_size > 5000


def test_report_puts_the_papers_numbers_beside_ours():
    cfg = load_config(REPO / "configs/demo.yaml")
    record = {"cams": {"status": "ran", "cam_miou": 0.25, "cam_split": "val", "seconds": 10.0},
              "pseudo_labels": {"status": "kept", "split": "train", "seed_miou": 0.30, "crf_miou": 0.32,
                                "mask_miou": 0.35, "seconds": 20.0},
              "deeplab": {"status": "ran", "seconds": 30.5}, "deeplab_gt": {"status": "ran", "seconds": 40.0}}
    seg = {"val_miou": 0.4, "val_miou_ms": 0.42, "val_miou_crf": 0.45}
    gt = {"val_miou": 0.8, "val_miou_ms": 0.85, "val_miou_crf": 0.9}
    report = make_report(cfg, record, seg, gt)
    assert report["fraction_of_full_supervision"] == pytest.approx(0.5)  # 0.45 / 0.9
    assert report["paper_fraction_of_full_supervision"] == pytest.approx(71.9 / 77.93)
    assert report["total_seconds"] == 100.5 and report["val_miou_gt_crf"] == 0.9
    md = report_markdown(report)
    assert "| 2 pseudo-labels | seed (CAM) on 'train' | 30.0 | 60.3 (Table 3, VOC train) |" in md
    assert "| 3 DeepLab on pseudo-labels | multi-scale + flip + CRF | 45.0 | 71.9" in md
    assert "| 4 DeepLab on ground truth | single scale | 80.0 | 76.65" in md
    assert "| 3 / 4 | pseudo-label DeepLab as a share of the fully supervised one (+ CRF) | 50.0 | 92.3" in md
    assert "not a target" in md  # the embedded dataset is not VOC
    assert PAPER["mask_miou"] == 72.3 and PAPER["coco_val"] == 45.3
    no_gt = make_report(cfg, {**record, "deeplab_gt": {"status": "skipped", "reason": "no masks"}}, seg, None)
    assert no_gt["val_miou_gt"] is None and "fraction_of_full_supervision" not in no_gt
    assert "| deeplab_gt | skipped: no masks | - | - |" in report_markdown(no_gt)


def test_stage_1_runs_only_where_needed_and_a_cut_summary_is_not_finished(tmp_path):

    given = ["pipeline.labels=/some/labels"]
    assert needs_classifier(load_config(None, [])) and needs_classifier(load_config(None, given))
    assert not needs_classifier(load_config(None, given + ["segment.pretrained=/w.pth"]))
    assert not needs_classifier(load_config(None, given + ["pipeline.init_segmentation_from_classifier=false"]))
    demo = load_config(REPO / "configs/pipeline_demo.yaml")  # DeepLab starts from the classifier: same backbone
    assert not demo.pipeline.search and demo.segment.backbone == demo.model.backbone and needs_classifier(demo)
    (tmp_path / "summary.json").write_text('{"val_miou": 0.')  # killed while writing it
    assert finished(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"val_miou": 0.5}')
    assert finished(tmp_path) == {"val_miou": 0.5} and finished(tmp_path / "nothing") is None


@pytest.mark.slow
def test_a_search_finds_its_own_state_api_beside_another_ray_instance_and_has_trial_slots(tmp_path):
    """Train's placement-group cleaner (which frees the CPUs of a trial stopped by Tune) asks the state API of "the"
    local Ray; with another Ray instance on the machine it failed ("Found multiple active Ray instances") and a
    demo search hung at its third trial. A Ray started for a search tells its workers its own dashboard."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    decoy = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(num_cpus=1, include_dashboard=False); "
                              "print('up', flush=True); time.sleep(600)"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert decoy.stdout.readline().strip() == "up"
        check = ("import ray; from acr.config import load_config; from acr.runtime.cluster import init_ray\n"
                 "init_ray(load_config(None, ['ray.num_cpus=2']), 'tune', trials=1)\n"
                 "@ray.remote\n"
                 "def actors():\n"
                 "    from ray.util.state import list_actors\n"
                 "    return len(list_actors())\n"
                 "print('actors', ray.get(actors.remote()), 'slots', ray.cluster_resources()['acr_trial_slot'])\n")
        proc = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "actors " in proc.stdout, proc.stderr[-2000:]
        # one trial slot (acr.tune.job.TRIAL_SLOT) for the one trial that 2 CPUs hold: a resumed search runs its
        # unfinished trials one at a time instead of all at once
        assert proc.stdout.strip().endswith("slots 1.0"), proc.stdout
    finally:
        os.killpg(decoy.pid, signal.SIGKILL)
        decoy.wait()
