"""Training through a real local Ray cluster: TorchTrainer workers, DDP over gloo, checkpoints, resume, real VOC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acr.checkpoint import load_state
from acr.config import load_config
from acr.data.ingest import epoch_permutation
from acr.data.shards import write_shards
from acr.data.sources import dataset_root
from acr.data.voc import DataError
from acr.train.job import run_training
from tests.conftest import TINY_OVERRIDES
from tests.test_shards import corrupt_one_row

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    yield


def _cfg(cache_dir, extra):
    return load_config(None, TINY_OVERRIDES + [f"data.cache_dir={cache_dir}", "train.log_every_steps=0"] + extra)


def _step_losses(run_dir: Path) -> list[tuple[float, float]]:
    hist = json.loads((run_dir / "history.json").read_text())
    return [(s["ru/loss"], s["cu/loss"]) for s in hist["steps"]]


def test_four_workers_equal_one_worker_in_fp64_with_evaluation_split(ray_cluster, cache_dir, tmp_path):
    """The global batch of 4 split over 4 workers (one image each) or computed by 1: in float64 the parameters, both
    optimisers' momentum and every step's all-reduced losses agree within 1e-10, which a wrong all-reduce (a sum
    instead of a mean, a gradient left out) does not pass however small the gradient; the evaluation, split over the
    4 workers, counts the same images and finds the same confusion counts (the same CAM mIoU at every threshold)."""
    common = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4", "eval.enabled=true",
              "scaling.cpus_per_worker=0.5", "train.threads_per_worker=1", "train.precision=fp64"]
    runs = {}
    for workers in (1, 4):
        summary = run_training(_cfg(cache_dir, common + [f"scaling.num_workers={workers}"]), tmp_path / f"w{workers}")
        runs[workers] = (summary, load_state(summary["checkpoint"]))
    for a, b in zip(_step_losses(tmp_path / "w1"), _step_losses(tmp_path / "w4"), strict=True):
        assert a == pytest.approx(b, abs=1e-10, rel=0)
    (one, s1), (four, s4) = runs[1], runs[4]
    for net in ("classifier", "reconstructor", "opt_cls", "opt_rec"):
        pairs = ([(k, v, s4[net][k]) for k, v in s1[net].items()] if net.startswith(("cl", "re")) else
                 [(f"{i}.{k}", v, s4[net]["state"][i][k]) for i, st in s1[net]["state"].items() for k, v in st.items()])
        for name, a, b in pairs:
            if a.is_floating_point():
                assert float((a - b).abs().max()) <= 1e-10, f"{net} {name} differs between 1 and 4 workers"
    assert one["num_images"] == four["num_images"] == 8
    assert four["sweep"]["miou"] == pytest.approx(one["sweep"]["miou"], abs=1e-12)
    assert len(set(one["sweep"]["miou"])) > 1  # scored: the thresholds give different masks
    # the workers' copies of both networks are bit-identical, and after CU the reconstructor has no gradients
    epoch = json.loads((tmp_path / "w4" / "history.json").read_text())["epochs"][0]
    assert epoch["replica_divergence"] == 0.0 and epoch["reconstructor_grads_after_cu"] == 0


def test_train_evaluates_checkpoints_and_resumes(ray_cluster, cache_dir, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(cache_dir, ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4"])
    first = run_training(cfg, run)
    summary = json.loads((run / "summary.json").read_text())
    for key in ("cam_miou", "precision", "recall", "threshold", "floor_background_miou", "floor_whole_image_miou",
                "checkpoint", "epochs", "train_images_per_second", "config"):
        assert key in summary, key
    for key in ("cam_miou", "precision", "recall", "floor_background_miou", "floor_whole_image_miou"):
        assert 0.0 <= summary[key] <= 1.0
    assert (run / "cam_overlays.png").stat().st_size > 0 and (run / "curves.png").is_file()
    assert first["num_images"] == 8
    # Rerun in the same folder with one more epoch: epoch 0 is not trained again.
    cfg2 = _cfg(cache_dir, ["train.epochs=2", "train.max_steps_per_epoch=2", "train.batch_size=4"])
    run_training(cfg2, run)
    hist = json.loads((run / "history.json").read_text())
    assert [e["epoch"] for e in hist["epochs"]] == [0, 1]
    assert [s["epoch"] for s in hist["steps"]] == [0, 0, 1, 1]
    state = load_state(json.loads((run / "summary.json").read_text())["checkpoint"])
    assert state["epoch"] == 2 and state["counters"]["cls_steps"] == 4


def test_corrupt_row_stops_naming_it_or_is_skipped_and_counted(ray_cluster, cache_dir, tmp_path):

    base = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4", "eval.enabled=false"]
    root = dataset_root(_cfg(cache_dir, base))
    out = tmp_path / "shards"
    manifest = write_shards("synthetic", root, out, 6, shard_rows=8, progress=False)
    # the stream's first two global batches of epoch 0 hold these 8 images; break one of them
    first = _cfg(cache_dir, base + [f"data.shards={out}"])
    victim = manifest["splits"]["train"]["shards"][0]["first_index"] + int(
        epoch_permutation(32, first.train.seed, 0)[1])
    victim_id = f"train_{victim:05d}"
    corrupt_one_row(out, manifest, "train", victim_id)
    with pytest.raises(DataError, match=f"row id '{victim_id}' of shard .*part-0000"):
        run_training(first, tmp_path / "stop")
    summary = run_training(_cfg(cache_dir, base + [f"data.shards={out}", "data.skip_corrupt=true"]), tmp_path / "skip")
    assert summary["skipped_corrupt"] == 1 and summary["skipped_corrupt_ids"] == [victim_id]
    assert summary["train_images"] == 31 and summary["dropped_per_epoch"] == 31 - 2 * 4


def test_coco_trains_and_evaluates(ray_cluster, coco_mini, cache_dir, tmp_path):
    cfg = _cfg(cache_dir, ["data.format=coco", f"data.root={coco_mini}", "data.num_classes=80",
                           "data.train_split=val2017", "eval.split=val2017", "train.epochs=1", "train.batch_size=4",
                           "train.max_steps_per_epoch=1"])
    summary = run_training(cfg, tmp_path / "coco")
    assert summary["train_images"] == 10 and summary["num_images"] == 10 and summary["dropped_per_epoch"] == 6
    assert 0 <= summary["cam_miou"] <= 1 and len(summary["per_class_iou"]) == 81
