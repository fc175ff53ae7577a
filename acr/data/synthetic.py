"""The embedded dataset: a synthetic WSSS benchmark written in PASCAL VOC layout.

It is built to pose the two problems ACR addresses, with ground truth to measure them:

* **Partial activation.** Every object is a blob whose *body* has a colour drawn from a palette shared by all classes
  (so the body says nothing about the class) and a coherent texture across the body. A small *part* (about a sixth of
  the body) carries a class-specific two-colour pattern. A plain classifier only needs the part, so its CAM covers a
  fraction of the object; the body's coherent colour is what a reconstructor can exploit.
* **Context leakage.** Each class in `context_classes` has a typical background context (a textured band, like water
  under a boat) that appears with `context_probability` when the class is present and rarely otherwise. The band is
  background in the ground truth, so CAMs that spread onto it lose precision.

Layout written (exactly what :mod:`acr.data.voc` reads): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
(palette PNG, 255 = void band around each object, as in VOC), ``Annotations/<id>.xml`` (image-level labels),
``ImageSets/Segmentation/{train,val}.txt`` and ``classes.txt``. Generation is deterministic given the config:
image i of split k is drawn from ``numpy.random.default_rng([seed, k, i])``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from acr.config import SyntheticConfig
from acr.data.voc import voc_palette

GENERATOR_VERSION = 4
SPLITS = ("train", "val")

# Body colours shared by all classes (RGB, 0-255).
_BODY_PALETTE = np.array(
    [[200, 60, 50], [60, 160, 70], [60, 90, 200], [210, 170, 40], [150, 70, 170], [40, 170, 170], [220, 120, 40],
     [120, 120, 120]],
    dtype=np.float32,
)


def _class_pattern_colors(num_classes: int) -> np.ndarray:
    """Two distinct saturated colours per class for its discriminative part, evenly spread in hue."""
    out = np.zeros((num_classes, 2, 3), np.float32)
    for c in range(num_classes):
        for j in range(2):
            h = (c / num_classes + 0.5 * j) % 1.0
            out[c, j] = _hsv_to_rgb(h, 1.0, 1.0 if j == 0 else 0.45)
    return out


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32) * 255


def class_names(cfg: SyntheticConfig) -> list[str]:
    return [f"shape{c}" + ("_with_context" if c in cfg.context_classes else "") for c in range(cfg.num_classes)]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] of shape (size, size): bicubic upsampling of a coarse random grid."""
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32) / 255.0


