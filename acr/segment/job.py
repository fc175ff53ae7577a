"""The DeepLab job's driver: which labels, checks before any worker starts, [1] training, [2] prediction, [3]
evaluation, and summary.json / predictions.png / loss.png in the job folder (a local folder or a URI)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray.data
from tqdm import tqdm

from acr.checkpoint import checkpoint_backbone, load_state, resolve_checkpoint
from acr.config import Config, apply_overrides, config_from_dict, num_classes, to_dict, validate
from acr.data import file_codecs
from acr.data.shards import iter_split_rows
from acr.data.sources import ensure_shards
from acr.errors import ConfigError, DataError
from acr.refine.crf import CRF_PRESETS
from acr.runtime.boundary import reraise_root_cause
from acr.runtime.cluster import init_ray, job_nodes
from acr.runtime.reach import require_reachable, stage_inputs
from acr.runtime.session import resume_point
from acr.runtime.stages import ImageFiles, positions, run_stage, split_ids
from acr.segment.predict import LEVELS, PredictStage, evaluate_predictions
from acr.segment.train_deeplab import GT, MODEL_DIR, load_trained, train_deeplab
from acr.storage import RunFolder
from acr.viz import save_label_panels, save_loss_curve

log = logging.getLogger(__name__)


def resolve_labels(labels: str | None) -> str:
    """'gt', or the folder (a path or a URI) holding the <id>.png label maps (a pseudo-label job's masks/)."""
    if not labels:
        raise ConfigError("segment.labels is required: a folder of <id>.png label maps, a pseudo-label job's "
                          "folder, or 'gt' (the ground-truth masks)")
    if labels == GT:
        return GT
    folder = RunFolder(labels)
    if folder.names(file_codecs.MASKS):
        return folder.sub(file_codecs.MASKS).location if folder.uri_prefix else str(Path(folder.path) / file_codecs.MASKS)
    if folder.names():
        return folder.location if folder.uri_prefix else folder.path
    raise ConfigError(f"segment.labels={labels}: not a folder of <id>.png label maps, a pseudo-label job folder, "
                      "nor 'gt'")


def labels_job_config(labels: str | None) -> Config | None:
    """The config a pseudo-label job folder was made with (its summary.json), with segment.split set to the job's
    split and segment.max_images to its image count; None for any other folder."""
    if not labels or labels == GT:
        return None
    s = RunFolder(labels).read_json("summary.json")
    if not s or "config" not in s or "split" not in s:
        return None
    return apply_overrides(config_from_dict(s["config"]), {"segment.split": s["split"],
                                                           "segment.max_images": s["config"]["pseudo"]["max_images"]})


def _init_backbone(cfg: Config) -> str | None:
    sg = cfg.segment
    if not sg.init_backbone:
        return None
    ckpt = resolve_checkpoint(sg.init_backbone, "segment.init_backbone")
    src = checkpoint_backbone(load_state(ckpt), f"segment.init_backbone={sg.init_backbone}")
    if src.name != sg.backbone:
        raise ConfigError(f"segment.init_backbone: {src.description} is a {src.name}, but segment.backbone="
                          f"{sg.backbone}")
    return ckpt


def check_labels(labels: str, uri: str, manifest: dict, split: str, max_images: int | None, n_classes: int) -> None:
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
    folder = RunFolder(labels)
    have = folder.names()
    missing = [i for i, _ in rows if f"{i}.png" not in have]
    if missing:
        raise DataError(f"{labels}: no label map <id>.png for {len(missing)} of the {len(rows)} training images of "
                        f"'{split}', e.g. {', '.join(missing[:3])}")
    for image_id, shape in tqdm(rows, desc="checking label maps", unit="img", mininterval=2, disable=len(rows) < 500):
        name = f"{image_id}.png"
        file_codecs.load_label_map(folder.read_bytes(name), folder.uri(name), shape, n_classes)


def _check_train_params(folder: RunFolder, params: dict) -> None:
    """A model trained with other labels or another network is not continued silently."""
    old = folder.read_json("train_params.json")
    for k, v in (old or {}).items():
        if k in params and params[k] != v:
            raise ConfigError(f"{folder.uri()} holds a DeepLab trained with {k}={v}, not {params[k]}: use another "
                              f"--output-dir, or delete {folder.uri(MODEL_DIR)}")
    folder.write_json("train_params.json", params)


def _drop_stale_predictions(folder: RunFolder, epoch: int) -> None:
    """Predictions of an earlier model (the run was continued with more epochs) are made again."""
    old = folder.read_json("predict_params.json")
    if old is not None and old.get("model_epoch") != epoch:
        for kind in LEVELS:
            folder.delete_dir(kind)
    folder.write_json("predict_params.json", {"model_epoch": epoch})


def _summary_head(cfg: Config, labels: str, init: str | None, uri: str, n_train: int, n_val: int) -> dict:
    sg = cfg.segment
    return {"labels": labels, "split": sg.split, "val_split": sg.val_split, "train_images": n_train,
            "val_images": n_val, "backbone": sg.backbone, "head": sg.head,
            "backbone_init": (f"ImageNet weights {sg.pretrained}" if sg.pretrained else
                              f"the trained CNN of {init}" if init else "random (no weights given)"),
            "init_backbone": init, "pretrained": sg.pretrained, "shards": uri, "stages": {}}


def run_segment(cfg: Config, out: str | Path) -> dict:
    """Train DeepLab on `segment.labels` (or continue), predict and evaluate on `segment.val_split`; writes
    summary.json (and predictions.png, loss.png) into `out`, a local folder or a URI."""
    validate(cfg, "segment")
    folder = RunFolder(out)
    folder.makedirs()
    sg, n_classes = cfg.segment, num_classes(cfg)
    if sg.crf not in CRF_PRESETS:
        raise ConfigError(f"segment.crf='{sg.crf}' is not one of {sorted(CRF_PRESETS)}")
    labels, init = resolve_labels(sg.labels), _init_backbone(cfg)
    uri, manifest = ensure_shards(apply_overrides(cfg, {"eval.enabled": False}), [sg.split, sg.val_split])
    train_ids = split_ids(uri, manifest, sg.split, sg.max_images)
    val_ids = split_ids(uri, manifest, sg.val_split, sg.max_val_images)
    if resume_point(folder.sub(MODEL_DIR))[0] < sg.epochs:  # training will run
        check_labels(labels, uri, manifest, sg.split, sg.max_images, n_classes)
    _check_train_params(folder, {"labels": labels, "split": sg.split, "max_images": sg.max_images,
                                 "backbone": sg.backbone, "head": sg.head, "output_stride": sg.output_stride,
                                 "init_backbone": init, "pretrained": sg.pretrained})
    init_ray(cfg, "segment")
    cfg = stage_inputs(cfg, folder, uri)
    require_reachable(cfg, {"segment.labels": None if labels == GT else labels, "segment.init_backbone": init})
    uri = cfg.data.shards or uri
    summary = _summary_head(cfg, labels, init, uri, len(train_ids), len(val_ids))
    files = ImageFiles(folder)
    try:
        summary["stages"]["train"] = train_deeplab(cfg, folder, labels, (uri, manifest, sg.split), len(train_ids),
                                                   init, f"the {sg.split} shards in {uri}")
        _, state = load_trained(folder)
        _drop_stale_predictions(folder, state["epoch"])
        val = (uri, manifest, sg.val_split)
        summary["stages"]["predict"] = run_stage("predict", files, val_ids, tuple(LEVELS), lambda order: positions(
            len(order)).map_batches(PredictStage, fn_constructor_kwargs=dict(
                cfg=cfg, files=files, shards=val, where=f"the {sg.val_split} shards in {uri}", order=order),
            compute=ray.data.ActorPoolStrategy(size=sg.actors), num_cpus=sg.actor_cpus, batch_size=4,
            num_gpus=1 if cfg.scaling.use_gpu else 0))
    except Exception as exc:  # Ray wraps the worker's or actor's own error (naming the file): show that one
        reraise_root_cause(exc)
    return _finish(cfg, folder, files, summary, state, uri, manifest)


def _finish(cfg: Config, folder: RunFolder, files: ImageFiles, summary: dict, state: dict, uri: str,
            manifest: dict) -> dict:
    """[3] evaluation, pictures and summary.json (the pipeline's "done")."""
    sg = cfg.segment
    t0 = time.perf_counter()
    summary["history"], summary["epochs"] = state["history"], int(state["epoch"])
    summary["resumes"] = state.get("resumes", [])  # every [epoch, step] the training restarted from
    result, items = evaluate_predictions(files, uri, manifest, sg.val_split, sg.max_val_images, num_classes(cfg),
                                         sg.overlays)
    summary.update(result)
    summary["class_names"] = ["background", *manifest["class_names"]]
    panels = [("gt", "ground truth")] + list(LEVELS.items())
    folder.save("predictions.png", lambda p: save_label_panels(p, items, panels))
    folder.save("loss.png", lambda p: save_loss_curve(p, state["history"]))
    summary["stages"]["evaluation"] = {"seconds": round(time.perf_counter() - t0, 2)}
    summary["config"] = to_dict(cfg)
    summary["nodes"] = job_nodes()
    folder.write_json("summary.json", summary)
    return summary
