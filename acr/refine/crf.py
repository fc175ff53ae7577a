"""Dense CRF (Krähenbühl & Koltun) with pydensecrf, as the WSSS line uses it.

Parameter sets are named after their source (shared/spec/pipeline.md): `psa` (psa/ACR/ToCo: Gaussian sxy 3 compat 3,
bilateral sxy 80 srgb 13 compat 10, 10 iterations) is the default for CAMs.
:class:`LabelCRFParams` is IRN's CRF on a hard label map (misc/imutils.py crf_inference_label).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax


@dataclass(frozen=True)
class CRFParams:
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 10


@dataclass(frozen=True)
class LabelCRFParams:
    """IRN's CRF on a hard label map (misc/imutils.py crf_inference_label)."""

    gt_prob: float = 0.7
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    iterations: int = 10


CRF_PRESETS = {
    "psa": CRFParams(),  # psa tool/imutils.py crf_inference; ACR's --crf
    "afa": CRFParams(3, 3, 64, 5, 4, 10),  # AFA/ToCo-family evaluation
    "deeplab": CRFParams(1, 3, 67, 3, 4, 10),  # kazuto1011/deeplab-pytorch post-processing
}


def crf_inference(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field inference. `image` HxWx3 uint8, `probs` (L, H, W) probabilities (each pixel sums to 1).
    Returns the refined (L, H, W) marginals."""
    n, h, w = probs.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"crf_inference: image is {image.shape[:2]}, probabilities are {(h, w)}")
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                           rgbim=np.require(image, np.uint8, ["C", "W"]), compat=params.bilateral_compat)
    return np.asarray(d.inference(params.iterations), np.float32).reshape(n, h, w)


def crf_from_cams(image: np.ndarray, cams: np.ndarray, labels: np.ndarray, alpha: float,
                  params: CRFParams = CRFParams()) -> np.ndarray:
    """The psa/ACR CAM refinement: background score (1 - max_c CAM)^alpha stacked with the CAMs of the labelled
    classes, normalised, refined by the CRF. Returns an HxW label map (0 background, c+1 for class c): only the
    image's labelled classes and the background can appear."""
    present = np.nonzero(labels > 0.5)[0]
    fg = cams[present]
    bg = (1.0 - fg.max(0, initial=0.0)) ** alpha
    scores = np.concatenate([bg[None], fg]) + 1e-5
    refined = crf_inference(image, scores / scores.sum(0, keepdims=True), params)
    keys = np.concatenate([[0], present + 1])
    return keys[refined.argmax(0)].astype(np.uint8)


def crf_from_labels(image: np.ndarray, label_map: np.ndarray, n_labels: int,
                    params: LabelCRFParams = LabelCRFParams()) -> np.ndarray:
    """IRN's crf_inference_label: unary from a hard label map (`label_map` HxW, values 0..n_labels-1, each pixel's
    label with probability gt_prob, the rest shared evenly), refined by the CRF. Returns the HxW argmax label map
    (int64, values 0..n_labels-1). With a single label there is nothing to choose: all zeros."""
    h, w = label_map.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"crf_from_labels: image is {image.shape[:2]}, label map is {(h, w)}")
    if n_labels < 2:
        return np.zeros((h, w), np.int64)
    d = dcrf.DenseCRF2D(w, h, n_labels)
    unary = unary_from_labels(np.asarray(label_map, np.int64), n_labels, gt_prob=params.gt_prob, zero_unsure=False)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                           rgbim=np.require(image, np.uint8, ["C", "W"]), compat=params.bilateral_compat)
    q = np.asarray(d.inference(params.iterations), np.float32).reshape(n_labels, h, w)
    return q.argmax(0)
