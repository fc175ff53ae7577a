"""The files of the per-image jobs (pseudo-labels, DeepLab's predictions): one file per image and kind in a job's folder
(acr.runtime.stages.ImageFiles), encoded and decoded here:

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
from PIL import Image

from acr.data.voc import DECODE_ERRORS, DataError, voc_palette

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
