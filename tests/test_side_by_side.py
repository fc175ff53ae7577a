"""The side-by-side benchmark's worker (benchmarks/step_timer.py) times the checkout it is given, not the installed
project, and is deterministic: the same code from the same inputs gives the same losses."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [*TINY_OVERRIDES, "data.format=synthetic", "synthetic.num_classes=4", "train.batch_size=2",
             "train.precision=fp32"]


def _time(repo: Path, inputs: Path, out: Path) -> dict:
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_timer.py"), "--repo", str(repo), "--inputs",
                    str(inputs), "--out", str(out), "--config", "configs/demo.yaml", "--steps", "1", "--threads", "1",
                    *OVERRIDES], check=True)
    return json.loads(out.read_text())


def test_the_step_timer_runs_the_checkout_it_is_given(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "side_by_side.py"), "--reference", "HEAD", "--prepare",
                    str(tmp_path), "--config", "configs/demo.yaml", *OVERRIDES], check=True, cwd=REPO)
    export, inputs = tmp_path / "reference", tmp_path / "inputs.pt"
    assert (export / "acr" / "method" / "step.py").is_file()
    assert torch.load(inputs, weights_only=True)["batch"]["image"].shape[0] == 2  # train.batch_size
    exported, here = _time(export, inputs, tmp_path / "a.json"), _time(REPO, inputs, tmp_path / "b.json")
    assert Path(exported["acr"]).resolve().is_relative_to(export.resolve())
    assert Path(here["acr"]).resolve().is_relative_to(REPO.resolve())
    assert len(exported["seconds"]) == 2 and all(s > 0 for s in exported["seconds"])
    assert exported["losses"][-1]["ru/loss"] > 0 and exported["losses"][0] != exported["losses"][1]
    # the same code from the same weights, batch and seed: the same losses, so that two implementations' losses
    # can be compared iteration by iteration
    assert _time(export, inputs, tmp_path / "c.json")["losses"] == exported["losses"]
