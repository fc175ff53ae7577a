"""Which target maps does ACR's adversarial objective reward? A diagnosis of issue 3 on the embedded benchmark.

    python experiments/cu_objective.py                       # trains the two seed-0 ACR runs it needs (~5 min), then scores
    python experiments/cu_objective.py --checkpoint DIR ...  # score given ACR checkpoints instead (no training)

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
Results: benchmarks/results/cu_objective.json (cu_objective_<N>_epochs.json for --epochs N) and the matching "CU
objective" section of BENCHMARKS.md.
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

from acr.checkpoint import load_networks  # noqa: E402
from acr.config import load_config, num_classes  # noqa: E402
from acr.data.sources import dataset_root  # noqa: E402
from acr.data.transforms import to_chw_normalized  # noqa: E402
from acr.data.voc import load_image, load_mask, read_voc_split  # noqa: E402
from acr.method.acr import adversarial_losses, classification_loss, normalize_cam, target_cam  # noqa: E402
from experiments.ablations import EXTRA, RUN_KEYS, pretrained_backbone, train  # noqa: E402
from benchmarks.common import commit, machine, write_benchmarks_md  # noqa: E402

CANDIDATES = ("cam", "cam_within_object", "cam_plus_object", "object", "cam_widened", "everything")
TERMS, METRICS = ("J_t", "J_nt", "J"), ("precision", "recall", "IoU")
REGIONS = ("object, cam < 0.5", "object, cam >= 0.5", "other objects", "background")
# The runs trained by default (seed 0, the ablations' budget and backbone): the baseline (for its CAM scores only), ACR
# with the released settings, ACR whose reconstructor learns to auto-encode (EXTRA row `adversarial_srf_ae_encoder`),
# and ACR with ten times the released CU weights (0.8 / 0.3).
RUNS = {"baseline": ["method.reconstructor=none"], "adversarial_srf": [],
        "adversarial_srf_ae_encoder": EXTRA["adversarial_srf_ae_encoder"],
        "adversarial_srf_cu_x10": ["method.cu_target_weight=8", "method.cu_nontarget_weight=3"]}


def load_frozen(checkpoint: Path):
    cls, rec, cfg = load_networks(checkpoint, reconstructor=True)
    return cls.requires_grad_(False), rec.requires_grad_(False), cfg


def load_image_tensor(record) -> torch.Tensor:
    return torch.from_numpy(to_chw_normalized(load_image(record.image_path)))


def adversarial_objective(losses: dict[str, torch.Tensor], mcfg) -> dict[str, torch.Tensor]:
    """What the classifier maximises in Eq. 14 besides -L_cls: J_t = -λ_t L_t^CU, J_nt = -λ_nt L_nt^CU, J = their
    sum (a term whose weight is 0 is absent from `losses` and counts 0)."""
    zero = next(iter(losses.values())).new_zeros(()) if losses else torch.zeros(())
    out = {"J_t": -mcfg.cu_target_weight * losses.get("t", zero),
           "J_nt": -mcfg.cu_nontarget_weight * losses.get("nt", zero)}
    out["J"] = out["J_t"] + out["J_nt"]
    return out


def candidates(cam_map: torch.Tensor, obj: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"cam": cam_map, "cam_within_object": cam_map * obj, "cam_plus_object": torch.maximum(cam_map, obj),
            "object": obj, "cam_widened": cam_map.clamp_min(0) ** 0.25, "everything": torch.ones_like(cam_map)}


def objective(rec, x, image, a, cam, target, mcfg) -> tuple[torch.Tensor, dict[str, float]]:
    """J(A) (see `adversarial_objective`) and the unweighted reconstruction errors ℓ_t = -L_t^CU, ℓ_nt = -L_nt^CU."""
    losses = adversarial_losses(rec, x, image, a, cam, target, mcfg)
    return adversarial_objective(losses, mcfg)["J"], {k: -float(losses[k].detach()) if k in losses else 0.0
                                                      for k in ("t", "nt")}


def score(checkpoint: Path, max_images: int | None) -> dict:
    cls, rec, cfg = load_frozen(checkpoint)
    mcfg, n_cls = cfg.method, num_classes(cfg)
    records = read_voc_split(dataset_root(cfg), cfg.eval.split, n_cls, require_masks=True)[:max_images]
    per = {c: {"j": [], "t": [], "nt": []} for c in CANDIDATES}
    grads = {r: [] for r in REGIONS}
    cosines = {(term, metric): [] for term in TERMS for metric in METRICS}
    for record in records:
        image = load_image_tensor(record)[None]
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
        image = torch.stack([load_image_tensor(r) for r in chunk])
        labels = torch.stack([torch.from_numpy(r.label_vector(n_cls)) for r in chunk])
        target = torch.tensor([r.classes[0] for r in chunk])
        with torch.no_grad():
            _, x = rec.encode(image)
        cam, logits = cls(image)
        loss_cls = classification_loss(logits, labels)
        losses = adversarial_losses(rec, x, image, target_cam(normalize_cam(cam), labels, target), cam, target, mcfg)
        loss_adv = -adversarial_objective(losses, mcfg)["J"]
        g_cls = torch.cat([g.flatten() for g in torch.autograd.grad(loss_cls, params, retain_graph=True)])
        g_adv = torch.cat([g.flatten() for g in torch.autograd.grad(loss_adv, params)])
        rows.append((len(chunk), float(loss_cls), float(g_cls.norm()), float(g_adv.norm()),
                     float(g_cls @ g_adv / (g_cls.norm() * g_adv.norm()).clamp_min(1e-30))))
    cls.eval().requires_grad_(False)
    v = np.array(rows)
    return {"loss_cls": float(v[:, 1].mean()), "grad_norm_cls": float(v[:, 2].mean()),
            "grad_norm_adversarial": float(v[:, 3].mean()), "ratio": float((v[:, 3] / v[:, 2]).mean()),
            "cosine": float(v[:, 4].mean()), "batches": len(rows), "batch": int(v[:, 0].max())}


def gradient_alignment(rec, x, image, cam, labels, target, obj, valid, mcfg) -> dict[tuple[str, str], float]:
    """Cosine, in the space of the raw CAM Z (what the classifier's head outputs), between the gradient of each
    adversarial term the classifier ascends and the gradient of a soft localisation metric of A_t against the object:
    precision Σ A·O / Σ A, recall Σ A·O / Σ O, IoU Σ A·O / (Σ A + Σ O - Σ A·O) over non-void pixels. Positive: one CU
    step along that term moves the map towards better precision / recall / IoU. Undefined (nan) where a gradient is 0."""
    z = cam.detach().clone().requires_grad_(True)
    a = F.interpolate(target_cam(normalize_cam(z), labels, target), size=image.shape[-2:], mode="bilinear",
                      align_corners=False)
    losses = adversarial_losses(rec, x, image, a, z.detach(), target, mcfg)
    terms = adversarial_objective(losses, mcfg)
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


# A spread or shrunk CAM can have its best background threshold outside the default sweep (0.05-0.60): sweep wider.
PUSH_THRESHOLDS = "eval.thresholds=[0.02,0.98,0.01]"
# The CU validation masks of the push experiment: the released code's and the paper's (Eq. 12-13).
PUSH_MASKS = {"released": [], "paper": ["method.cu_target_mask=soft", "method.cu_nontarget_mask=cam"]}


def push(name: str, checkpoint: Path, base: list[str], work: Path, epochs: int, factors) -> dict[str, dict]:
    """Does a larger step along the adversarial gradient improve the CAMs? From a trained ACR run, fine-tune its
    classifier for `epochs` epochs against its own reconstructor, frozen (`method.reconstructor=pretrained`), with
    the CU weights (λ_t, λ_nt) multiplied by k, with the released and with the paper's validation masks; k = 0 is the
    control (L_cls alone, the same fine-tuning). The background threshold is swept over 0.02-0.98 here."""
    mcfg = load_config(REPO / "configs/demo.yaml", base + RUNS[name]).method
    out = {}
    for masks, mask_overrides in PUSH_MASKS.items():
        for k in factors:
            if k == 0 and masks != "released":
                continue  # with both weights 0 the masks do not matter: one control
            overrides = RUNS[name] + mask_overrides + [
                "method.reconstructor=pretrained", f"method.pretrained_reconstructor={checkpoint}",
                f"method.init_classifier={checkpoint}", f"train.epochs={epochs}", PUSH_THRESHOLDS,
                f"method.cu_target_weight={k * mcfg.cu_target_weight}",
                f"method.cu_nontarget_weight={k * mcfg.cu_nontarget_weight}"]
            final, _ = train(f"{name}_push_{masks}_x{k}", overrides, work, base)
            out[f"{masks} x{k}"] = {m: final[m] for m in ("cam_miou", "precision", "recall", "threshold")
                                    if m in final}
    return out


def trajectory(run_folder: Path, max_images: int | None) -> list[dict]:
    """The update share (see `update_share`) at every epoch's checkpoint of a run folder."""
    out = []
    for k, ckpt in enumerate(sorted(run_folder.glob("checkpoint_*")), start=1):
        cls, rec, cfg = load_frozen(ckpt)
        records = read_voc_split(dataset_root(cfg), cfg.eval.split, num_classes(cfg), require_masks=True)[:max_images]
        out.append({"checkpoint": k, **update_share(cls, rec, records, cfg.method, num_classes(cfg))})
    return out


def markdown(results: dict[str, dict], trained: dict[str, dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    out = ["| run | CAM mIoU | precision | recall | auto-encoding L1 | adversarial / L_cls gradient | "
           "cos(∇J_t, ∇precision) | cos(∇J_nt, ∇recall) | cos(∇J, ∇IoU) | J(object) > J(cam) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for run in trained | results:
        m, r = trained.get(run, {}), results.get(run)
        row = [f"`{run}`", f(100 * m["cam_miou"] if "cam_miou" in m else None, ".1f"), f(m.get("precision"), ".3f"),
               f(m.get("recall"), ".3f"), f(m.get("ru/loss_autoencode"), ".3f")]
        if r:
            al = r["alignment"]
            row += [f"{r['update_share']['ratio']:.3f}", *(f"{al[k]['mean_cosine']:+.2f}" for k in
                    ("J_t vs precision", "J_nt vs recall", "J vs IoU")), f"{100 * r['maps']['object']['above_cam']:.0f}%"]
        else:
            row += ["-"] * 5
        out.append("| " + " | ".join(row) + " |")
    for run, r in results.items():
        w = r["weights"]
        out += ["", f"`{run}` ({r['pairs']} (image, class) pairs of {r['images']} val images; λ_t {w['lambda_t']}, "
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
        out += ["", "| gradient at A = cam of | cosine with ∇precision | with ∇recall | with ∇IoU |", "|---|---|---|---|"]
        for term in TERMS:
            cells = [r["alignment"][f"{term} vs {m}"] for m in METRICS]
            out.append(f"| {term} | " + " | ".join(
                "-" if c["mean_cosine"] is None else f"{c['mean_cosine']:+.3f} ({100 * c['positive']:.0f}% > 0)"
                for c in cells) + " |")
        u = r["update_share"]
        out += ["", f"Classifier update (CU phase, {u['batches']} batches of {u['batch']} val images): L_cls "
                f"{u['loss_cls']:.4f}; gradient norm of L_cls {u['grad_norm_cls']:.3g}, of λ_t L_t + λ_nt L_nt "
                f"{u['grad_norm_adversarial']:.3g} (ratio {u['ratio']:.3f}, cosine {u['cosine']:+.2f})."]
    pushed = {run: r["push"] for run, r in results.items() if r.get("push")}
    for run, rows in pushed.items():
        out += ["", f"`{run}`'s classifier fine-tuned against its own reconstructor, frozen, with the CU weights x k "
                "(k = 0: L_cls alone, the control), with the released validation masks (V_t = 1[A == 0], V_nt = A "
                "where t is the top CAM class) and the paper's (V_t = 1 - A, V_nt = A); background threshold swept over "
                "0.02-0.98:", "",
                "| CU masks | k | CAM mIoU | precision | recall | threshold |", "|---|---|---|---|---|---|"]
        for key, m in rows.items():
            masks, k = key.split(" x")
            out.append(f"| {masks} | {k} | {100 * m['cam_miou']:.1f} | {m['precision']:.3f} | {m['recall']:.3f} | "
                       f"{m['threshold']:.2f} |")
    paths = {run: r["trajectory"] for run, r in results.items() if r.get("trajectory")}
    if paths:
        out += ["", "Adversarial / L_cls gradient norm ratio (and L_cls) at the end of each epoch:", "",
                "| epoch | " + " | ".join(f"`{run}`" for run in paths) + " |", "|---" * (len(paths) + 1) + "|"]
        for k in range(max(len(v) for v in paths.values())):
            out.append(f"| {k + 1} | " + " | ".join(
                f"{v[k]['ratio']:.3f} ({v[k]['loss_cls']:.4f})" if k < len(v) else "-" for v in paths.values()) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, nargs="*", default=None,
                    help="ACR checkpoint folders (or state.pt) to score, printed only; default: train seed-0 runs")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the runs it trains (4: the ablation budget)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs to train and score")
    ap.add_argument("--max-images", type=int, default=None, help="score the first N val images only")
    ap.add_argument("--push", nargs="*", default=["adversarial_srf_ae_encoder"], choices=list(RUNS)[1:],
                    help="ACR runs whose classifier is then fine-tuned against its frozen reconstructor (see push)")
    ap.add_argument("--push-epochs", type=int, default=4)
    ap.add_argument("--push-factors", type=float, nargs="+", default=[0, 1, 3, 10, 30])
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    results, trained = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            for ckpt in args.checkpoint:
                results[str(ckpt)] = score(Path(ckpt), args.max_images)
            print(markdown(results, {}), flush=True)
            return
        base = ["train.log_every_steps=0", "train.threads_per_worker=2", f"train.epochs={args.epochs}"]
        base += ["train.seed=0", f"model.pretrained={pretrained_backbone(10, base)}"]
        for name in args.runs:
            final, ckpt = train(name, RUNS[name], Path(tmp), base)
            trained[name] = {k: final[k] for k in RUN_KEYS if k in final}
            if name != "baseline":
                results[name] = {**score(Path(ckpt), args.max_images),
                                 "trajectory": trajectory(Path(ckpt).parent, 32)}
                print(markdown({name: results[name]}, trained), flush=True)
                if name in args.push:
                    results[name]["push"] = push(name, Path(ckpt), base, Path(tmp), args.push_epochs,
                                                 [int(k) if float(k).is_integer() else k for k in args.push_factors])
    payload = {"epochs": args.epochs, "trained": trained, "runs": results, "minutes": (time.perf_counter() - t0) / 60,
               "commit": commit(), "command": " ".join(["python", "experiments/cu_objective.py", *sys.argv[1:]]),
               "machine": machine()}
    suffix = "" if args.epochs == 4 else f"_{args.epochs}_epochs"
    (REPO / "benchmarks" / "results" / f"cu_objective{suffix}.json").write_text(json.dumps(payload, indent=1))
    text = markdown(results, trained)
    write_benchmarks_md(f"CU objective{suffix.replace('_', ' ')}",
                        f"Command: `{payload['command']}` (commit {payload['commit']}, {payload['minutes']:.0f} min; "
                        f"seed 0, {args.epochs} epochs per run, the ablations' data and backbone). "
                        + "\n\n".join(__doc__.split("\n\n")[2:]).strip() + "\n\n" + text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
