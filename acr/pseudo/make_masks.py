"""[5] Boundary map, random walk and the final mask of each image -> masks/<id>.png (IRN's make_sem_seg_labels)."""

from __future__ import annotations

import numpy as np
import torch

from acr.config import config_from_dict
from acr.data import file_codecs
from acr.data.shards import ShardReader, decode_image_bytes
from acr.data.transforms import to_chw_normalized
from acr.pseudo.train_irn import load_trained_irn
from acr.refine import per_image
from acr.refine.crf import CRF_PRESETS
from acr.runtime.stages import ImageFiles, actor_device, made, rows_of


class WalkStage:
    """An actor of the mask stage: the job's trained IRN, loaded once."""

    def __init__(self, cfg_dict: dict, files: ImageFiles, shards: tuple, where: str, order: np.ndarray):
        self.cfg, self.device = config_from_dict(cfg_dict), actor_device()
        self.files, self.reader, self.where, self.order = files, ShardReader(*shards), where, order
        self.irn = load_trained_irn(self.cfg, files.folder, self.device)

    def __call__(self, batch: dict) -> dict:
        ps, ids = self.cfg.pseudo, []
        for rec in rows_of(self.reader, batch, self.order):
            image_id = rec["id"]
            raw = decode_image_bytes(rec["image"], f"image '{image_id}' of {self.where}")
            cams, keys = file_codecs.load_cams(self.files.read(file_codecs.CAMS, image_id))
            image = torch.from_numpy(to_chw_normalized(raw)).to(self.device)
            crf = (raw, CRF_PRESETS[ps.crf]) if ps.mask_crf else None
            mask = per_image.walk_labels(self.irn, image, cams, keys, ps.beta, ps.exp_times, ps.walk_radius,
                                      ps.cam_power, ps.sem_seg_bg_threshold, crf)
            self.files.write(file_codecs.MASKS, image_id, file_codecs.label_png_bytes(mask))
            ids.append(image_id)
        return made(ids)
