"""PASCAL VOC 2012 layout reader (also used for the embedded dataset and for users' own data in VOC layout).

Expected under the root::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png       palette PNG, 0 = background, 1..C classes, 255 = void (optional per image)
    SegmentationClassAug/<id>.png    SBD masks, used where SegmentationClass has none (optional)
    Annotations/<id>.xml             VOC XML, the image-level labels (optional)
    ImageSets/Segmentation/<split>.txt   one id per line, or psa-style "/JPEGImages/<id>.jpg /Segm.../<id>.png" lines
    classes.txt                      class names, one per line (optional; default: the 20 VOC classes)

Image-level labels come from, in order for `labels=auto`: a labels file (JSON ``{id: [class ids 1..C]}`` or psa/IRN's
``cls_labels.npy`` ``{id: multi-hot}``), the XML (every <object>, difficult ones included, as psa/IRN do), or the
classes present in the mask.
"""

from __future__ import annotations

import json
import pickle
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from acr.errors import DataError


VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
IGNORE = 255


# What decoding untrusted bytes with PIL raises: OSError (not an image, truncated), SyntaxError and ValueError
# (malformed chunks), DecompressionBombError (a header declaring a gigantic image), and for corrupted files other
# errors from inside PIL's format plugins (struct.error, IndexError, EOFError, ...). Each means "does not decode".
DECODE_ERRORS = (Exception,)


def voc_palette() -> list[int]:
    """The standard 256-entry VOC colour palette (flat RGB list)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


@dataclass(frozen=True)
class Record:
    """One image of a split: where its files are and its image-level labels (class indices 0..C-1)."""

    id: str
    image_path: Path
    mask_path: Path | None
    classes: tuple[int, ...]

    def label_vector(self, num_classes: int) -> np.ndarray:
        y = np.zeros(num_classes, np.float32)
        y[list(self.classes)] = 1.0
        return y


def read_class_names(root: Path) -> list[str]:
    f = Path(root) / "classes.txt"
    if f.is_file():
        names = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
        if not names:
            raise DataError(f"{f}: no class names")
        return names
    return list(VOC_CLASSES)


def read_split_ids(root: Path, split: str) -> list[str]:
    root = Path(root)
    for cand in (root / "ImageSets" / "Segmentation" / f"{split}.txt", root / f"{split}.txt"):
        if cand.is_file():
            ids = []
            for ln in cand.read_text().splitlines():
                tok = ln.strip().split()
                if tok:
                    ids.append(Path(tok[0]).stem)
            if not ids:
                raise DataError(f"{cand}: the list of split '{split}' is empty")
            return ids
    raise DataError(f"no list file for split '{split}' under {root} (looked for ImageSets/Segmentation/{split}.txt "
                    f"and {split}.txt)")


def load_image(path: Path) -> np.ndarray:
    """Decode an image to HxWx3 uint8 RGB; a corrupt or missing file raises DataError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except DECODE_ERRORS as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc


def load_mask(path: Path, num_classes: int) -> np.ndarray:
    """Decode a label PNG to HxW uint8; values must be in 0..num_classes or 255."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise DataError(f"mask {path}: expected a palette ('P') or grey ('L') PNG of class indices, "
                                f"got mode {im.mode}")
            m = np.asarray(im)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"mask file not found: {path}") from exc
    except DECODE_ERRORS as exc:
        raise DataError(f"cannot decode mask {path}: {exc}") from exc
    bad = np.unique(m[(m > num_classes) & (m != IGNORE)])
    if bad.size:
        raise DataError(f"mask {path} has class id(s) {bad.tolist()} beyond the class count {num_classes} "
                        f"(valid: 0..{num_classes} and {IGNORE} = void)")
    return m


def _xml_classes(path: Path, names: list[str]) -> list[int]:
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise DataError(f"cannot parse annotation {path}: {exc}") from exc
    out = set()
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in names:
            raise DataError(f"annotation {path} names class '{name}', which is not one of the {len(names)} classes")
        out.add(names.index(name))
    return sorted(out)


# The only globals a psa/IRN `cls_labels.npy` (np.save of a dict of arrays) needs to be unpickled.
_NPY_GLOBALS = {(m, n) for m in ("numpy._core.multiarray", "numpy.core.multiarray") for n in ("_reconstruct", "scalar")
                } | {("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _NPY_GLOBALS:
            raise pickle.UnpicklingError(f"it needs {module}.{name}, which a labels file never holds")
        return super().find_class(module, name)


def _load_npy_dict(path: Path) -> dict:
    """A dict saved with np.save, unpickled with numpy arrays as the only objects allowed (np.load with pickles allowed
    would run whatever code the file names)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            if dtype != np.dtype(object) or shape != ():
                raise ValueError(f"an array of {dtype} {shape}, not a saved dict")
            d = _ArraysOnlyUnpickler(f).load().item()
    except Exception as exc:  # a broken or unsafe file
        raise DataError(f"labels file {path}: cannot read it as a dict of label vectors ({exc})") from exc
    if not isinstance(d, dict):
        raise DataError(f"labels file {path}: holds a {type(d).__name__}, not a dict of label vectors")
    return d


