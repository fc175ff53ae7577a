"""The driver of an ACR training run: the shards (converted from the folder on first use), the training stream from
the run's resume point, the TorchTrainer (acr.runtime.trainer), and the final checkpoint turned into the run
folder's summary.json, history.json, pictures and config."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import torch

from acr.config import Config, dump_yaml, num_classes, to_dict
from acr.data.ingest import make_plan, train_dataset
from acr.data.shards import ShardIndex, find_corrupt_rows
from acr.data.sources import ensure_shards
from acr.runtime.cluster import init_ray, job_nodes
from acr.runtime.reach import stage_inputs
from acr.runtime.session import LocalSession, resume_point
from acr.train.standin import resolve_standin
from acr.runtime.trainer import build_trainer, fit
from acr.storage import RunFolder
from acr.train.worker import EVAL_FILE, HISTORY_FILE, OVERLAYS_FILE, run_worker, train_loop_per_worker
from acr.viz import save_curves

log = logging.getLogger(__name__)


def prepare_run(cfg: Config, start: tuple[int, int] = (0, 0), progress: bool = True,
                world: int | None = None, storage: RunFolder | None = None) -> tuple[dict, dict, dict]:
    """(loop_config, datasets, data_info) of a run: the shards (converted if need be), the usable training images
    (rows that do not decode are left out with data.skip_corrupt, else they stop the run where met), the training
    stream from `start` (epoch, step) cut for scaling.num_workers (the eval split is read by the workers). With the
    run's `storage`, the shards and weights are put where every worker of the cluster reads them
    (acr.runtime.reach)."""
    uri, manifest = ensure_shards(cfg, progress=progress)
    split = cfg.data.train_split
    indices = ShardIndex(manifest, split).indices
    corrupt = find_corrupt_rows(uri, manifest, split) if cfg.data.skip_corrupt else []
    if corrupt:
        bad = {r["index"] for r in corrupt}
        indices = [i for i in indices if i not in bad]
    init_ray(cfg, "train")  # the data checked first: a missing folder or bucket stops the job before Ray starts
    cfg = resolve_pretrained(cfg, storage=storage)  # model.pretrained=standin: made on first use (after the checks)
    if storage is not None:
        cfg = stage_inputs(cfg, storage, uri)
        uri = cfg.data.shards or uri
    start_epoch = min(start[0], cfg.train.epochs)
    plan = make_plan(indices, cfg, world or cfg.scaling.num_workers, start_epoch,
                     start[1] if start_epoch < cfg.train.epochs else 0)
    datasets = {"train": train_dataset(uri, manifest, plan, cfg, num_classes(cfg))}
    info = {"shards": uri, "train_images": len(indices), "dropped_per_epoch": plan.dropped_per_epoch,
            "train_skipped_corrupt": len(manifest["splits"][split]["skipped"]) + len(corrupt),
            "skipped_corrupt_ids": [r["id"] for r in manifest["splits"][split]["skipped"] + corrupt]}
    loop_config = {"config": to_dict(cfg), "shards": uri, "manifest": manifest, "plan": plan.to_dict()}
    return loop_config, datasets, info


def resolve_pretrained(cfg: Config, model: bool = True, segment: bool = False,
                       storage: RunFolder | None = None) -> Config:
    """`cfg` with `model.pretrained` (with `segment`: also `segment.pretrained`) = "standin" replaced by the file of
    the stand-in for ImageNet weights, pre-trained with the plain loop on first use (acr.train.standin). On a cluster
    of several nodes the pre-training's data stream reads its shards from the job's `storage`."""
    return resolve_standin(cfg, functools.partial(run_local, storage=storage), model, segment)


def run_local(cfg: Config, folder: Path, device: torch.device | str = "cpu", on_report=None,
              storage: RunFolder | None = None) -> LocalSession:
    """The training loop in this process, one worker, no Ray Train (the plain PyTorch loop of the benchmarks), fed
    by the same Ray Data stream; returns the session with every report and the last checkpoint. `on_report(metrics)`
    is called at every report (a progress bar); `storage`: see prepare_run."""
    init_ray(cfg)
    loop_config, datasets, _ = prepare_run(cfg, progress=False, world=1, storage=storage)
    session = LocalSession(Path(folder), datasets, device, on_report)
    threads = torch.get_num_threads()  # the loop sets a worker's (train.threads_per_worker): this process keeps its own
    try:
        run_worker(loop_config, session)
    finally:
        torch.set_num_threads(threads)
    return session


def training_trainer(cfg: Config, output_dir: str | Path | RunFolder, loop_config: dict, datasets: dict,
                     callbacks=None):
    """The TorchTrainer of an ACR run (the one builder, with ACR's worker function and checkpoint count)."""
    return build_trainer(train_loop_per_worker, loop_config, output_dir, datasets, cfg, cfg.scaling.num_workers,
                         keep=cfg.train.keep_checkpoints, callbacks=callbacks)


def run_training(cfg: Config, output_dir: str | Path) -> dict:
    """Train (or resume) in `output_dir` (a local folder or a URI, e.g. s3://bucket/runs/voc), evaluate, and write
    `summary.json` there; returns the summary."""
    folder = RunFolder(output_dir)
    folder.makedirs()
    folder.write_text("config.yaml", dump_yaml(cfg))
    # Fail fast, before any worker starts, on bad data: every error names the file, shard or image id.
    loop_config, datasets, data_info = prepare_run(cfg, resume_point(folder), storage=folder)
    result = fit(training_trainer(cfg, folder, loop_config, datasets))
    summary = {"epochs": cfg.train.epochs, **data_info,
               "checkpoint": folder.uri(fs_path=result.checkpoint.path) if result.checkpoint else None}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            summary.update(_from_final_checkpoint(cfg, folder, Path(d)))
    summary["skipped_corrupt"] = summary["train_skipped_corrupt"] + summary.get("eval_skipped_corrupt", 0)
    summary["metrics"] = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}
    summary["config"] = to_dict(cfg)
    summary["output_dir"] = folder.uri()
    summary["nodes"] = job_nodes()
    folder.write_json("summary.json", summary)
    return summary


def _from_final_checkpoint(cfg: Config, folder: RunFolder, d: Path) -> dict:
    """The run folder's history.json, overlays and curves from the final checkpoint; the summary's entries."""
    history = json.loads((d / HISTORY_FILE).read_text()) if (d / HISTORY_FILE).is_file() else {}
    folder.write_text(HISTORY_FILE, json.dumps(history))
    out = json.loads((d / EVAL_FILE).read_text()) if (d / EVAL_FILE).is_file() else {}
    if (d / OVERLAYS_FILE).is_file():
        folder.put_file(d / OVERLAYS_FILE, OVERLAYS_FILE)
    epochs = history.get("epochs", [])
    speeds = [e["images_per_second"] for e in epochs if e.get("images_per_second")]
    out["train_images_per_second"] = float(np.median(speeds)) if speeds else None
    out["history_last_epoch"] = epochs[-1] if epochs else None
    out["resumes"] = history.get("resumes", [])  # where the run restarted from a checkpoint (a failed worker, a rerun)
    if "sweep" in out:
        sweep = out["sweep"]
        folder.save("curves.png", lambda p: save_curves(p, epochs, np.array(sweep["thresholds"]), sweep["miou"]))
    return out
