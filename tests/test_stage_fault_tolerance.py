"""The pseudo-label job and DeepLab end to end on the real VOC images of ../shared/data/voc_mini, and IRN and DeepLab
surviving what ACR training survives, on S3 as on a cloud cluster (an s3:// job folder on a local S3-compatible
server, moto), through the same runtime (acr.runtime: the one TorchTrainer builder, the checkpoint contract, the
resumable loop). For each job:

0. an uninterrupted run on local disk (the reference), checked as a user would: every file, level and score;
1. IRN: the job's script (ray_jobs/pseudo_labels.py) is killed with its Ray (SIGKILL to its session) after the
   network's first checkpoint, in the middle of its first epoch; rerun with the same s3:// --output-dir, the job
   keeps its finished per-image files and continues the network from that checkpoint, read from S3. (DeepLab's
   driver killed and rerun: tests/test_pipeline.py, where the pipeline dies in DeepLab's training; the same runtime
   as here, and as ACR's in tests/test_fault_tolerance.py.)
2. the job run with scaling.max_failures=1 on S3 has the network's training worker killed (SIGKILL) after a
   checkpoint (IRN: the rerun's next one; DeepLab: its first): Ray Train starts a new worker group, which resumes
   from it, read from S3, and completes the job;
3. the network, interrupted, ends with the parameters, optimiser state and counters of the reference (within 1e-7,
   the tolerance of the ACR test: the same computation in the same order), and so do the job's scores.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from acr.config import Config, apply_overrides, load_config, parse_overrides
from acr.data import file_codecs
from acr.pseudo.job import job_config, run_pseudo_labels
from acr.runtime.session import read_latest
from acr.segment.job import run_segment
from acr.storage import RunFolder
from acr.train.job import run_local
from tests.conftest import REPO, TINY_OVERRIDES
from tests.faults import assert_same_network, run_killed_at_first_checkpoint, run_with_a_worker_killed, s3_uri
from tests.rayhead import ray_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes through /proc")]
TOLERANCE = 1e-7
MULTI_WORKER_TOLERANCE = 1e-5  # fp32 sums in another order (measured: under 2e-6; per-worker means: over 6e-5)
FAULTS = ["scaling.max_failures=1", "train.threads_per_worker=1"]
# IRN: 4 of voc_mini's 9 train images in batches of 2, 2 epochs, a checkpoint after every step: (0, 1), (1, 0),
# (1, 1), (2, 0).
IMAGES = 4
PSEUDO = ["pseudo.actors=1", "pseudo.scales=[1.0]", "pseudo.flip=false", "pseudo.irn_crop_size=64",
          "pseudo.irn_epochs=2", "pseudo.irn_batch_size=2", "pseudo.irn_checkpoint_every_steps=1", "pseudo.exp_times=2",
          "pseudo.overlays=2", f"pseudo.max_images={IMAGES}", *FAULTS]
# DeepLab on label maps: 2 epochs of 2 steps of 2 images (4 of the 9 train images), a checkpoint after every step;
# val: 2 of voc_mini's 3 images.
SEGMENT = ["data.format=voc", "segment.backbone=resnet18", "segment.output_stride=16", "segment.epochs=2",
           "segment.max_images=4", "segment.max_val_images=2", "segment.batch_size=2", "segment.crop_size=64",
           "segment.scale_range=[0.2,0.3]", "segment.eval_scales=[0.5,1.0]", "segment.actors=1", "segment.overlays=2",
           "segment.checkpoint_every_steps=1", "model.backbone=resnet18", "train.precision=fp32", *FAULTS]


@pytest.fixture(scope="module")
def voc_classifier(ray_cluster, voc_mini, cache_dir, tmp_path_factory) -> str:
    cfg = load_config(None, TINY_OVERRIDES + [
        f"data.cache_dir={cache_dir}", "train.log_every_steps=0", "train.epochs=1", "train.max_steps_per_epoch=2",
        "train.batch_size=4", "eval.enabled=false", "data.format=voc", f"data.root={voc_mini}"])
    return str(run_local(cfg, tmp_path_factory.mktemp("classifier") / "train").last_checkpoint)


def _pseudo_config(checkpoint: str, cache_dir, *extra: str) -> Config:
    overrides = dict(parse_overrides(PSEUDO + [f"data.cache_dir={cache_dir}", *extra]))
    return job_config(apply_overrides(Config(), {"pseudo.checkpoint": checkpoint}), overrides)


def _segment_args(voc_mini, cache_dir, labels) -> list[str]:
    return [f"segment.labels={labels}", f"data.root={voc_mini}", f"data.cache_dir={cache_dir}", *SEGMENT]


def _segment_config(voc_mini, cache_dir, labels) -> Config:
    return load_config(REPO / "configs/demo.yaml", _segment_args(voc_mini, cache_dir, labels), job="segment")


def _assert_interrupted_twice(scenario: dict) -> None:
    assert scenario["driver_returncode"] == -signal.SIGKILL, scenario["driver_log"]
    first = (scenario["first"]["epoch"], scenario["first"]["step_in_epoch"])
    assert (0, 1) <= first < (2, 0)  # killed after its first checkpoint (usually mid-epoch), before the end
    assert "error" not in scenario, scenario.get("error")
    assert len(scenario["workers"]) == 1, scenario["workers"]  # the network's one worker, killed
    assert not Path(f"/proc/{scenario['workers'][0]}").exists()
    before_kill = (scenario["before_kill"]["epoch"], scenario["before_kill"]["step_in_epoch"])
    assert first < before_kill < (2, 0)


def _scenario(script_args: list[str], network: RunFolder, rerun) -> dict:
    """[1] the script killed with its Ray at the network's first checkpoint, [2] the job rerun in this process with
    its training worker killed after the next checkpoint."""
    out: dict = {}
    out["first"], out["driver_returncode"], out["driver_log"] = run_killed_at_first_checkpoint(script_args, network,
                                                                                               REPO)
    out.update(run_with_a_worker_killed(rerun, network, after=out["first"]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the pseudo-label job (IRN)


@pytest.fixture(scope="module")
def pseudo_runs(voc_classifier, s3_endpoint, cache_dir, tmp_path_factory) -> dict:
    reference = tmp_path_factory.mktemp("pseudo") / "reference"
    summary = run_pseudo_labels(_pseudo_config(voc_classifier, cache_dir), reference)  # uninterrupted, local disk
    uri = s3_uri(s3_endpoint, "jobs/pseudo")
    _copy_stage_files(reference, RunFolder(uri))  # the stages before IRN done already: the kill comes in IRN
    args = ["ray_jobs/pseudo_labels.py", f"checkpoint={voc_classifier}", "--output-dir", uri, *PSEUDO,
            f"data.cache_dir={cache_dir}"]
    scenario = _scenario(args, RunFolder(uri).sub("irn"),
                         lambda: run_pseudo_labels(_pseudo_config(voc_classifier, cache_dir), uri))
    return {"reference": reference, "reference_summary": summary, "folder": RunFolder(uri), **scenario}


def _copy_stage_files(local: Path, folder: RunFolder) -> None:
    """The per-image files of the stages before IRN (and their settings), as a job that got that far leaves them."""
    for kind in (file_codecs.CAMS, file_codecs.CRF, file_codecs.IR_LABELS):
        for f in (local / kind).iterdir():
            folder.write_bytes(f"{kind}/{f.name}", f.read_bytes())
    folder.write_bytes("refine_params.json", (local / "refine_params.json").read_bytes())


def test_the_pseudo_label_job_on_real_voc_images(pseudo_runs, voc_mini):
    out, summary = pseudo_runs["reference"], pseudo_runs["reference_summary"]
    ids = (voc_mini / "ImageSets/Segmentation/train.txt").read_text().split()[:IMAGES]  # pseudo.max_images
    assert summary["num_images"] == len(ids) and summary["images_with_ground_truth"] == len(ids)
    for k in ("seed_miou", "crf_miou", "mask_miou", "mask_precision", "mask_recall"):
        assert 0.0 < summary[k] <= 1.0, k
    assert summary["stages"]["cams"]["done"] == len(ids) and summary["stages"]["masks"]["done"] == len(ids)
    assert summary["stages"]["irn"]["history"][-1]["steps"] == 2  # two full batches of 2 per epoch
    masks = sorted((out / "masks").glob("*.png"))
    assert sorted(p.stem for p in masks) == sorted(ids)  # one PNG per image of the job
    for p in masks:
        with Image.open(p) as im, Image.open(voc_mini / "JPEGImages" / f"{p.stem}.jpg") as jpg:
            assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0] and im.size == jpg.size  # VOC palette
        labels = set(np.unique(file_codecs.read_label_png(p)).tolist())
        cams, keys = file_codecs.load_cams(out / "cams" / f"{p.stem}.npz")
        assert labels <= {0, *(keys + 1).tolist()}  # only the image's own classes and background
    assert (out / "table3.md").read_text().count("|") > 20 and (out / "levels.png").stat().st_size > 5000
    assert json.loads((out / "summary.json").read_text())["mask_miou"] == summary["mask_miou"]


def test_irn_killed_twice_on_s3_ends_as_an_uninterrupted_run(pseudo_runs):
    _assert_interrupted_twice(pseudo_runs)
    summary = pseudo_runs["result"]
    first = [pseudo_runs["first"]["epoch"], pseudo_runs["first"]["step_in_epoch"]]
    assert summary["stages"]["irn"]["resumed_from"] == first  # the rerun continued IRN where the driver died
    resumes = summary["stages"]["irn"]["resumes"]  # the rerun's, then the new group's
    before_kill = (pseudo_runs["before_kill"]["epoch"], pseudo_runs["before_kill"]["step_in_epoch"])
    assert len(resumes) == 2 and resumes[0] == first and before_kill <= tuple(resumes[1]) < (2, 0), resumes
    assert summary["stages"]["cams"]["kept"] == IMAGES and summary["stages"]["refine"]["kept"] == IMAGES  # kept
    worst = assert_same_network(pseudo_runs["folder"].sub("irn"), RunFolder(pseudo_runs["reference"] / "irn"),
                                TOLERANCE)
    print(f"IRN: largest difference from the uninterrupted run: {worst}")
    folder = pseudo_runs["folder"]
    assert len(folder.names(file_codecs.MASKS)) == IMAGES
    assert folder.read_json("summary.json")["mask_miou"] == summary["mask_miou"]
    for k in ("seed_miou", "crf_miou", "mask_miou"):  # the same network, the same masks
        assert summary[k] == pytest.approx(pseudo_runs["reference_summary"][k], abs=1e-6), k


def test_irn_on_two_workers_trains_as_one_worker(pseudo_runs, voc_classifier, cache_dir, tmp_path):
    """IRN's global batch of 2 split over 2 workers (one image each): the same batches (blocks of B/W rows in
    order) and the loss's means over the global batch's pairs (collectives.batch_denominator), so the network ends as
    the 1-worker reference's within fp32 summation order; per-worker means instead differ by far more."""
    folder = RunFolder(tmp_path / "irn-2-workers")
    _copy_stage_files(pseudo_runs["reference"], folder)  # the same CAMs and confident labels: only IRN differs
    cfg = _pseudo_config(voc_classifier, cache_dir, "pseudo.irn_num_workers=2", "scaling.cpus_per_worker=1")
    summary = run_pseudo_labels(cfg, folder.location)
    worst = assert_same_network(folder.sub("irn"), RunFolder(pseudo_runs["reference"] / "irn"), MULTI_WORKER_TOLERANCE)
    print(f"IRN on 2 workers: largest difference from 1 worker: {worst}")
    assert summary["stages"]["irn"]["history"][-1]["steps"] == 2
    assert summary["mask_miou"] == pytest.approx(pseudo_runs["reference_summary"]["mask_miou"], abs=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# DeepLab


def _labels_from_gt(voc_mini: Path, folder: Path) -> Path:
    """The ground-truth masks of the train split as a folder of label maps (palette PNGs with 255 borders)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in (voc_mini / "ImageSets/Segmentation/train.txt").read_text().split():
        (folder / f"{i}.png").write_bytes((voc_mini / "SegmentationClass" / f"{i}.png").read_bytes())
    return folder


def _script(out: str | Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "ray_jobs/segment.py", "--config", "configs/demo.yaml", "--output-dir", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=ray_env())


@pytest.fixture(scope="module")
def deeplab_runs(ray_cluster, voc_mini, s3_endpoint, cache_dir, tmp_path_factory) -> dict:
    labels = _labels_from_gt(voc_mini, tmp_path_factory.mktemp("labels") / "maps")
    reference = tmp_path_factory.mktemp("deeplab") / "reference"
    script = _script(reference, _segment_args(voc_mini, cache_dir, labels))  # uninterrupted, local disk
    uri = s3_uri(s3_endpoint, "jobs/deeplab")
    cfg = _segment_config(voc_mini, cache_dir, labels)
    scenario = run_with_a_worker_killed(lambda: run_segment(cfg, uri), RunFolder(uri).sub("model"), after=None)
    again = run_segment(cfg, uri)  # finished: nothing is trained or predicted again
    return {"reference": reference, "script": script, "folder": RunFolder(uri), "again": again, "labels": labels,
            **scenario}


def test_the_segment_script_on_real_voc_images(deeplab_runs, voc_mini):
    out, proc = deeplab_runs["reference"], deeplab_runs["script"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-5000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out.resolve() / "summary.json")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 4 and summary["val_images_scored"] == 2  # segment.max_(val_)images
    for key in ("val_miou", "val_miou_ms", "val_miou_crf", "val_precision", "val_recall_crf"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert len(summary["class_names"]) == 21 and summary["class_names"][0] == "background"
    for suffix in ("", "_ms", "_crf"):
        iou = summary[f"val_per_class_iou{suffix}"]
        assert len(iou) == 21 and 0.0 <= iou[0] <= 1.0  # background is in every val image
        assert all(v is None or 0.0 <= v <= 1.0 for v in iou)
    assert summary["stages"]["train"]["steps_per_epoch"] == 2 and summary["stages"]["predict"]["done"] == 2
    last = summary["history"][-1]
    assert last["steps"] == 2 and math.isfinite(last["loss"])
    assert last["lr_last_step"] == pytest.approx(0.001 * (1 - 3 / 4) ** 0.9)  # the last of 4 poly steps
    val_ids = (voc_mini / "ImageSets/Segmentation/val.txt").read_text().split()[:2]
    for level in ("pred", "pred_ms", "pred_crf"):
        assert sorted(p.stem for p in (out / level).glob("*.png")) == sorted(val_ids)
        for i in val_ids:
            p = out / level / f"{i}.png"
            with Image.open(p) as im, Image.open(voc_mini / "JPEGImages" / f"{i}.jpg") as jpg:
                assert im.mode == "P" and im.size == jpg.size and im.getpalette()[3:6] == [128, 0, 0]
            assert file_codecs.read_label_png(p).max() <= 20
    assert (out / "predictions.png").stat().st_size > 5000 and (out / "loss.png").is_file()


def test_deeplab_with_its_worker_killed_on_s3_ends_as_an_uninterrupted_run(deeplab_runs):
    assert "error" not in deeplab_runs, deeplab_runs.get("error")
    assert len(deeplab_runs["workers"]) == 1, deeplab_runs["workers"]  # the network's one worker, killed
    assert not Path(f"/proc/{deeplab_runs['workers'][0]}").exists()
    before_kill = (deeplab_runs["before_kill"]["epoch"], deeplab_runs["before_kill"]["step_in_epoch"])
    assert (0, 1) <= before_kill < (2, 0)  # killed after a checkpoint, before the end: the new group resumed
    summary = deeplab_runs["result"]
    assert summary["stages"]["train"]["resumed_from"] is None  # the job started afresh; Ray Train restarted it
    # from the checkpoint recorded before the kill (or a later one the worker reported as it died), read from S3
    resumes = summary["resumes"]
    assert resumes == read_latest(deeplab_runs["folder"].sub("model")).state["resumes"]
    assert len(resumes) == 1 and before_kill <= tuple(resumes[0]) < (2, 0), resumes
    worst = assert_same_network(deeplab_runs["folder"].sub("model"), RunFolder(deeplab_runs["reference"] / "model"),
                                TOLERANCE)
    print(f"DeepLab: largest difference from the uninterrupted run: {worst}")
    reference = json.loads((deeplab_runs["reference"] / "summary.json").read_text())
    for key in ("val_miou", "val_miou_ms", "val_miou_crf"):
        assert summary[key] == pytest.approx(reference[key], abs=1e-6), key
    assert deeplab_runs["folder"].read_json("summary.json")["val_miou"] == summary["val_miou"]
    assert [h["epoch"] for h in summary["history"]] == [1, 2]


def test_deeplab_on_two_workers_trains_as_one_worker(deeplab_runs, voc_mini, cache_dir, tmp_path):
    """DeepLab's global batch of 2 over 2 workers: the network ends as the 1-worker reference's (the pixel
    cross-entropy's mean over the global batch's labelled pixels, the backbone's BatchNorm frozen, ASPP v2 without
    BatchNorm), and so do its scores."""
    cfg = load_config(REPO / "configs/demo.yaml", _segment_args(voc_mini, cache_dir, deeplab_runs["labels"]) + [
        "segment.num_workers=2", "scaling.cpus_per_worker=1"], job="segment")
    summary = run_segment(cfg, tmp_path / "two-workers")
    worst = assert_same_network(RunFolder(tmp_path / "two-workers" / "model"),
                                RunFolder(deeplab_runs["reference"] / "model"), MULTI_WORKER_TOLERANCE)
    print(f"DeepLab on 2 workers: largest difference from 1 worker: {worst}")
    reference = json.loads((deeplab_runs["reference"] / "summary.json").read_text())
    assert summary["val_miou"] == pytest.approx(reference["val_miou"], abs=1e-3)


def test_a_finished_deeplab_job_is_kept_on_rerun(deeplab_runs):
    again, first = deeplab_runs["again"], deeplab_runs["result"]
    assert again["stages"]["train"] == {"kept": True, "epochs": 2}
    assert again["stages"]["predict"]["kept"] == 2 and again["stages"]["predict"]["done"] == 0
    assert (again["val_miou"], again["val_miou_crf"]) == (first["val_miou"], first["val_miou_crf"])
