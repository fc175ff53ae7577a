"""The pseudo-label job on Ray: CAMs -> dense CRF -> IRN -> masks (IRN's make_cam, cam_to_ir_label, train_irn,
make_sem_seg_labels), each stage a Ray Data pipeline over the split's Parquet shards, IRN trained with Ray Train.

    [1] cams       read_parquet -> map_batches(CamStage, actor pool: the classifier loaded once per actor)
    [2] seed eval  background threshold of the seed / +CRF levels (best on the ground truth, or configured)
    [3] refine     read_parquet -> map_batches(refine_rows, CPU tasks): +CRF level and IRN's confident labels
    [4] irn        TorchTrainer: IRN's class-boundary branch on the classifier's frozen backbone, one Ray Data
                   dataset per epoch (random rescale / flip / crop seeded by (seed, epoch, image))
    [5] masks      read_parquet -> map_batches(WalkStage, actor pool): boundary map, random walk, masks
    [6] evaluation seed, +CRF and mask mIoU / precision / recall where ground truth exists (Table 3), overlays

Every stage writes one file per image (acr.refine.pseudo) and skips images whose file exists, so a rerun resumes.
The output folder must be visible to every node (NFS or one machine): actors on any node write into it.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from acr.checkpoint import STATE_FILE, load_classifier, load_state, save_state
from acr.config import Config, ConfigError, apply_overrides, num_classes, to_dict
from acr.data.ingest import EvalRows
from acr.data.shards import ShardReader, decode_image_bytes, decode_mask_bytes, iter_split_rows
from acr.data.sources import ensure_shards
from acr.data.transforms import to_chw_normalized
from acr.data.voc import DataError
from acr.distributed.trainer import init_ray, local_num_cpus, root_cause
from acr.metrics import confusion_matrix, scores, thresholds_from, threshold_sweep_confusion
from acr.refine import pseudo
from acr.refine.crf import CRF_PRESETS

IRN_FILE = "irn.pt"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rows_of(reader, batch: dict, order: np.ndarray | None = None, columns=("id", "index", "image", "labels")):
    """The rows (dicts of `columns`) of a Ray Data batch of positions (`id` column of ray.data.range), read from the
    split's shards by index; position p stands for image order[p] of the split where an order is given."""
    positions = np.asarray(batch["id"], np.int64)
    yield from reader.read(reader.index.indices[positions if order is None else order[positions]], columns)


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which a training epoch of a batch job's network (IRN, DeepLab) visits the split's images."""
    from acr.data.ingest import epoch_permutation

    return epoch_permutation(num_images, seed, epoch)


def each_missing(reader, batch: dict, out: Path, kinds: tuple[str, ...], where: str, make) -> dict:
    """Calls make(image_id, raw image, labels) for each row of the batch whose `kinds` files are not all there;
    returns the stage's per-image status ("done" or "kept")."""
    ids, status = [], []
    for rec in rows_of(reader, batch):
        image_id = rec["id"]
        ids.append(image_id)
        if all(pseudo.is_done(out, k, image_id) for k in kinds):
            status.append("kept")
            continue
        make(image_id, decode_image_bytes(rec["image"], f"image '{image_id}' of {where}"), np.asarray(rec["labels"]))
        status.append("done")
    return {"id": np.array(ids, dtype=object), "status": np.array(status, dtype=object)}


class CamStage:
    """[1] Multi-scale + flip CAMs of each image's labelled classes -> cams/<id>.npz."""

    def __init__(self, checkpoint: str, out: str, scales: list[float], flip: bool, shards: tuple, where: str):
        from acr.cam import infer_cams

        self.infer, self.device = infer_cams, _device()
        self.model, _ = load_classifier(checkpoint, self.device)
        self.reader = ShardReader(*shards)
        self.out, self.scales, self.flip, self.where = Path(out), scales, flip, where

    def __call__(self, batch: dict) -> dict:
        return each_missing(self.reader, batch, self.out, (pseudo.CAMS,), self.where, self._cams)

    def _cams(self, image_id: str, raw: np.ndarray, labels: np.ndarray) -> None:
        image = torch.from_numpy(to_chw_normalized(raw)).to(self.device)
        lab = torch.from_numpy(labels.astype(np.float32)).to(self.device)
        cams = self.infer(self.model, image, lab, self.scales, self.flip).float().cpu().numpy()
        keys = np.nonzero(labels > 0)[0]
        pseudo.save_cams(pseudo.output_path(self.out, pseudo.CAMS, image_id), cams[keys], keys)


