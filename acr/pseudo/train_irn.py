"""[4] IRN's class-boundary branch on a frozen CNN (pseudo.irn_backbone; IRN's train_irn), trained with Ray Train.

Every epoch visits the job's images in an order from (train.seed, epoch); each crop is a random rescale, flip and
crop of the image and its confident labels, seeded by (seed, epoch, image id). The loss is IRN's class-boundary
loss over the pairs within `pseudo.irn_radius`, with SGD (no momentum, as IRN's PolyOptimizer) and the poly LR. The
run lives in <job>/irn (local or s3://): checkpoints (the boundary branch, its optimiser, counters; the frozen
CNN is pseudo.checkpoint's) after every epoch and every `pseudo.irn_checkpoint_every_steps` steps; a lost worker
restarts from the last one (`scaling.max_failures`) and a rerun of the job continues it.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from acr.checkpoint import checkpoint_backbone, load_state
from acr.config import Config, stage_workers, to_dict
from acr.data import file_codecs
from acr.data.shards import ShardReader, decode_image_bytes
from acr.data.transforms import scale_flip_crop_pair
from acr.errors import CheckpointError, ConfigError
from acr.models.backbones import build_backbone
from acr.models.irn import IRNet
from acr.refine.irn import affinity_labels, boundary_loss, path_affinity, path_offsets
from acr.runtime.collectives import batch_denominator
from acr.runtime.loop import LoopPlan, epoch_datasets, start_worker, train_epochs
from acr.runtime.session import read_latest, resume_point
from acr.runtime.stages import ImageFiles, epoch_order, positions, rows_of
from acr.runtime.trainer import build_trainer, fit
from acr.storage import RunFolder

log = logging.getLogger(__name__)
IRN_DIR = "irn"


def build_irn(cfg: Config, checkpoint: str | None = None, device: torch.device | str = "cpu") -> IRNet:
    """IRN's boundary branch on the frozen CNN `pseudo.irn_backbone` of `checkpoint` (the classifier's backbone, the
    reconstructor's encoder or the ImageNet CNN: acr.checkpoint.checkpoint_backbone); without a checkpoint on a
    random model.backbone."""
    if checkpoint is None:
        backbone = build_backbone(cfg.model.backbone, cfg.model.output_stride, dropout=False)
    else:
        backbone = checkpoint_backbone(load_state(checkpoint), checkpoint, cfg.pseudo.irn_backbone).build()
    return IRNet(backbone, cfg.pseudo.irn_width).to(device)


def irn_samples(batch: dict, files: ImageFiles, crop: int, resize_range: list[float], seed: int, epoch: int,
                first_row: int, total: int, shards: tuple, where: str) -> dict:
    """The training crops of the epoch's rows first_row + position: image and confident labels rescaled by one
    random factor, flipped, cropped to `crop` (padding: 0 after normalisation / label 255), the label at stride 4."""
    images, labels = [], []
    order = epoch_order(total, seed, epoch)[first_row:]
    for rec in rows_of(ShardReader(*shards), batch, order):
        image_id = rec["id"]
        rng = np.random.default_rng([seed, epoch, zlib.crc32(image_id.encode())])
        raw = decode_image_bytes(rec["image"], f"image '{image_id}' of {where}")
        label = file_codecs.read_label_png(files.read(file_codecs.IR_LABELS, image_id), files.where(file_codecs.IR_LABELS, image_id))
        image, lab = scale_flip_crop_pair(raw, label, rng, resize_range, crop)
        images.append(image)
        labels.append(lab[::4, ::4])
    return {"image": np.stack(images) if images else np.zeros((0, 3, crop, crop), np.float32),
            "label": np.stack(labels) if labels else np.zeros((0, crop // 4, crop // 4), np.uint8)}


def irn_worker(config: dict) -> None:
    """The TorchTrainer function: IRN trained by the shared resumable loop (acr.runtime.loop)."""
    cfg, session, plan = start_worker(config)
    ps = cfg.pseudo
    irn = build_irn(cfg, config["checkpoint"], session.device)
    params = [p for p in irn.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": params, "lr_mult": 1.0}], lr=ps.irn_lr, weight_decay=ps.irn_weight_decay)
    offsets = path_offsets(ps.irn_radius)

    def loss_fn(model, batch):
        edge = model(batch["image"])
        return boundary_loss(path_affinity(edge, offsets), *affinity_labels(batch["label"].long(), offsets),
                             denominator=batch_denominator)

    train_epochs(session, irn.boundary_branch(), session.prepare(irn), opt, loss_fn, plan)


def irn_plan(cfg: Config, total: int, start: tuple[int, int]) -> LoopPlan:
    """Every epoch is total // irn_batch_size full batches (IRN drops the last partial one); a job with fewer
    images than one batch trains on all of them as one batch (a multiple of the worker count)."""
    ps, workers = cfg.pseudo, stage_workers(cfg, "irn")
    batch = min(ps.irn_batch_size, total - total % workers)
    if batch < ps.irn_batch_size:
        log.warning("the job has %d images, fewer than pseudo.irn_batch_size=%d: IRN trains on batches of %d",
                    total, ps.irn_batch_size, batch)
    if batch == 0:
        raise ConfigError(f"the job's {total} images are fewer than the {workers} IRN workers")
    return LoopPlan("IRN", ps.irn_epochs, total // batch, batch, ps.irn_lr, 0.9, cfg.train.max_consecutive_nonfinite,
                    ps.irn_checkpoint_every_steps, start, cfg.train.seed)


def train_irn(cfg: Config, job: RunFolder, ckpt: str, shards: tuple, total: int, where: str) -> dict:
    """Train (or continue, or keep) IRN in <job>/irn; its history and what was done."""
    ps, folder = cfg.pseudo, job.sub(IRN_DIR)
    start = resume_point(folder)
    if start[0] >= ps.irn_epochs:
        state = read_latest(folder).state
        return {"kept": True, "history": state["history"], "resumes": state.get("resumes", [])}
    plan, workers = irn_plan(cfg, total, start), stage_workers(cfg, "irn")
    files = ImageFiles(job, file_codecs.SUFFIXES)
    datasets = epoch_datasets(plan, lambda e, first: positions(plan.steps_per_epoch * plan.batch_size - first)
                              .map_batches(irn_samples, batch_size=8, num_cpus=ps.actor_cpus, fn_kwargs=dict(
                                  files=files, crop=ps.irn_crop_size, resize_range=ps.irn_resize_range,
                                  seed=cfg.train.seed, epoch=e, first_row=first, total=total, shards=shards,
                                  where=where)), workers)
    t0 = time.perf_counter()
    loop_config = {"config": to_dict(cfg), "checkpoint": ckpt, "plan": asdict(plan)}
    fit(build_trainer(irn_worker, loop_config, folder, datasets, cfg, workers))
    state = read_latest(folder).state
    return {"kept": False, "resumed_from": list(start) if start != (0, 0) else None, "history": state["history"],
            "resumes": state.get("resumes", []), "seconds": round(time.perf_counter() - t0, 2)}


def load_trained_irn(cfg: Config, job: RunFolder | str | Path, device: torch.device | str = "cpu") -> IRNet:
    """The trained IRN of a job folder: the frozen CNN of pseudo.checkpoint (pseudo.irn_backbone) and the boundary branch of
    the latest checkpoint in <job>/irn."""
    restored = read_latest(RunFolder.of(job).sub(IRN_DIR), map_location=device)
    if restored is None:
        raise CheckpointError(f"{RunFolder.of(job).uri(IRN_DIR)} holds no trained IRN (run the job's IRN stage)")
    irn = build_irn(cfg, cfg.pseudo.checkpoint, device)
    irn.boundary_branch().load_state_dict(restored.state["model"])
    return irn
