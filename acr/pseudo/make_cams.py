"""[1] Multi-scale + flip CAMs of each image's labelled classes -> cams/<id>.npz (IRN's make_cam)."""

from __future__ import annotations

import numpy as np
import torch

from acr.cam import infer_cams
from acr.checkpoint import load_classifier
from acr.data import file_codecs
from acr.data.shards import ShardReader, decode_image_bytes
from acr.data.transforms import to_chw_normalized
from acr.runtime.stages import ImageFiles, actor_device, made, rows_of


class CamStage:
    """An actor of the CAM stage: the classifier of `checkpoint`, loaded once."""

    def __init__(self, checkpoint: str, files: ImageFiles, scales: list[float], flip: bool, shards: tuple,
                 where: str, order: np.ndarray):
        self.device = actor_device()
        self.model, _ = load_classifier(checkpoint, self.device)
        self.reader, self.files, self.order = ShardReader(*shards), files, order
        self.scales, self.flip, self.where = scales, flip, where

    def __call__(self, batch: dict) -> dict:
        ids = []
        for rec in rows_of(self.reader, batch, self.order):
            raw = decode_image_bytes(rec["image"], f"image '{rec['id']}' of {self.where}")
            labels = np.asarray(rec["labels"])
            image = torch.from_numpy(to_chw_normalized(raw)).to(self.device)
            lab = torch.from_numpy(labels.astype(np.float32)).to(self.device)
            cams = infer_cams(self.model, image, lab, self.scales, self.flip).float().cpu().numpy()
            keys = np.nonzero(labels > 0)[0]
            self.files.write(file_codecs.CAMS, rec["id"], file_codecs.cams_bytes(cams[keys], keys))
            ids.append(rec["id"])
        return made(ids)
