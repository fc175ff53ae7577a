"""The one per-image Ray Data stage runner of the batch jobs (CAMs, CRF and confident labels, masks, DeepLab's
predictions), and the per-image files those stages write.

A stage maps a function (a task, or an actor class whose model loads once per actor) over the images of a split
that still lack one of the stage's files: the driver lists the stage's folders once, the dataset is a range over the
missing images' positions, and each call reads its rows by index from the split's Parquet shards. Each image's file
is written whole (acr.storage), so a rerun redoes only the images whose files are missing, and a killed stage loses
at most the images in flight. The job folder may be local or a URI (s3://...): every actor writes into it directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import ray.data
import torch
from tqdm import tqdm

from acr.data.ingest import epoch_permutation
from acr.data.shards import ShardReader, iter_split_rows
from acr.errors import DataError
from acr.storage import RunFolder

log = logging.getLogger(__name__)


def actor_device() -> torch.device:
    """Where a stage's actor runs its model (a GPU where the actor was given one)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ImageFiles:
    """One file per image and kind in a job folder: `<kind>/<image id><suffix>` (".png" unless `suffixes` says)."""

    def __init__(self, folder: RunFolder, suffixes: dict[str, str] | None = None):
        self.folder, self.suffixes = folder, dict(suffixes or {})

    def __reduce__(self):
        return (ImageFiles, (self.folder, self.suffixes))

    def name(self, kind: str, image_id: str) -> str:
        return f"{kind}/{image_id}{self.suffixes.get(kind, '.png')}"

    def where(self, kind: str, image_id: str) -> str:
        return self.folder.uri(self.name(kind, image_id))

    def done(self, kind: str) -> set[str]:
        """The ids of the images that have their `kind` file (one listing of the folder)."""
        suffix = self.suffixes.get(kind, ".png")
        return {n.removesuffix(suffix) for n in self.folder.names(kind) if n.endswith(suffix)}

    def write(self, kind: str, image_id: str, data: bytes) -> None:
        self.folder.write_bytes(self.name(kind, image_id), data)

    def read(self, kind: str, image_id: str) -> bytes:
        data = self.folder.read_bytes(self.name(kind, image_id))
        if data is None:
            raise DataError(f"{self.where(kind, image_id)} is missing (was its stage run?)")
        return data


def rows_of(reader: ShardReader, batch: dict, order: np.ndarray | None = None,
            columns=("id", "index", "image", "labels")) -> Iterator[dict]:
    """The rows (dicts of `columns`) of a Ray Data batch of positions (the `id` column of ray.data.range), read
    from the split's shards by index; position p stands for image order[p] of the split where an order is given."""
    positions = np.asarray(batch["id"], np.int64)
    yield from reader.read(reader.index.indices[positions if order is None else order[positions]], columns)


def positions(total: int) -> ray.data.Dataset:
    """A Ray Data range of `total` positions, in blocks of 4 (every actor of a pool gets work at once)."""
    ds = ray.data.range(total, override_num_blocks=max(1, min(-(-total // 4), 5000)))
    ds.context.enable_progress_bars = False  # each stage shows one tqdm bar in images instead
    return ds


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which a training epoch of a batch job's network (IRN, DeepLab) visits the split's images."""
    return epoch_permutation(num_images, seed, epoch)


def split_ids(uri: str, manifest: dict, split: str, max_images: int | None) -> list[str]:
    """The ids of a job's images, in index order (only the id and index columns are read)."""
    return [row["id"] for _, row in iter_split_rows(uri, manifest, split, ["id", "index"])
            if max_images is None or row["index"] < max_images]


def run_stage(name: str, files: ImageFiles, ids: list[str], kinds: tuple[str, ...],
              make_ds: Callable[[np.ndarray], ray.data.Dataset]) -> dict:
    """Run a stage over the images of `ids` that lack one of their `kinds` files: `make_ds(order)` maps the stage
    over positions(len(order)), position p standing for image order[p]; its batches return one `id` per image
    made. Consumes it with a progress bar; returns the counts of images made ("done") and kept (complete already)."""
    have = {kind: files.done(kind) for kind in kinds}
    order = np.array([p for p, i in enumerate(ids) if any(i not in have[k] for k in kinds)], np.int64)
    counts = {"done": 0, "kept": len(ids) - len(order), "seconds": 0.0}
    if not len(order):
        return counts
    t0 = time.perf_counter()
    with tqdm(total=len(order), desc=name, unit="img", mininterval=2) as bar:
        for batch in make_ds(order).iter_batches(batch_size=None, batch_format="numpy"):
            counts["done"] += len(batch["id"])
            bar.update(len(batch["id"]))
    counts["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("%s: %d images made, %d kept (%.1f s)", name, counts["done"], counts["kept"], counts["seconds"])
    return counts


def made(ids: list[str]) -> dict:
    """What a stage call returns for the images it made."""
    return {"id": np.array(ids, dtype=object)}
