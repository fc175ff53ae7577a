"""The entry script as users run it: in a subprocess that starts its own Ray, and through `ray job submit` to a
local head that the test starts and stops."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.rayhead import RayHead
from tests.rayhead import ray_env as _env

pytestmark = pytest.mark.slow


def test_bad_config_key_exits_with_its_name(tmp_path):
    proc = subprocess.run([sys.executable, "ray_jobs/train.py", "--output-dir", str(tmp_path), "train.epoch=1"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=_env())
    assert proc.returncode == 2 and "train.py: config error: unknown config key 'train.epoch'" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_ray_job_submit_trains_on_real_voc(voc_mini, cache_dir, tmp_path):
    """Acceptance: `ray job submit -- python ray_jobs/train.py data.format=voc data.root=../shared/data/voc_mini
    train.epochs=1` runs end to end on real VOC images through a local head that this test starts and stops (it
    cannot learn from 9 images; it must run, evaluate and say where its summary is)."""
    # 4 logical CPUs on the 2 cores: the training worker's 2 plus the Ray Data decode actor and its small tasks
    head = RayHead(num_cpus=4, dashboard=True)
    try:
        out = tmp_path / "voc"
        submit = ["ray", "job", "submit", "--address", head.job_address, "--working-dir", str(REPO), "--",
                  "python", "ray_jobs/train.py", "--output-dir", str(out), "data.format=voc", f"data.root={voc_mini}",
                  "train.epochs=1", "eval.scales=[1.0]", "model.pretrained=null", f"data.cache_dir={cache_dir}"]
        # Token auth is on whenever ~/.ray/auth_token exists; asking for it explicitly works either way.
        env = _env(RAY_AUTH_MODE="token")
        for _ in range(12):  # the head's job agent comes up a few seconds after `ray start` returns
            proc = subprocess.run(submit, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
            if "No available agent to submit job" not in proc.stdout + proc.stderr:
                break
            time.sleep(5)
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
        assert "succeeded" in proc.stdout
        assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout[-3000:], proc.stderr[-3000:])  # none
        assert str(out.resolve() / "summary.json") in proc.stdout.splitlines()  # the job says where its summary is
        summary = json.loads((out / "summary.json").read_text())
        assert summary["epochs"] == 1 and summary["num_images"] == 3 and summary["train_images"] == 9
        assert 0 <= summary["cam_miou"] <= 1 and 0 < summary["floor_background_miou"] < 1
        assert (out / "cam_overlays.png").is_file()
    finally:
        head.stop()  # this test's Ray only (its process group), never another one on the machine
    assert not head.alive()


def test_a_data_error_is_one_line_naming_the_folder_and_exits_1(tmp_path):
    proc = subprocess.run([sys.executable, "ray_jobs/train.py", "--output-dir", str(tmp_path / "run"),
                           "data.format=voc", "data.root=/nonexistent/VOC2012"], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=_env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == "error: data.root /nonexistent/VOC2012 is not a directory", proc.stderr
    assert "Traceback" not in proc.stderr


def test_pseudo_labels_script_names_a_bad_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "ray_jobs/pseudo_labels.py", "--output-dir", str(tmp_path),
                           "checkpoint=/nonexistent"], capture_output=True, text=True, timeout=120, cwd=REPO, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("pseudo_labels.py: config error: pseudo.checkpoint=/nonexistent: not a "
                                                   "checkpoint"), proc.stderr
