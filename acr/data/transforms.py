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


def random_crop(img: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A size x size crop; where the image is smaller it is placed at a random offset in a zero-filled container."""
    h, w = img.shape[:2]
    out = np.zeros((size, size) + img.shape[2:], img.dtype)
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


def to_chw_normalized(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(normalize(img).transpose(2, 0, 1))
