"""The training loop in-process (LocalSession: no Ray Train, the same Ray Data stream): ablation modes and failure
handling."""

import json

import pytest
import torch

from acr.checkpoint import load_classifier, load_state
from acr.config import load_config
from acr.errors import NonFiniteLossError
from acr.train.job import run_local
from tests.conftest import TINY_OVERRIDES


def _run(tmp_path, cache_dir, name, extra):
    cfg = load_config(None, TINY_OVERRIDES + [f"data.cache_dir={cache_dir}", "train.log_every_steps=0",
                                              "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4",
                                              "train.threads_per_worker=2"] + extra)
    return run_local(cfg, tmp_path / name)


def test_baseline_pretrained_and_adversarial_modes(ray_local, tmp_path, cache_dir):
    base = _run(tmp_path, cache_dir, "base", ["method.reconstructor=none", "eval.enabled=false"])
    state = load_state(base.last_checkpoint)
    assert state["reconstructor"] is None and state["counters"]["rec_steps"] == 0  # no reconstructor was built
    adv = _run(tmp_path, cache_dir, "adv", ["eval.enabled=false"])
    adv_state = load_state(adv.last_checkpoint)
    assert adv_state["counters"] == {"cls_steps": 2, "rec_steps": 2, "consecutive_nonfinite": 0, "skipped_steps": 0}
    # paper Sec. 5.3: (1) train the reconstructor against the frozen baseline classifier ...
    ru = _run(tmp_path, cache_dir, "ru", ["eval.enabled=false", f"method.init_classifier={base.last_checkpoint}",
                                          "method.train_classifier=false"])
    ru_state = load_state(ru.last_checkpoint)
    assert ru_state["counters"]["cls_steps"] == 0 and ru_state["counters"]["rec_steps"] == 2
    assert all(torch.equal(v, state["classifier"][k]) for k, v in ru_state["classifier"].items())
    # (2) ... then a new classifier against that reconstructor, frozen (CU terms active, no RU phase)
    pre = _run(tmp_path, cache_dir, "pre", ["method.reconstructor=pretrained", "eval.enabled=false",
                                            f"method.pretrained_reconstructor={ru.last_checkpoint}"])
    hist = json.loads((pre.last_checkpoint / "history.json").read_text())
    assert all(s["ru/loss"] is None for s in hist["steps"])
    assert pre.reports[-1]["cu/loss_t"] < 0
    model, cfg = load_classifier(pre.last_checkpoint)
    assert cfg.method.reconstructor == "pretrained" and isinstance(model, torch.nn.Module)


def test_eval_reports_fractions_and_beats_nothing_by_construction(ray_local, tmp_path, cache_dir):
    s = _run(tmp_path, cache_dir, "ev", [])
    final = s.reports[-1]
    for k in ("cam_miou", "precision", "recall"):
        assert 0.0 <= final[k] <= 1.0
    result = json.loads((s.last_checkpoint / "eval.json").read_text())
    assert len(result["sweep"]["miou"]) == len(result["sweep"]["thresholds"]) and result["num_images"] == 8
    assert result["cam_miou"] == max(result["sweep"]["miou"])
    best = result["sweep"]["miou"].index(result["cam_miou"])  # flagged exactly when the best is an end of the range
    ends = {0: "low", len(result["sweep"]["miou"]) - 1: "high"}
    assert result["threshold_at_edge"] == ends.get(best) and result["threshold_range"] == [0.01, 0.99]
    assert (s.last_checkpoint / "cam_overlays.png").stat().st_size > 1000


def test_diverging_loss_stops_with_a_clear_error(ray_local, tmp_path, cache_dir):
    with pytest.raises(NonFiniteLossError, match="consecutive non-finite losses"):
        _run(tmp_path, cache_dir, "nan", ["optim.lr=1e30", "train.max_consecutive_nonfinite=0",
                                          "train.max_steps_per_epoch=4", "eval.enabled=false"])
