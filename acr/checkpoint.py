"""Training state on disk: one `state.pt` per checkpoint folder, written atomically, always read with
`torch.load(weights_only=True)` (no unpickling of arbitrary objects)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from acr.config import Config, config_from_dict
from acr.models.factory import build_classifier, build_reconstructor

STATE_FILE = "state.pt"


def _save_atomically(obj, path: Path) -> Path:
    """torch.save to a temporary file beside `path`, then rename: a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def save_state(folder: Path, state: dict) -> Path:
    return _save_atomically(state, Path(folder) / STATE_FILE)


class CheckpointError(ValueError):
    """A checkpoint file that does not load; the message names it."""


def load_state(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint's state (a folder's state.pt, or the file). Only tensors and plain containers are unpickled: a
    file that needs anything else (e.g. an object whose unpickling would run code) is refused, naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint state at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for unsafe or broken files
        raise CheckpointError(f"cannot load {path} with torch.load(weights_only=True): {exc}") from exc


def load_networks(path: str | Path, device: torch.device | str = "cpu", reconstructor: bool = False
                  ) -> tuple[torch.nn.Module, torch.nn.Module | None, Config]:
    """The trained classifier of a checkpoint folder (or state.pt), in eval mode, with the config it was trained with;
    with `reconstructor=True` also its reconstructor (an error, naming the file, where the run had none)."""
    state = load_state(path)
    cfg = config_from_dict(state["config"])
    cfg.model.pretrained = None  # the checkpoint has every weight
    model = build_classifier(cfg)
    model.load_state_dict(state["classifier"])
    rec = None
    if reconstructor:
        if state.get("reconstructor") is None:
            raise CheckpointError(f"{path} holds no reconstructor (a baseline run?)")
        rec = build_reconstructor(cfg)
        rec.load_state_dict(state["reconstructor"])
        rec = rec.to(device).eval()
    return model.to(device).eval(), rec, cfg


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Config]:
    """The trained classifier of a checkpoint folder (or state.pt), with the config it was trained with."""
    model, _, cfg = load_networks(path, device)
    return model, cfg


def export_backbone(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the classifier's backbone of a checkpoint as a plain state dict that `model.pretrained` accepts (the
    same tensor names as the ImageNet weights files), so that a classifier trained on one dataset can initialise
    both networks of a run on another: the embedded benchmark's stand-in for ImageNet pre-training."""
    state = load_state(checkpoint)
    backbone = {k.removeprefix("backbone."): v for k, v in state["classifier"].items() if k.startswith("backbone.")}
    if not backbone:
        raise ValueError(f"{checkpoint}: the classifier state has no backbone tensors")
    return _save_atomically(backbone, Path(out))
