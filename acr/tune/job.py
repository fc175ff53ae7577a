"""Search ACR's SRF grid size, q and loss weights with Ray Tune + Optuna (TPE) and ASHA (ray_jobs/tune.py).

Each trial is a function trainable that runs one TorchTrainer (the Ray 2.60 pattern: `TuneReportCallback` forwards
every report of the training run to Tune). Trials score their CAMs after every epoch on `tune.select_split` (pixel
labels of that split are used for the selection); the best trial's checkpoint is then scored once on `eval.split`,
a different split, and that is the number to report. The Optuna study lives in a database (SQLite by default), so it
can be opened with optuna-dashboard and continued; an interrupted search rerun with the same folder resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import optuna
import ray
import ray.tune
import torch
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from acr.checkpoint import load_classifier
from acr.config import Config, ConfigError, apply_overrides, config_from_dict, dump_yaml, to_dict, validate
from acr.data.ingest import EvalRows
from acr.data.sources import ensure_shards
from acr.data.synthetic import default_cache_dir
from acr.errors import RunError
from acr.runtime.cluster import TRIAL_SLOT, concurrent_trials, init_ray, job_nodes, trial_resources
from acr.runtime.reach import driver_disk_is_shared, stage_inputs
from acr.runtime.session import resume_point
from acr.storage import RunFolder
from acr.train.evaluate import evaluate_split
from acr.train.job import prepare_run, resolve_pretrained, training_trainer
from acr.train.worker import EVAL_FILE, HISTORY_FILE
from acr.viz import save_trial_plots

log = logging.getLogger(__name__)
KINDS = ("categorical", "uniform", "loguniform", "int")
METRIC = "cam_miou"
SUMMARY = "summary.json"
TRIALS = "trials"  # the trials' training runs, in the search's folder
__all__ = ["TRIAL_SLOT", "concurrent_trials", "load_space", "run_tune", "trial_resources"]


def load_space(path: str | Path, cfg: Config) -> dict[str, tuple[str, list]]:
    """{dotted key: (kind, values or [low, high])}. Every error names the file and key, before any trial starts:
    an unknown config key, an unknown distribution, an empty range, or a value the config refuses (e.g. an SRF grid
    size that does not divide the crop: every categorical value and both ends of a range are checked)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"search space {path}: expected a non-empty mapping of config keys to distributions")
    space = {}
    for key, spec in raw.items():
        where = f"search space {path}: {key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(k + ': ...' for k in KINDS)}}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
        if kind != "categorical":
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] < values[1]:
                raise ConfigError(f"{where}: {kind} needs [low, high] with low < high (an empty range otherwise), "
                                  f"got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {values[0]}")
            if kind == "int" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}: int needs integer bounds, got {values!r}")
        for v in values:
            try:
                apply_overrides(cfg, {key: v}, source=str(path), job="tune")
            except ConfigError as exc:
                raise ConfigError(f"{where}={v!r} is not a valid setting: {exc}") from exc
        space[key] = (kind, values)
    return space


def optuna_space(space: dict[str, tuple[str, list]]) -> dict:
    out = {}
    for key, (kind, v) in space.items():
        if kind == "categorical":
            out[key] = CategoricalDistribution(v)
        elif kind == "int":
            out[key] = IntDistribution(v[0], v[1])
        else:
            out[key] = FloatDistribution(float(v[0]), float(v[1]), log=kind == "loguniform")
    return out


def selection_config(cfg: Config) -> Config:
    """What a trial trains and scores: per-epoch evaluation on the selection split."""
    return apply_overrides(cfg, {"eval.enabled": True, "eval.every_epoch": True, "eval.split": cfg.tune.select_split,
                                 "eval.max_images": cfg.tune.select_max_images, "train.checkpoint_every_steps": None})


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The configuration a trial (or best.yaml) trains with: the base config with the sampled values; its `eval`
    section is the base's (the trial scored on the selection split instead)."""
    return apply_overrides(base, params, source="a trial's parameters", job="train")


def trial_folder(search: str | Path | RunFolder, trial: str) -> RunFolder:
    """Where a trial's training run lives: in the search's own storage (a URI or a folder every node reaches), not
    in Tune's folder on the node that runs the trial's driver."""
    return RunFolder.of(search).sub(TRIALS).sub(trial)


