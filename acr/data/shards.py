"""The dataset as Parquet shards: the one form in which images enter training.

Layout (``ray_jobs/prepare_data.py`` writes it; ``data.shards`` reads it, a local folder or an ``s3://`` URI)::

    OUT/manifest.json                  class names, per split: rows, shard files with sizes and sha256, skipped images
    OUT/<split>/part-NNNNN.parquet     one row per image, one Parquet row group per row (random access by row)

Columns: ``id`` (string), ``index`` (int64, the image's position in the source's split list, stable across reruns),
``image`` (the original encoded bytes, unchanged), ``labels`` (list<uint8>, multi-hot over the foreground classes),
``mask`` (PNG bytes of the ground-truth class mask, null where none exists), ``height``, ``width`` (int32).

Shard k of a split holds the source items k*S .. (k+1)*S-1 (S = ``data.shard_rows``). Each shard records in its
Parquet metadata a fingerprint of the items it was written from (ids, file sizes and mtimes); a rerun keeps a shard
whose file opens and whose fingerprint matches, and rewrites the others (files are written to a temporary name and
renamed, so an interrupted run never leaves a partial file under a final name).
"""

from __future__ import annotations

import hashlib
import io
import json
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from acr.data.coco import CocoSplit, coco_splits
from acr.registry import DATASET_FORMATS
from acr.data.voc import DECODE_ERRORS, DataError, load_image, read_class_names, read_voc_split, voc_palette
from acr.storage import write_atomically

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INFO_KEY = b"acr.shard"  # Parquet metadata: {"fingerprint", "skipped", "masks"}
SCHEMA = pa.schema([
    ("id", pa.string()), ("index", pa.int64()), ("image", pa.binary()), ("labels", pa.list_(pa.uint8())),
    ("mask", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
])


# ---------------------------------------------------------------------------------------------------------------------
# Sources: what a VOC / COCO / synthetic folder holds, as items that can produce a row


@dataclass(frozen=True)
class SourceItem:
    id: str
    image_path: Path
    classes: tuple[int, ...]
    mask: Callable[[], bytes | None] = field(compare=False)
    stat_paths: tuple[Path, ...] = ()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A class-index mask as a VOC-palette PNG."""
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _voc_splits(root: Path) -> list[str]:
    lists = sorted((root / "ImageSets" / "Segmentation").glob("*.txt"))
    if not lists:
        raise DataError(f"{root}: no split lists under ImageSets/Segmentation/ (train.txt, val.txt, train_aug.txt...)")
    return [p.stem for p in lists]


def _coco_source(root: Path, num_classes: int, splits, labels, labels_file, coco_crowd):
    out: dict[str, list[SourceItem]] = {}
    names: list[str] = []
    for split in splits or coco_splits(root):
        cs = CocoSplit(root, split, num_classes, coco_crowd)
        names = cs.class_names
        out[split] = [SourceItem(im.id, im.image_path, im.classes,
                                 (lambda cs=cs, im=im: encode_mask_png(cs.mask(im))), (im.image_path,))
                      for im in cs.images]
    if not out:
        raise DataError(f"{root}: no COCO split found (annotations/instances_<split>.json beside a <split>/ folder)")
    return names, out


def _voc_source(root: Path, num_classes: int, splits, labels, labels_file, coco_crowd):
    out: dict[str, list[SourceItem]] = {}
    for split in splits or _voc_splits(root):
        recs = read_voc_split(root, split, num_classes, labels=labels, labels_file=labels_file)
        out[split] = [SourceItem(r.id, r.image_path, r.classes,
                                 (lambda p=r.mask_path: p.read_bytes() if p is not None else None),
                                 tuple(p for p in (r.image_path, r.mask_path) if p is not None))
                      for r in recs]
    return read_class_names(root), out


# data.format -> the reader of its folder (the embedded dataset is generated in VOC layout); one per acr.registry
# DATASET_FORMATS entry.
SOURCES = {"synthetic": _voc_source, "voc": _voc_source, "coco": _coco_source}
assert set(SOURCES) == set(DATASET_FORMATS), "acr.registry.DATASET_FORMATS and the readers disagree"


def read_source(fmt: str, root: Path, num_classes: int, splits: list[str] | None = None, labels: str = "auto",
                labels_file: str | None = None, coco_crowd: str = "ignore") -> tuple[list[str], dict[str, list[SourceItem]]]:
    """(class names, {split: items}) of a dataset folder; `splits` None = every split the source defines."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a directory")
    if fmt not in SOURCES:
        raise DataError(f"unknown data.format '{fmt}' (known: {', '.join(SOURCES)})")
    return SOURCES[fmt](root, num_classes, splits, labels, labels_file, coco_crowd)


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _fingerprint(items: list[SourceItem], num_classes: int) -> str:
    h = hashlib.sha256(f"v{SCHEMA_VERSION};C{num_classes}".encode())
    for it in items:
        h.update(f"{it.id};{it.classes}".encode())
        for p in it.stat_paths:
            st = p.stat()
            h.update(f";{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shard_info(path: Path) -> dict:
    """The info a shard was written with ({} if the file is absent, unreadable or not ours)."""
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta.get(INFO_KEY, b"{}"))
    except (OSError, pa.ArrowInvalid, json.JSONDecodeError):
        return {}


