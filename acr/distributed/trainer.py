"""The driver side of a training run: shards for the data (converted from the folder on first use), the Ray Data
streams, start or join Ray, fit a TorchTrainer, and turn the final checkpoint into the run folder's summary.json,
pictures and config."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from acr.config import Config, dump_yaml, num_classes, to_dict
from acr.data.ingest import make_plan, train_dataset
from acr.data.shards import ShardIndex, find_corrupt_rows
from acr.data.sources import ensure_shards
from acr.distributed.storage import RunFolder
from acr.distributed.train_loop import (EVAL_FILE, HISTORY_FILE, OVERLAYS_FILE, PROGRESS_FILE, LocalSession, run_worker,
                                        train_loop_per_worker)
from acr.viz import save_curves

# Ray Train V2 polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and each report() waits for a poll.
# Its print patch would log every progress line of the workers twice (once as stdout, once through logging).
_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


# Ray starts every worker process at niceness 15 (RAY_worker_niceness), below the driver. Training workers are the
# job's main work: they run at normal priority, as a plain PyTorch process would, while Ray Data's decode actors and
# Ray's helper actors stay at 15.
TRAINING_WORKER_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


def _quiet_placement_group_cleaner() -> None:
    """Worker setup hook: without the dashboard Ray's state API is absent, and Train's placement-group cleaner
    would log a warning every second that it cannot query it."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def local_num_cpus(cfg: Config, trials: int = 0) -> int:
    """Logical CPUs of a local Ray: the training workers' plus the Ray Data decode actors' plus one for Ray Data's
    small tasks (per run; `trials` concurrent Tune trials each add their driver's share). Ray Data needs CPUs of its
    own, or its tasks never run while the workers hold theirs (a silent deadlock); the logical count may exceed the
    cores, the OS shares them."""
    workers = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    data = cfg.data.decode_actors * cfg.data.decode_cpus + 1
    cores = os.cpu_count() or 1
    if trials:
        return int(math.ceil(max(cores, trials * (workers + data + cfg.tune.trial_cpus))))
    return int(math.ceil(max(cores, workers) + data))


def init_ray(cfg: Config, trials: int = 0) -> None:
    """Join the cluster named by `ray.address` or RAY_ADDRESS (e.g. under `ray job submit`), else start a local one
    (sized for one run, or for `trials` concurrent Tune trials)."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Tune stops a trial (ASHA, or at its last epoch) by killing its driver, and with it Train's controller; the
    # worker group's placement group is then removed by Train's cleaner, which asks the state API, served by the
    # dashboard. Without it every stopped trial leaks its workers' CPUs and the next trial's data stream waits
    # forever for a CPU. So a search always runs with the dashboard.
    dashboard = cfg.ray.include_dashboard or trials > 0
    runtime_env = {"env_vars": {k: os.environ.get(k, v) for k, v in _RAY_ENV.items()}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        for k, v in runtime_env["env_vars"].items():
            os.environ.setdefault(k, v)
        options = {}
        if dashboard:
            # Train's cleaner finds the state API through RAY_API_SERVER_ADDRESS, else it looks for "the" local Ray
            # and fails ("Found multiple active Ray instances") where other Ray instances run on the machine (other
            # users' jobs): every stopped trial would leak its CPUs as above. So the dashboard gets a free port,
            # and every worker its address.
            options["dashboard_port"] = _free_port()
            runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{options['dashboard_port']}"
        else:
            runtime_env["worker_process_setup_hook"] = _quiet_placement_group_cleaner
        num_cpus = cfg.ray.num_cpus or local_num_cpus(cfg, trials)
        if trials:  # Tune sees a trial's driver only (0.1 CPU): this resource caps the trials at once (acr.tuning)
            from acr.tuning import TRIAL_SLOT, concurrent_trials

            gpus = torch.cuda.device_count() if cfg.scaling.use_gpu else 0
            options["resources"] = {TRIAL_SLOT: concurrent_trials(cfg, {"CPU": num_cpus, "GPU": gpus})}
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, runtime_env=runtime_env, **options)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resume_point(output_dir: str | Path | RunFolder) -> tuple[int, int]:
    """(epoch, step) of the checkpoint that Ray Train resumes from in `output_dir` ((0, 0) if none): the latest one
    in Ray's record of the run, so that the training stream starts where the restored networks left off."""
    folder = RunFolder.of(output_dir)
    latest = folder.latest_checkpoint()
    text = folder.read_text("", fs_path=f"{latest}/{PROGRESS_FILE}") if latest else None
    if latest and text is None:
        raise ValueError(f"the run's latest checkpoint {folder.uri(fs_path=latest)} has no {PROGRESS_FILE}: it was "
                         "not written by this code; choose another --output-dir")
    if text is None:
        return 0, 0
    d = json.loads(text)
    return int(d["epoch"]), int(d["step_in_epoch"])


def prepare_run(cfg: Config, start: tuple[int, int] = (0, 0), progress: bool = True,
                world: int | None = None) -> tuple[dict, dict, dict]:
    """(loop_config, datasets, data_info) of a run: the shards (converted if need be), the usable training images
    (rows that do not decode are left out with data.skip_corrupt, else they stop the run where met), the training
    stream from `start` (epoch, step) cut for scaling.num_workers (the eval split is read by the workers)."""
    uri, manifest = ensure_shards(cfg, progress=progress)
    split = cfg.data.train_split
    indices = ShardIndex(manifest, split).indices
    corrupt = find_corrupt_rows(uri, manifest, split) if cfg.data.skip_corrupt else []
    if corrupt:
        bad = {r["index"] for r in corrupt}
        indices = [i for i in indices if i not in bad]
    start_epoch = min(start[0], cfg.train.epochs)
    plan = make_plan(indices, cfg, world or cfg.scaling.num_workers, start_epoch, start[1] if start_epoch < cfg.train.epochs else 0)
    datasets = {"train": train_dataset(uri, manifest, plan, cfg, num_classes(cfg))}
    info = {"shards": uri, "train_images": len(indices), "dropped_per_epoch": plan.dropped_per_epoch,
            "train_skipped_corrupt": len(manifest["splits"][split]["skipped"]) + len(corrupt),
            "skipped_corrupt_ids": [r["id"] for r in manifest["splits"][split]["skipped"] + corrupt]}
    loop_config = {"config": to_dict(cfg), "shards": uri, "manifest": manifest, "plan": plan.to_dict()}
    return loop_config, datasets, info