def run_trial(config: dict, base: dict, keys: list[str], search: str) -> None:
    """The Tune trainable: one TorchTrainer run of `base` with the trial's sampled `keys` in the search's storage
    (`search`), every report forwarded to Tune."""
    cfg = selection_config(trial_config(config_from_dict(base), {k: config[k] for k in keys}))
    folder = trial_folder(search, Path(ray.tune.get_context().get_trial_dir()).name)
    # a trial restarted after its driver's node was lost continues its training run from the last checkpoint
    loop_config, datasets, _ = prepare_run(cfg, resume_point(folder.sub("train")), progress=False)
    folder.makedirs()
    folder.write_text("config.yaml", dump_yaml(cfg))
    training_trainer(cfg, folder.sub("train"), loop_config, datasets, callbacks=[TuneReportCallback()]).fit()


def latest_checkpoint(run: RunFolder) -> str | None:
    """A trial's newest checkpoint (the latest in Ray's record of its training run), as a path or URI."""
    latest = run.latest_checkpoint()
    return run.location_of(latest) if latest else None


def _tuner(cfg: Config, base: Config, space: dict, out: RunFolder, storage: str, concurrent: int, driver: dict):
    """A new Tuner, or the interrupted search in `out` restored."""
    experiment = out.sub("experiment")
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, base=to_dict(base), keys=list(space),
                                                                 search=out.location), driver)
    fs = None if out.is_local else out.fs
    if ray.tune.Tuner.can_restore(experiment.path, storage_filesystem=fs):
        log.info("resuming the search in %s", experiment.uri())
        return ray.tune.Tuner.restore(experiment.path, trainable, resume_unfinished=True, resume_errored=True,
                                      storage_filesystem=fs)
    search = OptunaSearch(optuna_space(space), metric=METRIC, mode="max", study_name=cfg.tune.study_name,
                          storage=optuna.storages.RDBStorage(storage),
                          sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed))
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                               grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor)
                 if cfg.tune.asha else None)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(metric=METRIC, mode="max", search_alg=search, scheduler=scheduler,
                                        num_samples=cfg.tune.num_samples, max_concurrent_trials=concurrent,
                                        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=ray.tune.RunConfig(name=experiment.name, storage_path=out.path, storage_filesystem=fs,
                                      failure_config=ray.tune.FailureConfig(max_failures=cfg.scaling.max_failures)))


def run_tune(cfg: Config, space_file: str | Path, output_dir: str | Path) -> dict:
    """Search, resume if `output_dir` (a folder or a URI) holds an interrupted search, and write the outputs (see
    ray_jobs/tune.py)."""
    validate(cfg, "tune")
    out = RunFolder(output_dir)
    out.makedirs()
    space = load_space(space_file, cfg)
    # Convert the data once, before any trial (trials would race on the cache); trials read the shards.
    splits = [cfg.data.train_split, cfg.tune.select_split, cfg.eval.split]
    uri, _ = ensure_shards(cfg, splits)
    init_ray(cfg, "tune", trials=cfg.tune.max_concurrent or 1)
    # the stand-in made once, before the trials; shards and weights where every trial's workers read them
    base = stage_inputs(resolve_pretrained(apply_overrides(cfg, {"data.shards": uri}), storage=out), out, uri)
    concurrent, driver = trial_limits(cfg)
    storage = cfg.tune.storage or f"sqlite:///{study_file(out)}"
    results = _tuner(cfg, base, space, out, storage, concurrent, driver).fit()
    return write_outputs(cfg, base, space, results, out, storage)


def trial_limits(cfg: Config) -> tuple[int, dict]:
    """(trials at once, what a trial's driver reserves) on the connected cluster."""
    cluster = ray.cluster_resources()
    concurrent, driver = concurrent_trials(cfg, cluster), {"CPU": cfg.tune.trial_cpus}
    if cluster.get(TRIAL_SLOT):
        concurrent, driver[TRIAL_SLOT] = min(concurrent, int(cluster[TRIAL_SLOT])), 1
    elif not driver_disk_is_shared():
        # a cluster of several nodes, or one still to grow: the trials' demands make the autoscaler add nodes, so
        # the nodes up now do not bound the trials at once
        concurrent = cfg.tune.max_concurrent or cfg.tune.num_samples
    log.info("up to %d trial(s) at once, each %s%s", concurrent, trial_resources(cfg),
             "" if TRIAL_SLOT in driver else f" (the cluster has no '{TRIAL_SLOT}' resource: a resumed search "
                                              "restarts all its unfinished trials at once)")
    return concurrent, driver


