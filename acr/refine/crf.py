"""Dense CRF (Krähenbühl & Koltun) with pydensecrf, as the WSSS line uses it.

Parameter sets are named after their source (shared/spec/pipeline.md): `psa` (psa/ACR/ToCo: Gaussian sxy 3 compat 3,
bilateral sxy 80 srgb 13 compat 10, 10 iterations) is the default for CAMs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax


@dataclass(frozen=True)
class CRFParams:
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
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
