"""Training state on disk: one `state.pt` per checkpoint folder, written atomically, always read with
`torch.load(weights_only=True)` (no unpickling of arbitrary objects); and where a job finds a checkpoint."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from acr.config import Config, config_from_dict
from acr.errors import CheckpointError, ConfigError
from acr.storage import RunFolder, is_uri, write_atomically
from acr.models.backbones import build_backbone
from acr.models.factory import build_classifier, build_reconstructor, is_vit, vit_encoder
from acr.models.weights import load_backbone_weights

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
    backbone = _prefixed(load_state(checkpoint)["classifier"], "backbone.")
    if not backbone:
        raise ValueError(f"{checkpoint}: the classifier state has no backbone tensors")
    return write_atomically(Path(out), lambda f: torch.save(backbone, f))


# Where the CNN that IRN freezes (pseudo.irn_backbone) and DeepLab starts from (segment.init_backbone) comes from.
BACKBONE_SOURCES = ("auto", "classifier", "encoder", "pretrained")


@dataclass(frozen=True)
class CnnBackbone:
    """A CNN backbone of a checkpoint: its acr.registry name, output stride, and weights, either a state dict
    (`state`, the trained network's) or a weights file (`weights_file`, what the run started from)."""
    name: str
    output_stride: int
    state: dict | None
    weights_file: str | None
    description: str

    def build(self, dropout: bool = False) -> torch.nn.Module:
        backbone = build_backbone(self.name, self.output_stride, dropout=dropout)
        if self.state is not None:
            backbone.load_state_dict(self.state)
        elif self.weights_file:
            load_backbone_weights(backbone, self.weights_file, self.name)
        return backbone


def backbone_source(cfg: Config, which: str, has_reconstructor: bool) -> str:
    """`auto`: the classifier's backbone for a CNN classifier; for a ViT one (MCTformer-v2, no stride-4 features
    for IRN and no DeepLab form) the reconstructor's CNN encoder G_E, or without a reconstructor the ImageNet CNN
    the encoder would have started from (IRN's own choice: an ImageNet ResNet-50, frozen)."""
    if which not in BACKBONE_SOURCES:
        raise ConfigError(f"backbone source '{which}' is not one of {BACKBONE_SOURCES}")
    if which != "auto":
        return which
    if not is_vit(cfg):
        return "classifier"
    return "encoder" if has_reconstructor and not vit_encoder(cfg) else "pretrained"


def checkpoint_backbone(state: dict, where: str, which: str = "auto") -> CnnBackbone:
    """The CNN backbone `which` (BACKBONE_SOURCES) of a checkpoint's `state`: `classifier` (a CNN classifier's),
    `encoder` (the reconstructor's encoder G_E, trained by the RU phase) or `pretrained` (the CNN of the same name
    built from the ImageNet weights file the run started from). Errors name the checkpoint and the choice."""
    cfg = config_from_dict(state["config"])
    m, vit = cfg.model, is_vit(cfg)
    source = backbone_source(cfg, which, state.get("reconstructor") is not None)
    name, stride = (m.vit.encoder_backbone, 8) if vit else (m.backbone, m.output_stride)
    if source == "classifier":
        if vit:
            raise ConfigError(f"{where}: the classifier is a ViT ({m.backbone}); IRN and DeepLab need a CNN: choose "
                              "`encoder` (the reconstructor's) or `pretrained`")
        return CnnBackbone(name, stride, _prefixed(state["classifier"], "backbone."), None,
                           f"the classifier's {name} of {where}")
    if source == "encoder":
        if vit_encoder(cfg):
            raise ConfigError(f"{where}: the reconstructor's encoder is a ViT's blocks (model.vit.encoder=vit_blocks); "
                              "IRN and DeepLab need a CNN: choose `pretrained` (model.vit.encoder_backbone)")
        if state.get("reconstructor") is None:
            raise CheckpointError(f"{where} holds no reconstructor (method.reconstructor=none), so no encoder: "
                                  "choose `pretrained` or `classifier`")
        return CnnBackbone(name, stride, _prefixed(state["reconstructor"], "backbone."), None,
                           f"the reconstructor's encoder {name} of {where}")
    weights = m.vit.encoder_pretrained if vit else m.pretrained
    if not weights or weights == "standin":
        raise ConfigError(f"{where} was trained from {'no weights file' if not weights else 'an unresolved stand-in'} "
                          f"({'model.vit.encoder_pretrained' if vit else 'model.pretrained'}={weights}): `pretrained` "
                          "has no weights to take")
    return CnnBackbone(name, stride, None, weights, f"{name} from {weights} (the weights {where} started from)")


def _prefixed(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
