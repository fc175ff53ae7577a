"""Ray Data pipelines that feed training and evaluation from Parquet shards (acr.data.shards).

Training: one stream for the whole run, built by the driver and split among the workers by Ray Train
(``get_dataset_shard("train").iter_torch_batches``):

    range(rows) -> (epoch, image index) -> [actor pool] read the row from its shard, decode, augment
                -> blocks of exactly B/W rows -> streaming_split(W, equal=True), order preserved

Row p of the stream is position p mod (S*B) of epoch start_epoch + p // (S*B) (S steps per epoch, B the global
batch), and that position holds image ``indices[permutation(seed, epoch)[position]]``: a fresh global shuffle every
epoch, deterministic for a given seed and epoch. With order preservation Ray Data hands the B/W-row blocks to the W
workers in turn, so global batch k is stream rows kB..kB+B-1 for any W: a 2-worker run trains on the same batches as a
1-worker run. Each image appears at most once per epoch; the N - S*B images that do not fill a last global batch
are dropped (a different set each epoch) and reported. The rows are read by index (one Parquet row group per image),
so no all-to-all shuffle moves image bytes, and a resumed run starts its stream at the checkpoint's epoch and step.

Evaluation: the eval split is not split among workers: each reads it whole from its shards (:class:`EvalRows`) and
scores the rows rank, rank + W, ...; the confusion matrices are summed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import ray.data

from acr.data.shards import ShardReader, decode_image_bytes, decode_mask_bytes, iter_split_rows
from acr.data.transforms import to_chw_normalized, train_transform

# The "epoch" whose augmentations feed BatchNorm calibration at initialisation (never a training epoch).
CALIBRATION_EPOCH = 1_000_000_000


def epoch_permutation(num_images: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_images)


@dataclass
class TrainPlan:
    """What the training stream holds: `indices` are the usable image indices of the split (corrupt ones excluded)."""

    split: str
    indices: list[int]
    batch_size: int
    world: int
    seed: int
    epochs: int
    steps_per_epoch: int
    start_epoch: int = 0
    start_step: int = 0

    @property
    def rows_per_epoch(self) -> int:
        return self.steps_per_epoch * self.batch_size

    @property
    def dropped_per_epoch(self) -> int:
        return len(self.indices) - self.rows_per_epoch

    @property
    def total_rows(self) -> int:
        return max(0, (self.epochs - self.start_epoch) * self.rows_per_epoch - self.start_step * self.batch_size)

    def batches_before(self, epoch: int, step: int) -> int:
        """Worker batches in the stream before (epoch, step): what a worker restarted from a later checkpoint skips."""
        return (epoch - self.start_epoch) * self.steps_per_epoch + step - self.start_step

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions -> (epoch, image index)."""
        p = positions.astype(np.int64) + self.start_step * self.batch_size
        epochs = self.start_epoch + p // self.rows_per_epoch
        within = p % self.rows_per_epoch
        idx = np.asarray(self.indices, np.int64)
        out = np.empty_like(p)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = idx[self._permutation(int(e))[within[sel]]]
        return epochs, out

    def _permutation(self, epoch: int) -> np.ndarray:
        """The epoch's permutation, drawn once per epoch (a stream moves forward: the last two are kept)."""
        cache = self.__dict__.setdefault("_permutations", {})  # not a dataclass field: not in to_dict()
        if epoch not in cache:
            if len(cache) >= 2:
                del cache[min(cache)]
            cache[epoch] = epoch_permutation(len(self.indices), self.seed, epoch)
        return cache[epoch]

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(indices, cfg, world: int, start_epoch: int = 0, start_step: int = 0) -> TrainPlan:
    steps = len(indices) // cfg.train.batch_size
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    if steps == 0:
        raise ValueError(f"split '{cfg.data.train_split}' has {len(indices)} usable images, fewer than the global "
                         f"batch train.batch_size={cfg.train.batch_size}")
    return TrainPlan(cfg.data.train_split, [int(i) for i in indices], cfg.train.batch_size, world, cfg.train.seed,
                     cfg.train.epochs, steps, start_epoch, start_step)