def refine_rows(batch: dict, out: str, threshold: float, crf: str, fg: float, bg: float, num_classes: int,
                shards: tuple, where: str) -> dict:
    """[3] The +CRF level (crf/<id>.png) and IRN's confident labels (ir_labels/<id>.png) of each image."""
    out = Path(out)

    def refine(image_id: str, raw: np.ndarray, _) -> None:
        cams, keys = pseudo.load_cams(pseudo.output_path(out, pseudo.CAMS, image_id))
        pseudo.write_label_png(pseudo.output_path(out, pseudo.CRF, image_id),
                               pseudo.crf_labels(raw, cams, keys, threshold, CRF_PRESETS[crf]))
        pseudo.write_label_png(pseudo.output_path(out, pseudo.IR_LABELS, image_id),
                               pseudo.ir_labels(raw, cams, keys, num_classes, fg, bg))

    return each_missing(ShardReader(*shards), batch, out, (pseudo.CRF, pseudo.IR_LABELS), where, refine)


def irn_samples(batch: dict, out: str, crop: int, resize_range: list[float], seed: int, epoch: int, total: int,
                shards: tuple, where: str) -> dict:
    """[4] IRN's training crops: image and confident labels rescaled by a random factor, flipped, cropped to `crop`
    (padding: image 0 after normalisation, label 255), the label taken at stride 4. Seeded by (seed, epoch, id);
    the epoch visits the job's `total` images in a permuted order."""
    from acr.data.transforms import scale_flip_crop_pair

    images, labels = [], []
    reader = ShardReader(*shards)
    for rec in rows_of(reader, batch, epoch_order(total, seed, epoch)):
        image_id = rec["id"]
        rng = np.random.default_rng([seed, epoch, zlib.crc32(image_id.encode())])
        raw = decode_image_bytes(rec["image"], f"image '{image_id}' of {where}")
        label = pseudo.read_label_png(pseudo.output_path(Path(out), pseudo.IR_LABELS, image_id))
        image, lab = scale_flip_crop_pair(raw, label, rng, resize_range, crop)
        images.append(image)
        labels.append(lab[::4, ::4])
    return {"image": np.stack(images) if images else np.zeros((0, 3, crop, crop), np.float32),
            "label": np.stack(labels) if labels else np.zeros((0, crop // 4, crop // 4), np.uint8)}


def build_irn(cfg: Config, checkpoint: str | None = None, device: torch.device | str = "cpu"):
    """IRN's boundary branch on the classifier's backbone (taken from `checkpoint`, frozen)."""
    from acr.models.backbones import build_backbone
    from acr.refine.irn import IRNet

    backbone = build_backbone(cfg.model.backbone, cfg.model.output_stride, dropout=False)
    if checkpoint is not None:
        state = load_state(checkpoint)["classifier"]
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                                  if k.startswith("backbone.")})
    return IRNet(backbone, cfg.pseudo.irn_width).to(device)


def irn_train_loop(config: dict) -> None:
    """[4] Per worker: SGD with IRN's poly learning rate (power 0.9, no momentum: IRN's PolyOptimizer) on the
    class-boundary loss over pairs within `pseudo.irn_radius`; rank 0 writes irn.pt and the loss history."""
    from acr.config import config_from_dict
    from acr.refine.irn import affinity_labels, boundary_loss, path_affinity, path_offsets

    cfg = config_from_dict(config["config"])
    ps = cfg.pseudo
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    irn = build_irn(cfg, config["checkpoint"], device)
    params = [p for p in irn.parameters() if p.requires_grad]
    model = ray.train.torch.prepare_model(irn, move_to_device=device)
    opt = torch.optim.SGD(params, lr=ps.irn_lr, weight_decay=ps.irn_weight_decay)
    per_worker = max(1, ps.irn_batch_size // ctx.get_world_size())
    total_steps = max(1, ps.irn_epochs * math.ceil(config["num_images"] / ps.irn_batch_size))
    offsets = path_offsets(ps.irn_radius)
    history, step = [], 0
    for epoch in range(ps.irn_epochs):
        losses = []
        for batch in ray.train.get_dataset_shard(f"epoch{epoch}").iter_torch_batches(batch_size=per_worker,
                                                                                    device=device):
            for g in opt.param_groups:
                g["lr"] = ps.irn_lr * (1 - min(step, total_steps - 1) / total_steps) ** 0.9
            model.train()
            edge = model(batch["image"])
            loss = boundary_loss(path_affinity(edge, offsets), *affinity_labels(batch["label"].long(), offsets))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"IRN loss is {loss.item()} at epoch {epoch + 1}, step {step}: stopped "
                                         "(no irn.pt written); lower pseudo.irn_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None, "steps": len(losses)})
        if ctx.get_world_rank() == 0:
            print(f"IRN epoch {epoch + 1}/{ps.irn_epochs}: boundary loss {history[-1]['loss']}", flush=True)
        ray.train.report({"epoch": epoch + 1, "loss": history[-1]["loss"]})
    if ctx.get_world_rank() == 0:
        inner = model.module if hasattr(model, "module") else model
        save_state(Path(config["out"]) / "irn", {"irn": inner.state_dict(), "history": history})
        (Path(config["out"]) / "irn" / "history.json").write_text(json.dumps(history))


class WalkStage:
    """[5] Boundary map, random walk and the final mask of each image -> masks/<id>.png."""

    def __init__(self, cfg_dict: dict, out: str, shards: tuple, where: str):
        from acr.config import config_from_dict

        self.cfg, self.device = config_from_dict(cfg_dict), _device()
        self.out, self.reader, self.where = Path(out), ShardReader(*shards), where
        self.irn = build_irn(self.cfg, None, self.device)
        self.irn.load_state_dict(load_state(self.out / "irn")["irn"])

    def __call__(self, batch: dict) -> dict:
        return each_missing(self.reader, batch, self.out, (pseudo.MASKS,), self.where, self._mask)

    def _mask(self, image_id: str, raw: np.ndarray, _) -> None:
        ps = self.cfg.pseudo
        cams, keys = pseudo.load_cams(pseudo.output_path(self.out, pseudo.CAMS, image_id))
        image = torch.from_numpy(to_chw_normalized(raw)).to(self.device)
        mask = pseudo.walk_labels(self.irn, image, cams, keys, ps.beta, ps.exp_times, ps.walk_radius,
                                  ps.cam_power, ps.sem_seg_bg_threshold)
        pseudo.write_label_png(pseudo.output_path(self.out, pseudo.MASKS, image_id), mask)


# ----------------------------------------------------------------------------------------------------------------
# The driver


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, its state.pt, a train.py output folder or a tune.py one."""
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.name == STATE_FILE:
        return p.parent
    if (p / STATE_FILE).is_file():
        return p
    summary = p / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        for key in ("best_checkpoint", "checkpoint"):
            if s.get(key):
                return resolve_checkpoint(s[key])
        raise ConfigError(f"pseudo.checkpoint={path}: its summary.json names no checkpoint (best_checkpoint or "
                          "checkpoint)")
    raise ConfigError(f"pseudo.checkpoint={path}: not a checkpoint folder, a state.pt, nor a train.py / tune.py "
                      "output folder with a summary.json")


def positions(total: int):
    """The job's images as a Ray Data range of positions (blocks of 4: every actor of a pool gets work at once);
    each stage reads its rows by index from the shards (one row group per image)."""
    ds = ray.data.range(total, override_num_blocks=max(1, min(-(-total // 4), 5000)))
    ds.context.enable_progress_bars = False  # each stage shows one tqdm bar in images instead
    return ds


def split_ids(uri: str, manifest: dict, split: str, max_images: int | None) -> list[str]:
    """The ids of the job's images (only the id and index columns are read)."""
    return [row["id"] for _, row in iter_split_rows(uri, manifest, split, ["id", "index"])
            if max_images is None or row["index"] < max_images]


def run_stage(name: str, make_ds, out: Path, ids: list[str], kinds: tuple[str, ...]) -> dict:
    """Run a stage over the images whose `kinds` files are missing (none missing: not even started), consuming its
    dataset with a progress bar; counts of images done and kept (already complete)."""
    missing = sum(not all(pseudo.is_done(out, k, i) for k in kinds) for i in ids)
    if not missing:
        return {"done": 0, "kept": len(ids), "seconds": 0.0}
    ds, total = make_ds(), len(ids)
    counts = {"done": 0, "kept": 0}
    t0 = time.perf_counter()
    with tqdm(total=total, desc=name, unit="img", mininterval=2) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for s in batch["status"]:
                counts[str(s)] += 1
            bar.update(len(batch["status"]))
    counts["seconds"] = round(time.perf_counter() - t0, 2)
    return counts


def gt_rows(uri: str, manifest: dict, split: str, max_images: int | None, n_classes: int):
    for row in EvalRows(uri, manifest, split).iter_rows():
        if max_images is not None and row["index"] >= max_images:
            continue
        if row.get("mask") is not None:
            yield row["id"], decode_mask_bytes(row["mask"], f"mask of '{row['id']}' in {uri}", n_classes), row


def seed_sweep(out: Path, uri: str, manifest: dict, split: str, max_images: int | None, n_classes: int,
               thresholds: np.ndarray) -> tuple[np.ndarray, int]:
    """[2] Confusion matrices of the seed level at every background threshold, summed over the labelled images."""
    sweep, n = np.zeros((len(thresholds), n_classes + 1, n_classes + 1), np.int64), 0
    for image_id, gt, _ in gt_rows(uri, manifest, split, max_images, n_classes):
        cams, keys = pseudo.load_cams(pseudo.output_path(out, pseudo.CAMS, image_id))
        sweep += threshold_sweep_confusion(pseudo.full_cams(cams, keys, n_classes), gt, thresholds)
        n += 1
    return sweep, n


def evaluate_levels(out: Path, uri: str, manifest: dict, split: str, max_images: int | None, n_classes: int,
                    threshold: float, overlays: int) -> tuple[dict, list[dict]]:
    """[6] Table 3's levels on the labelled images: seed (at `threshold`), +CRF, mask; plus the confident labels'
    coverage and precision (IRN's training targets)."""
    n = n_classes + 1
    conf = {k: np.zeros((n, n), np.int64) for k in ("seed", "crf", "mask", "ir")}
    items = []
    for image_id, gt, row in gt_rows(uri, manifest, split, max_images, n_classes):
        cams, keys = pseudo.load_cams(pseudo.output_path(out, pseudo.CAMS, image_id))
        maps = {"seed": pseudo.seed_labels(cams, keys, threshold),
                "crf": pseudo.read_label_png(pseudo.output_path(out, pseudo.CRF, image_id)),
                "mask": pseudo.read_label_png(pseudo.output_path(out, pseudo.MASKS, image_id)),
                "ir": pseudo.read_label_png(pseudo.output_path(out, pseudo.IR_LABELS, image_id))}
        for k, m in maps.items():
            if m.shape != gt.shape:
                raise DataError(f"{pseudo.output_path(out, k, image_id)}: {m.shape} but the image is {gt.shape}")
            pred, g = (m, gt) if k != "ir" else (np.where(m == 255, 0, m), np.where(m == 255, 255, gt))
            conf[k] += confusion_matrix(pred, g, n)
        if len(items) < overlays:
            items.append({"id": image_id, "raw": decode_image_bytes(row["image"], image_id), "gt": gt, **maps})
    result = {}
    for k in ("seed", "crf", "mask"):
        s = scores(conf[k])
        result.update({f"{k}_miou": s["miou"], f"{k}_precision": s["precision"], f"{k}_recall": s["recall"],
                       f"{k}_per_class_iou": s["iou"]})
    labelled = conf["ir"].sum()
    result["ir_label_confident_pixels"] = int(labelled)
    result["ir_label_pixel_accuracy"] = float(np.trace(conf["ir"]) / labelled) if labelled else None
    return result, items


def job_config(cfg: Config, overrides: dict) -> Config:
    """The job's config: the checkpoint's training config with the job's `pseudo.*` (and any other) overrides."""
    ckpt = resolve_checkpoint(cfg.pseudo.checkpoint) if cfg.pseudo.checkpoint else None
    if ckpt is None:
        raise ConfigError("pseudo.checkpoint is required (a checkpoint, train.py or tune.py output folder)")
    from acr.config import config_from_dict

    trained = config_from_dict(load_state(ckpt)["config"])
    merged = apply_overrides(trained, {**overrides, "pseudo.checkpoint": str(ckpt)}, source="the command line")
    if merged.pseudo.crf not in CRF_PRESETS:
        raise ConfigError(f"pseudo.crf='{merged.pseudo.crf}' is not one of {sorted(CRF_PRESETS)}")
    return merged


def run_pseudo_labels(cfg: Config, out: str | Path) -> dict:
    """Run (or resume) the job in `out` and write `out/summary.json` (and `table3.md`, `levels.png`)."""
    from acr.viz import save_level_overlays

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ps, n_classes = cfg.pseudo, num_classes(cfg)
    ckpt = str(resolve_checkpoint(ps.checkpoint))
    uri, manifest = ensure_shards(apply_overrides(cfg, {"eval.enabled": False}), [ps.split])
    ids = split_ids(uri, manifest, ps.split, ps.max_images)
    total, shards = len(ids), (uri, manifest, ps.split)
    where = f"the {ps.split} shards in {uri}"
    if not cfg.ray.num_cpus and not (cfg.ray.address):
        need = int(math.ceil(ps.actors * ps.actor_cpus)) + 1
        cfg = apply_overrides(cfg, {"ray.num_cpus": max(local_num_cpus(cfg), need)})
    init_ray(cfg)
    summary = {"checkpoint": ckpt, "split": ps.split, "num_images": total, "shards": uri, "stages": {}}
    stages = summary["stages"]
    actor = dict(compute=ray.data.ActorPoolStrategy(size=ps.actors), num_cpus=ps.actor_cpus, batch_size=4,
                 num_gpus=1 if cfg.scaling.use_gpu else 0)
    try:
        # [1] CAMs
        stages["cams"] = run_stage("cams", lambda: positions(total).map_batches(
            CamStage, fn_constructor_kwargs=dict(checkpoint=ckpt, out=str(out), scales=ps.scales, flip=ps.flip,
                                                 shards=shards, where=where), **actor),
            out, ids, (pseudo.CAMS,))
        # [2] the seed level's background threshold
        thresholds = thresholds_from(cfg.eval.thresholds)
        t0 = time.perf_counter()
        sweep, n_gt = seed_sweep(out, uri, manifest, ps.split, ps.max_images, n_classes, thresholds)
        stages["seed_sweep"] = {"seconds": round(time.perf_counter() - t0, 2)}
        summary["images_with_ground_truth"] = n_gt
        if ps.seed_threshold is not None:
            threshold, source = ps.seed_threshold, "pseudo.seed_threshold"
        elif n_gt:
            per_t = [scores(c)["miou"] for c in sweep]
            threshold, source = float(thresholds[int(np.argmax(per_t))]), "best of eval.thresholds on the ground truth"
            summary["seed_sweep"] = {"thresholds": thresholds.tolist(), "miou": per_t}
        else:
            raise ConfigError(f"split '{ps.split}' has no ground truth to choose the seed threshold: set "
                              "pseudo.seed_threshold")
        summary.update({"seed_threshold": threshold, "seed_threshold_source": source})
        check_stage_params(out, {"seed_threshold": threshold, "crf": ps.crf, "conf_fg_threshold": ps.conf_fg_threshold,
                                  "conf_bg_threshold": ps.conf_bg_threshold}, "refine",
                           f"{out / pseudo.CRF} and {out / pseudo.IR_LABELS}")
        # [3] +CRF level and confident labels
        stages["refine"] = run_stage("crf + confident labels", lambda: positions(total).map_batches(
            refine_rows, fn_kwargs=dict(out=str(out), threshold=threshold, crf=ps.crf, fg=ps.conf_fg_threshold,
                                        bg=ps.conf_bg_threshold, num_classes=n_classes, shards=shards,
                                        where=where), batch_size=4, num_cpus=ps.actor_cpus),
            out, ids, (pseudo.CRF, pseudo.IR_LABELS))
        # [4] IRN
        stages["irn"] = train_irn(cfg, out, ckpt, uri, manifest, total, where)
        # [5] masks
        stages["masks"] = run_stage("masks", lambda: positions(total).map_batches(
            WalkStage, fn_constructor_kwargs=dict(cfg_dict=to_dict(cfg), out=str(out), shards=shards, where=where),
            **actor), out, ids, (pseudo.MASKS,))
    except Exception as exc:  # Ray wraps the stage's own error (a DataError naming the image): show that one
        cause = root_cause(exc)
        if cause is exc:
            raise
        raise cause from exc
    # [6] evaluation
    t0 = time.perf_counter()
    if n_gt:
        levels, items = evaluate_levels(out, uri, manifest, ps.split, ps.max_images, n_classes, threshold,
                                        ps.overlays)
        summary.update(levels)
        save_level_overlays(out / "levels.png", items, threshold)
        (out / "table3.md").write_text(table3(summary))
    stages["evaluation"] = {"seconds": round(time.perf_counter() - t0, 2)}
    summary["config"] = to_dict(cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def check_stage_params(out: Path, params: dict, stage: str, made: str) -> None:
    """Files of a stage made with other parameters are not reused silently: the rerun stops, naming the key and
    what to delete (`made`) to redo the stage."""
    path = out / f"{stage}_params.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for k, v in params.items():
            if old.get(k) != v:
                raise ConfigError(f"{out} holds the {stage} stage's files made with {k}={old.get(k)}, not {v}: use "
                                  f"another --output-dir, or delete {made}")
    path.write_text(json.dumps(params))


def train_irn(cfg: Config, out: Path, ckpt: str, uri: str, manifest: dict, total: int, where: str) -> dict:
    """[4] Train IRN with Ray Train unless out/irn/state.pt exists."""
    from ray.train.torch import TorchTrainer

    ps = cfg.pseudo
    if (out / "irn" / STATE_FILE).is_file():
        return {"kept": True, "history": load_state(out / "irn")["history"]}
    t0 = time.perf_counter()
    shards = (uri, manifest, ps.split)
    datasets = {f"epoch{e}": positions(total).map_batches(
        irn_samples, fn_kwargs=dict(out=str(out), crop=ps.irn_crop_size, resize_range=ps.irn_resize_range,
                                    seed=cfg.train.seed, epoch=e, total=total, shards=shards, where=where),
        batch_size=8, num_cpus=ps.actor_cpus) for e in range(ps.irn_epochs)}
    trainer = TorchTrainer(
        irn_train_loop,
        train_loop_config={"config": to_dict(cfg), "checkpoint": ckpt, "out": str(out), "num_images": total},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        datasets=datasets,
        run_config=ray.train.RunConfig(name="irn_run", storage_path=str(out / "irn")))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise root_cause(exc) from exc
    if result.error is not None:
        raise root_cause(result.error) from result.error
    history = load_state(out / "irn")["history"]
    return {"kept": False, "history": history, "seconds": round(time.perf_counter() - t0, 2)}


PAPER_TABLE3 = {"seed": 60.3, "crf": 65.9, "mask": 72.3}  # ACR (CVPR 2023) Table 3, VOC 2012 train, mIoU %


def table3(summary: dict) -> str:
    """Table 3 of the paper (pseudo-label quality per level) with this run's numbers beside it."""
    lines = [f"Pseudo-label levels on '{summary['split']}' ({summary['images_with_ground_truth']} images with "
             f"ground truth; seed threshold {summary['seed_threshold']:.2f}, {summary['seed_threshold_source']})",
             "", "| level | mIoU | precision | recall | paper (VOC train mIoU) |", "|---|---|---|---|---|"]
    names = {"seed": "Seed (CAM)", "crf": "+ CRF", "mask": "Mask (IRN)"}
    for k, name in names.items():
        lines.append(f"| {name} | {100 * summary[f'{k}_miou']:.1f} | {100 * summary[f'{k}_precision']:.1f} | "
                     f"{100 * summary[f'{k}_recall']:.1f} | {PAPER_TABLE3[k]} |")
    return "\n".join(lines) + "\n"