def _check_outside(out: Path, root: Path) -> None:
    out, root = Path(out).resolve(), Path(root).resolve()
    if out == root or root in out.parents:
        raise DataError(f"shards would be written inside data.root ({out} is under {root}); choose an output folder "
                        "outside the dataset (data.cache_dir or --output-dir)")


def write_shards(fmt: str, root: Path, out: Path, num_classes: int, shard_rows: int = 256,
                 splits: list[str] | None = None, labels: str = "auto", labels_file: str | None = None,
                 coco_crowd: str = "ignore", skip_corrupt: bool = False, progress: bool = True) -> dict:
    """Convert a dataset folder into shards under `out` (see the module docstring); returns the manifest.

    Every image is decoded once to check it (and to record its size); a corrupt image or mask raises DataError naming
    the file, or with `skip_corrupt` is left out and listed under the split's `skipped`."""
    root, out = Path(root).expanduser().resolve(), Path(out).expanduser().resolve()
    _check_outside(out, root)
    names, source = read_source(fmt, root, num_classes, splits, labels, labels_file, coco_crowd)
    if len(names) != num_classes:
        raise DataError(f"{root} defines {len(names)} classes but the config says {num_classes}")
    manifest = {"schema_version": SCHEMA_VERSION, "format": fmt, "source": str(root), "num_classes": num_classes,
                "class_names": names, "shard_rows": shard_rows, "splits": {}}
    try:
        old = {s["file"]: s for sp in json.loads((out / MANIFEST).read_text())["splits"].values() for s in sp["shards"]}
    except (OSError, ValueError, KeyError):
        old = {}
    for split, items in source.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        shards, skipped, rows = [], [], 0
        chunks = [items[i:i + shard_rows] for i in range(0, len(items), shard_rows)]
        bar = tqdm(total=len(items), desc=f"shards {split}", unit="img", disable=not progress, leave=False)
        for k, chunk in enumerate(chunks):
            path = out / split / f"part-{k:05d}.parquet"
            fp = _fingerprint(chunk, num_classes)
            name = f"{split}/{path.name}"
            info = _shard_info(path) if path.is_file() else {}
            if info.get("fingerprint") != fp:
                info = _write_chunk(path, chunk, k * shard_rows, num_classes, fp, skip_corrupt)
            bar.update(len(chunk))
            n = len(chunk) - len(info["skipped"])
            skipped += info["skipped"]
            size = path.stat().st_size
            prev = old.get(name, {})
            sha = prev["sha256"] if prev.get("bytes") == size and prev.get("fingerprint") == fp else _sha256(path)
            shards.append({"file": name, "rows": n, "first_index": k * shard_rows,
                           "missing": [s["index"] for s in info["skipped"]], "masks": info["masks"], "bytes": size,
                           "sha256": sha, "fingerprint": fp})
            rows += n
        bar.close()
        for stale in sorted((out / split).glob("part-*.parquet"))[len(chunks):]:
            stale.unlink()  # the source shrank
        manifest["splits"][split] = {"rows": rows, "masks": sum(s["masks"] for s in shards), "shards": shards,
                                     "skipped": skipped}
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _write_chunk(path: Path, chunk: list[SourceItem], first_index: int, num_classes: int, fingerprint: str,
                 skip_corrupt: bool) -> dict:
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    skipped = []
    for j, item in enumerate(chunk):
        try:
            data = item.image_path.read_bytes()
            h, w = load_image(item.image_path).shape[:2]
            mask = item.mask()
            if mask is not None:
                with Image.open(io.BytesIO(mask)) as m:
                    if (m.height, m.width) != (h, w):
                        raise DataError(f"mask of image '{item.id}' is {m.width}x{m.height} but the image "
                                        f"{item.image_path} is {w}x{h}")
        except (DataError, OSError) as exc:
            if not skip_corrupt:
                raise DataError(f"{exc} (set data.skip_corrupt=true to leave such images out)") from exc
            skipped.append({"id": item.id, "index": first_index + j, "reason": str(exc)})
            continue
        labels = np.zeros(num_classes, np.uint8)
        labels[list(item.classes)] = 1
        for name, value in (("id", item.id), ("index", first_index + j), ("image", data), ("labels", labels.tolist()),
                            ("mask", mask), ("height", h), ("width", w)):
            cols[name].append(value)
    info = {"fingerprint": fingerprint, "skipped": skipped, "masks": sum(m is not None for m in cols["mask"])}
    table = pa.table(cols, schema=SCHEMA.with_metadata({INFO_KEY: json.dumps(info).encode()}))
    # no compression: the images are compressed already
    write_atomically(path, lambda f: pq.write_table(table, f, row_group_size=1, compression="none"))
    return info


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as exc:  # no such scheme, an unreachable bucket, no credentials
            raise DataError(f"shards {uri}: cannot open it ({exc})") from exc
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def load_manifest(uri: str) -> dict:
    fs, base = _filesystem(str(uri))
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"no shard manifest at {uri}/{MANIFEST} (write one with ray_jobs/prepare_data.py)") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri}/{MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{uri}/{MANIFEST}: shard schema version {manifest.get('schema_version')}, this code reads "
                        f"{SCHEMA_VERSION}; rerun ray_jobs/prepare_data.py")
    return manifest


