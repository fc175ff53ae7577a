"""Per-image steps of the pseudo-label job, without Ray (acr.pseudo runs them over a dataset).

The job (acr.pseudo) keeps one file per image and kind in its folder (acr.runtime.stages.ImageFiles); these functions
encode and decode them:

    cams/<id>.npz        multi-scale + flip CAMs of the image's labelled classes (float16, full resolution), `keys`
    crf/<id>.png         the +CRF level: CAMs with a constant background score, refined by the dense CRF
    ir_labels/<id>.png   IRN's confident labels (0 background, c+1 class c, 255 not confident)
    masks/<id>.png       the pseudo-label: CAMs propagated by the random walk on IRN's class boundaries

PNGs are palette-indexed with the VOC palette, the size of the image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from acr.data.voc import DECODE_ERRORS, DataError, voc_palette
from acr.refine.crf import CRFParams, LabelCRFParams, crf_inference
from acr.refine.irn import IRNet, confident_labels, labels_from_walk, propagate, scaled_to_max

CAMS, CRF, IR_LABELS, MASKS = "cams", "crf", "ir_labels", "masks"
SUFFIXES = {CAMS: ".npz"}  # every other kind of file (masks, DeepLab's predictions) is a .png


def label_png_bytes(labels: np.ndarray) -> bytes:
    """HxW uint8 label map -> palette PNG (VOC colours, 255 = void)."""
    png = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    png.putpalette(voc_palette())
    buf = io.BytesIO()
    png.save(buf, format="PNG")
    return buf.getvalue()


def read_label_png(data: bytes | str | Path, where: str = "") -> np.ndarray:
    """A palette PNG written by :func:`label_png_bytes` (its bytes, or a local path) -> HxW uint8 label map."""
    if not where:
        where = "a label PNG" if isinstance(data, bytes) else str(data)
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with Image.open(source) as im:
            if im.mode != "P":
                raise DataError(f"{where}: expected a palette-indexed PNG, got mode {im.mode}")
            return np.asarray(im, np.uint8)
    except DataError:
        raise
    except DECODE_ERRORS as exc:
        raise DataError(f"{where}: not a readable PNG label map ({exc})") from exc


def load_label_map(data: bytes | None, where: str, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """A training label map given by the user or a pseudo-label job (its bytes; None: missing): a palette or
    greyscale PNG of the image's size with values 0 (background), 1..num_classes, or 255 (ignore). Anything else
    is a DataError naming the file."""
    if data is None:
        raise DataError(f"label map {where} is missing")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{where}: a label map must be a palette or greyscale PNG of class indices, got "
                                f"mode {im.mode}")
            labels = np.asarray(im, np.uint8)
    except DataError:
        raise
    except DECODE_ERRORS as exc:
        raise DataError(f"{where}: not a readable PNG label map ({exc})") from exc
    if labels.shape != tuple(shape):
        raise DataError(f"{where}: label map is {labels.shape[1]}x{labels.shape[0]} (w x h), the image is "
                        f"{shape[1]}x{shape[0]}")
    bad = np.setdiff1d(np.unique(labels), np.r_[np.arange(num_classes + 1), 255])
    if bad.size:
        raise DataError(f"{where}: class id(s) {bad.tolist()} beyond the class count {num_classes} (0 background, "
                        "255 ignore)")
    return labels


def cams_bytes(cams: np.ndarray, keys: np.ndarray) -> bytes:
    """cams (K, H, W) of the K labelled classes `keys` (class indices, 0-based) as an .npz, in float16."""
    buf = io.BytesIO()
    np.savez_compressed(buf, cams=cams.astype(np.float16), keys=np.asarray(keys, np.int64))
    return buf.getvalue()


def load_cams(data: bytes | str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(cams float32, keys) of :func:`cams_bytes` output (its bytes, or a local path)."""
    with np.load(io.BytesIO(data) if isinstance(data, bytes) else data) as d:
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
                radius: int, cam_power: float, bg_threshold: float, crf: tuple[np.ndarray, CRFParams] | None = None
                ) -> np.ndarray:
    """IRN's make_sem_seg_labels for one image: the CAMs, brought to the boundary map's stride-4 grid (area
    average) and raised to `cam_power`, are propagated by the random walk, upsampled x4, cropped to the image,
    divided by their maximum; background wherever no class beats `bg_threshold`. With `crf` = (the HxWx3 uint8
    image, CRF parameters), the walked scores are refined by the dense CRF at full resolution before the argmax,
    as the +CRF level refines the CAMs (:func:`crf_labels`; the walk itself only resolves 4-pixel cells)."""
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
    if crf is not None:
        return crf_labels(crf[0], scaled_to_max(rw).cpu().numpy(), keys, bg_threshold, crf[1])
    keys_bg = np.concatenate([[0], np.asarray(keys) + 1])
    return labels_from_walk(rw.cpu(), keys_bg, bg_threshold)
