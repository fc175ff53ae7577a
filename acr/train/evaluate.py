"""CAM quality on `eval.split`, computed inside the training workers: each worker scores the rows rank, rank + W,
... of the split (read whole from its shards by every worker), the confusion matrices are summed over workers, the
background threshold is swept and the best mIoU reported with its precision and recall, beside the two floors."""

from __future__ import annotations

import logging

import numpy as np
import torch

from acr.cam import evaluate_image, infer_cams
from acr.config import Config, num_classes
from acr.data.ingest import eval_item
from acr.errors import DataError
from acr.metrics import Confusions, best_threshold, thresholds_from
from acr.runtime.collectives import reduce_sum_numpy

log = logging.getLogger(__name__)


def _score_row(classifier, cfg: Config, row: dict, where: str, device, thresholds, conf: Confusions):
    """One image's confusion matrices added to `conf`; the item (for pictures), or None if skipped as corrupt."""
    try:
        item = eval_item(row, num_classes(cfg), where)
    except (DataError, ValueError):
        if not cfg.data.skip_corrupt:
            raise
        return None
    if item["mask"] is None:
        raise DataError(f"{where} has no ground-truth mask; eval.split must have masks")
    dtype = next(classifier.parameters()).dtype
    cams = infer_cams(classifier, torch.from_numpy(item["image"]).to(device, dtype),
                      torch.from_numpy(item["labels"]).to(device, dtype), cfg.eval.scales, cfg.eval.flip)
    cams = cams.float().cpu().numpy()
    per_image = evaluate_image(cams, item["labels"], item["mask"], thresholds)
    for name in ("sweep", "floor_background", "floor_whole_image"):
        conf.add_matrix(name, per_image[name])
    return {**{k: item[k] for k in ("id", "raw", "mask", "labels")}, "cams": cams}


def evaluate_split(classifier: torch.nn.Module, cfg: Config, eval_rows, shards: str, rank: int, world: int,
                   device: torch.device) -> tuple[dict, list[dict]]:
    """The CAM scores of `eval.split` (see the module docstring); rank 0 also returns the first `eval.overlays`
    images for pictures. An undecodable row stops with an error naming it, or with data.skip_corrupt is skipped and
    counted (`eval_skipped_corrupt`)."""
    thresholds = thresholds_from(cfg.eval.thresholds)
    n = num_classes(cfg) + 1
    conf = Confusions(n, ("floor_background", "floor_whole_image"))
    conf.matrices["sweep"] = np.zeros((len(thresholds), n, n), np.int64)
    overlays, skipped, total = [], 0, 0
    classifier.eval()
    for j, row in enumerate(eval_rows.iter_rows()):
        if cfg.eval.max_images and j >= cfg.eval.max_images:
            break
        total += 1
        if j % world != rank:
            continue
        if rank == 0 and j and j % 20 == 0:
            log.info("  CAMs: %d images (rank 0 of %d)", j, world)
        where = f"row id '{row['id']}' of the {cfg.eval.split} shards in {shards}"
        item = _score_row(classifier, cfg, row, where, device, thresholds, conf)
        skipped += item is None
        if item is not None and rank == 0 and len(overlays) < cfg.eval.overlays:
            overlays.append(item)
    conf.reduce(reduce_sum_numpy)
    skipped = int(reduce_sum_numpy(np.array([skipped]))[0])
    return _result(cfg, conf, thresholds, total - skipped, skipped), overlays


def _result(cfg: Config, conf: Confusions, thresholds: np.ndarray, scored: int, skipped: int) -> dict:
    per_t = conf.sweep("sweep")
    chosen = best_threshold(thresholds, [s["miou"] for s in per_t], "CAM scores")
    best = chosen.pop("index")
    return {
        "split": cfg.eval.split, "num_images": scored, "eval_skipped_corrupt": skipped,
        "cam_miou": per_t[best]["miou"], "precision": per_t[best]["precision"], "recall": per_t[best]["recall"],
        **chosen, "per_class_iou": per_t[best]["iou"],
        "sweep": {"thresholds": thresholds.tolist(), "miou": [s["miou"] for s in per_t],
                  "precision": [s["precision"] for s in per_t], "recall": [s["recall"] for s in per_t]},
        "floor_background_miou": conf.scores("floor_background")["miou"],
        "floor_whole_image_miou": conf.scores("floor_whole_image")["miou"],
    }