def run_local(cfg: Config, folder: Path, device: torch.device | str = "cpu") -> LocalSession:
    """The training loop in this process, one worker, no Ray Train (the plain PyTorch loop of the benchmarks), fed
    by the same Ray Data stream; returns the session with every report and the last checkpoint."""
    init_ray(cfg)
    loop_config, datasets, _ = prepare_run(cfg, progress=False, world=1)
    session = LocalSession(Path(folder), datasets, device)
    run_worker(loop_config, session)
    return session


def build_trainer(cfg: Config, output_dir: str | Path | RunFolder, loop_config: dict, datasets: dict,
                  train_fn=train_loop_per_worker, callbacks=None) -> TorchTrainer:
    """The TorchTrainer of a run in `output_dir` (a local folder or a URI such as s3://bucket/runs/voc: Ray's
    storage_path + name): `datasets["train"]` is split among the workers, in order; the last
    `train.keep_checkpoints` checkpoints are kept; after a worker fails, the worker group restarts from the last
    checkpoint up to `scaling.max_failures` times."""
    folder = RunFolder.of(output_dir)
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True  # the stream's order is the epoch's permutation (acr.data.ingest)
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=options),
        run_config=ray.train.RunConfig(
            name=folder.name, storage_path=folder.parent, storage_filesystem=None if folder.is_local else folder.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks,
            worker_runtime_env=TRAINING_WORKER_ENV,
        ),
    )


def root_cause(error: BaseException) -> BaseException:
    """The exception a worker raised (e.g. a DataError naming the corrupt file), unwrapped from Ray Train's
    WorkerGroupError / RayTaskError, so that the user sees one clear message instead of a remote traceback."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = failures[min(failures)]
    # Follow the chain (Ray's RayTaskError.cause, Ray Data's UserCodeException.__cause__) to the first exception
    # that this library raised, e.g. the DataError of a Ray Data decode actor; else to the deepest one.
    chain, e = [], error
    while isinstance(e, BaseException) and e not in chain:
        chain.append(e)
        if type(e).__module__.split(".")[0] == "acr":
            return e
        e = getattr(e, "cause", None) or e.__cause__
    # Ray Data hands a UDF's failure over as UserCodeException with the original only in the remote traceback text.
    for e in chain:
        found = re.findall(r"^(acr(?:\.\w+)+)\.(\w+): (.+)$", str(e), flags=re.M)
        if found:
            module, name, message = found[-1]
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                return cls(message)
    return chain[-1] if len(chain) > 1 else error


def run_training(cfg: Config, output_dir: str | Path) -> dict:
    """Train (or resume) in `output_dir` (a local folder or a URI, e.g. s3://bucket/runs/voc), evaluate, and write
    `summary.json` there; returns the summary."""
    folder = RunFolder(output_dir)
    folder.makedirs()
    folder.write_text("config.yaml", dump_yaml(cfg))
    init_ray(cfg)
    # Fail fast, before any worker starts, on bad data: every error names the file, shard or image id.
    loop_config, datasets, data_info = prepare_run(cfg, resume_point(folder))
    try:
        result = build_trainer(cfg, folder, loop_config, datasets).fit()
    except ray.train.TrainingFailedError as exc:
        raise root_cause(exc) from exc
    if result.error is not None:
        raise root_cause(result.error) from result.error
    summary = {"epochs": cfg.train.epochs, **data_info,
               "checkpoint": folder.uri(fs_path=result.checkpoint.path) if result.checkpoint else None}
    metrics = result.metrics or {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
            d = Path(d)
            history = json.loads((d / HISTORY_FILE).read_text()) if (d / HISTORY_FILE).is_file() else {}
            folder.write_text(HISTORY_FILE, json.dumps(history))
            if (d / EVAL_FILE).is_file():
                summary.update(json.loads((d / EVAL_FILE).read_text()))
            if (d / OVERLAYS_FILE).is_file():
                folder.put_file(d / OVERLAYS_FILE, OVERLAYS_FILE)
            epochs = history.get("epochs", [])
            speeds = [e["images_per_second"] for e in epochs if e.get("images_per_second")]
            summary["train_images_per_second"] = float(np.median(speeds)) if speeds else None
            summary["history_last_epoch"] = epochs[-1] if epochs else None
            # where the run restarted from a checkpoint (a failed worker, or a rerun in this folder)
            summary["resumes"] = history.get("resumes", [])
            if "sweep" in summary:
                save_curves(Path(tmp) / "curves.png", epochs, np.array(summary["sweep"]["thresholds"]),
                            summary["sweep"]["miou"])
                folder.put_file(Path(tmp) / "curves.png", "curves.png")
    summary["skipped_corrupt"] = summary["train_skipped_corrupt"] + summary.get("eval_skipped_corrupt", 0)
    summary["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    summary["config"] = to_dict(cfg)
    summary["output_dir"] = folder.uri()
    folder.write_text("summary.json", json.dumps(summary, indent=1))
    return summary
