"""The pseudo-label job's driver: its config (the checkpoint's training config with the job's overrides), the stages
in order, and summary.json / table3.md / levels.png in the job folder (a local folder or a URI)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray.data

from acr.checkpoint import backbone_source, load_state, resolve_checkpoint
from acr.config import Config, apply_overrides, config_from_dict, num_classes, to_dict, validate
from acr.data import file_codecs
from acr.data.sources import ensure_shards
from acr.errors import ConfigError
from acr.pseudo.evaluate import evaluate_levels, table3
from acr.pseudo.make_cams import CamStage
from acr.pseudo.make_masks import WalkStage
from acr.pseudo.seed_and_crf import refine_rows, seed_threshold
from acr.pseudo.train_irn import train_irn
from acr.refine.crf import CRF_PRESETS
from acr.runtime.boundary import reraise_root_cause
from acr.runtime.cluster import init_ray, job_nodes
from acr.runtime.reach import require_reachable, stage_inputs
from acr.runtime.stages import ImageFiles, positions, run_stage, split_ids
from acr.storage import RunFolder
from acr.viz import save_level_overlays

log = logging.getLogger(__name__)


def job_config(cfg: Config, overrides: dict) -> Config:
    """The job's config: the training config of `cfg.pseudo.checkpoint` with the job's `pseudo.*` (and any other)
    overrides, validated by the pseudo-label job's rules."""
    if not cfg.pseudo.checkpoint:
        raise ConfigError("pseudo.checkpoint is required (a checkpoint, train.py or tune.py output folder)")
    ckpt = resolve_checkpoint(cfg.pseudo.checkpoint)
    trained = config_from_dict(load_state(ckpt)["config"])
    merged = apply_overrides(trained, {**overrides, "pseudo.checkpoint": ckpt}, source="the command line")
    if merged.pseudo.crf not in CRF_PRESETS:
        raise ConfigError(f"pseudo.crf='{merged.pseudo.crf}' is not one of {sorted(CRF_PRESETS)}")
    validate(merged, "pseudo_labels")
    return merged


def check_stage_params(folder: RunFolder, params: dict, stage: str, made: str) -> None:
    """Files of a stage made with other parameters are not reused silently: the rerun stops, naming the key and
    what to delete (`made`) to redo the stage."""
    name = f"{stage}_params.json"
    old = folder.read_json(name)
    for k, v in (old or {}).items():
        if k in params and params[k] != v:
            raise ConfigError(f"{folder.uri()} holds the {stage} stage's files made with {k}={v}, not {params[k]}: "
                              f"use another --output-dir, or delete {made}")
    folder.write_json(name, params)


