"""ACR on a ViT (MCTformer-v2, DeiT-Ti/16) against MCTformer-v2 alone on the embedded default, and the ViT step's
speed beside the ResNet steps'.

    python experiments/vit.py                        # 3 seeds x 3 rows (configs/demo_vit.yaml), then the step table
    python experiments/vit.py --seeds 0 --epochs 1   # a smoke run

Rows: `mctformer` (method.reconstructor=none: MCTformer-v2 trained alone, both its losses), `acr_vit` (ACR's RU and
CU phases on it, decomposing PatchCAM, the default model.vit.train_cam) and `acr_vit_class_attention` (ACR decomposing
the class-to-patch attention map instead), the same budget, data, stand-in weights and seeds. Each run's classifier is
scored on the embedded val split at two levels, as the paper's Table 3 reports a ViT's CAMs: `CAM` (MCTformer-v2's
fused map, class-to-patch attention x ReLU(PatchCAM)) and `refined` (that map refined by the patch-to-patch attention,
MCTformer's `--patch-attn-refine`, what inference uses by default); a second table scores the fused map's two factors
apart (model.vit.cam=class_attention, patchcam), to show which of them localises. The step table times train_step
(RU + CU) on one fixed batch for each classifier backbone with the demo's reconstructor and counts its FLOPs
(`torch.utils.flop_counter`).
Results: benchmarks/results/vit.json and the "vit" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from acr.checkpoint import load_classifier  # noqa: E402
from acr.config import load_config  # noqa: E402
from acr.data.ingest import EvalRows  # noqa: E402
from acr.data.sources import ensure_shards  # noqa: E402
from acr.method.step import StepCounters, train_step  # noqa: E402
from acr.train.evaluate import evaluate_split  # noqa: E402
from acr.train.job import run_local  # noqa: E402
from benchmarks.common import (acr_flops_per_image, commit, machine, models, tiny_batch,  # noqa: E402
                               write_benchmarks_md)

ROWS = {"mctformer": ["method.reconstructor=none"], "acr_vit": [],
        "acr_vit_class_attention": ["model.vit.train_cam=class_attention"]}
# ACR Table 3, VOC train: CAM, mask (ViT rows); the paper does not say which map ACR decomposed
PAPER = {"mctformer": (61.7, 69.1), "acr_vit": (65.5, 70.9), "acr_vit_class_attention": (65.5, 70.9)}
SCORES = ("cam_miou", "precision", "recall", "threshold")
# level -> (model.vit.cam, model.vit.affinity_refine): the paper's two levels, then the fused map's factors apart
LEVELS = {"cam": ("fused", False), "refined": ("fused", True), "class_attention": ("class_attention", False),
          "class_attention_refined": ("class_attention", True), "patchcam": ("patchcam", False)}


def score(cfg, checkpoint: Path) -> dict:
    """The checkpoint's classifier on eval.split at every level of LEVELS (one process)."""
    uri, manifest = ensure_shards(cfg, [cfg.eval.split], progress=False)
    model, _ = load_classifier(checkpoint)
    out = {}
    for level, (cam, refine) in LEVELS.items():
        model.cam, model.affinity_refine = cam, refine
        result, _ = evaluate_split(model, cfg, EvalRows(uri, manifest, cfg.eval.split), uri, 0, 1,
                                   torch.device("cpu"))
        out[level] = {k: result[k] for k in SCORES}
    return out


def run_row(name: str, seed: int, epochs: int, work: Path, extra: list[str]) -> dict:
    cfg = load_config(REPO / "configs/demo_vit.yaml", ROWS[name] + [f"train.seed={seed}", f"train.epochs={epochs}",
                                                                      "train.log_every_steps=0", *extra])
    t = time.perf_counter()
    session = run_local(cfg, work / f"{name}-{seed}")
    seconds = time.perf_counter() - t
    ckpt = session.last_checkpoint
    out = {"seconds": seconds, "images_per_second": session.reports[-1].get("images_per_second"),
           "loss_cls": session.reports[-1].get("cu/loss_cls"), **score(cfg, ckpt)}
    print(f"  {name} seed {seed}: " + ", ".join(f"{level} {out[level]['cam_miou']:.4f}" for level in LEVELS)
          + f" ({seconds:.0f} s)", flush=True)
    return out


