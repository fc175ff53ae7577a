"""DeepLab on pseudo-labels (or on the ground truth: the upper bound), on Ray:

    [1] train     TorchTrainer: DeepLab on (image, label map) crops; one Ray Data dataset per epoch (the split's
                  images in a permuted order, random scale / flip / crop seeded by (seed, epoch, id)), poly SGD;
                  rank 0 writes model/state.pt (model, optimiser, epoch, history) after every epoch, from which a
                  rerun, or a worker group restarted by Ray Train (scaling.max_failures), continues
    [2] predict   map_batches(PredictStage, actor pool): each val image single scale, multi-scale + flip, and
                  multi-scale + flip + dense CRF -> pred/, pred_ms/, pred_crf/<id>.png (palette PNGs)
    [3] evaluate  mIoU, precision, recall and per-class IoU of each level against the val ground truth,
                  predictions.png, loss.png, summary.json

The output folder must be visible to every node (NFS or one machine): the workers and actors write into it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F
from tqdm import tqdm

from acr.checkpoint import STATE_FILE, load_state, save_state
from acr.config import Config, ConfigError, apply_overrides, config_from_dict, num_classes, to_dict
from acr.data.shards import ShardReader, decode_image_bytes, decode_mask_bytes, iter_split_rows
from acr.data.sources import ensure_shards
from acr.data.transforms import to_chw_normalized
from acr.data.voc import DataError
from acr.distributed.batch import (check_stage_params, each_missing, epoch_order, gt_rows, positions,
                                   resolve_checkpoint, rows_of, run_stage, split_ids)
from acr.distributed.trainer import init_ray, local_num_cpus, root_cause
from acr.metrics import confusion_matrix, scores
from acr.models.deeplab import build_deeplab, predict_probabilities
from acr.refine import pseudo
from acr.refine.crf import CRF_PRESETS, crf_inference

GT = "gt"  # segment.labels=gt: the split's ground-truth masks
MODEL_DIR = "model"
LEVELS = {"pred": "single scale", "pred_ms": "multi-scale + flip", "pred_crf": "multi-scale + flip + CRF"}
SUFFIXES = {"pred": "", "pred_ms": "_ms", "pred_crf": "_crf"}  # summary keys: val_miou, val_miou_ms, val_miou_crf


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_labels(labels: str | None) -> str:
    """'gt', or the folder holding the <id>.png label maps (a pseudo-label job's masks/)."""
    if not labels:
        raise ConfigError("segment.labels is required: a folder of <id>.png label maps, a pseudo-label job's "
                          "folder, or 'gt' (the ground-truth masks)")
    if labels == GT:
        return GT
    p = Path(labels).expanduser().resolve()
    if (p / pseudo.MASKS).is_dir():
        return str(p / pseudo.MASKS)
    if p.is_dir():
        return str(p)
    raise ConfigError(f"segment.labels={labels}: not a folder of <id>.png label maps, a pseudo-label job folder, "
                      "nor 'gt'")


def labels_job_config(labels: str | None) -> Config | None:
    """The config a pseudo-label job folder was made with (its summary.json), with segment.split set to the job's
    split and segment.max_images to its image count; None for any other folder."""
    if not labels or labels == GT:
        return None
    summary = Path(labels).expanduser() / "summary.json"
    if not summary.is_file():
        return None
    s = json.loads(summary.read_text())
    if "config" not in s or "split" not in s:
        return None
    return apply_overrides(config_from_dict(s["config"]), {"segment.split": s["split"],
                                                           "segment.max_images": s["config"]["pseudo"]["max_images"]})


# ----------------------------------------------------------------------------------------------------------------
# [1] training


def segment_samples(batch: dict, labels: str, crop: int, scale_range: list[float], flip: bool, seed: int,
                    epoch: int, total: int, n_classes: int, shards: tuple, where: str) -> dict:
    """Training crops of the epoch's images: image and label map rescaled by one random factor, flipped, cropped
    (padding: mean colour / 255), seeded by (seed, epoch, id)."""
    from acr.data.transforms import scale_flip_crop_pair

    columns = ("id", "index", "image", "mask") if labels == GT else ("id", "index", "image")
    images, targets = [], []
    for rec in rows_of(ShardReader(*shards), batch, epoch_order(total, seed, epoch), columns):
        image_id = rec["id"]
        raw = decode_image_bytes(rec["image"], f"image '{image_id}' of {where}")
        if labels == GT:
            if rec["mask"] is None:
                raise DataError(f"image '{image_id}' of {where} has no ground-truth mask (segment.labels=gt)")
            label = decode_mask_bytes(rec["mask"], f"'{image_id}' of {where}", n_classes)
        else:
            label = pseudo.load_label_map(Path(labels) / f"{image_id}.png", raw.shape[:2], n_classes)
        rng = np.random.default_rng([seed, epoch, zlib.crc32(image_id.encode())])
        image, target = scale_flip_crop_pair(raw, label, rng, scale_range, crop, flip)
        images.append(image)
        targets.append(target)
    return {"image": np.stack(images) if images else np.zeros((0, 3, crop, crop), np.float32),
            "label": np.stack(targets) if targets else np.zeros((0, crop, crop), np.uint8)}


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """deeplab-pytorch's poly schedule: base_lr (1 - step / total_steps)^power, step counted from 0 (the last of
    `total_steps` steps runs at base_lr (1 / total_steps)^power, never at 0)."""
    return base_lr * (1 - min(step, total_steps - 1) / total_steps) ** power


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy over the labelled pixels (255 ignored); 0 for a batch without any."""
    total = F.cross_entropy(logits.float(), labels.long(), ignore_index=255, reduction="sum")
    return total / (labels != 255).sum().clamp(min=1)


def segment_train_loop(config: dict) -> None:
    """Per worker: DeepLab with SGD (momentum, weight decay; head at head_lr_multiplier x lr) and poly LR over all
    epochs; continues from model/state.pt when it exists."""
    from acr.method.step import NonFiniteLossError, autocast_context

    cfg = config_from_dict(config["config"])
    sg = cfg.segment
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    model_dir = Path(config["out"]) / MODEL_DIR
    init = config["init_backbone"]
    model = build_deeplab(sg, num_classes(cfg) + 1, load_state(init) if init else None, init or "").to(device)
    opt = torch.optim.SGD(model.param_groups(sg.lr, sg.head_lr_multiplier), lr=sg.lr, momentum=sg.momentum,
                          weight_decay=sg.weight_decay)
    start, history = 0, []
    if (model_dir / STATE_FILE).is_file():
        state = load_state(model_dir, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
    ddp = ray.train.torch.prepare_model(model, move_to_device=device)
    steps, per_worker = config["steps_per_epoch"], sg.batch_size // ctx.get_world_size()
    total_steps = sg.epochs * steps
    for epoch in range(start, sg.epochs):
        ddp.train()
        losses, t0 = [], time.perf_counter()
        batches = ray.train.get_dataset_shard(f"epoch{epoch}").iter_torch_batches(
            batch_size=per_worker, device=device, drop_last=True)
        for i, batch in enumerate(batches):
            step = epoch * steps + i
            for g in opt.param_groups:
                g["lr"] = poly_lr(g["base_lr"], step, total_steps, sg.poly_power)
            with autocast_context(device, cfg.train.precision):
                logits = ddp(batch["image"])
            loss = segmentation_loss(logits, batch["label"])
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"DeepLab loss is {loss.item()} at epoch {epoch + 1}, step {i + 1}: stopped; "
                                         f"{model_dir / STATE_FILE} keeps the last finished epoch ({epoch}); lower "
                                         "segment.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None, "steps": len(losses),
                        "images_per_second": len(losses) * sg.batch_size / seconds if losses else None,
                        "backbone_lr_last_step": opt.param_groups[0]["lr"]})
        if ctx.get_world_rank() == 0:
            save_state(model_dir, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                                   "history": history, "config": config["config"]})
            print(f"DeepLab epoch {epoch + 1}/{sg.epochs}: loss {history[-1]['loss']:.4f}, "
                  f"{history[-1]['images_per_second'] or 0:.1f} img/s", flush=True)
        ray.train.report({"epoch": epoch + 1, "loss": history[-1]["loss"]})


def train_deeplab(cfg: Config, out: Path, labels: str, shards: tuple, total: int, init: str | None,
                  where: str) -> dict:
    """[1] Train (or continue) DeepLab in out/model with Ray Train."""
    from ray.train.torch import TorchTrainer

    sg = cfg.segment
    state_file = out / MODEL_DIR / STATE_FILE
    start = int(load_state(state_file)["epoch"]) if state_file.is_file() else 0
    if start >= sg.epochs:
        return {"kept": True, "epochs": start}
    init_ray(cfg)
    steps = total // sg.batch_size
    if steps == 0:
        raise ConfigError(f"segment.batch_size={sg.batch_size} is larger than the {total} training images of "
                          f"'{sg.split}'")
    steps = min(steps, sg.max_steps_per_epoch or steps)
    datasets = {f"epoch{e}": positions(steps * sg.batch_size).map_batches(
        segment_samples, fn_kwargs=dict(labels=labels, crop=sg.crop_size, scale_range=sg.scale_range, flip=sg.flip,
                                        seed=cfg.train.seed, epoch=e, total=total, n_classes=num_classes(cfg),
                                        shards=shards, where=where),
        batch_size=8, num_cpus=sg.actor_cpus) for e in range(start, sg.epochs)}
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        segment_train_loop,
        train_loop_config={"config": to_dict(cfg), "out": str(out), "init_backbone": init, "steps_per_epoch": steps},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        datasets=datasets,
        run_config=ray.train.RunConfig(name="ray_train", storage_path=str(out / MODEL_DIR),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures)))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return {"kept": False, "epochs": sg.epochs - start, "steps_per_epoch": steps,
            "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------------------------------------------
# [2] prediction, [3] evaluation


class PredictStage:
    """[2] The three prediction levels of each val image -> pred/, pred_ms/, pred_crf/<id>.png."""

    def __init__(self, cfg_dict: dict, out: str, shards: tuple, where: str):
        cfg = config_from_dict(cfg_dict)
        self.sg, self.device = cfg.segment, _device()
        self.out, self.reader, self.where = Path(out), ShardReader(*shards), where
        sg = apply_overrides(cfg, {"segment.pretrained": None}).segment  # every weight comes from the state
        self.model = build_deeplab(sg, num_classes(cfg) + 1).to(self.device)
        self.model.load_state_dict(load_state(self.out / MODEL_DIR, map_location=self.device)["model"])
        self.model.eval()

    def __call__(self, batch: dict) -> dict:
        return each_missing(self.reader, batch, self.out, tuple(LEVELS), self.where, self._predict)

    def _predict(self, image_id: str, raw: np.ndarray, _) -> None:
        image = torch.from_numpy(to_chw_normalized(raw)).to(self.device)
        single, multi = predict_probabilities(self.model, image, self.sg.eval_scales, self.sg.eval_flip)
        multi = multi.float().cpu().numpy()
        maps = {"pred": single.argmax(0).cpu().numpy(), "pred_ms": multi.argmax(0),
                "pred_crf": crf_inference(raw, multi, CRF_PRESETS[self.sg.crf]).argmax(0)}
        for kind, m in maps.items():
            pseudo.write_label_png(pseudo.output_path(self.out, kind, image_id), m.astype(np.uint8))


def evaluate_predictions(out: Path, uri: str, manifest: dict, split: str, max_images: int | None, n_classes: int,
                         overlays: int) -> tuple[dict, list[dict]]:
    """[3] Each level's scores against the ground truth of `split` (keys val_miou[_ms|_crf], val_precision...)."""
    n = n_classes + 1
    conf = {k: np.zeros((n, n), np.int64) for k in LEVELS}
    items, count = [], 0
    for image_id, gt, row in gt_rows(uri, manifest, split, max_images, n_classes):
        maps = {k: pseudo.read_label_png(pseudo.output_path(out, k, image_id)) for k in LEVELS}
        for k, m in maps.items():
            if m.shape != gt.shape:
                raise DataError(f"{pseudo.output_path(out, k, image_id)}: {m.shape} but the image is {gt.shape}")
            conf[k] += confusion_matrix(m, gt, n)
        count += 1
        if len(items) < overlays:
            items.append({"id": image_id, "raw": decode_image_bytes(row["image"], image_id), "gt": gt, **maps})
    result = {"val_images_scored": count}
    for k, suffix in SUFFIXES.items():
        s = scores(conf[k])
        result.update({f"val_miou{suffix}": s["miou"], f"val_precision{suffix}": s["precision"],
                       f"val_recall{suffix}": s["recall"], f"val_per_class_iou{suffix}": s["iou"]})
    return result, items


# ----------------------------------------------------------------------------------------------------------------
# The driver


def _init_backbone(cfg: Config) -> str | None:
    sg = cfg.segment
    if not sg.init_backbone:
        return None
    ckpt = resolve_checkpoint(sg.init_backbone)
    trained = config_from_dict(load_state(ckpt)["config"]).model.backbone
    if trained != sg.backbone:
        raise ConfigError(f"segment.init_backbone={sg.init_backbone} is a {trained} classifier but segment.backbone="
                          f"{sg.backbone}")
    return str(ckpt)


def _check_labels(labels: str, uri: str, manifest: dict, split: str, max_images: int | None,
                  n_classes: int) -> None:
    """Every training image has its label map (or, for gt, its mask), of the image's size, with class ids 0..C or
    255, before any worker starts; the first bad file is named."""
    if labels == GT:
        info = manifest["splits"][split]
        if info.get("masks", 0) < info["rows"]:
            raise DataError(f"{uri}: split '{split}' has ground-truth masks for {info.get('masks', 0)} of its "
                            f"{info['rows']} images; segment.labels=gt needs one for every image")
        return
    rows = [(row["id"], (int(row["height"]), int(row["width"])))
            for _, row in iter_split_rows(uri, manifest, split, ["id", "index", "height", "width"])
            if max_images is None or row["index"] < max_images]
    missing = [i for i, _ in rows if not (Path(labels) / f"{i}.png").is_file()]
    if missing:
        raise DataError(f"{labels}: no label map <id>.png for {len(missing)} of the {len(rows)} training images of "
                        f"'{split}', e.g. {', '.join(missing[:3])}")
    for image_id, shape in tqdm(rows, desc="checking label maps", unit="img", mininterval=2, disable=len(rows) < 500):
        pseudo.load_label_map(Path(labels) / f"{image_id}.png", shape, n_classes)


def segment_num_cpus(cfg: Config) -> int:
    """Logical CPUs a local Ray needs for this job: the training workers, the prediction actors (or the crop tasks),
    and one for Ray Data's small tasks."""
    sg = cfg.segment
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + max(sg.actors, 1) * sg.actor_cpus + 1
    return max(local_num_cpus(cfg), int(math.ceil(need)))


def run_segment(cfg: Config, out: str | Path) -> dict:
    """Train DeepLab on `segment.labels` (or continue), predict and evaluate on `segment.val_split`; writes
    out/summary.json (and predictions.png, loss.png)."""
    from acr.viz import save_label_panels, save_loss_curve

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sg, n_classes = cfg.segment, num_classes(cfg)
    if sg.crf not in CRF_PRESETS:
        raise ConfigError(f"segment.crf='{sg.crf}' is not one of {sorted(CRF_PRESETS)}")
    labels = resolve_labels(sg.labels)
    init = _init_backbone(cfg)
    uri, manifest = ensure_shards(apply_overrides(cfg, {"eval.enabled": False}), [sg.split, sg.val_split])
    train_ids = split_ids(uri, manifest, sg.split, sg.max_images)
    val_ids = split_ids(uri, manifest, sg.val_split, sg.max_val_images)
    state_file = out / MODEL_DIR / STATE_FILE
    if not state_file.is_file() or int(load_state(state_file)["epoch"]) < sg.epochs:  # training will run
        _check_labels(labels, uri, manifest, sg.split, sg.max_images, n_classes)
    check_stage_params(out, {"labels": labels, "split": sg.split, "max_images": sg.max_images, "backbone": sg.backbone,
                             "head": sg.head, "output_stride": sg.output_stride, "init_backbone": init,
                             "pretrained": sg.pretrained}, "train", str(out / MODEL_DIR))
    if not cfg.ray.num_cpus and not cfg.ray.address:
        cfg = apply_overrides(cfg, {"ray.num_cpus": segment_num_cpus(cfg)})
    where = f"the {sg.split} shards in {uri}"
    summary = {"labels": labels, "split": sg.split, "val_split": sg.val_split, "train_images": len(train_ids),
               "val_images": len(val_ids), "backbone": sg.backbone, "head": sg.head,
               "backbone_init": (f"ImageNet weights {sg.pretrained}" if sg.pretrained else
                                 f"the classifier of {init}" if init else "random (no weights given)"),
               "init_backbone": init, "pretrained": sg.pretrained, "shards": uri, "stages": {}}
    try:  # Ray is started only for work left to do: a finished run is evaluated again without it
        summary["stages"]["train"] = train_deeplab(cfg, out, labels, (uri, manifest, sg.split), len(train_ids), init,
                                                   where)
        state = load_state(out / MODEL_DIR)
        _drop_stale_predictions(out, int(state["epoch"]))
        if any(not pseudo.is_done(out, k, i) for i in val_ids for k in LEVELS):
            init_ray(cfg)
        val_where = f"the {sg.val_split} shards in {uri}"
        summary["stages"]["predict"] = run_stage("predict", lambda: positions(len(val_ids)).map_batches(
            PredictStage, fn_constructor_kwargs=dict(cfg_dict=to_dict(cfg), out=str(out),
                                                     shards=(uri, manifest, sg.val_split), where=val_where),
            compute=ray.data.ActorPoolStrategy(size=sg.actors), num_cpus=sg.actor_cpus, batch_size=4,
            num_gpus=1 if cfg.scaling.use_gpu else 0), out, val_ids, tuple(LEVELS))
    except Exception as exc:  # Ray wraps the worker's or actor's own error (naming the file): show that one
        cause = root_cause(exc)
        if cause is exc:
            raise
        raise cause from exc
    t0 = time.perf_counter()
    summary["history"] = state["history"]
    summary["epochs"] = int(state["epoch"])
    result, items = evaluate_predictions(out, uri, manifest, sg.val_split, sg.max_val_images, n_classes, sg.overlays)
    summary.update(result)
    summary["class_names"] = ["background", *manifest["class_names"]]
    save_label_panels(out / "predictions.png", items, [("gt", "ground truth")] + list(LEVELS.items()))
    save_loss_curve(out / "loss.png", state["history"])
    summary["stages"]["evaluation"] = {"seconds": round(time.perf_counter() - t0, 2)}
    summary["config"] = to_dict(cfg)
    pseudo.write_atomically(out / "summary.json", json.dumps(summary, indent=1).encode())  # the pipeline's "done"
    return summary


def _drop_stale_predictions(out: Path, epoch: int) -> None:
    """Predictions of an earlier model (the run was continued with more epochs) are made again."""
    marker = out / "predict_params.json"
    if marker.is_file() and json.loads(marker.read_text()).get("model_epoch") != epoch:
        for kind in LEVELS:
            shutil.rmtree(out / kind, ignore_errors=True)
    marker.write_text(json.dumps({"model_epoch": epoch}))
