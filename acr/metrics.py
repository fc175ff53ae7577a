"""Segmentation metrics from a dataset-level confusion matrix (pixel counts summed over all images, 255 ignored),
as the released ACR evaluation and IRN do: IoU_c = TP / (GT + Pred - TP), precision_c = TP / Pred,
recall_c = TP / GT, each averaged over background + classes. A class with neither GT nor prediction pixels is left out
of the mean (nanmean, as IRN). Every value is a fraction in [0, 1]."""

from __future__ import annotations

import logging

import numpy as np

from acr.data.voc import IGNORE

log = logging.getLogger(__name__)


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_labels: int) -> np.ndarray:
    """(num_labels, num_labels) int64 counts, rows = ground truth, columns = prediction; GT 255 is ignored."""
    valid = gt != IGNORE
    if not np.all(gt[valid] < num_labels):
        raise ValueError(f"ground truth has label {int(gt[valid].max())} >= {num_labels}")
    idx = gt[valid].astype(np.int64) * num_labels + pred[valid].astype(np.int64)
    return np.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def threshold_sweep_confusion(cams: np.ndarray, gt: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Confusion matrices for every background threshold τ at once.

    `cams` (C, H, W) in [0, 1] (absent classes 0). The prediction is argmax over [τ, cam_1..cam_C]: class c+1 where
    the largest CAM exceeds τ, else background (ties go to the background, then to the lower class index).
    Returns (T, C+1, C+1). One pass over the pixels whatever the number of thresholds: each pixel is counted once in
    a histogram over (how many thresholds lie below its largest CAM, its label, its class), and the matrices are
    cumulative sums of it, so a sweep of the whole range [0.01, 0.99] costs about what one threshold does.
    """
    n = cams.shape[0] + 1
    t = np.asarray(thresholds, np.float64)
    if t.ndim != 1 or np.any(np.diff(t) <= 0):
        raise ValueError(f"thresholds must be increasing, got {t.tolist()}")
    valid = gt != IGNORE
    g = gt[valid].astype(np.int64)
    top = cams.max(0)[valid].astype(np.float64)
    arg = cams.argmax(0)[valid].astype(np.int64) + 1
    below = np.searchsorted(t, top, side="left")  # thresholds < top: foreground at threshold i iff i < below
    levels = len(t) + 1
    fg = np.bincount((below * n + g) * n + arg, minlength=levels * n * n).reshape(levels, n, n)
    bg = np.bincount(below * n + g, minlength=levels * n).reshape(levels, n)
    out = np.cumsum(fg[::-1], 0)[::-1][1:].copy()  # pixels with below > i
    out[:, :, 0] += np.cumsum(bg, 0)[:-1]  # pixels with below <= i predict background
    return out


def best_threshold(thresholds, miou, what: str) -> dict:
    """The best threshold of a sweep, and whether it lies at an end of the searched range ("low", "high" or None):
    there a wider range may score higher, the summary says so and a warning names `what` was scored."""
    thresholds = list(thresholds)
    i = int(np.nanargmax(miou))
    edge = "low" if i == 0 else "high" if i == len(thresholds) - 1 else None
    if edge:
        log.warning("%s: the best background threshold %.2f is the %s end of the searched range [%.2f, %.2f]: a "
                    "wider range (eval.thresholds) may score higher", what, thresholds[i], edge, thresholds[0],
                    thresholds[-1])
    return {"index": i, "threshold": float(thresholds[i]), "threshold_at_edge": edge,
            "threshold_range": [float(thresholds[0]), float(thresholds[-1])]}


def scores(conf: np.ndarray) -> dict:
    """mIoU, mean precision, mean recall and per-class IoU from a confusion matrix (fractions)."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    gt = conf.sum(1)
    pred = conf.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt + pred - tp)
        precision = tp / pred
        recall = tp / gt
    seen = (gt + pred) > 0
    precision = np.where(seen & (pred == 0), 0.0, precision)  # a class in GT never predicted: precision 0
    recall = np.where(seen & (gt == 0), 0.0, recall)  # predicted but absent from GT: recall 0
    return {
        "miou": float(np.nanmean(np.where(seen, iou, np.nan))),
        "precision": float(np.nanmean(np.where(seen, precision, np.nan))),
        "recall": float(np.nanmean(np.where(seen, recall, np.nan))),
        "iou": [None if not s else float(v) for v, s in zip(iou, seen)],
    }


def thresholds_from(spec) -> np.ndarray:
    start, stop, step = spec
    return np.round(np.arange(start, stop + step / 2, step), 6)


class Confusions:
    """The one confusion-matrix accumulator: dataset-level matrices of named levels ("seed", "mask", a threshold
    sweep of shape (T, L, L), ...), summed image by image, and over workers with :meth:`reduce`."""

    def __init__(self, num_labels: int, names: tuple[str, ...] = ()):
        self.num_labels = num_labels
        self.matrices: dict[str, np.ndarray] = {name: np.zeros((num_labels, num_labels), np.int64) for name in names}

    def add(self, name: str, pred: np.ndarray, gt: np.ndarray) -> None:
        self.add_matrix(name, confusion_matrix(pred, gt, self.num_labels))

    def add_matrix(self, name: str, matrix: np.ndarray) -> None:
        if name in self.matrices:
            self.matrices[name] = self.matrices[name] + matrix
        else:
            self.matrices[name] = np.array(matrix, np.int64)

    def reduce(self, reduce_sum) -> "Confusions":
        """Sum over workers with `reduce_sum(array) -> array` (every worker must hold the same names)."""
        for name in sorted(self.matrices):
            self.matrices[name] = reduce_sum(self.matrices[name])
        return self

    def scores(self, name: str) -> dict:
        return scores(self.matrices[name])

    def sweep(self, name: str) -> list[dict]:
        """Scores at every threshold of a (T, L, L) sweep."""
        return [scores(m) for m in self.matrices[name]]
