"""Fault tolerance through a real local Ray cluster and the Ray Data training stream, on S3 as on a cloud cluster
(an s3:// run folder served by a local S3-compatible server, moto). One scenario, three properties:

1. `python ray_jobs/train.py --output-dir s3://...` is killed with its Ray (SIGKILL to its whole session) after its
   first checkpoint, in the middle of epoch 0; rerunning it with the same --output-dir resumes from that checkpoint
   (epoch, step, both optimisers, LR and SRF schedules, RNG state, the training stream's position), read from S3.
2. During that rerun (scaling.max_failures=1) its training worker is killed (SIGKILL) after the next checkpoint:
   Ray Train starts a new worker group, which resumes from the last checkpoint and completes the run.
3. The run, interrupted twice, ends with the parameters, optimiser states, step counters and RNG state of an
   uninterrupted run, and only the newest train.keep_checkpoints checkpoints are left.

The runs use one thread per worker and dropout on: the U-Net's dropout draws from torch's RNG, so the final parameters
match only if the RNG state is restored too. They are in float32 (a checkpoint of the two ResNet-18 networks and
their momentum is 185 MB, 370 MB in float64, and the S3 server is local Python): a resumed run repeats the same
computation in the same order, so the tolerance, 1e-7 absolute on every tensor, leaves room for nothing but
summation order; state that is not restored (dropout masks, momentum, learning rate) changes the updates themselves."""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from acr.checkpoint import load_state
from acr.config import load_config
from acr.storage import RunFolder
from acr.train.job import run_local, run_training
from tests.conftest import REPO, TINY_OVERRIDES
from tests.faults import (assert_history_complete, assert_keeps_newest, assert_same_acr_state,
                          run_killed_at_first_checkpoint, run_with_a_worker_killed, s3_uri)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes through /proc")]
TOLERANCE = 1e-7
# 2 epochs of 2 steps, a checkpoint after every step: checkpoints at (epoch, step) (0, 1), (1, 0), (1, 1), (2, 0);
# the newest two are kept.
RUN = ["train.epochs=2", "train.max_steps_per_epoch=2", "train.batch_size=4", "train.checkpoint_every_steps=1",
       "train.keep_checkpoints=2", "eval.enabled=false", "train.precision=fp32", "train.threads_per_worker=1",
       "model.dropout=true", "train.log_every_steps=0", "scaling.max_failures=1"]
ALL_STEPS = [(0, 0), (0, 1), (1, 0), (1, 1)]


def _overrides(cache_dir) -> list[str]:
    return TINY_OVERRIDES + [f"data.cache_dir={cache_dir}"] + RUN


@pytest.fixture(scope="module")
def reference(ray_cluster, cache_dir, tmp_path_factory) -> dict:
    """The uninterrupted run's final state: the same training loop and data stream in this process (acr.train.job
    .run_local, no Ray Train; Ray Train's own runs are compared with each other in tests/test_ray_train.py)."""
    session = run_local(load_config(None, _overrides(cache_dir)), tmp_path_factory.mktemp("reference") / "run")
    assert len(session.reports) == len(ALL_STEPS) and session.last_checkpoint is not None
    return load_state(session.last_checkpoint)


def _final_state(folder: RunFolder) -> dict:
    with folder.fs.open_input_file(f"{folder.latest_checkpoint()}/state.pt") as f, \
            tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "state.pt").write_bytes(f.read())
        return load_state(tmp)


@pytest.fixture(scope="module")
def scenario(ray_cluster, s3_endpoint, cache_dir) -> dict:
    uri = s3_uri(s3_endpoint, "runs/voc")
    folder = RunFolder(uri)
    out: dict = {"folder": folder}
    # [1] train.py, killed with its Ray after its first checkpoint
    out["first"], out["driver_returncode"], out["driver_log"] = run_killed_at_first_checkpoint(
        ["ray_jobs/train.py", "--output-dir", uri] + _overrides(cache_dir), folder, REPO)
    out["interrupted_files"] = {name: folder.read_text(name) for name in ("config.yaml", "summary.json")}
    # [2] the rerun in the same place (what train.py runs), its worker killed after its first new checkpoint
    rerun = run_with_a_worker_killed(lambda: run_training(load_config(None, _overrides(cache_dir)), uri), folder,
                                     after=out["first"])
    out.update({"summary" if k == "result" else k: v for k, v in rerun.items()})
    return out


def test_an_interrupted_train_py_resumes_from_its_last_checkpoint_on_s3(scenario):
    assert scenario["driver_returncode"] == -signal.SIGKILL, scenario["driver_log"]
    assert scenario["first"] == {"epoch": 0, "step_in_epoch": 1}  # mid-epoch
    files = scenario["interrupted_files"]
    assert "max_failures: 1" in files["config.yaml"] and files["summary.json"] is None  # started, not finished
    assert "error" not in scenario, scenario.get("error")
    summary = scenario["summary"]
    assert summary["resumes"][0] == scenario["first"]
    assert summary["output_dir"] == "s3://acr-test/runs/voc"
    assert summary["checkpoint"].startswith("s3://acr-test/runs/voc/checkpoint_")
    assert json.loads(scenario["folder"].read_text("summary.json"))["resumes"] == summary["resumes"]


def test_a_killed_worker_restarts_from_the_last_checkpoint(scenario):
    assert len(scenario["workers"]) == 1, scenario["workers"]
    assert "error" not in scenario, scenario.get("error")
    resumes = scenario["summary"]["resumes"]
    assert len(resumes) == 2  # the rerun, then the new worker group after the kill
    second = (resumes[1]["epoch"], resumes[1]["step_in_epoch"])
    before_kill = (scenario["before_kill"]["epoch"], scenario["before_kill"]["step_in_epoch"])
    assert before_kill <= second < (2, 0) and second > (0, 1)  # the newest checkpoint when the worker died
    assert not Path(f"/proc/{scenario['workers'][0]}").exists()


def test_the_interrupted_run_ends_as_an_uninterrupted_one(scenario, reference):
    assert "error" not in scenario, scenario.get("error")
    folder = scenario["folder"]
    assert_history_complete(folder, ALL_STEPS)
    assert reference["counters"]["cls_steps"] == len(ALL_STEPS)
    worst = assert_same_acr_state(_final_state(folder), reference, TOLERANCE)
    print(f"largest difference from the uninterrupted run: {worst}")
    assert_keeps_newest(folder, keep=2, kills=2)