STEP_ROWS = {  # classifier backbone -> overrides of configs/demo.yaml (128 px, batch 8, the demo's reconstructor)
    "resnet18 (demo.yaml)": [],
    "resnet38d": ["model.backbone=resnet38d", "model.output_stride=8"],
    "deit_tiny (demo_vit.yaml)": ["--vit"],
    "deit_small": ["--vit", "model.backbone=deit_small"],
}


def step_row(overrides: list[str], steps: int) -> dict:

    vit = "--vit" in overrides
    cfg = load_config(REPO / ("configs/demo_vit.yaml" if vit else "configs/demo.yaml"),
                      [o for o in overrides if o != "--vit"] + ["model.pretrained=null", "train.precision=fp32",
                                                                 "model.vit.encoder_pretrained=null"])
    batch = cfg.train.batch_size
    cls, rec, oc, orr = models(cfg)
    b = tiny_batch(cfg, batch)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        train_step(cls, rec, oc, orr, b, cfg, 0.5, 100, StepCounters(), lambda x: x, torch.device("cpu"))
        times.append(time.perf_counter() - t)
    s = float(np.median(times[1:]))
    flops = acr_flops_per_image(cfg, batch)
    return {"seconds_per_step": s, "images_per_second": batch / s, "gflop_per_image": flops / 1e9,
            "gflop_per_second": flops * batch / s / 1e9}


def mean_std(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"Budget: configs/demo_vit.yaml (DeiT-Ti/16 MCTformer-v2 from its stand-in, 128 px, 320 train images), "
             f"{result['epochs']} epochs per run, seeds {seeds}; CAM mIoU on the 96 val images (mean ± std).\n",
             "| row | CAM mIoU (%) | P / R | refined mIoU (%) | P / R | paper CAM / mask (VOC train) |",
             "|---|---|---|---|---|---|"]
    for name, runs in result["runs"].items():
        cells = []
        for level in ("cam", "refined"):
            vals = [r[level] for r in runs]
            cells += [mean_std([v["cam_miou"] for v in vals]),
                      f"{np.mean([v['precision'] for v in vals]):.3f} / {np.mean([v['recall'] for v in vals]):.3f}"]
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {PAPER[name][0]} / {PAPER[name][1]} |")
    lines += ["", "The fused map's factors scored apart (mIoU %, mean ± std; best background threshold, mean) and the "
              "last epoch's L_cls (the sum of MCTformer's two BCEs):", "",
              "| row | class-to-patch attention | refined | PatchCAM | fused | L_cls |", "|---|---|---|---|---|---|"]
    for name, runs in result["runs"].items():
        cells = [f"{mean_std([r[lv]['cam_miou'] for r in runs])} (t {np.mean([r[lv]['threshold'] for r in runs]):.2f})"
                 for lv in ("class_attention", "class_attention_refined", "patchcam", "cam")]
        losses = [r["loss_cls"] for r in runs if r.get("loss_cls") is not None]
        loss = f"{np.mean(losses):.3f}" if losses else "-"
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {loss} |")
    lines += ["", f"One ACR iteration (RU + CU), batch 8, 128x128, fp32, {torch.get_num_threads()} threads, the demo's "
              "reconstructor (its encoder: the classifier's backbone for the ResNets, ResNet-18 for the ViTs), median of the "
              "timed steps:", "",
              "| classifier | s/step | images/s | GFLOP/image | GFLOP/s |", "|---|---|---|---|---|"]
    for name, r in result["steps"].items():
        lines.append(f"| {name} | {r['seconds_per_step']:.2f} | {r['images_per_second']:.2f} | "
                     f"{r['gflop_per_image']:.1f} | {r['gflop_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (configs/demo_vit.yaml: 3)")
    ap.add_argument("--steps", type=int, default=3, help="timed iterations per step-table row (after one warm-up)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo_vit.yaml for every run")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: [run_row(name, s, args.epochs, Path(tmp), args.overrides) for s in args.seeds] for name in ROWS}
    steps = {name: step_row(o, args.steps) for name, o in STEP_ROWS.items()}
    result = {"commit": commit(), "machine": machine(), "seeds": args.seeds, "epochs": args.epochs,
              "minutes": (time.perf_counter() - t) / 60, "runs": runs, "steps": steps,
              "command": " ".join(["python", "experiments/vit.py", *sys.argv[1:]])}
    out = REPO / "benchmarks" / "results" / "vit.json"
    out.write_text(json.dumps(result, indent=1))
    text = markdown(result)
    write_benchmarks_md("vit", f"Command: `{result['command']}` (commit {result['commit']}, "
                               f"{result['minutes']:.0f} min).\n\n" + text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
