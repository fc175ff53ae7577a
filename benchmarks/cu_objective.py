"""Which target maps does ACR's adversarial objective reward? A diagnosis of issue 3 on the embedded benchmark.

    python benchmarks/cu_objective.py                       # trains the two seed-0 ACR runs it needs (~5 min), then scores
    python benchmarks/cu_objective.py --checkpoint DIR ...  # score given ACR checkpoints instead (no training)

In the classifier-updating phase the classifier maximises J(A) = λ_t ℓ_t(A) + λ_nt ℓ_nt(A), the reconstruction
errors of Eq. 12-13 (ℓ_t: the non-target pixels rebuilt from X ⊙ A; ℓ_nt: the target pixels rebuilt from
X ⊙ (1 - A)), against the trained, frozen reconstructor. ACR improves CAMs only if J is higher at better maps. For every
(val image, present class t), with a trained checkpoint's classifier and reconstructor, this scores J (through the
same function the training step uses, `acr.method.acr.adversarial_losses`) at target maps A_t built from the
classifier's own map and the ground truth:

* `cam`: the classifier's normalised CAM of t (single scale, as in training);
* `cam_within_object`: cam ⊙ object (its background activation removed: higher precision, the L_t term's claim);
* `cam_plus_object`: max(cam, object) (the uncovered rest of the object added: higher recall, the L_nt term's claim);
* `object`: the ground-truth mask of t;  `cam_widened`: cam^0.25 (same support, spread towards it);
* `everything`: A = 1.

It reports the mean of J and of each term, and how often a map scores above `cam`. It also reports the gradient
dJ/dA at A = cam (what one CU step does to the map), averaged over four regions: the target object where cam < 0.5
(what recall needs), the object where cam >= 0.5, other objects, and background (what precision must not gain).
Results: benchmarks/results/cu_objective.json and the "CU objective" section of BENCHMARKS.md.
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from acr.checkpoint import load_state  # noqa: E402
from acr.config import config_from_dict, num_classes  # noqa: E402
from acr.data.sources import dataset_root  # noqa: E402
from acr.data.transforms import to_chw_normalized  # noqa: E402
from acr.data.voc import load_image, load_mask, read_voc_split  # noqa: E402
from acr.method.acr import adversarial_losses, classification_loss, normalize_cam, target_cam  # noqa: E402
from acr.models.factory import build_classifier, build_reconstructor  # noqa: E402
from benchmarks.ablations import EXTRA, pretrained_backbone, train  # noqa: E402
from benchmarks.throughput import commit, machine, write_benchmarks_md  # noqa: E402

CANDIDATES = ("cam", "cam_within_object", "cam_plus_object", "object", "cam_widened", "everything")
TERMS, METRICS = ("J_t", "J_nt", "J"), ("precision", "recall", "IoU")
REGIONS = ("object, cam < 0.5", "object, cam >= 0.5", "other objects", "background")
# The two ACR runs scored by default (seed 0, the ablation budget): the released settings, and the reconstructor that
# learns to auto-encode (EXTRA row `adversarial_srf_ae_encoder`).
DEFAULT_RUNS = {"adversarial_srf": [], "adversarial_srf_ae_encoder": EXTRA["adversarial_srf_ae_encoder"]}


def load_networks(checkpoint: Path):
    state = load_state(checkpoint)
    cfg = config_from_dict(state["config"])
    if state.get("reconstructor") is None:
        raise ValueError(f"{checkpoint} holds no reconstructor: score an ACR run, not a baseline")
    cfg.model.pretrained = None  # every weight is in the checkpoint
    cls, rec = build_classifier(cfg), build_reconstructor(cfg)
    cls.load_state_dict(state["classifier"])
    rec.load_state_dict(state["reconstructor"])
    return cls.eval().requires_grad_(False), rec.eval().requires_grad_(False), cfg


def candidates(cam_map: torch.Tensor, obj: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"cam": cam_map, "cam_within_object": cam_map * obj, "cam_plus_object": torch.maximum(cam_map, obj),
            "object": obj, "cam_widened": cam_map.clamp_min(0) ** 0.25, "everything": torch.ones_like(cam_map)}


def objective(rec, x, image, a, cam, target, mcfg) -> tuple[torch.Tensor, dict[str, float]]:
    """J(A) = λ_t ℓ_t + λ_nt ℓ_nt, the part of -L^CU (Eq. 14) the classifier maximises, and its two terms."""
    losses = adversarial_losses(rec, x, image, a, cam, target, mcfg)
    terms = {"t": -losses["t"] if "t" in losses else a.new_zeros(()),
             "nt": -losses["nt"] if "nt" in losses else a.new_zeros(())}
    j = mcfg.cu_target_weight * terms["t"] + mcfg.cu_nontarget_weight * terms["nt"]
    return j, {k: float(v.detach()) for k, v in terms.items()}


def score(checkpoint: Path, max_images: int | None) -> dict:
    cls, rec, cfg = load_networks(checkpoint)
    mcfg, n_cls = cfg.method, num_classes(cfg)
    records = read_voc_split(dataset_root(cfg), cfg.eval.split, n_cls, require_masks=True)[:max_images]
    per = {c: {"j": [], "t": [], "nt": []} for c in CANDIDATES}
    grads = {r: [] for r in REGIONS}
    cosines = {(term, metric): [] for term in TERMS for metric in METRICS}
    for record in records:
        image = torch.from_numpy(to_chw_normalized(load_image(record.image_path)))[None]
        gt = torch.from_numpy(load_mask(record.mask_path, n_cls).astype(np.int64))
        labels = torch.from_numpy(record.label_vector(n_cls))[None]
        with torch.no_grad():
            cam, _ = cls(image)
            _, x = rec.encode(image)
        for t in record.classes:
            target = torch.tensor([t])
            a_small = target_cam(normalize_cam(cam), labels, target)
            cam_map = F.interpolate(a_small, size=image.shape[-2:], mode="bilinear", align_corners=False)
            obj = (gt == t + 1).float()[None, None]
            for name, a in candidates(cam_map, obj).items():
                a = a.clone().requires_grad_(name == "cam")
                j, terms = objective(rec, x, image, a, cam, target, mcfg)
                per[name]["j"].append(float(j.detach()))
                per[name]["t"].append(terms["t"])
                per[name]["nt"].append(terms["nt"])
                if name == "cam":  # dJ/dA per pixel, in units of the per-image L1 sum (x H W)
                    (g,) = torch.autograd.grad(j, a)
                    g = (g * g[0, 0].numel())[0, 0]
                    hot = cam_map[0, 0] >= 0.5
                    regions = {REGIONS[0]: (gt == t + 1) & ~hot, REGIONS[1]: (gt == t + 1) & hot,
                               REGIONS[2]: (gt > 0) & (gt <= n_cls) & (gt != t + 1), REGIONS[3]: gt == 0}
                    for r, m in regions.items():
                        if bool(m.any()):
                            grads[r].append(float(g[m].mean()))
            for pair, c in gradient_alignment(rec, x, image, cam, labels, target, obj, gt != 255, mcfg).items():
                cosines[pair].append(c)
    share = update_share(cls, rec, records, mcfg, n_cls)
    base = np.array(per["cam"]["j"])
    maps = {}
    for name, v in per.items():
        j = np.array(v["j"])
        maps[name] = {"J": float(j.mean()), "l_t": float(np.mean(v["t"])), "l_nt": float(np.mean(v["nt"])),
                      "above_cam": float((j > base + 1e-9).mean()) if name != "cam" else None}
    return {"checkpoint": str(checkpoint), "pairs": len(base), "images": len(records),
            "weights": {"lambda_t": mcfg.cu_target_weight, "lambda_nt": mcfg.cu_nontarget_weight},
            "masks": {"target": mcfg.cu_target_mask, "nontarget": mcfg.cu_nontarget_mask,
                      "normalization": mcfg.l1_normalization},
            "maps": maps, "gradient_at_cam": {r: {"mean": float(np.mean(v)) if v else None, "pairs": len(v),
                                                  "positive": float(np.mean(np.array(v) > 0)) if v else None}
                                              for r, v in grads.items()},
            "update_share": share,
            "alignment": {f"{term} vs {metric}": _summary(cosines[term, metric]) for term, metric in cosines}}


def _summary(values: list[float]) -> dict:
    v = np.array([c for c in values if np.isfinite(c)])
    return {"mean_cosine": float(v.mean()) if len(v) else None, "positive": float((v > 0).mean()) if len(v) else None,
            "pairs": int(len(v)), "undefined": int(len(values) - len(v))}


def update_share(cls, rec, records, mcfg, n_cls: int, batch: int = 16, batches: int = 2) -> dict:
    """How much of the classifier's CU update comes from the adversarial terms: over `batches` batches of val images
    (target = first present class), the norms of the batch gradients of L_cls and of λ_t L_t + λ_nt L_nt (Eq. 14)
    with respect to the classifier's trained parameters, their ratio and cosine. The classifier runs in train mode
    (as in the CU phase; dropout draws seeded), its frozen BatchNorm excluded as in training."""
    torch.manual_seed(0)
    cls.requires_grad_(True)
    cls.train()  # re-freezes BatchNorm where configured
    params = [q for q in cls.parameters() if q.requires_grad]
    rows = []
    for k in range(batches):
        chunk = records[k * batch:(k + 1) * batch]
        if not chunk:
            break
        image = torch.stack([torch.from_numpy(to_chw_normalized(load_image(r.image_path))) for r in chunk])
        labels = torch.stack([torch.from_numpy(r.label_vector(n_cls)) for r in chunk])
        target = torch.tensor([r.classes[0] for r in chunk])
        with torch.no_grad():
            _, x = rec.encode(image)
        cam, logits = cls(image)
        loss_cls = classification_loss(logits, labels)
        losses = adversarial_losses(rec, x, image, target_cam(normalize_cam(cam), labels, target), cam, target, mcfg)
        loss_adv = sum(w * losses[n] for w, n in ((mcfg.cu_target_weight, "t"), (mcfg.cu_nontarget_weight, "nt"))
                       if n in losses)
        g_cls = torch.cat([g.flatten() for g in torch.autograd.grad(loss_cls, params, retain_graph=True)])
        g_adv = torch.cat([g.flatten() for g in torch.autograd.grad(loss_adv, params)])
        rows.append((float(loss_cls), float(g_cls.norm()), float(g_adv.norm()),
                     float(g_cls @ g_adv / (g_cls.norm() * g_adv.norm()).clamp_min(1e-30))))
    cls.eval().requires_grad_(False)
    v = np.array(rows)
    return {"loss_cls": float(v[:, 0].mean()), "grad_norm_cls": float(v[:, 1].mean()),
            "grad_norm_adversarial": float(v[:, 2].mean()), "ratio": float((v[:, 2] / v[:, 1]).mean()),
            "cosine": float(v[:, 3].mean()), "batches": len(rows), "batch": batch}


def gradient_alignment(rec, x, image, cam, labels, target, obj, valid, mcfg) -> dict[tuple[str, str], float]:
    """Cosine, in the space of the raw CAM Z (what the classifier's head outputs), between the gradient of each
    adversarial term the classifier ascends and the gradient of a soft localisation metric of A_t against the object:
    precision Σ A·O / Σ A, recall Σ A·O / Σ O, IoU Σ A·O / (Σ A + Σ O - Σ A·O) over non-void pixels. Positive: one CU
    step along that term moves the map towards better precision / recall / IoU. Undefined (nan) where a gradient is 0."""
    z = cam.detach().clone().requires_grad_(True)
    a = F.interpolate(target_cam(normalize_cam(z), labels, target), size=image.shape[-2:], mode="bilinear",
                      align_corners=False)
    losses = adversarial_losses(rec, x, image, a, z.detach(), target, mcfg)
    zero = a.sum() * 0
    terms = {"J_t": -mcfg.cu_target_weight * losses.get("t", zero), "J_nt": -mcfg.cu_nontarget_weight * losses.get("nt", zero)}
    terms["J"] = terms["J_t"] + terms["J_nt"]
    v = valid.float()[None, None]
    inter, area, size = (a * obj * v).sum(), (a * v).sum(), (obj * v).sum()
    metrics = {"precision": inter / area.clamp_min(1e-6), "recall": inter / size.clamp_min(1e-6),
               "IoU": inter / (area + size - inter).clamp_min(1e-6)}
    flat = {}
    for name, value in {**terms, **metrics}.items():
        (g,) = torch.autograd.grad(value, z, retain_graph=True, allow_unused=True)
        flat[name] = torch.zeros(z[0, 0].numel()) if g is None else g[0, int(target)].flatten()
    out = {}
    for term in TERMS:
        for metric in METRICS:
            n = flat[term].norm() * flat[metric].norm()
            out[term, metric] = float(flat[term] @ flat[metric] / n) if n > 0 else float("nan")
    return out


def markdown(results: dict[str, dict]) -> str:
    out = []
    for run, r in results.items():
        w = r["weights"]
        out += [f"`{run}` ({r['pairs']} (image, class) pairs of {r['images']} val images; λ_t {w['lambda_t']}, "
                f"λ_nt {w['lambda_nt']}; V_t `{r['masks']['target']}`, V_nt `{r['masks']['nontarget']}`, "
                f"`{r['masks']['normalization']}`):", "",
                "| target map A | J (x1e3) | ℓ_t (x1e3) | ℓ_nt (x1e3) | pairs with J above `cam` |", "|---|---|---|---|---|"]
        for name, m in r["maps"].items():
            above = "-" if m["above_cam"] is None else f"{100 * m['above_cam']:.0f}%"
            out.append(f"| `{name}` | {1e3 * m['J']:.2f} | {1e3 * m['l_t']:.2f} | {1e3 * m['l_nt']:.2f} | {above} |")
        out += ["", "| region (A = cam) | mean dJ/dA (x HW) | pairs | pairs with dJ/dA > 0 |", "|---|---|---|---|"]
        for reg, g in r["gradient_at_cam"].items():
            if g["mean"] is not None:
                out.append(f"| {reg} | {g['mean']:+.4f} | {g['pairs']} | {100 * g['positive']:.0f}% |")
        out += ["", "| gradient of (A = cam) | cosine with ∇precision | with ∇recall | with ∇IoU |", "|---|---|---|---|"]
        for term in TERMS:
            cells = [r["alignment"][f"{term} vs {m}"] for m in METRICS]
            out.append(f"| {term} | " + " | ".join(
                "-" if c["mean_cosine"] is None else f"{c['mean_cosine']:+.3f} ({100 * c['positive']:.0f}% > 0)"
                for c in cells) + " |")
        u = r["update_share"]
        out += ["", f"Classifier update (CU phase, {u['batches']} batches of {u['batch']} val images): L_cls "
                f"{u['loss_cls']:.4f}; gradient norm of L_cls {u['grad_norm_cls']:.3g}, of λ_t L_t + λ_nt L_nt "
                f"{u['grad_norm_adversarial']:.3g} (ratio {u['ratio']:.2f}, cosine {u['cosine']:+.2f}).", ""]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, nargs="*", default=None,
                    help="ACR checkpoint folders (or state.pt) to score; default: train the seed-0 ablation runs")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the runs it trains (the ablation budget)")
    ap.add_argument("--max-images", type=int, default=None, help="score the first N val images only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            runs = {str(p): p for p in args.checkpoint}
        else:
            base = ["train.log_every_steps=0", "train.threads_per_worker=2", f"train.epochs={args.epochs}",
                    "train.seed=0"]
            base += [f"model.pretrained={pretrained_backbone(10, base[:3])}"]
            runs = {name: train(name, ov, Path(tmp), base)[1] for name, ov in DEFAULT_RUNS.items()}
        for name, ckpt in runs.items():
            results[name] = score(Path(ckpt), args.max_images)
            print(markdown({name: results[name]}), flush=True)
    payload = {"runs": results, "minutes": (time.perf_counter() - t0) / 60, "commit": commit(),
               "command": " ".join(["python", "benchmarks/cu_objective.py", *sys.argv[1:]]), "machine": machine()}
    if not args.checkpoint:  # the reproducible default writes the results; scoring ad-hoc checkpoints only prints
        out = REPO / "benchmarks" / "results" / "cu_objective.json"
        out.write_text(json.dumps(payload, indent=1))
        write_benchmarks_md("CU objective", f"Command: `{payload['command']}` (commit {payload['commit']}, "
                            f"{payload['minutes']:.0f} min). {__doc__.split(chr(10) + chr(10))[2].strip()}\n\n"
                            + markdown(results))


if __name__ == "__main__":
    main()