def check_manifest(manifest: dict, uri: str, num_classes: int, splits: list[str], require_masks=()) -> None:
    """Class count and splits against the config, masks where evaluation needs them, and every shard file present
    at its recorded size (a truncated or replaced file is named)."""
    if manifest["num_classes"] != num_classes:
        raise DataError(f"{uri}/{MANIFEST} has {manifest['num_classes']} classes but the config says {num_classes} "
                        "(data.num_classes, or synthetic.num_classes for the embedded dataset)")
    fs, base = _filesystem(str(uri))
    for split in splits:
        if split not in manifest["splits"]:
            raise DataError(f"{uri}: no split '{split}' in the shards (have: {', '.join(manifest['splits'])})")
        info = manifest["splits"][split]
        if split in require_masks and info.get("masks", 0) < info["rows"]:
            raise DataError(f"{uri}: split '{split}' has ground-truth masks for {info.get('masks', 0)} of its "
                            f"{info['rows']} images; the evaluation split needs a mask for every image")
        for shard in manifest["splits"][split]["shards"]:
            info = fs.get_file_info(f"{base}/{shard['file']}")
            if info.type == pafs.FileType.NotFound:
                raise DataError(f"shard {uri}/{shard['file']} is missing")
            if info.size != shard["bytes"]:
                raise DataError(f"shard {uri}/{shard['file']} is {info.size} bytes, the manifest says "
                                f"{shard['bytes']}: truncated or replaced; rerun ray_jobs/prepare_data.py")


class ShardIndex:
    """Where each image of a split lives: index -> (shard number, row in shard)."""

    def __init__(self, manifest: dict, split: str):
        self.shards = manifest["splits"][split]["shards"]
        self.firsts = [s["first_index"] for s in self.shards]
        indices = []
        for s in self.shards:
            missing = set(s["missing"])
            count = s["rows"] + len(missing)
            indices += [i for i in range(s["first_index"], s["first_index"] + count) if i not in missing]
        self.indices = np.array(indices, np.int64)  # available image indices, increasing

    def __len__(self) -> int:
        return len(self.indices)

    def locate(self, index: int) -> tuple[int, int]:
        k = bisect_right(self.firsts, index) - 1
        s = self.shards[k]
        row = index - s["first_index"] - sum(1 for m in s["missing"] if m < index)
        return k, row


