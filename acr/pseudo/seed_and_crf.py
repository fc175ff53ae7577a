"""[2] The seed level's background threshold (swept on the ground truth where it exists), and [3] the +CRF level
(crf/<id>.png) and IRN's confident labels (ir_labels/<id>.png) of every image (IRN's cam_to_ir_label)."""

from __future__ import annotations

import numpy as np

from acr.data import file_codecs
from acr.data.ingest import labelled_rows
from acr.data.shards import ShardReader, decode_image_bytes
from acr.errors import ConfigError
from acr.metrics import Confusions, best_threshold, threshold_sweep_confusion, thresholds_from
from acr.refine import per_image
from acr.refine.crf import CRF_PRESETS
from acr.runtime.stages import ImageFiles, made, rows_of


def seed_threshold(cfg, files: ImageFiles, uri: str, manifest: dict, n_classes: int) -> dict:
    """{"seed_threshold", "seed_threshold_source", "images_with_ground_truth", "seed_sweep"?}: `pseudo.seed_threshold`
    if set, else the best of `eval.thresholds` for the seed level on the labelled images of the job."""
    ps = cfg.pseudo
    thresholds = thresholds_from(cfg.eval.thresholds)
    sweep, n = Confusions(n_classes + 1), 0
    for image_id, gt, _ in labelled_rows(uri, manifest, ps.split, ps.max_images, n_classes):
        cams, keys = file_codecs.load_cams(files.read(file_codecs.CAMS, image_id))
        sweep.add_matrix("seed", threshold_sweep_confusion(file_codecs.full_cams(cams, keys, n_classes), gt, thresholds))
        n += 1
    out = {"images_with_ground_truth": n}
    if ps.seed_threshold is not None:
        return {**out, "seed_threshold": ps.seed_threshold, "seed_threshold_source": "pseudo.seed_threshold"}
    if not n:
        raise ConfigError(f"split '{ps.split}' has no ground truth to choose the seed threshold: set "
                          "pseudo.seed_threshold")
    per_t = [s["miou"] for s in sweep.sweep("seed")]
    chosen = best_threshold(thresholds, per_t, "seed level")
    return {**out, "seed_threshold": chosen["threshold"],
            "seed_threshold_source": "best of eval.thresholds on the ground truth",
            "seed_threshold_at_edge": chosen["threshold_at_edge"],
            "seed_sweep": {"thresholds": thresholds.tolist(), "miou": per_t}}


def refine_rows(batch: dict, files: ImageFiles, threshold: float, crf: str, fg: float, bg: float, num_classes: int,
                shards: tuple, where: str, order: np.ndarray) -> dict:
    """[3] A task of the refine stage: the +CRF level and the confident labels of each image of the batch."""
    ids = []
    for rec in rows_of(ShardReader(*shards), batch, order):
        image_id = rec["id"]
        raw = decode_image_bytes(rec["image"], f"image '{image_id}' of {where}")
        cams, keys = file_codecs.load_cams(files.read(file_codecs.CAMS, image_id))
        files.write(file_codecs.CRF, image_id,
                    file_codecs.label_png_bytes(per_image.crf_labels(raw, cams, keys, threshold, CRF_PRESETS[crf])))
        files.write(file_codecs.IR_LABELS, image_id,
                    file_codecs.label_png_bytes(per_image.ir_labels(raw, cams, keys, num_classes, fg, bg)))
        ids.append(image_id)
    return made(ids)
