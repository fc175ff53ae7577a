"""Pictures next to summary.json: CAM overlays and training curves (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from acr.data.voc import voc_palette  # noqa: E402

_PALETTE = np.array(voc_palette(), np.uint8).reshape(256, 3)


def colorize(labels: np.ndarray) -> np.ndarray:
    """HxW label map -> HxWx3 VOC colours (255 = void is drawn in the VOC void colour)."""
    return _PALETTE[labels]


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    heat = plt.get_cmap("jet")(np.clip(cam, 0, 1))[..., :3] * 255
    return (image * (1 - alpha) + heat * alpha).astype(np.uint8)


def save_cam_overlays(path: Path, items: list[dict], class_names: list[str], threshold: float) -> None:
    """One row per image: image, ground truth, CAM (max over present classes), prediction at `threshold`.
    `items`: dicts with id, raw (HxWx3 uint8), cams (CxHxW), labels (C,), mask (HxW or None)."""
    if not items:
        return
    fig, axes = plt.subplots(len(items), 4, figsize=(10, 2.6 * len(items)), squeeze=False)
    for row, it in zip(axes, items):
        cams = it["cams"]
        top = cams.max(0)
        pred = np.where(top > threshold, cams.argmax(0) + 1, 0)
        names = ", ".join(class_names[c] for c in np.nonzero(it["labels"] > 0.5)[0])
        panels = [(it["raw"], f"{it['id']}"), (colorize(it["mask"]) if it["mask"] is not None else None, "ground truth"),
                  (cam_overlay(it["raw"], top), f"CAM: {names}"), (colorize(pred.astype(np.uint8)), f"CAM > {threshold:.2f}")]
        for ax, (img, title) in zip(row, panels):
            ax.axis("off")
            ax.set_title(title, fontsize=8)
            if img is not None:
                ax.imshow(img)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_curves(path: Path, history: list[dict], thresholds: np.ndarray, sweep_miou: list[float]) -> None:
    """Loss curves per epoch and CAM mIoU against the background threshold."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    keys = sorted({k for h in history for k in h if k.startswith(("ru/", "cu/"))})
    epochs = [h["epoch"] for h in history]
    for k in keys:
        ax1.plot(epochs, [h.get(k, np.nan) for h in history], marker="o", label=k)
    ax1.set_xlabel("epoch")
    ax1.set_title("training losses (epoch means, all workers)")
    ax1.legend(fontsize=7)
    ax2.plot(thresholds, sweep_miou)
    best = int(np.argmax(sweep_miou))
    ax2.axvline(thresholds[best], ls="--", c="gray")
    ax2.set_xlabel("background threshold")
    ax2.set_ylabel("CAM mIoU")
    ax2.set_title(f"best {sweep_miou[best]:.3f} at {thresholds[best]:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_label_panels(path: Path, items: list[dict], panels: list[tuple[str, str]]) -> None:
    """One row per image: the image, then each (key, title) of `panels` as a label map in VOC colours.
    `items`: dicts with id, raw and the panels' keys."""
    if not items:
        return
    fig, axes = plt.subplots(len(items), len(panels) + 1, figsize=(2.4 * (len(panels) + 1), 2.5 * len(items)),
                             squeeze=False)
    for row, it in zip(axes, items):
        for ax, (img, title) in zip(row, [(it["raw"], it["id"])] + [(colorize(it[k]), t) for k, t in panels]):
            ax.axis("off")
            ax.set_title(title, fontsize=8)
            ax.imshow(img)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_level_overlays(path: Path, items: list[dict], threshold: float) -> None:
    """Pseudo-label levels: image, ground truth, seed (CAM > threshold), +CRF, IRN's confident labels (white: not
    confident), final mask. `items`: dicts with id, raw, gt, seed, crf, ir, mask."""
    save_label_panels(path, items, [("gt", "ground truth"), ("seed", f"seed (> {threshold:.2f})"), ("crf", "+ CRF"),
                                    ("ir", "confident labels"), ("mask", "mask (IRN)")])


def save_loss_curve(path: Path, history: list[dict]) -> None:
    """Training loss per epoch."""
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_trial_plots(path: Path, curves: dict[str, list[float]], importances: dict[str, float]) -> None:
    """A search's trials: CAM mIoU per epoch of every trial, and the parameters' importances (if any)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for trial, scores in curves.items():
        axes[0].plot(range(1, len(scores) + 1), scores, marker="o", label=trial[-12:])
    axes[0].set(xlabel="epoch", ylabel="CAM mIoU (selection split)", title="trials")
    axes[0].legend(fontsize=6)
    if importances:
        axes[1].barh(list(importances), list(importances.values()))
    axes[1].set(xlabel="importance (fANOVA)" if importances else "needs two finished trials",
                title="parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_report_plot(path: Path, bars: list[tuple[str, float | None, float]], dataset: str) -> None:
    """The pipeline report's bars: (name, our mIoU as a fraction or None, the paper's mIoU %)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(bars))
    ax.bar([i - 0.2 for i in x], [100 * (b[1] or 0) for b in bars], 0.4, label=f"ours ({dataset})")
    ax.bar([i + 0.2 for i in x], [b[2] for b in bars], 0.4, label="paper (VOC 2012)", color="lightgray")
    ax.set_xticks(list(x), [b[0] for b in bars])
    ax.set_ylabel("mIoU %")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
