"""[1] DeepLab trained on (image, label map) crops with Ray Train: one Ray Data dataset per epoch (the split's images
in an order from (train.seed, epoch); random scale, flip and crop seeded by (seed, epoch, id)), SGD with momentum
and weight decay, the head at `segment.head_lr_multiplier` x lr, the poly LR over all steps (acr.runtime.loop). The
run lives in <job>/model (local or s3://): checkpoints after every epoch and every `segment.checkpoint_every_steps`
steps; a lost worker restarts from the last one (`scaling.max_failures`) and a rerun continues it."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from acr.checkpoint import checkpoint_backbone, load_state
from acr.config import Config, config_from_dict, num_classes, stage_workers, to_dict
from acr.data import file_codecs
from acr.data.shards import ShardReader, decode_image_bytes, decode_mask_bytes
from acr.data.transforms import scale_flip_crop_pair
from acr.errors import CheckpointError, ConfigError, DataError
from acr.method.step import autocast_context
from acr.models.deeplab import DeepLab, build_deeplab
from acr.runtime.collectives import batch_denominator
from acr.runtime.loop import LoopPlan, epoch_datasets, start_worker, train_epochs
from acr.runtime.session import read_latest, resume_point
from acr.runtime.stages import epoch_order, positions, rows_of
from acr.runtime.trainer import build_trainer, fit
from acr.storage import RunFolder

GT = "gt"  # segment.labels=gt: the split's ground-truth masks
MODEL_DIR = "model"


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor,
                      denominator: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Pixel cross-entropy over the labelled pixels (255 ignored); 0 for a batch without any. `denominator(count,
    at_least=1)` lets a worker of several divide by the global batch's count (collectives.batch_denominator)."""
    total = F.cross_entropy(logits.float(), labels.long(), ignore_index=255, reduction="sum")
    count = (labels != 255).sum()
    return total / (denominator(count, at_least=1) if denominator else count.clamp(min=1))


def read_label(labels: str, rec: dict, raw_shape: tuple, n_classes: int, where: str) -> np.ndarray:
    """The training label map of a row: its ground-truth mask (labels=gt) or `<labels>/<id>.png`."""
    if labels == GT:
        if rec["mask"] is None:
            raise DataError(f"image '{rec['id']}' of {where} has no ground-truth mask (segment.labels=gt)")
        return decode_mask_bytes(rec["mask"], f"'{rec['id']}' of {where}", n_classes)
    folder = RunFolder(labels)
    name = f"{rec['id']}.png"
    return file_codecs.load_label_map(folder.read_bytes(name), folder.uri(name), raw_shape[:2], n_classes)


def segment_samples(batch: dict, labels: str, crop: int, scale_range: list[float], flip: bool, seed: int,
                    epoch: int, first_row: int, total: int, n_classes: int, shards: tuple, where: str) -> dict:
    """Training crops of the epoch's rows first_row + position: image and label map rescaled by one random factor,
    flipped, cropped (padding: mean colour / 255), seeded by (seed, epoch, id)."""
    columns = ("id", "index", "image", "mask") if labels == GT else ("id", "index", "image")
    images, targets = [], []
    order = epoch_order(total, seed, epoch)[first_row:]
    for rec in rows_of(ShardReader(*shards), batch, order, columns):
        raw = decode_image_bytes(rec["image"], f"image '{rec['id']}' of {where}")
        label = read_label(labels, rec, raw.shape, n_classes, where)
        rng = np.random.default_rng([seed, epoch, zlib.crc32(rec["id"].encode())])
        image, target = scale_flip_crop_pair(raw, label, rng, scale_range, crop, flip)
        images.append(image)
        targets.append(target)
    return {"image": np.stack(images) if images else np.zeros((0, 3, crop, crop), np.float32),
            "label": np.stack(targets) if targets else np.zeros((0, crop, crop), np.uint8)}