class TrainRows:
    """Ray Data UDF (one per actor): stream positions -> decoded, augmented training rows. Every random choice of an
    image (resize, flip, crop, target-class and SRF-grid uniforms) is keyed by (seed, epoch, image index)."""

    def __init__(self, uri: str, manifest: dict, plan: dict, num_classes: int, augment: dict, grid_size: int):
        self.plan = TrainPlan(**plan)
        self.reader = ShardReader(uri, manifest, self.plan.split)
        self.num_classes, self.augment, self.grid_size = num_classes, augment, grid_size

    def decode(self, epochs: np.ndarray, indices: np.ndarray) -> dict:
        images, labels, target_u, grid_u = [], [], [], []
        for epoch, rec in zip(epochs, self.reader.read(indices)):
            where = f"row id '{rec['id']}' of shard {self.reader.uri}/{self.reader.shard_name(rec['index'])}"
            rng = np.random.default_rng([self.plan.seed, int(epoch), int(rec["index"])])
            images.append(train_transform(decode_image_bytes(rec["image"], where), rng, **self.augment))
            y = np.asarray(rec["labels"], np.float32)
            if y.shape != (self.num_classes,):
                raise ValueError(f"{where}: {y.shape[0]} labels, the config has {self.num_classes} classes")
            labels.append(y)
            target_u.append(rng.random())
            grid_u.append(rng.random((self.grid_size, self.grid_size)))
        return {"image": np.stack(images), "labels": np.stack(labels), "target_u": np.array(target_u, np.float32),
                "grid_u": np.stack(grid_u).astype(np.float32), "index": np.asarray(indices, np.int64),
                "epoch": np.asarray(epochs, np.int64)}

    def __call__(self, batch: dict) -> dict:
        epochs, indices = self.plan.rows(np.asarray(batch["id"]))
        return self.decode(epochs, indices)


def augment_kwargs(cfg) -> dict:
    a = cfg.augment
    return dict(resize_mode=a.resize_mode, resize_range=list(a.resize_range), crop_size=a.crop_size, flip=a.flip)


def train_dataset(uri: str, manifest: dict, plan: TrainPlan, cfg, num_classes: int):
    """The training stream (see the module docstring)."""
    per_worker = plan.batch_size // plan.world
    # Decode in calls of ~64 rows (fewer, larger Ray tasks and blocks); the repartition then cuts exact B/W blocks.
    per_call = max(per_worker, 64)
    ds = ray.data.range(plan.total_rows, override_num_blocks=max(1, min(256, plan.total_rows // per_call)))
    ds = ds.map_batches(TrainRows, batch_size=per_call, num_cpus=cfg.data.decode_cpus,
                        compute=ray.data.ActorPoolStrategy(size=cfg.data.decode_actors),
                        fn_constructor_args=(str(uri), manifest, plan.to_dict(), num_classes, augment_kwargs(cfg),
                                             cfg.method.srf.grid_size))
    ds = ds.repartition(target_num_rows_per_block=per_worker, strict=True)
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False  # a run-long stream: the training loop prints progress
    return ds


class EvalRows:
    """The eval split's rows in order, read from its shards with pyarrow, one shard at a time. Evaluation runs in
    every worker over the whole split (each scores every W-th row): a plain reader avoids starting Ray Data tasks per
    epoch for a split that every worker reads anyway."""

    def __init__(self, uri: str, manifest: dict, split: str):
        self.uri, self.manifest, self.split = str(uri), manifest, split

    def iter_rows(self):
        for _, row in iter_split_rows(self.uri, self.manifest, self.split, ["id", "index", "image", "labels", "mask"]):
            yield row


def eval_item(row: dict, num_classes: int, where: str) -> dict:
    """A read_parquet row of the eval split -> what CAM evaluation needs: the raw image, the normalised (3, H, W)
    float32 image, the labels (float32) and the mask, as numpy arrays (this module imports no torch: Ray Data's
    processes that run its UDFs stay light)."""
    raw = decode_image_bytes(row["image"], where)
    mask = decode_mask_bytes(row["mask"], where, num_classes) if row.get("mask") is not None else None
    if mask is not None and mask.shape != raw.shape[:2]:
        raise ValueError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]}, image {raw.shape[1]}x{raw.shape[0]}")
    return {"id": row["id"], "raw": raw, "image": to_chw_normalized(raw),
            "labels": np.asarray(row["labels"], np.float32), "mask": mask}


def labelled_rows(uri: str, manifest: dict, split: str, max_images: int | None, num_classes: int):
    """(id, ground-truth mask, row) of each image of `split` (the first `max_images` by index) that has a mask."""
    for row in EvalRows(uri, manifest, split).iter_rows():
        if max_images is not None and row["index"] >= max_images:
            continue
        if row.get("mask") is not None:
            yield row["id"], decode_mask_bytes(row["mask"], f"mask of '{row['id']}' in {uri}", num_classes), row