def study_file(out: RunFolder) -> Path:
    """The Optuna study's SQLite file: in the search's folder, or for a URI in this machine's cache (SQLite needs a
    local file; the study is also kept with Tune's searcher state in the search's storage)."""
    if out.is_local:
        return Path(out.path) / "study.db"
    digest = hashlib.sha256(out.location.encode()).hexdigest()[:12]
    path = default_cache_dir(None) / "studies" / f"{out.name}-{digest}.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_scores(out: RunFolder, trial: str) -> list[float]:
    """A trial's score after each epoch, from its own training run (history.json and eval.json of its latest
    checkpoint): Tune's record of a trial it restarted (its node lost) holds only the epochs after the restart."""
    run = trial_folder(out, trial).sub("train")
    latest = run.latest_checkpoint()
    if latest is None:
        return []
    checkpoint = RunFolder(run.location_of(latest))
    epochs = json.loads(checkpoint.read_text(HISTORY_FILE)).get("epochs", []) if checkpoint.exists(HISTORY_FILE) else []
    scores = [float(e[METRIC]) for e in epochs if e.get(METRIC) is not None]
    if checkpoint.exists(EVAL_FILE):
        scores.append(float(json.loads(checkpoint.read_text(EVAL_FILE))[METRIC]))
    return scores


def write_outputs(cfg: Config, base: Config, space: dict, results, out: RunFolder, storage: str) -> dict:
    rows, curves = [], {}
    for r in results:
        params = {k: r.config.get(k) for k in space}
        hist = r.metrics_dataframe
        scores = [] if hist is None or METRIC not in hist else [float(v) for v in hist[METRIC] if not math.isnan(v)]
        trial_id = Path(r.path).name
        if len(scores) < cfg.train.epochs:  # after a restart Tune's record is the shorter: the run's own is whole
            scores = max(scores, run_scores(out, trial_id), key=len)
        curves[trial_id] = scores
        last = r.metrics or {}
        rows.append({"trial": trial_id, "status": "error" if r.error else "done", "epochs": len(scores),
                     "stopped_early": not r.error and len(scores) < cfg.train.epochs,
                     "best_cam_miou": max(scores) if scores else None, "last_cam_miou": scores[-1] if scores else None,
                     "last_threshold": last.get("threshold"), "last_threshold_at_edge": last.get("threshold_at_edge"),
                     "path": r.path, **params})
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    out.write_text("trials.csv", table.getvalue())
    scored = [row for row in rows if row["best_cam_miou"] is not None]
    if not scored:
        raise RunError(f"no trial produced a CAM mIoU; see {out.uri('trials.csv')} and the trial folders")
    # Best = highest final-epoch score among trials that trained every epoch (early-stopped ones are not comparable).
    full = [row for row in scored if row["epochs"] >= cfg.train.epochs] or scored
    best = max(full, key=lambda row: row["last_cam_miou"])
    best_cfg = trial_config(base, {k: best[k] for k in space})
    out.write_text("best.yaml", dump_yaml(best_cfg))
    ckpt = latest_checkpoint(trial_folder(out, best["trial"]).sub("train"))
    reported = evaluate_checkpoint(best_cfg, ckpt) if ckpt is not None and best_cfg.eval.enabled else None
    summary = {
        "best_config": {k: best[k] for k in space}, "best_trial": best["trial"],
        "best_cam_miou": best["last_cam_miou"], "select_split": cfg.tune.select_split,
        "best_cam_miou_reported": reported["cam_miou"] if reported else None,
        "best_precision_reported": reported["precision"] if reported else None,
        "best_recall_reported": reported["recall"] if reported else None,
        "best_threshold_reported": reported["threshold"] if reported else None,
        "best_threshold_at_edge_reported": reported["threshold_at_edge"] if reported else None,
        "trials_with_threshold_at_edge": sum(bool(r["last_threshold_at_edge"]) for r in rows),
        "report_split": best_cfg.eval.split, "best_checkpoint": str(ckpt) if ckpt else None,
        "n_trials": len(rows), "n_stopped_early": sum(r["stopped_early"] for r in rows),
        "n_errored": sum(r["status"] == "error" for r in rows), "study_storage": storage,
        "study_name": cfg.tune.study_name, "space": {k: list(v) for k, v in space.items()},
    }
    summary["nodes"] = job_nodes()
    out.write_json(SUMMARY, summary)
    save_plots(out, curves, storage, cfg.tune.study_name)
    return summary


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict:
    """Score a checkpoint's classifier on `eval.split` in this process (one worker)."""
    uri, manifest = ensure_shards(cfg, [cfg.eval.split], progress=False)
    model, _ = load_classifier(checkpoint)
    result, _ = evaluate_split(model, cfg, EvalRows(uri, manifest, cfg.eval.split), uri, 0, 1, torch.device("cpu"))
    return result


def save_plots(out: RunFolder, curves: dict[str, list[float]], storage: str, study_name: str) -> None:
    """trials.png: every trial's score per epoch, and the parameters' importances (fANOVA) where computable."""
    importances = {}
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, KeyError):
        pass  # fewer than two finished trials, or all with the same value
    out.save("trials.png", lambda p: save_trial_plots(p, curves, importances))
