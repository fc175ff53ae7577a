"""[6] Table 3's levels on the job's labelled images: seed (at the seed threshold), +CRF, mask (mIoU, precision,
recall, per-class IoU), the confident labels' coverage and accuracy (IRN's training targets), overlays, table3.md."""

from __future__ import annotations

import numpy as np

from acr.data import file_codecs
from acr.data.ingest import labelled_rows
from acr.data.shards import decode_image_bytes
from acr.errors import DataError
from acr.metrics import Confusions
from acr.refine import per_image
from acr.runtime.stages import ImageFiles

LEVELS = ("seed", "crf", "mask")
PAPER_TABLE3 = {"seed": 60.3, "crf": 65.9, "mask": 72.3}  # ACR (CVPR 2023) Table 3, VOC 2012 train, mIoU %


def _maps(files: ImageFiles, image_id: str, threshold: float) -> dict[str, np.ndarray]:
    cams, keys = file_codecs.load_cams(files.read(file_codecs.CAMS, image_id))
    maps = {"seed": per_image.seed_labels(cams, keys, threshold)}
    for level, kind in (("crf", file_codecs.CRF), ("mask", file_codecs.MASKS), ("ir", file_codecs.IR_LABELS)):
        maps[level] = file_codecs.read_label_png(files.read(kind, image_id), files.where(kind, image_id))
    return maps


def evaluate_levels(files: ImageFiles, uri: str, manifest: dict, split: str, max_images: int | None,
                    n_classes: int, threshold: float, overlays: int) -> tuple[dict, list[dict]]:
    """The scores of every level (keys seed_miou, crf_precision, ...) and the first `overlays` images' maps."""
    conf, items = Confusions(n_classes + 1), []
    for image_id, gt, row in labelled_rows(uri, manifest, split, max_images, n_classes):
        maps = _maps(files, image_id, threshold)
        for level, m in maps.items():
            if m.shape != gt.shape:
                raise DataError(f"{files.where(level, image_id)}: {m.shape} but the image is {gt.shape}")
            pred, g = (m, gt) if level != "ir" else (np.where(m == 255, 0, m), np.where(m == 255, 255, gt))
            conf.add(level, pred, g)
        if len(items) < overlays:
            items.append({"id": image_id, "raw": decode_image_bytes(row["image"], image_id), "gt": gt, **maps})
    result = {}
    for level in LEVELS:
        s = conf.scores(level) if level in conf.matrices else {"miou": None, "precision": None, "recall": None,
                                                                "iou": None}
        result.update({f"{level}_miou": s["miou"], f"{level}_precision": s["precision"],
                       f"{level}_recall": s["recall"], f"{level}_per_class_iou": s["iou"]})
    ir = conf.matrices.get("ir")
    labelled = int(ir.sum()) if ir is not None else 0
    result["ir_label_confident_pixels"] = labelled
    result["ir_label_pixel_accuracy"] = float(np.trace(ir) / labelled) if labelled else None
    return result, items


def table3(summary: dict) -> str:
    """Table 3 of the paper (pseudo-label quality per level) with this run's numbers beside it."""
    lines = [f"Pseudo-label levels on '{summary['split']}' ({summary['images_with_ground_truth']} images with "
             f"ground truth; seed threshold {summary['seed_threshold']:.2f}, {summary['seed_threshold_source']})",
             "", "| level | mIoU | precision | recall | paper (VOC train mIoU) |", "|---|---|---|---|---|"]
    names = {"seed": "Seed (CAM)", "crf": "+ CRF", "mask": "Mask (IRN)"}
    for k, name in names.items():
        lines.append(f"| {name} | {100 * summary[f'{k}_miou']:.1f} | {100 * summary[f'{k}_precision']:.1f} | "
                     f"{100 * summary[f'{k}_recall']:.1f} | {PAPER_TABLE3[k]} |")
    return "\n".join(lines) + "\n"