def build_model(cfg: Config, init: str | None = None) -> DeepLab:
    """DeepLab with its backbone from ImageNet weights (segment.pretrained), an ACR checkpoint's CNN (`init`: the
    classifier's backbone, or a ViT classifier's reconstructor encoder) or random."""
    if not init:
        return build_deeplab(cfg.segment, num_classes(cfg) + 1)
    src = checkpoint_backbone(load_state(init), init)
    return build_deeplab(cfg.segment, num_classes(cfg) + 1, src.state if src.state is not None
                         else src.build().state_dict(), src.description)


def segment_worker(config: dict) -> None:
    """The TorchTrainer function: DeepLab trained by the shared resumable loop (acr.runtime.loop)."""
    cfg, session, plan = start_worker(config)
    sg = cfg.segment
    model = build_model(cfg, config["init_backbone"]).to(session.device)
    opt = torch.optim.SGD(model.param_groups(sg.lr, sg.head_lr_multiplier), lr=sg.lr, momentum=sg.momentum,
                          weight_decay=sg.weight_decay)

    def loss_fn(ddp, batch):
        with autocast_context(session.device, cfg.train.precision):
            logits = ddp(batch["image"])
        return segmentation_loss(logits, batch["label"], batch_denominator)

    train_epochs(session, model, session.prepare(model), opt, loss_fn, plan,
                 extra_state={"config": config["config"]})


def segment_plan(cfg: Config, total: int, start: tuple[int, int]) -> LoopPlan:
    sg = cfg.segment
    steps = total // sg.batch_size
    if steps == 0:
        raise ConfigError(f"segment.batch_size={sg.batch_size} is larger than the {total} training images of "
                          f"'{sg.split}'")
    steps = min(steps, sg.max_steps_per_epoch or steps)
    return LoopPlan("DeepLab", sg.epochs, steps, sg.batch_size, sg.lr, sg.poly_power,
                    cfg.train.max_consecutive_nonfinite, sg.checkpoint_every_steps, start, cfg.train.seed)


def train_deeplab(cfg: Config, job: RunFolder, labels: str, shards: tuple, total: int, init: str | None,
                  where: str) -> dict:
    """Train (or continue, or keep) DeepLab in <job>/model."""
    sg, folder = cfg.segment, job.sub(MODEL_DIR)
    start = resume_point(folder)
    if start[0] >= sg.epochs:
        return {"kept": True, "epochs": start[0]}
    plan, workers = segment_plan(cfg, total, start), stage_workers(cfg, "segment")
    datasets = epoch_datasets(plan, lambda e, first: positions(plan.steps_per_epoch * plan.batch_size - first)
                              .map_batches(segment_samples, batch_size=8, num_cpus=sg.actor_cpus, fn_kwargs=dict(
                                  labels=labels, crop=sg.crop_size, scale_range=sg.scale_range, flip=sg.flip,
                                  seed=cfg.train.seed, epoch=e, first_row=first, total=total,
                                  n_classes=num_classes(cfg), shards=shards, where=where)), workers)
    t0 = time.perf_counter()
    loop_config = {"config": to_dict(cfg), "init_backbone": init, "plan": asdict(plan)}
    fit(build_trainer(segment_worker, loop_config, folder, datasets, cfg, workers))
    return {"kept": False, "epochs": sg.epochs - start[0], "resumed_from": list(start) if start != (0, 0) else None,
            "steps_per_epoch": plan.steps_per_epoch, "seconds": round(time.perf_counter() - t0, 2)}


def load_trained(job: RunFolder, device: torch.device | str = "cpu") -> tuple[DeepLab, dict]:
    """The trained DeepLab of a job folder (its latest checkpoint in <job>/model) and that checkpoint's state."""
    restored = read_latest(job.sub(MODEL_DIR), map_location=device)
    if restored is None:
        raise CheckpointError(f"{job.uri(MODEL_DIR)} holds no trained DeepLab (run the training stage)")
    cfg = config_from_dict(restored.state["config"])
    cfg.segment.pretrained = None  # every weight comes from the state
    model = build_deeplab(cfg.segment, num_classes(cfg) + 1).to(device)
    model.load_state_dict(restored.state["model"])
    return model.eval(), {**restored.state, "epoch": restored.epoch}
