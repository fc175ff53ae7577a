"""User-given files are never unpickled beyond tensors: a pickle whose loading would run code, given as ImageNet
weights (`model.pretrained`) or as a checkpoint (`method.init_classifier`, pseudo-label checkpoints), is refused with
an error naming the file, and its code does not run. No torch.load in the library goes without weights_only=True."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from acr.checkpoint import CheckpointError, load_state, save_state
from acr.data.voc import DataError, _load_labels_file
from acr.models.weights import WeightsError, load_backbone_weights
from tests.conftest import REPO

# torch warns that the plain pickle uses protocol 4 before it refuses it: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


class Payload:
    """Unpickling this runs `exec`, which writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('executed')",)


@pytest.fixture(params=["pickle", "torch.save"])
def malicious(request, tmp_path):
    marker = tmp_path / "executed.txt"
    path = tmp_path / "resnet18-weights.pth"
    payload = {"conv1.weight": torch.zeros(1), "evil": Payload(marker)}
    if request.param == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    return path, marker


def test_malicious_pretrained_weights_are_refused_not_executed(malicious):
    path, marker = malicious
    with pytest.raises(WeightsError, match=re.escape(f"cannot load {path} as a state dict with weights_only=True")):
        load_backbone_weights(nn.Conv2d(3, 1, 1), path, "resnet18")
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_not_executed(malicious, tmp_path):
    path, marker = malicious
    with pytest.raises(CheckpointError, match=re.escape(f"cannot load {path} with torch.load(weights_only=True)")):
        load_state(path)
    assert not marker.exists()
    # a real checkpoint state still loads
    save_state(tmp_path / "ok", {"epoch": 3, "classifier": {"w": torch.ones(2)}, "config": {"a": [1, 2]}})
    state = load_state(tmp_path / "ok")
    assert state["epoch"] == 3 and torch.equal(state["classifier"]["w"], torch.ones(2))


def test_every_torch_load_in_the_code_is_weights_only():
    calls = []
    for folder in ("acr", "ray_jobs", "benchmarks"):
        for f in (REPO / folder).rglob("*.py"):
            text = f.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                end = text.find("\n", text.find(")", m.end()))
                calls.append((f.relative_to(REPO), text[m.start():end]))
    assert calls, "no torch.load found: the search is broken"
    unsafe = [(f, c) for f, c in calls if "weights_only=True" not in c]
    assert not unsafe, unsafe
    assert not [f for f in (REPO / "acr").rglob("*.py") if re.search(r"\bpickle\.loads?\(|allow_pickle=True",
                                                                    f.read_text())]


def test_psa_labels_npy_loads_and_a_malicious_one_is_refused(tmp_path):
    """psa/IRN's cls_labels.npy is an np.save'd dict (a pickle): read with numpy arrays as the only allowed objects."""


    good = tmp_path / "cls_labels.npy"
    np.save(good, {"2007_000032": np.array([1, 0, 0, 1], np.float32), "2007_000039": np.eye(4, dtype=np.float32)[2]})
    assert _load_labels_file(good, 4) == {"2007_000032": [0, 3], "2007_000039": [2]}

    marker = tmp_path / "executed.txt"
    bad = tmp_path / "evil.npy"
    np.save(bad, {"2007_000032": Payload(marker)}, allow_pickle=True)
    with pytest.raises(DataError, match=re.escape(f"labels file {bad}: cannot read it") + ".*builtins.exec"):
        _load_labels_file(bad, 4)
    assert not marker.exists()
    numeric = tmp_path / "numeric.npy"
    np.save(numeric, np.zeros((3, 4), np.float32))
    with pytest.raises(DataError, match="not a saved dict"):
        _load_labels_file(numeric, 4)
