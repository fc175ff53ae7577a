"""The one way this project builds and runs a Ray Train `TorchTrainer` (ACR training, IRN, DeepLab).

Every trainer gets: `scaling.*` (workers, GPU, CPUs per worker), the run folder as Ray's storage_path + name (a
local folder or a URI such as s3://bucket/runs/x, so that checkpoints survive the node), the newest `keep`
checkpoints, `scaling.max_failures` restarts of the worker group from the last checkpoint, its datasets split among
the workers in order (the order is part of the run: a resumed or restarted run streams what an uninterrupted one
would), and workers at normal priority. Failures are unwrapped to the error the worker raised.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ray.train
from ray.train.torch import TorchTrainer

from acr.config import Config
from acr.runtime.boundary import reraise_root_cause
from acr.storage import RunFolder

# Ray starts every worker process at niceness 15 (RAY_worker_niceness), below the driver. Training workers are the
# job's main work: they run at normal priority, as a plain PyTorch process would, while Ray Data's decode actors and
# Ray's helper actors stay at 15.
TRAINING_WORKER_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


def build_trainer(train_fn: Callable[[dict], None], loop_config: dict, output_dir: str | Path | RunFolder,
                  datasets: dict, cfg: Config, workers: int, keep: int = 2, callbacks=None) -> TorchTrainer:
    """The TorchTrainer of a run of `train_fn(loop_config)` on `workers` workers in `output_dir`."""
    folder = RunFolder.of(output_dir)
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    s = cfg.scaling
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=s.use_gpu,
                                               resources_per_worker={"CPU": s.cpus_per_worker}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all", execution_options=options),
        run_config=ray.train.RunConfig(
            name=folder.name, storage_path=folder.parent, storage_filesystem=None if folder.is_local else folder.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            callbacks=callbacks,
            worker_runtime_env=TRAINING_WORKER_ENV,
        ),
    )


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """Run the trainer; a failure is raised as the error its worker raised (see acr.runtime.boundary)."""
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        reraise_root_cause(exc)
    if result.error is not None:
        reraise_root_cause(result.error)
    return result
