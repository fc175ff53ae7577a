"""Ray Tune + Optuna: search-space validation (the end-to-end search is not yet tested: see README, status)."""

from __future__ import annotations


import pytest

from acr.config import ConfigError, load_config
from acr.tuning import load_space
from tests.conftest import REPO


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
