"""The driver side of a training run: validate the data, start or join Ray, fit a TorchTrainer, and turn the final
checkpoint into the run folder's summary.json, pictures and config."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import ray
import ray.train
from ray.train.torch import TorchTrainer

from acr.config import Config, dump_yaml, to_dict
from acr.data.sources import dataset_root, load_split
from acr.distributed.train_loop import EVAL_FILE, HISTORY_FILE, OVERLAYS_FILE, train_loop_per_worker
from acr.viz import save_curves

# Ray Train V2 polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and each report() waits for a poll.
# Its print patch would log every progress line of the workers twice (once as stdout, once through logging).
_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def _quiet_placement_group_cleaner() -> None:
    """Worker setup hook: without the dashboard Ray's state API is absent, and Train's placement-group cleaner
    would log a warning every second that it cannot query it."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def init_ray(cfg: Config) -> None:
    """Join the cluster named by `ray.address` or RAY_ADDRESS (e.g. under `ray job submit`), else start a local one."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {k: os.environ.get(k, v) for k, v in _RAY_ENV.items()}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        for k, v in runtime_env["env_vars"].items():
            os.environ.setdefault(k, v)
        if not cfg.ray.include_dashboard:
            runtime_env["worker_process_setup_hook"] = _quiet_placement_group_cleaner
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard, runtime_env=runtime_env)


def build_trainer(cfg: Config, output_dir: Path, data_root: Path) -> TorchTrainer:
    output_dir = Path(output_dir).resolve()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "data_root": str(data_root)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=output_dir.name, storage_path=str(output_dir.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        ),
    )


def root_cause(error: BaseException) -> BaseException:
    """The exception a worker raised (e.g. a DataError naming the corrupt file), unwrapped from Ray Train's
    WorkerGroupError / RayTaskError, so that the user sees one clear message instead of a remote traceback."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = failures[min(failures)]
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def run_training(cfg: Config, output_dir: str | Path) -> dict:
    """Train (or resume) in `output_dir`, evaluate, and write `output_dir/summary.json`; returns the summary."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    root = dataset_root(cfg)
    # Fail fast, before any worker starts, on a bad dataset: every error names the file or image id.
    n_train = len(load_split(cfg, cfg.data.train_split, root=root))
    if cfg.eval.enabled:
        load_split(cfg, cfg.eval.split, require_masks=True, root=root)
    (output_dir / "config.yaml").write_text(dump_yaml(cfg))
    init_ray(cfg)
    result = build_trainer(cfg, output_dir, root).fit()
    if result.error is not None:
        raise root_cause(result.error) from result.error
    summary = {"epochs": cfg.train.epochs, "train_images": n_train, "dataset_root": str(root),
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    metrics = result.metrics or {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            d = Path(d)
            history = json.loads((d / HISTORY_FILE).read_text()) if (d / HISTORY_FILE).is_file() else {}
            (output_dir / HISTORY_FILE).write_text(json.dumps(history))
            if (d / EVAL_FILE).is_file():
                summary.update(json.loads((d / EVAL_FILE).read_text()))
            if (d / OVERLAYS_FILE).is_file():
                shutil.copy(d / OVERLAYS_FILE, output_dir / OVERLAYS_FILE)
        epochs = history.get("epochs", [])
        speeds = [e["images_per_second"] for e in epochs if e.get("images_per_second")]
        summary["train_images_per_second"] = float(np.median(speeds)) if speeds else None
        summary["history_last_epoch"] = epochs[-1] if epochs else None
        if "sweep" in summary:
            save_curves(output_dir / "curves.png", epochs, np.array(summary["sweep"]["thresholds"]),
                        summary["sweep"]["miou"])
    summary["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    summary["config"] = to_dict(cfg)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