def _blob(rng: np.random.Generator, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """A star-convex blob: an ellipse whose radius is modulated by two low harmonics."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.65, 1.0)
    dy, dx = yy - cy, xx - cx
    ry = dy * np.cos(ang) - dx * np.sin(ang)
    rx = dy * np.sin(ang) + dx * np.cos(ang)
    theta = np.arctan2(ry, rx)
    r = np.sqrt((ry / aspect) ** 2 + rx**2)
    mod = 1.0 + 0.12 * np.sin(2 * theta + rng.uniform(0, 2 * np.pi)) + 0.08 * np.sin(3 * theta + rng.uniform(0, 6.3))
    return r <= radius * mod


def _render_image(rng: np.random.Generator, cfg: SyntheticConfig, pattern_colors: np.ndarray):
    s = cfg.image_size
    # Background: muted low-frequency colour noise.
    base = rng.uniform(90, 170, size=3).astype(np.float32)
    img = base[None, None, :] + 45 * (np.stack([_smooth_noise(rng, s, 4) for _ in range(3)], -1) - 0.5)
    mask = np.zeros((s, s), np.uint8)

    n_obj = int(rng.integers(1, cfg.max_objects + 1))
    classes = rng.choice(cfg.num_classes, size=n_obj, replace=False)

    # Context band (background in the GT): under the object for context classes, rarely otherwise.
    context_of = [c for c in classes if c in cfg.context_classes]
    ctx_class = None
    if context_of and rng.random() < cfg.context_probability:
        ctx_class = int(context_of[0])
    elif rng.random() < 0.05 and cfg.context_classes:
        ctx_class = int(rng.choice(cfg.context_classes))
    if ctx_class is not None:
        k = cfg.context_classes.index(ctx_class)
        band_h = int(s * rng.uniform(0.35, 0.5))
        top = k % 2 == 1  # alternate: bottom band ("water"), top band ("sky")
        yy = np.arange(s, dtype=np.float32)[:, None]
        rows = (yy < band_h) if top else (yy >= s - band_h)
        hue = (0.58 + 0.13 * k) % 1.0
        col = _hsv_to_rgb(hue, 0.55, 0.8)
        freq = 2 * np.pi / rng.uniform(5, 8)
        stripes = 0.5 + 0.5 * np.sin(freq * np.arange(s, dtype=np.float32)[:, None] + 0.5 * _smooth_noise(rng, s, 3) * 6)
        band = col[None, None, :] * (0.75 + 0.25 * stripes[..., None])
        img = np.where(rows[..., None], band, img)

    placed = np.zeros((s, s), bool)
    for c in classes:
        radius = s * rng.uniform(0.16, 0.24)
        for _ in range(20):  # keep objects mostly apart
            cy, cx = rng.uniform(radius, s - radius, size=2)
            body = _blob(rng, s, cy, cx, radius)
            if (body & placed).sum() < 0.1 * body.sum():
                break
        body &= ~placed
        # Body: a palette colour with a coherent texture (fine stripes of a random orientation).
        col = _BODY_PALETTE[rng.integers(len(_BODY_PALETTE))] + rng.uniform(-20, 20, size=3)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        ang = rng.uniform(0, np.pi)
        tex = 0.5 + 0.5 * np.sin((np.cos(ang) * xx + np.sin(ang) * yy) * 2 * np.pi / rng.uniform(4, 7))
        body_rgb = col[None, None, :] * (0.8 + 0.2 * tex[..., None])
        img = np.where(body[..., None], body_rgb, img)
        # Part: a small disc inside the body in the class's two colours (outer ring, inner disc).
        part_r = radius * rng.uniform(0.36, 0.42)
        ys, xs = np.nonzero(body)
        inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= (radius - part_r) ** 2 * 0.8
        j = int(rng.integers(inside.sum())) if inside.any() else int(rng.integers(len(ys)))
        py, px = (ys[inside][j], xs[inside][j]) if inside.any() else (ys[j], xs[j])
        d2 = (yy - py) ** 2 + (xx - px) ** 2
        part = (d2 <= part_r**2) & body
        part_rgb = np.where((d2 <= (0.55 * part_r) ** 2)[..., None], pattern_colors[c, 1], pattern_colors[c, 0])
        img = np.where(part[..., None], part_rgb, img)
        mask[body] = c + 1
        placed |= body

    img = np.clip(img + rng.normal(0, 4, size=img.shape), 0, 255).astype(np.uint8)
    # VOC-style void band: pixels within one pixel of an object boundary are 255.
    m = Image.fromarray(mask)
    grown = np.asarray(m.filter(ImageFilter.MaxFilter(3)))
    shrunk = np.asarray(m.filter(ImageFilter.MinFilter(3)))
    void = grown != shrunk
    mask = np.where(void, 255, mask).astype(np.uint8)
    return img, mask, sorted(int(c) for c in classes)


def _annotation_xml(image_id: str, names: list[str], size: int) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    return (f"<annotation><filename>{image_id}.jpg</filename><size><width>{size}</width><height>{size}</height>"
            f"<depth>3</depth></size>{objs}</annotation>\n")


def config_key(cfg: SyntheticConfig) -> str:
    blob = json.dumps({"v": GENERATOR_VERSION, **cfg.__dict__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def generate(cfg: SyntheticConfig, root: Path) -> Path:
    """Write the dataset to `root` (which must not exist yet)."""
    root = Path(root)
    names = class_names(cfg)
    pattern_colors = _class_pattern_colors(cfg.num_classes)
    for d in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for k, (split, count) in enumerate(zip(SPLITS, (cfg.train_images, cfg.val_images))):
        ids = []
        for i in range(count):
            rng = np.random.default_rng([cfg.seed, k, i])
            img, mask, classes = _render_image(rng, cfg, pattern_colors)
            image_id = f"{split}_{i:05d}"
            Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(root / "SegmentationClass" / f"{image_id}.png")
            (root / "Annotations" / f"{image_id}.xml").write_text(
                _annotation_xml(image_id, [names[c] for c in classes], cfg.image_size))
            ids.append(image_id)
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    (root / "synthetic.json").write_text(json.dumps({"generator_version": GENERATOR_VERSION, **cfg.__dict__}, indent=1))
    return root


def default_cache_dir(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("ACR_CACHE", Path.home() / ".cache" / "acr"))


def ensure_synthetic(cfg: SyntheticConfig, cache_dir: str | None) -> Path:
    """Return the dataset folder for `cfg`, generating it on first use (atomically: written aside, then renamed)."""
    target = default_cache_dir(cache_dir) / "synthetic" / config_key(cfg)
    if (target / "synthetic.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        generate(cfg, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is complete
            if not (target / "synthetic.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
