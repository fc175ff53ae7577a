"""[2] The three prediction levels of each val image -> pred/, pred_ms/, pred_crf/<id>.png (palette PNGs), by an
actor pool that loads the trained DeepLab once per actor; [3] each level's scores against the val ground truth."""

from __future__ import annotations

import numpy as np
import torch

from acr.config import Config
from acr.data import file_codecs
from acr.data.ingest import labelled_rows
from acr.data.shards import ShardReader, decode_image_bytes
from acr.data.transforms import to_chw_normalized
from acr.errors import DataError
from acr.metrics import Confusions
from acr.models.deeplab import predict_probabilities
from acr.refine.crf import CRF_PRESETS, crf_inference
from acr.runtime.stages import ImageFiles, actor_device, made, rows_of
from acr.segment.train_deeplab import load_trained

LEVELS = {"pred": "single scale", "pred_ms": "multi-scale + flip", "pred_crf": "multi-scale + flip + CRF"}
SUFFIXES = {"pred": "", "pred_ms": "_ms", "pred_crf": "_crf"}  # summary keys: val_miou, val_miou_ms, val_miou_crf


class PredictStage:
    """An actor of the prediction stage."""

    def __init__(self, cfg: Config, files: ImageFiles, shards: tuple, where: str, order: np.ndarray):
        self.sg, self.device = cfg.segment, actor_device()
        self.files, self.reader, self.where, self.order = files, ShardReader(*shards), where, order
        self.model, _ = load_trained(files.folder, self.device)

    def __call__(self, batch: dict) -> dict:
        ids = []
        for rec in rows_of(self.reader, batch, self.order):
            raw = decode_image_bytes(rec["image"], f"image '{rec['id']}' of {self.where}")
            image = torch.from_numpy(to_chw_normalized(raw)).to(self.device)
            single, multi = predict_probabilities(self.model, image, self.sg.eval_scales, self.sg.eval_flip)
            multi = multi.float().cpu().numpy()
            maps = {"pred": single.argmax(0).cpu().numpy(), "pred_ms": multi.argmax(0),
                    "pred_crf": crf_inference(raw, multi, CRF_PRESETS[self.sg.crf]).argmax(0)}
            for kind, m in maps.items():
                self.files.write(kind, rec["id"], file_codecs.label_png_bytes(m.astype(np.uint8)))
            ids.append(rec["id"])
        return made(ids)


def evaluate_predictions(files: ImageFiles, uri: str, manifest: dict, split: str, max_images: int | None,
                         n_classes: int, overlays: int) -> tuple[dict, list[dict]]:
    """[3] Each level's scores against the ground truth of `split` (keys val_miou[_ms|_crf], val_precision...)."""
    conf, items, count = Confusions(n_classes + 1), [], 0
    for image_id, gt, row in labelled_rows(uri, manifest, split, max_images, n_classes):
        maps = {k: file_codecs.read_label_png(files.read(k, image_id), files.where(k, image_id)) for k in LEVELS}
        for k, m in maps.items():
            if m.shape != gt.shape:
                raise DataError(f"{files.where(k, image_id)}: {m.shape} but the image is {gt.shape}")
            conf.add(k, m, gt)
        count += 1
        if len(items) < overlays:
            items.append({"id": image_id, "raw": decode_image_bytes(row["image"], image_id), "gt": gt, **maps})
    result = {"val_images_scored": count}
    for k, suffix in SUFFIXES.items():
        s = conf.scores(k) if k in conf.matrices else {"miou": None, "precision": None, "recall": None, "iou": None}
        result.update({f"val_miou{suffix}": s["miou"], f"val_precision{suffix}": s["precision"],
                       f"val_recall{suffix}": s["recall"], f"val_per_class_iou{suffix}": s["iou"]})
    return result, items
