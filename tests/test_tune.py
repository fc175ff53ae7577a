"""Ray Tune + Optuna: search-space validation, and a real search killed in the middle and resumed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from acr.config import ConfigError, load_config, to_dict
from acr.tune.job import concurrent_trials, load_space, trial_resources
from tests.conftest import REPO, TINY_OVERRIDES


def _space(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ("method.srf.grid_sise: {categorical: [4]}", "unknown config key 'method.srf.grid_sise'"),
    ("optim.lr: {uniform: [0.1, 0.1]}", r"optim.lr: uniform needs \[low, high\] with low < high"),
    ("optim.lr: {loguniform: [0, 0.1]}", "optim.lr: loguniform needs low > 0"),
    ("method.srf.grid_size: {categorical: []}", "method.srf.grid_size: categorical needs a non-empty list"),
    ("method.srf.grid_size: {categorical: [8, 12]}",
     r"method.srf.grid_size=12 is not a valid setting: .*must divide augment.crop_size=128"),
    ("optim.lr: {normal: [0, 1]}", "optim.lr: expected one of"),
])
def test_bad_search_space_is_named_before_any_trial(tmp_path, text, message):
    cfg = load_config(REPO / "configs/demo.yaml")
    with pytest.raises(ConfigError, match=message):
        load_space(_space(tmp_path, text), cfg)


def test_shipped_spaces_fit_their_configs():
    demo = load_space(REPO / "search_spaces/demo.yaml", load_config(REPO / "configs/demo.yaml"))
    assert demo["method.srf.grid_size"] == ("categorical", [4, 8, 16])
    full = load_space(REPO / "search_spaces/acr.yaml", load_config(REPO / "configs/voc_official.yaml",
                                                                    ["data.root=/nonexistent"]))
    assert {"method.srf.q_start", "method.ru_target_weight", "method.cu_nontarget_weight", "optim.lr"} <= set(full)


def _terminated(experiment) -> list[str]:
    """The trials that Tune's experiment state (experiment_state-*.json, what a resumed search reads) records as
    finished."""
    done = []
    for f in experiment.glob("experiment_state-*.json"):
        try:
            trials = [json.loads(t[0]) for t in json.loads(f.read_text())["trial_data"]]
        except (ValueError, KeyError, IndexError, TypeError):  # being written
            continue
        done += [t.get("trial_id", "?") for t in trials if t.get("status") == "TERMINATED"]
    return done


@pytest.mark.slow
def test_search_killed_midway_resumes_and_best_yaml_reproduces_the_trial(cache_dir, tmp_path):
    out = tmp_path / "tune"
    space = _space(tmp_path, "method.srf.grid_size: {categorical: [4, 8]}\n"
                             "method.cu_target_weight: {uniform: [0.2, 1.2]}\n")
    args = [sys.executable, "ray_jobs/tune.py", "--output-dir", str(out), "--space", str(space),
            *TINY_OVERRIDES, f"data.cache_dir={cache_dir}", "train.epochs=2", "train.max_steps_per_epoch=1",
            "train.batch_size=4", "train.log_every_steps=0", "tune.num_samples=2", "tune.select_max_images=4",
            "eval.max_images=4", "scaling.cpus_per_worker=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # Kill the whole search (driver, Ray and its workers) once the first trial has finished.
    deadline = time.time() + 600
    finished = []
    while time.time() < deadline and not finished and proc.poll() is None:
        time.sleep(2)
        finished = [p for p in (out / "experiment").glob("*/result.json")
                    if len(p.read_text().splitlines()) >= 2]
    assert finished, "no trial finished within 10 minutes"
    deadline = time.time() + 120  # Tune records a finished trial in its experiment state within seconds
    while time.time() < deadline and not _terminated(out / "experiment") and proc.poll() is None:
        time.sleep(0.5)
    recorded = _terminated(out / "experiment")
    assert recorded, "no finished trial recorded in Tune's experiment state"
    finished = [p for p in (out / "experiment").glob("*/result.json") if len(p.read_text().splitlines()) >= 2
                and any(t in p.parent.name for t in recorded)]
    assert finished, (recorded, sorted(p.name for p in (out / "experiment").iterdir()))
    os.killpg(proc.pid, signal.SIGKILL)  # the search and the Ray it started (same process group)
    proc.wait()
    done_before = {p.parent.name: p.read_text() for p in finished}
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming the search" in rerun.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_trials"] == 2 and summary["n_errored"] == 0
    for name, text in done_before.items():  # finished trials were not run again
        assert (out / "experiment" / name / "result.json").read_text() == text
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 2 and (out / "trials.png").is_file() and (out / "study.db").is_file()
    assert summary["select_split"] == "train" and summary["report_split"] == "val"
    assert 0 <= summary["best_cam_miou"] <= 1 and 0 <= summary["best_cam_miou_reported"] <= 1
    # best.yaml, given to train.py, resolves to the best trial's configuration exactly
    best = load_config(out / "best.yaml")
    trial = yaml.safe_load((out / "trials" / summary["best_trial"] / "config.yaml").read_text())
    for key, value in summary["best_config"].items():
        section, *rest = key.split(".")
        node = to_dict(best)[section]
        for part in rest:
            node = node[part]
        assert node == value
    resolved = to_dict(best)
    for section in resolved:
        if section != "eval":  # trials score on the selection split; best.yaml keeps the reported one
            assert resolved[section] == trial[section], section


def test_trials_at_once_follow_the_config_or_the_cluster():

    cfg = load_config(REPO / "configs/demo.yaml")  # 1 worker x 2 CPUs, 1 decode actor
    assert trial_resources(cfg) == {"CPU": pytest.approx(0.1 + 2 + 1 + 1), "GPU": 0.0}
    assert concurrent_trials(cfg, {"CPU": 5.0}) == 1 and concurrent_trials(cfg, {"CPU": 64.0}) == 15
    gpu = load_config(REPO / "configs/demo.yaml", ["scaling.use_gpu=true", "scaling.num_workers=2",
                                                   "scaling.cpus_per_worker=1", "train.batch_size=8"])
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # the GPUs bound it
    assert concurrent_trials(load_config(REPO / "configs/demo.yaml", ["tune.max_concurrent=3"]), {"CPU": 1}) == 3
