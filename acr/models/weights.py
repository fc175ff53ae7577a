"""ImageNet weights from files the user gives; nothing is ever downloaded and nothing is unpickled.

* torchvision ResNets: a torchvision state dict (``resnet50-*.pth``), loaded with ``torch.load(weights_only=True)``.
* ResNet-38d: the MXNet ``resnet_38d.params`` file the WSSS community distributes (read here without mxnet, by parsing
  MXNet's NDArray-list format), or a psa-style converted ``.pth`` state dict.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from acr.errors import WeightsError
from acr.storage import local_file

_LIST_MAGIC = 0x112
_V1_MAGIC = 0xF993FAC8
_V2_MAGIC = 0xF993FAC9
_V3_MAGIC = 0xF993FACA
_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64}


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise WeightsError(f"{self.path}: truncated MXNet file at byte {self.pos}")
        out = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return out

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise WeightsError(f"{self.path}: truncated MXNet file at byte {self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def _read_ndarray(r: _Reader) -> np.ndarray:
    (magic,) = r.take("<I")
    if magic in (_V2_MAGIC, _V3_MAGIC):
        (stype,) = r.take("<i")
        if stype != 0:
            raise WeightsError(f"{r.path}: sparse NDArray (storage type {stype}) is not supported")
        (ndim,) = r.take("<i")
        shape = r.take(f"<{ndim}q") if ndim > 0 else ()
    elif magic == _V1_MAGIC:
        (ndim,) = r.take("<I")
        shape = r.take(f"<{ndim}q")
    else:  # legacy: the magic is the number of dimensions, dims are uint32
        ndim = magic
        if ndim > 32:
            raise WeightsError(f"{r.path}: not an MXNet NDArray (bad header {magic:#x})")
        shape = r.take(f"<{ndim}I")
    if len(shape) == 0 or 0 in shape:
        return np.zeros(shape, np.float32)
    r.take("<ii")  # context: dev_type, dev_id
    (type_flag,) = r.take("<i")
    if type_flag not in _DTYPES:
        raise WeightsError(f"{r.path}: unknown MXNet dtype flag {type_flag}")
    dtype = np.dtype(_DTYPES[type_flag])
    count = int(np.prod(shape))
    return np.frombuffer(r.raw(count * dtype.itemsize), dtype=dtype).reshape(shape).copy()


def read_mxnet_params(path: str | Path) -> dict[str, np.ndarray]:
    """Parse an MXNet `.params` file (NDArray list) into {name: array}. Names keep their `arg:`/`aux:` prefix."""
    path = Path(path)
    r = _Reader(path.read_bytes(), path)
    header, _reserved = r.take("<QQ")
    if header != _LIST_MAGIC:
        raise WeightsError(f"{path}: not an MXNet .params file (header {header:#x}, expected {_LIST_MAGIC:#x})")
    (n,) = r.take("<Q")
    arrays = [_read_ndarray(r) for _ in range(n)]
    (m,) = r.take("<Q")
    names = []
    for _ in range(m):
        (length,) = r.take("<Q")
        names.append(r.raw(length).decode())
    if m != n:
        raise WeightsError(f"{path}: {n} arrays but {m} names")
    return dict(zip(names, arrays))


def write_mxnet_params(path: str | Path, arrays: dict[str, np.ndarray], legacy: bool = False) -> None:
    """Write {name: float32 array} in MXNet's format (V2, or the legacy format of 2016-era files). For tests and for
    users who want to round-trip a file."""
    out = [struct.pack("<QQ", _LIST_MAGIC, 0), struct.pack("<Q", len(arrays))]
    for a in arrays.values():
        a = np.ascontiguousarray(a, np.float32)
        if legacy:
            out.append(struct.pack(f"<I{a.ndim}I", a.ndim, *a.shape))
        else:
            out.append(struct.pack(f"<Iii{a.ndim}q", _V2_MAGIC, 0, a.ndim, *a.shape))
        out.append(struct.pack("<iii", 1, 0, 0))
        out.append(a.tobytes())
    out.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        b = name.encode()
        out.append(struct.pack("<Q", len(b)) + b)
    Path(path).write_bytes(b"".join(out))


_BN_NAMES = {"beta": "bias", "gamma": "weight", "mean": "running_mean", "var": "running_var"}


def mxnet_to_resnet38d(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename MXNet ResNet-38 parameters to :class:`ResNet38d` names (psa's `convert_mxnet_to_torch` mapping):
    `res2a_branch1_weight` -> `b2.conv_branch1.weight`, `bn3b1_branch2a_gamma` -> `b3_1.bn_branch2a.weight`,
    `bn7_moving_var` -> `bn7.running_var`, `conv1a_weight` -> `conv1a.weight`; the ImageNet classifier is dropped."""
    out = {}
    for key, value in params.items():
        name = key.split(":", 1)[-1]
        toks = name.split("_")
        t = torch.from_numpy(np.asarray(value, np.float32))
        if "conv1a" in toks[0]:
            out["conv1a.weight"] = t
        elif "linear1000" in toks[0] or "fc" in toks[0]:
            continue
        elif len(toks) > 1 and "branch" in toks[1]:
            head = toks[0]
            block = f"b{head[-3]}_{head[-1]}" if head[-1] != "a" else f"b{head[-2]}"
            if head.startswith("res"):
                out[f"{block}.conv_{toks[1]}.weight"] = t
            else:
                out[f"{block}.bn_{toks[1]}.{_BN_NAMES[toks[-1]]}"] = t
        elif toks[0] == "bn7":
            out[f"bn7.{_BN_NAMES[toks[-1]]}"] = t
        else:
            raise WeightsError(f"unexpected MXNet parameter name '{key}' for resnet38d")
    return out


