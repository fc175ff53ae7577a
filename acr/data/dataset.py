"""Torch datasets over VOC-layout records, with all per-image randomness keyed by (seed, epoch, image index).

The global batch order of an epoch is a permutation drawn from (seed, epoch); worker r of W takes its contiguous
slice of every global batch. So the images a step sees, their augmentation, their target class and their SRF grid do
not depend on the number of workers, and a 2-worker run computes the same all-reduced step as a 1-worker run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from acr.data.transforms import to_chw_normalized, train_transform
from acr.data.voc import DataError, Record, load_image, load_mask


# The "epoch" whose augmentations feed BatchNorm calibration at initialisation (never a training epoch).
CALIBRATION_EPOCH = 1_000_000_000


def epoch_permutation(num_images: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_images)


def global_batches(num_images: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """[steps, batch_size] image indices of one epoch (drop_last: the remainder is dropped)."""
    steps = num_images // batch_size
    return epoch_permutation(num_images, seed, epoch)[: steps * batch_size].reshape(steps, batch_size)


class WorkerBatchSampler(Sampler):
    """Yields, for each step of `epoch`, this worker's slice of the global batch as (epoch, index) keys."""

    def __init__(self, num_images: int, global_batch: int, rank: int, world_size: int, seed: int, epoch: int,
                 start_step: int = 0, max_steps: int | None = None):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not divide among {world_size} workers")
        self.batches = global_batches(num_images, global_batch, seed, epoch)
        if max_steps is not None:
            self.batches = self.batches[:max_steps]
        self.batches = self.batches[start_step:]
        per = global_batch // world_size
        self.slices = self.batches[:, rank * per:(rank + 1) * per]
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.slices)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for row in self.slices:
            yield [(self.epoch, int(i)) for i in row]


class TrainDataset(Dataset):
    """Items keyed by (epoch, index): augmented image, labels, and the uniforms that pick the target class and the
    SRF grid (consumed by :mod:`acr.method.acr`)."""

    def __init__(self, records: Sequence[Record], num_classes: int, seed: int, resize_mode: str, resize_range,
                 crop_size: int, flip: bool, grid_size: int):
        self.records = list(records)
        self.num_classes = num_classes
        self.seed = seed
        self.aug = dict(resize_mode=resize_mode, resize_range=resize_range, crop_size=crop_size, flip=flip)
        self.grid_size = grid_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rec = self.records[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        image = train_transform(load_image(rec.image_path), rng, **self.aug)
        return {
            "image": torch.from_numpy(image),
            "labels": torch.from_numpy(rec.label_vector(self.num_classes)),
            "target_u": torch.tensor(rng.random(), dtype=torch.float32),
            "grid_u": torch.from_numpy(rng.random((self.grid_size, self.grid_size)).astype(np.float32)),
            "index": torch.tensor(index),
        }


class EvalDataset(Dataset):
    """Whole images (no augmentation) with labels and GT masks, for CAM inference and evaluation."""

    def __init__(self, records: Sequence[Record], num_classes: int):
        self.records = list(records)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        raw = load_image(rec.image_path)
        item = {
            "id": rec.id,
            "raw": raw,
            "image": torch.from_numpy(to_chw_normalized(raw)),
            "labels": torch.from_numpy(rec.label_vector(self.num_classes)),
            "mask": None,
        }
        if rec.mask_path is not None:
            mask = load_mask(rec.mask_path, self.num_classes)
            if mask.shape != raw.shape[:2]:
                raise DataError(f"mask {rec.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image "
                                f"{rec.image_path} is {raw.shape[1]}x{raw.shape[0]}")
            item["mask"] = mask
        return item
