"""Training state on disk: one `state.pt` per checkpoint folder, written atomically, always read with
`torch.load(weights_only=True)` (no unpickling of arbitrary objects); and where a job finds a checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from acr.config import Config, config_from_dict
from acr.errors import CheckpointError, ConfigError
from acr.storage import RunFolder, is_uri, write_atomically
from acr.models.factory import build_classifier, build_reconstructor

STATE_FILE = "state.pt"


def save_state(folder: Path, state: dict) -> Path:
    """`folder/state.pt`, written atomically (acr.storage.write_atomically)."""
    return write_atomically(Path(folder) / STATE_FILE, lambda f: torch.save(state, f))


def load_state(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint's state: a folder's state.pt, or the file; a local path or a URI (s3://...). Only tensors and
    plain containers are unpickled: a file that needs anything else (e.g. an object whose unpickling would run code)
    is refused, naming the file."""
    if is_uri(path):
        folder = RunFolder(str(path))
        data = folder.read_bytes(STATE_FILE)
        if data is None:
            raise CheckpointError(f"no checkpoint state at {folder.uri(STATE_FILE)}")
        return _torch_load(io.BytesIO(data), folder.uri(STATE_FILE), map_location)
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint state at {path}")
    return _torch_load(path, path, map_location)


def _torch_load(source, where, map_location) -> dict:
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for unsafe or broken files
        raise CheckpointError(f"cannot load {where} with torch.load(weights_only=True): {exc}") from exc


def resolve_checkpoint(location: str | Path, key: str = "pseudo.checkpoint") -> str:
    """A checkpoint folder from a checkpoint folder, its state.pt, a train.py output folder or a tune.py one (their
    summary.json names it): a local path or a URI. Anything else is a ConfigError naming `key`."""
    location = str(location)
    if is_uri(location):
        folder = RunFolder(location)
        if folder.exists(STATE_FILE):
            return location
        summary = folder.read_json("summary.json")
    else:
        p = Path(location).expanduser().resolve()
        if p.is_file() and p.name == STATE_FILE:
            return str(p.parent)
        if (p / STATE_FILE).is_file():
            return str(p)
        summary = json.loads((p / "summary.json").read_text()) if (p / "summary.json").is_file() else None
    if summary is None:
        raise ConfigError(f"{key}={location}: not a checkpoint folder, a state.pt, nor a train.py / tune.py output "
                          "folder with a summary.json")
    for name in ("best_checkpoint", "checkpoint"):
        if summary.get(name):
            return resolve_checkpoint(summary[name], key)
    raise ConfigError(f"{key}={location}: its summary.json names no checkpoint (best_checkpoint or checkpoint)")


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
    return write_atomically(Path(out), lambda f: torch.save(backbone, f))
