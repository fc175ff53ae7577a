"""MS COCO (2014 and 2017 layouts) as image-level labels and semantic masks, read with pycocotools.

Expected under the root::

    annotations/instances_<split>.json   (e.g. instances_train2014.json, instances_val2017.json)
    <split>/<file_name>                  (the images; `file_name` as the JSON gives it)

`<split>` is the folder name (`train2014`, `val2014`, `train2017`, `val2017`). Where `instances_<split>.json` is
absent, a single `instances_<split>*.json` is accepted (e.g. a subset such as `instances_val2017_mini.json`).

Classes: the categories sorted by their COCO id, numbered 1..80 (0 = background), see :func:`category_map`; COCO's ids
run 1..90 with gaps, so e.g. id 13 (stop sign) is class 12 and id 90 (toothbrush) is class 80.
Semantic masks: non-crowd instances painted from the largest to the smallest area (a small object in front of a
large one stays visible); crowd regions (iscrowd=1) painted first, as 255 (`crowd=ignore`) or as their class
(`crowd=class`), so that a non-crowd instance overlapping them wins. Image-level labels: every category with an
annotation in the image, crowd included. An image without any annotation has no label: it is left out of the split
(counted as `unlabelled`), as WSSS methods on COCO do.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from acr.data.voc import IGNORE, DataError


def annotation_file(root: Path, split: str) -> Path:
    root = Path(root)
    exact = root / "annotations" / f"instances_{split}.json"
    if exact.is_file():
        return exact
    cands = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise DataError(f"no COCO annotations for split '{split}': expected {exact}")
    raise DataError(f"several annotation files match split '{split}' under {root / 'annotations'}: "
                    f"{', '.join(c.name for c in cands)}; name the one to use with data.train_split / eval.split")


def coco_splits(root: Path) -> list[str]:
    """The splits of a COCO root: one per `annotations/instances_<split>*.json` whose `<split>/` folder exists."""
    out = []
    for f in sorted((Path(root) / "annotations").glob("instances_*.json")):
        name = f.stem.removeprefix("instances_")
        split = next((s for s in (name, name.split("_")[0]) if (Path(root) / s).is_dir()), None)
        if split and split not in out:
            out.append(split)
    return out


def category_map(categories: list[dict]) -> dict[int, int]:
    """COCO category id -> class index 1..K (background is 0), in increasing id order."""
    return {c["id"]: i + 1 for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}


@dataclass(frozen=True)
class CocoImage:
    id: str
    image_path: Path
    classes: tuple[int, ...]  # 0-based foreground class indices
    height: int
    width: int
    coco_id: int


class CocoSplit:
    """One COCO split: its images with labels, and their semantic masks on demand."""

    def __init__(self, root: str | Path, split: str, num_classes: int, crowd: str = "ignore"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.root {self.root} is not a directory")
        self.split = split
        self.crowd = crowd
        ann_file = annotation_file(self.root, split)
        self.image_dir = self.root / split
        if not self.image_dir.is_dir():
            raise DataError(f"COCO split '{split}': image folder {self.image_dir} not found")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            try:
                self.coco = COCO(str(ann_file))
            except (ValueError, KeyError) as exc:
                raise DataError(f"cannot read COCO annotations {ann_file}: {exc}") from exc
        cats = self.coco.loadCats(self.coco.getCatIds())
        if len(cats) != num_classes:
            raise DataError(f"{ann_file} defines {len(cats)} categories but the config says "
                            f"data.num_classes={num_classes}")
        self.cat_to_class = category_map(cats)
        self.class_names = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
        self.images: list[CocoImage] = []
        self.unlabelled: list[str] = []
        for img_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[img_id]
            anns = self.coco.imgToAnns.get(img_id, [])
            classes = sorted({self.cat_to_class[a["category_id"]] - 1 for a in anns})
            image_id = Path(info["file_name"]).stem
            if not classes:
                self.unlabelled.append(image_id)
                continue
            path = self.image_dir / info["file_name"]
            if not path.is_file():
                raise DataError(f"COCO image '{image_id}' of split '{split}' has no file {path}")
            self.images.append(CocoImage(image_id, path, tuple(classes), info["height"], info["width"], img_id))

    def mask(self, image: CocoImage) -> np.ndarray:
        """HxW uint8 semantic mask: 0 background, 1..K classes, 255 crowd (with crowd=ignore)."""
        anns = self.coco.imgToAnns.get(image.coco_id, [])
        out = np.zeros((image.height, image.width), np.uint8)
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        objects = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -float(a.get("area", 0.0)))
        for a in crowd + objects:
            m = self.coco.annToMask(a).astype(bool)
            if m.shape != out.shape:
                raise DataError(f"COCO annotation {a.get('id')} of image '{image.id}' decodes to {m.shape}, "
                                f"image is {out.shape}")
            value = IGNORE if a.get("iscrowd", 0) and self.crowd == "ignore" else self.cat_to_class[a["category_id"]]
            out[m] = value
        return out
