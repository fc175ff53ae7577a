"""Segmentation metrics from a dataset-level confusion matrix (pixel counts summed over all images, 255 ignored),
as the released ACR evaluation and IRN do: IoU_c = TP / (GT + Pred - TP), precision_c = TP / Pred,
recall_c = TP / GT, each averaged over background + classes. A class with neither GT nor prediction pixels is left out
of the mean (nanmean, as IRN). Every value is a fraction in [0, 1]."""

from __future__ import annotations

import numpy as np

from acr.data.voc import IGNORE


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
    Returns (T, C+1, C+1).
    """
    n = cams.shape[0] + 1
    top = cams.max(0)
    arg = cams.argmax(0) + 1
    valid = gt != IGNORE
    g = gt[valid].astype(np.int64)
    top_v, arg_v = top[valid], arg[valid]
    out = np.empty((len(thresholds), n, n), np.int64)
    for i, t in enumerate(thresholds):
        pred = np.where(top_v > t, arg_v, 0)
        out[i] = np.bincount(g * n + pred, minlength=n * n).reshape(n, n)
    return out


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