def _load_state_dict_file(path: Path, where: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file at `path` (named `where` in errors: its URI where it was downloaded)."""
    where = where or path
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad/unsafe file
        raise WeightsError(f"cannot load {where} as a state dict with weights_only=True: {exc}") from exc
    for wrapper in ("state_dict", "model"):  # a training checkpoint's weights (DeiT's releases hold them in "model")
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise WeightsError(f"{where}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_backbone_weights(backbone: nn.Module, path: str | Path, name: str) -> None:
    """Load ImageNet weights into a backbone built by :func:`acr.models.backbones.build_backbone`. Every backbone
    tensor must be found with the right shape; extra tensors (the ImageNet classifier) are ignored."""
    if str(path) == "standin":
        raise WeightsError("pretrained=standin names the project's stand-in for ImageNet weights: the job resolves it "
                           "to its file (acr.train.standin.resolve_standin, or `python ray_jobs/standin.py`)")
    with local_file(path) as local:
        if local is None:
            raise WeightsError(f"weights file not found: {path}")
        _load_backbone_file(backbone, local, str(path), name)


def _load_backbone_file(backbone: nn.Module, path: Path, where: str, name: str) -> None:
    if path.suffix == ".params":
        if name != "resnet38d":
            raise WeightsError(f"{where}: MXNet .params weights are for resnet38d, not {name}")
        sd = mxnet_to_resnet38d(read_mxnet_params(path))
    else:
        sd = _load_state_dict_file(path, where)
    own = backbone.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{where} does not fit backbone {name}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        raise WeightsError(f"{where}: tensor {k} has shape {tuple(sd[k].shape)}, backbone {name} expects "
                           f"{tuple(own[k].shape)}")
    backbone.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)


def _resize_tokens(t: torch.Tensor, count: int) -> torch.Tensor:
    """(1, T, D) leading tokens -> (1, count, D): one token repeated (DeiT's class token for each of MCTformer's
    class tokens, as MCTformer main.py does), `count` kept, any other number averaged and then repeated."""
    if t.shape[1] != count:
        t = t.mean(dim=1, keepdim=True).expand(1, count, t.shape[2])
    return t.contiguous()


def _resize_position_embedding(pe: torch.Tensor, file_tokens: int, own: torch.Tensor, own_tokens: int,
                               path: Path) -> torch.Tensor:
    """A position embedding of `file_tokens` leading tokens and a square patch grid -> the backbone's: the token part
    by :func:`_resize_tokens`, the grid resized bicubically (MCTformer main.py, timm's resample_abs_pos_embed)."""
    grid_in, grid_out = (pe.shape[1] - file_tokens) ** 0.5, (own.shape[1] - own_tokens) ** 0.5
    if grid_in != int(grid_in) or pe.shape[2] != own.shape[2]:
        raise WeightsError(f"{path}: pos_embed has shape {tuple(pe.shape)}, not one of {file_tokens} token(s) and a "
                           f"square grid of width {own.shape[2]}")
    patches = pe[:, file_tokens:].reshape(1, int(grid_in), int(grid_in), -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=(int(grid_out), int(grid_out)), mode="bicubic", align_corners=False)
    return torch.cat([_resize_tokens(pe[:, :file_tokens], own_tokens),
                      patches.to(pe.dtype).flatten(2).transpose(1, 2)], dim=1)


def load_vit_weights(backbone: nn.Module, path: str | Path, name: str) -> None:
    """Load a timm-format DeiT checkpoint (a state dict, or DeiT's release file with it under "model"; a local path or
    a URI) into an acr.models.vit.VisionTransformer, whatever its number of leading tokens and its grid: the class
    token and the position embedding are adapted (:func:`_resize_position_embedding`); every other tensor must fit
    exactly."""
    with local_file(path) as local:
        if local is None:
            raise WeightsError(f"weights file not found: {path}")
        sd = _load_state_dict_file(local, str(path))
    own = backbone.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise WeightsError(f"{path} does not fit backbone {name}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    tokens = sd["cls_token"].shape[1] if sd["cls_token"].dim() == 3 else -1
    if tokens < 1 or sd["cls_token"].shape[2] != own["cls_token"].shape[2]:
        raise WeightsError(f"{path}: cls_token has shape {tuple(sd['cls_token'].shape)}, backbone {name} expects "
                           f"(1, T, {own['cls_token'].shape[2]})")
    sd = dict(sd, cls_token=_resize_tokens(sd["cls_token"], backbone.num_tokens),
              pos_embed=_resize_position_embedding(sd["pos_embed"], tokens, own["pos_embed"], backbone.num_tokens,
                                                   path))
    bad = [k for k in own if sd[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        raise WeightsError(f"{path}: tensor {k} has shape {tuple(sd[k].shape)}, backbone {name} expects "
                           f"{tuple(own[k].shape)}")
    backbone.load_state_dict({k: sd[k] for k in own})
