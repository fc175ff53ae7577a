"""Multi-scale + flip CAM inference and CAM evaluation (the released code's `infer`, generalised).

For each scale s the image is resized (bicubic, antialiased when shrinking), the classifier runs on it and on its
horizontal flip; each raw CAM is upsampled to the image size, passed through ReLU, the flipped one flipped back, and all
are summed. Absent classes are zeroed and the sum is max-normalised per class: (C, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from acr.method.acr import normalize_cam
from acr.metrics import confusion_matrix, threshold_sweep_confusion


@torch.no_grad()
def infer_cams(classifier: nn.Module, image: torch.Tensor, labels: torch.Tensor, scales: Sequence[float],
               flip: bool = True) -> torch.Tensor:
    """`image` (3, H, W) normalised, `labels` (C,) multi-hot, both on the classifier's device -> (C, H, W)."""
    classifier.eval()
    h, w = image.shape[-2:]
    total = None
    for s in scales:
        x = image[None]
        if s != 1.0:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=s < 1.0)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        cam = classifier.localisation_map(x)
        cam = F.relu(F.interpolate(cam.float(), size=(h, w), mode="bilinear", align_corners=False))
        cam = cam[0] + cam[1].flip(-1) if flip else cam[0]
        total = cam if total is None else total + cam
    return normalize_cam((total * labels[:, None, None])[None])[0]


def floor_confusions(labels: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two floors every CAM must beat, for one image: all background, and a CAM of 1 over the whole image for
    every labelled class (which, through the argmax, predicts the first labelled class everywhere)."""
    n = labels.shape[0] + 1
    background = confusion_matrix(np.zeros_like(gt), gt, n)
    first = int(np.nonzero(labels > 0.5)[0][0]) + 1
    whole = confusion_matrix(np.full_like(gt, first), gt, n)
    return background, whole


def evaluate_image(cams: np.ndarray, labels: np.ndarray, gt: np.ndarray, thresholds: np.ndarray) -> dict:
    """Per-image confusion matrices (sweep over thresholds, and the two floors), to be summed over the dataset."""
    background, whole = floor_confusions(labels, gt)
    return {"sweep": threshold_sweep_confusion(cams, gt, thresholds), "floor_background": background,
            "floor_whole_image": whole}