class ShardReader:
    """Random access to rows of one split (one row group per row); open files are cached. Used inside Ray Data
    actors and by a worker for its few direct reads (BN calibration)."""

    def __init__(self, uri: str, manifest: dict, split: str):
        self.uri, self.split = str(uri), split
        self.fs, self.base = _filesystem(self.uri)
        self.index = ShardIndex(manifest, split)
        self._files: dict[int, pq.ParquetFile] = {}

    def _file(self, k: int) -> pq.ParquetFile:
        if k not in self._files:
            name = self.index.shards[k]["file"]
            try:
                self._files[k] = pq.ParquetFile(self.fs.open_input_file(f"{self.base}/{name}"))
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(f"cannot read shard {self.uri}/{name}: {exc}") from exc
        return self._files[k]

    def shard_name(self, index: int) -> str:
        return self.index.shards[self.index.locate(index)[0]]["file"]

    def read(self, indices, columns=("id", "index", "image", "labels")) -> Iterator[dict]:
        for index in indices:
            k, row = self.index.locate(int(index))
            try:
                rec = self._file(k).read_row_group(row, columns=list(columns)).to_pylist()[0]
            except (OSError, pa.ArrowInvalid, IndexError) as exc:
                raise DataError(f"cannot read row {row} (image index {index}) of shard "
                                f"{self.uri}/{self.index.shards[k]['file']}: {exc}") from exc
            if rec["index"] != index:
                raise DataError(f"shard {self.uri}/{self.index.shards[k]['file']} row {row} holds image index "
                                f"{rec['index']}, the manifest places {index} there; rerun ray_jobs/prepare_data.py")
            yield rec


def decode_image_bytes(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8; undecodable bytes raise DataError naming `where` (shard and row id)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except DECODE_ERRORS as exc:
        raise DataError(f"cannot decode the image of {where}: {exc}") from exc


def decode_mask_bytes(data: bytes, where: str, num_classes: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            m = np.asarray(im)
    except DECODE_ERRORS as exc:
        raise DataError(f"cannot decode the mask of {where}: {exc}") from exc
    if mode not in ("P", "L"):
        raise DataError(f"the mask of {where} is a {mode} image; a mask is a palette ('P') or grey ('L') PNG of "
                        "class indices")
    bad = np.unique(m[(m > num_classes) & (m != 255)])
    if bad.size:
        raise DataError(f"the mask of {where} has class id(s) {bad.tolist()} beyond the class count {num_classes}")
    return m


def iter_split_rows(uri: str, manifest: dict, split: str, columns: list[str]) -> Iterator[tuple[dict, dict]]:
    """(shard entry, row) for every row of a split in index order, `columns` only, one shard in memory at a time."""
    fs, base = _filesystem(str(uri))
    for shard in manifest["splits"][split]["shards"]:
        try:
            table = pq.read_table(fs.open_input_file(f"{base}/{shard['file']}"), columns=list(columns))
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"cannot read shard {uri}/{shard['file']}: {exc}") from exc
        for row in table.to_pylist():
            yield shard, row


def find_corrupt_rows(uri: str, manifest: dict, split: str) -> list[dict]:
    """Every row of a split whose image or mask bytes do not decode: [{id, index, shard, reason}]. One pass over the
    split (used by `data.skip_corrupt=true` before training, and by prepare_data.py --verify)."""
    bad = []
    for shard, row in iter_split_rows(uri, manifest, split, ["id", "index", "image", "mask"]):
        where = f"row id '{row['id']}' of shard {uri}/{shard['file']}"
        try:
            decode_image_bytes(row["image"], where)
            if row["mask"] is not None:
                decode_mask_bytes(row["mask"], where, manifest["num_classes"])
        except DataError as exc:
            bad.append({"id": row["id"], "index": row["index"], "shard": shard["file"], "reason": str(exc)})
    return bad