def _stages(cfg: Config, folder: RunFolder, files: ImageFiles, ids: list[str], shards: tuple, where: str,
            summary: dict) -> None:
    """[1]-[5] in order (each redoes only what is missing)."""
    ps, n_classes, stages = cfg.pseudo, num_classes(cfg), summary["stages"]
    actor = dict(num_cpus=ps.actor_cpus, batch_size=4, num_gpus=1 if cfg.scaling.use_gpu else 0,
                 compute=ray.data.ActorPoolStrategy(size=ps.actors))
    stages["cams"] = run_stage("cams", files, ids, (file_codecs.CAMS,), lambda order: positions(len(order)).map_batches(
        CamStage, fn_constructor_kwargs=dict(checkpoint=ps.checkpoint, files=files, scales=ps.scales, flip=ps.flip,
                                             shards=shards, where=where, order=order), **actor))
    t0 = time.perf_counter()
    summary.update(seed_threshold(cfg, files, shards[0], shards[1], n_classes))
    stages["seed_sweep"] = {"seconds": round(time.perf_counter() - t0, 2)}
    threshold = summary["seed_threshold"]
    fg = max(threshold, ps.conf_bg_threshold) if ps.conf_fg_threshold is None else ps.conf_fg_threshold
    summary["conf_fg_threshold"] = fg
    check_stage_params(folder, {"seed_threshold": threshold, "crf": ps.crf, "conf_fg_threshold": fg,
                                "conf_bg_threshold": ps.conf_bg_threshold}, "refine",
                       f"{folder.uri(file_codecs.CRF)} and {folder.uri(file_codecs.IR_LABELS)}")
    stages["refine"] = run_stage("crf + confident labels", files, ids, (file_codecs.CRF, file_codecs.IR_LABELS),
                                 lambda order: positions(len(order)).map_batches(refine_rows, fn_kwargs=dict(
                                     files=files, threshold=threshold, crf=ps.crf, fg=fg,
                                     bg=ps.conf_bg_threshold, num_classes=n_classes, shards=shards, where=where,
                                     order=order), batch_size=4, num_cpus=ps.actor_cpus))
    stages["irn"] = train_irn(cfg, folder, ps.checkpoint, shards, len(ids), where)
    stages["irn"]["backbone"] = backbone_source(cfg, ps.irn_backbone, cfg.method.reconstructor != "none")
    if ps.sem_seg_bg_threshold is None:
        cfg = apply_overrides(cfg, {"pseudo.sem_seg_bg_threshold": threshold})
        summary["mask_bg_threshold_source"] = "the seed threshold"
    summary["mask_bg_threshold"] = cfg.pseudo.sem_seg_bg_threshold
    check_stage_params(folder, {"mask_bg_threshold": cfg.pseudo.sem_seg_bg_threshold, "beta": ps.beta,
                                "exp_times": ps.exp_times, "walk_radius": ps.walk_radius, "cam_power": ps.cam_power,
                                "mask_crf": ps.mask_crf}, "masks", folder.uri(file_codecs.MASKS))
    stages["masks"] = run_stage("masks", files, ids, (file_codecs.MASKS,), lambda order: positions(len(order)).map_batches(
        WalkStage, fn_constructor_kwargs=dict(cfg_dict=to_dict(cfg), files=files, shards=shards, where=where,
                                              order=order), **actor))


def run_pseudo_labels(cfg: Config, out: str | Path) -> dict:
    """Run (or resume) the job in `out` (a local folder or a URI) and write summary.json, table3.md and levels.png
    there; returns the summary."""
    folder = RunFolder(out)
    folder.makedirs()
    ps = cfg.pseudo
    uri, manifest = ensure_shards(apply_overrides(cfg, {"eval.enabled": False}), [ps.split])
    ids = split_ids(uri, manifest, ps.split, ps.max_images)
    init_ray(cfg, "pseudo_labels")
    cfg = stage_inputs(cfg, folder, uri)
    require_reachable(cfg, {"pseudo.checkpoint": ps.checkpoint})
    uri = cfg.data.shards or uri
    shards, where = (uri, manifest, ps.split), f"the {ps.split} shards in {uri}"
    files = ImageFiles(folder, file_codecs.SUFFIXES)
    summary = {"checkpoint": ps.checkpoint, "split": ps.split, "num_images": len(ids), "shards": uri, "stages": {}}
    try:
        _stages(cfg, folder, files, ids, shards, where, summary)
    except Exception as exc:  # Ray wraps the stage's own error (a DataError naming the image): show that one
        reraise_root_cause(exc)
    t0 = time.perf_counter()
    if summary["images_with_ground_truth"]:
        levels, items = evaluate_levels(files, uri, manifest, ps.split, ps.max_images, num_classes(cfg),
                                        summary["seed_threshold"], ps.overlays)
        summary.update(levels)
        folder.save("levels.png", lambda p: save_level_overlays(p, items, summary["seed_threshold"]))
        folder.write_text("table3.md", table3(summary))
    summary["stages"]["evaluation"] = {"seconds": round(time.perf_counter() - t0, 2)}
    summary["config"] = to_dict(cfg)
    summary["nodes"] = job_nodes()
    folder.write_json("summary.json", summary)
    log.info("pseudo-labels: %s", {k: summary.get(k) for k in ("seed_miou", "crf_miou", "mask_miou")})
    return summary