def _load_labels_file(path: Path, num_classes: int) -> dict[str, list[int]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    if path.suffix == ".npy":
        d = _load_npy_dict(path)  # psa/IRN format: {id: float32[C] multi-hot}
        out = {}
        for k, v in d.items():
            v = np.asarray(v)
            if v.shape != (num_classes,):
                raise DataError(f"labels file {path}: entry '{k}' has {v.shape[0] if v.ndim else 0} classes, "
                                f"expected {num_classes}")
            out[str(k)] = np.nonzero(v > 0.5)[0].tolist()
        return out
    raw = json.loads(path.read_text())
    out = {}
    for k, v in raw.items():
        ids = v.get("class_ids_in_mask") if isinstance(v, dict) else v
        if not isinstance(ids, list) or not all(isinstance(i, int) and 1 <= i <= num_classes for i in ids):
            raise DataError(f"labels file {path}: entry '{k}' must be a list of class ids in 1..{num_classes}, got {v!r}")
        out[str(k)] = [i - 1 for i in ids]
    return out


def read_voc_split(root: str | Path, split: str, num_classes: int, labels: str = "auto",
                   labels_file: str | None = None, require_masks: bool = False) -> list[Record]:
    """Records of one split. Every image must exist and have at least one label; errors name the id and file."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a directory")
    names = read_class_names(root)
    if len(names) != num_classes:
        raise DataError(f"{root} defines {len(names)} classes ({'classes.txt' if (root / 'classes.txt').is_file() else 'VOC default'}) "
                        f"but the config says data.num_classes={num_classes}")
    file_labels = _load_labels_file(Path(labels_file), num_classes) if labels_file and labels in ("auto", "file") else None
    records = []
    for image_id in read_split_ids(root, split):
        image_path = root / "JPEGImages" / f"{image_id}.jpg"
        if not image_path.is_file():
            raise DataError(f"image '{image_id}' of split '{split}' has no file {image_path}")
        mask_path = None
        for d in ("SegmentationClass", "SegmentationClassAug"):
            if (root / d / f"{image_id}.png").is_file():
                mask_path = root / d / f"{image_id}.png"
                break
        if require_masks and mask_path is None:
            raise DataError(f"image '{image_id}' of split '{split}' has no ground-truth mask under {root}")
        xml = root / "Annotations" / f"{image_id}.xml"
        if labels == "file" or (labels == "auto" and file_labels is not None):
            if image_id not in file_labels:
                raise DataError(f"image '{image_id}' has no entry in labels file {labels_file}")
            classes = file_labels[image_id]
        elif labels == "xml" or (labels == "auto" and xml.is_file()):
            if not xml.is_file():
                raise DataError(f"image '{image_id}' has no annotation {xml}")
            classes = _xml_classes(xml, names)
        elif mask_path is not None:
            m = load_mask(mask_path, num_classes)
            classes = [int(v) - 1 for v in np.unique(m) if 0 < v <= num_classes]
        else:
            raise DataError(f"image '{image_id}' has no image-level label: no labels file entry, no {xml}, "
                            f"no SegmentationClass mask")
        if not classes:
            raise DataError(f"image '{image_id}' has no label (an empty class list); every training image needs at "
                            f"least one class ({mask_path or xml})")
        records.append(Record(image_id, image_path, mask_path, tuple(sorted(classes))))
    return records
