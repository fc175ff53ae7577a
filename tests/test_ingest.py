"""The Ray Data training stream through real TorchTrainer workers: each image at most once per epoch, equal batches
per worker, deterministic order, and the global batches of one worker (the stream's definition, TrainPlan and
TrainRows, computed here without Ray) for 2 workers. (1 and 2 Ray Train workers training alike:
tests/test_ray_train.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from acr.config import load_config, num_classes
from acr.data.ingest import TrainPlan, TrainRows, augment_kwargs, epoch_permutation
from acr.runtime.trainer import build_trainer
from acr.train.job import prepare_run
from acr.train.probe import stream_probe
from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow


def _stream(cfg, workers: int, out: Path, start=(0, 0)) -> tuple[list[list[dict]], dict]:
    cfg.scaling.num_workers = workers
    cfg.scaling.cpus_per_worker = 0.5
    loop_config, datasets, info = prepare_run(cfg, start=start, progress=False)
    out.mkdir(parents=True)
    trainer = build_trainer(stream_probe, {"per_worker": cfg.train.batch_size // workers, "record_dir": str(out)},
                            out / "run", datasets, cfg, workers)
    result = trainer.fit()
    assert result.error is None, result.error
    return ([json.loads((out / f"rank{r}.json").read_text())["batches"] for r in range(workers)],
            {**info, **loop_config["plan"]}, loop_config)


def _one_worker_stream(cfg, loop_config: dict) -> list[dict]:
    """The global batches of the run, as one worker would receive them, from the stream's own definition."""
    plan = TrainPlan(**{**loop_config["plan"], "world": 1})
    rows = TrainRows(loop_config["shards"], loop_config["manifest"], plan.to_dict(), num_classes(cfg),
                     augment_kwargs(cfg), cfg.method.srf.grid_size)
    b, out = plan.batch_size, []
    for k in range(plan.total_rows // b):
        d = rows.decode(*plan.rows(np.arange(k * b, (k + 1) * b)))
        out.append({"epoch": d["epoch"].tolist(), "index": d["index"].tolist(), "target_u": d["target_u"].tolist()})
    return out


def test_two_workers_see_each_image_once_per_epoch_in_the_one_worker_order(ray_local, cache_dir, tmp_path):
    # 32 images, global batch 6: 5 steps, 2 images dropped per epoch (a different pair each epoch)
    cfg = load_config(None, TINY_OVERRIDES + [f"data.cache_dir={cache_dir}", "train.epochs=2", "train.batch_size=6",
                                              "eval.enabled=false"])
    two, plan, loop_config = _stream(cfg, 2, tmp_path / "w2")
    one = [_one_worker_stream(cfg, loop_config)]
    assert plan["steps_per_epoch"] == 5 and plan["batch_size"] == 6 and len(plan["indices"]) == 32
    assert len(two[0]) == len(two[1]) == 10 and len(one[0]) == 10  # every worker the same number of batches
    for k in range(10):
        epoch = k // 5
        assert two[0][k]["epoch"] == two[1][k]["epoch"] == [epoch] * 3
        assert two[0][k]["shape"] == [3, 3, 64, 64]
        # global batch k is the same for 1 and 2 workers, images and per-image randomness alike
        assert two[0][k]["index"] + two[1][k]["index"] == one[0][k]["index"]
        assert two[0][k]["target_u"] + two[1][k]["target_u"] == pytest.approx(one[0][k]["target_u"])
    for epoch in range(2):
        seen = [i for b in one[0][epoch * 5:(epoch + 1) * 5] for i in b["index"]]
        assert len(seen) == len(set(seen)) == 30  # at most once per epoch; 32 - 30 = 2 dropped
        assert seen == epoch_permutation(32, cfg.train.seed, epoch)[:30].tolist()  # deterministic: seed and epoch
    assert plan["steps_per_epoch"] * 6 + 2 == 32
    # a run resumed at epoch 1 step 3 starts its stream exactly there
    resumed, _, _ = _stream(cfg, 2, tmp_path / "r", start=(1, 3))
    assert [b["index"] for b in resumed[0]] == [b["index"] for b in two[0][8:]]
