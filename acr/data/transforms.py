"""Image transforms as in the released ACR code: random resize, horizontal flip, ImageNet normalisation, random crop
with zero padding (in normalised space, i.e. the mean colour). No colour jitter (it destabilises the reconstructor).
Every random choice draws from the `numpy.random.Generator` passed in, never from a global RNG."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(img: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> HxWx3 float32, ImageNet-normalised."""
    return (img.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def random_resize(img: np.ndarray, rng: np.random.Generator, mode: str, low: float, high: float) -> np.ndarray:
    """`long_side`: long side drawn as an integer uniformly in [low, high]; `scale`: factor uniform in [low, high].
    Aspect ratio kept, bicubic."""
    h, w = img.shape[:2]
    if mode == "long_side":
        target = int(rng.integers(int(low), int(high) + 1))
        scale = target / max(h, w)
    else:
        scale = float(rng.uniform(low, high))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))


def random_flip(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img[:, ::-1] if rng.random() < 0.5 else img


def random_crop(img: np.ndarray, rng: np.random.Generator, size: int, fill=0) -> np.ndarray:
    """A size x size crop; where the image is smaller it is placed at a random offset in a container filled with
    `fill` (a scalar, or one value per channel)."""
    h, w = img.shape[:2]
    out = np.empty((size, size) + img.shape[2:], img.dtype)
    out[...] = fill
    ch, cw = min(size, h), min(size, w)

    def offsets(space: int) -> tuple[int, int]:  # (container offset, image offset)
        if space > 0:
            return 0, int(rng.integers(space + 1))
        return int(rng.integers(-space + 1)), 0

    cont_left, img_left = offsets(w - size)
    cont_top, img_top = offsets(h - size)
    out[cont_top:cont_top + ch, cont_left:cont_left + cw] = img[img_top:img_top + ch, img_left:img_left + cw]
    return out


def train_transform(img: np.ndarray, rng: np.random.Generator, resize_mode: str, resize_range, crop_size: int,
                    flip: bool) -> np.ndarray:
    """uint8 HxWx3 -> float32 3 x crop x crop, in the released code's order: resize, flip, normalise, crop."""
    img = random_resize(img, rng, resize_mode, *resize_range)
    if flip:
        img = random_flip(img, rng)
    img = random_crop(normalize(img), rng, crop_size)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def scale_flip_crop_pair(raw: np.ndarray, label: np.ndarray, rng: np.random.Generator, resize_range, crop: int,
                         flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Image (uint8 HxWx3) and label map (uint8 HxW) rescaled by one factor drawn from resize_range (bilinear and
    nearest), flipped together, normalised and cropped at the same place; padding is 0 (the mean colour) in the
    image and 255 (ignore) in the label. Returns (3 x crop x crop float32, crop x crop uint8)."""
    if raw.shape[:2] != label.shape:
        raise ValueError(f"image {raw.shape[:2]} and label map {label.shape} differ in size")
    s = rng.uniform(*resize_range)
    size = (max(1, round(raw.shape[1] * s)), max(1, round(raw.shape[0] * s)))
    raw = np.asarray(Image.fromarray(raw).resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    if flip and rng.random() < 0.5:
        raw, label = raw[:, ::-1], label[:, ::-1]
    both = np.concatenate([normalize(np.ascontiguousarray(raw)), label[..., None].astype(np.float32)], axis=2)
    both = random_crop(both, rng, crop, fill=np.array([0, 0, 0, 255], np.float32))
    return np.ascontiguousarray(both[..., :3].transpose(2, 0, 1)), both[..., 3].astype(np.uint8)


def to_chw_normalized(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(normalize(img).transpose(2, 0, 1))
