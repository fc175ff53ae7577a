"""The per-image steps of the pseudo-label job, without Ray (acr.pseudo runs them over a dataset): the seed and +CRF
levels from CAMs, IRN's confident labels, the boundary map and the random walk's masks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from acr.data.file_codecs import full_cams
from acr.models.irn import IRNet
from acr.refine.crf import CRFParams, LabelCRFParams, crf_inference
from acr.refine.irn import confident_labels, labels_from_walk, propagate, scaled_to_max


def seed_labels(cams: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """The seed level: argmax over [threshold, CAMs]; 0 background, c+1 class c."""
    lut = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    if len(keys) == 0:
        return np.zeros(cams.shape[1:], np.uint8)
    return lut[np.concatenate([np.full((1,) + cams.shape[1:], threshold, np.float32), cams]).argmax(0)]


def crf_labels(image: np.ndarray, cams: np.ndarray, keys: np.ndarray, threshold: float,
               params: CRFParams = CRFParams()) -> np.ndarray:
    """The +CRF level: the scores [threshold, CAMs of the labelled classes] normalised per pixel and refined by the
    dense CRF (psa's crf_inference), argmax. Only the labelled classes and background can appear."""
    if len(keys) == 0:
        return np.zeros(image.shape[:2], np.uint8)
    scores = np.concatenate([np.full((1,) + cams.shape[1:], threshold, np.float32), cams]) + 1e-5
    refined = crf_inference(image, scores / scores.sum(0, keepdims=True), params)
    lut = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    return lut[refined.argmax(0)]


def ir_labels(image: np.ndarray, cams: np.ndarray, keys: np.ndarray, num_classes: int, fg: float, bg: float,
              params: LabelCRFParams = LabelCRFParams()) -> np.ndarray:
    """IRN's confident labels (cam_to_ir_label) from the stored CAMs of the labelled classes."""
    labels = np.zeros(num_classes, np.float32)
    labels[keys] = 1
    return confident_labels(image, full_cams(cams, keys, num_classes), labels, fg, bg, params)


def boundary_map(irn: IRNet, image: torch.Tensor) -> torch.Tensor:
    """Class-boundary probabilities at stride 4 of a normalised (3, H, W) image: the sigmoid of the mean of its and
    its flip's logits (IRN's EdgeDisplacement inference)."""
    irn.eval()
    logits = irn.logits(torch.stack([image, image.flip(-1)]))
    return torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)


def walk_labels(irn: IRNet, image: torch.Tensor, cams: np.ndarray, keys: np.ndarray, beta: float, exp_times: int,
                radius: int, cam_power: float, bg_threshold: float, crf: tuple[np.ndarray, CRFParams] | None = None
                ) -> np.ndarray:
    """IRN's make_sem_seg_labels for one image: the CAMs, brought to the boundary map's stride-4 grid (area
    average) and raised to `cam_power`, are propagated by the random walk, upsampled x4, cropped to the image,
    divided by their maximum; background wherever no class beats `bg_threshold`. With `crf` = (the HxWx3 uint8
    image, CRF parameters), the walked scores are refined by the dense CRF at full resolution before the argmax,
    as the +CRF level refines the CAMs (:func:`crf_labels`; the walk itself only resolves 4-pixel cells)."""
    h, w = image.shape[-2:]
    if len(keys) == 0:
        return np.zeros((h, w), np.uint8)
    edge = boundary_map(irn, image).float()
    h4, w4 = edge.shape
    pad = torch.zeros((len(keys), h4 * 4, w4 * 4), dtype=torch.float32, device=edge.device)
    pad[:, :h, :w] = torch.from_numpy(cams).to(edge.device)
    cams4 = F.avg_pool2d(pad[None], 4)[0] ** cam_power
    rw = propagate(cams4, edge, beta=beta, exp_times=exp_times, radius=radius)
    rw = F.interpolate(rw[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :h, :w]
    if crf is not None:
        return crf_labels(crf[0], scaled_to_max(rw).cpu().numpy(), keys, bg_threshold, crf[1])
    keys_bg = np.concatenate([[0], np.asarray(keys) + 1])
    return labels_from_walk(rw.cpu(), keys_bg, bg_threshold)
