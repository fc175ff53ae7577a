"""Per-image steps of the pseudo-label job, without Ray (acr/distributed/batch.py runs them over a dataset).

Each step reads and writes one file per image under the job's folder, written under a temporary name and renamed,
so a rerun skips every image whose file exists (`is_done`) and a killed job leaves no partial file:

    cams/<id>.npz        multi-scale + flip CAMs of the image's labelled classes (float16, full resolution), `keys`
    crf/<id>.png         the +CRF level: CAMs with a constant background score, refined by the dense CRF
    ir_labels/<id>.png   IRN's confident labels (0 background, c+1 class c, 255 not confident)
    masks/<id>.png       the pseudo-label: CAMs propagated by the random walk on IRN's class boundaries

PNGs are palette-indexed with the VOC palette, the size of the image.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from acr.data.voc import voc_palette
from acr.refine.crf import CRFParams, LabelCRFParams, crf_inference
from acr.refine.irn import IRNet, confident_labels, labels_from_walk, propagate

CAMS, CRF, IR_LABELS, MASKS = "cams", "crf", "ir_labels", "masks"
SUFFIX = {CAMS: ".npz"}  # every other kind of file (masks, DeepLab's predictions) is a .png


def output_path(out: Path, kind: str, image_id: str) -> Path:
    return Path(out) / kind / f"{image_id}{SUFFIX.get(kind, '.png')}"


def is_done(out: Path, kind: str, image_id: str) -> bool:
    return output_path(out, kind, image_id).is_file()


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """HxW uint8 label map -> palette PNG (VOC colours, 255 = void)."""
    png = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    png.putpalette(voc_palette())
    buf = io.BytesIO()
    png.save(buf, format="PNG")
    write_atomically(Path(path), buf.getvalue())


def read_label_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode != "P":
            raise ValueError(f"{path}: expected a palette-indexed PNG, got mode {im.mode}")
        return np.asarray(im, np.uint8)


def load_label_map(path: Path, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """A training label map given by the user or a pseudo-label job: a palette or greyscale PNG of the image's size
    with values 0 (background), 1..num_classes, or 255 (ignore). Anything else is a DataError naming the file."""
    from acr.data.voc import DECODE_ERRORS, DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"label map {path} is missing")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: a label map must be a palette or greyscale PNG of class indices, got mode "
                                f"{im.mode}")
            labels = np.asarray(im, np.uint8)
    except DataError:
        raise
    except DECODE_ERRORS as exc:
        raise DataError(f"{path}: not a readable PNG label map ({exc})") from exc
    if labels.shape != tuple(shape):
        raise DataError(f"{path}: label map is {labels.shape[1]}x{labels.shape[0]} (w x h), the image is "
                        f"{shape[1]}x{shape[0]}")
    bad = np.setdiff1d(np.unique(labels), np.r_[np.arange(num_classes + 1), 255])
    if bad.size:
        raise DataError(f"{path}: class id(s) {bad.tolist()} beyond the class count {num_classes} (0 background, "
                        "255 ignore)")
    return labels


def save_cams(path: Path, cams: np.ndarray, keys: np.ndarray) -> None:
    """cams (K, H, W) of the K labelled classes `keys` (class indices, 0-based), stored as float16."""
    buf = io.BytesIO()
    np.savez_compressed(buf, cams=cams.astype(np.float16), keys=np.asarray(keys, np.int64))
    write_atomically(Path(path), buf.getvalue())


def load_cams(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as d:
        return d["cams"].astype(np.float32), d["keys"]


def full_cams(cams: np.ndarray, keys: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, H, W) CAMs of the labelled classes -> (C, H, W) with zeros for the others."""
    out = np.zeros((num_classes,) + cams.shape[1:], np.float32)
    out[keys] = cams
    return out


def seed_labels(cams: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """The seed level: argmax over [threshold, CAMs]; 0 background, c+1 class c."""
    lut = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    if len(keys) == 0:
        return np.zeros(cams.shape[1:], np.uint8)
    return lut[np.concatenate([np.full((1,) + cams.shape[1:], threshold, np.float32), cams]).argmax(0)]


def crf_labels(image: np.ndarray, cams: np.ndarray, keys: np.ndarray, threshold: float,
               params: CRFParams = CRFParams()) -> np.ndarray:
    """The +CRF level: the scores [threshold, CAMs of the labelled classes] normalised per pixel and refined by the
    dense CRF (psa's crf_inference), argmax. Only the labelled classes and background can appear."""
    if len(keys) == 0:
        return np.zeros(image.shape[:2], np.uint8)
    scores = np.concatenate([np.full((1,) + cams.shape[1:], threshold, np.float32), cams]) + 1e-5
    refined = crf_inference(image, scores / scores.sum(0, keepdims=True), params)
    lut = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    return lut[refined.argmax(0)]


def ir_labels(image: np.ndarray, cams: np.ndarray, keys: np.ndarray, num_classes: int, fg: float, bg: float,
              params: LabelCRFParams = LabelCRFParams()) -> np.ndarray:
    """IRN's confident labels (cam_to_ir_label) from the stored CAMs of the labelled classes."""
    labels = np.zeros(num_classes, np.float32)
    labels[keys] = 1
    return confident_labels(image, full_cams(cams, keys, num_classes), labels, fg, bg, params)


@torch.no_grad()
def boundary_map(irn: IRNet, image: torch.Tensor) -> torch.Tensor:
    """Class-boundary probabilities at stride 4 of a normalised (3, H, W) image: the sigmoid of the mean of its and
    its flip's logits (IRN's EdgeDisplacement inference)."""
    irn.eval()
    logits = irn.logits(torch.stack([image, image.flip(-1)]))
    return torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)


@torch.no_grad()
def walk_labels(irn: IRNet, image: torch.Tensor, cams: np.ndarray, keys: np.ndarray, beta: float, exp_times: int,
                radius: int, cam_power: float, bg_threshold: float) -> np.ndarray:
    """IRN's make_sem_seg_labels for one image: the CAMs, brought to the boundary map's stride-4 grid (area
    average) and raised to `cam_power`, are propagated by the random walk, upsampled x4, cropped to the image,
    divided by their maximum; background wherever no class beats `bg_threshold`."""
    h, w = image.shape[-2:]
    if len(keys) == 0:
        return np.zeros((h, w), np.uint8)
    edge = boundary_map(irn, image).float()
    h4, w4 = edge.shape
    pad = torch.zeros((len(keys), h4 * 4, w4 * 4), dtype=torch.float32, device=edge.device)
    pad[:, :h, :w] = torch.from_numpy(cams).to(edge.device)
    cams4 = F.avg_pool2d(pad[None], 4)[0] ** cam_power
    rw = propagate(cams4, edge, beta=beta, exp_times=exp_times, radius=radius)
    rw = F.interpolate(rw[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :h, :w]
    keys_bg = np.concatenate([[0], np.asarray(keys) + 1])
    return labels_from_walk(rw.cpu(), keys_bg, bg_threshold)
