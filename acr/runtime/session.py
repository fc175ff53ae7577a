"""The one checkpoint contract of every Ray Train job (ACR, IRN, DeepLab), and the worker's view of Ray Train.

A checkpoint is a folder with `state.pt` (tensors and plain containers, read back with weights_only=True),
`progress.json` ({"epoch": e, "step_in_epoch": s}: the point the run resumes from) and any other files the job adds
(history, pictures). Workers report it through :meth:`Session.report` (every rank calls it; rank 0's state is
saved) and get the latest one back through :meth:`Session.restore`, i.e. `ray.train.get_checkpoint()` after a worker
group restarts, or after a rerun in the same run folder. The driver reads the resume point with :func:`resume_point`
(the same record Ray Train resumes from), so the data a rerun streams starts where the restored networks left off.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from acr.checkpoint import load_state, save_state
from acr.errors import CheckpointError
from acr.storage import RunFolder

PROGRESS_FILE = "progress.json"

# A checkpoint's extra files: name -> text, bytes, or a function that writes the file at the given path.
Files = dict[str, str | bytes | Callable[[Path], None]]


@dataclass
class Restored:
    state: dict
    epoch: int
    step_in_epoch: int
    files: dict[str, str]  # the checkpoint's other JSON / text files, by name


def write_checkpoint(folder: Path, state: dict, epoch: int, step_in_epoch: int, files: Files | None = None) -> None:
    save_state(folder, state)
    (folder / PROGRESS_FILE).write_text(json.dumps({"epoch": epoch, "step_in_epoch": step_in_epoch}))
    for name, content in (files or {}).items():
        if callable(content):
            content(folder / name)
        else:
            (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)


def read_checkpoint(folder: Path, map_location="cpu") -> Restored:
    progress = folder / PROGRESS_FILE
    if not progress.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {PROGRESS_FILE}: it was not written by this code")
    point = json.loads(progress.read_text())
    files = {p.name: p.read_text() for p in folder.glob("*.json") if p.name != PROGRESS_FILE}
    return Restored(load_state(folder, map_location), int(point["epoch"]), int(point["step_in_epoch"]), files)


def resume_point(output_dir: str | Path | RunFolder) -> tuple[int, int]:
    """(epoch, step) of the checkpoint that Ray Train resumes from in `output_dir` ((0, 0) if none): the latest one
    in Ray's record of the run."""
    folder = RunFolder.of(output_dir)
    latest = folder.latest_checkpoint()
    text = folder.read_text("", fs_path=f"{latest}/{PROGRESS_FILE}") if latest else None
    if latest and text is None:
        raise CheckpointError(f"the run's latest checkpoint {folder.uri(fs_path=latest)} has no {PROGRESS_FILE}: "
                              "it was not written by this code; choose another --output-dir")
    if text is None:
        return 0, 0
    d = json.loads(text)
    return int(d["epoch"]), int(d["step_in_epoch"])


def read_latest(output_dir: str | Path | RunFolder, map_location="cpu") -> Restored | None:
    """The run's latest recorded checkpoint (None if it has none), read from its storage (local or a URI)."""
    folder = RunFolder.of(output_dir)
    latest = folder.latest_checkpoint()
    if latest is None:
        return None
    with ray.train.Checkpoint(latest, filesystem=folder.fs).as_directory() as d:
        return read_checkpoint(Path(d), map_location)


def set_worker_threads(cfg) -> None:
    """Compute threads of a training worker: train.threads_per_worker, else its scaling.cpus_per_worker."""
    torch.set_num_threads(cfg.train.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker)))


class Session:
    """What a training loop needs from Ray Train: rank, world size, device, its dataset shards, DDP, and the
    checkpoint contract (see the module docstring)."""

    rank: int
    world: int
    device: torch.device

    def restore(self, map_location="cpu") -> Restored | None:
        raise NotImplementedError

    def report(self, metrics: dict, epoch: int, step_in_epoch: int, state: dict | None = None,
               files: Files | None = None) -> None:
        """Report `metrics`; with `state` (rank 0's) also a checkpoint at (epoch, step_in_epoch). Every rank calls
        it, with or without a state."""
        if state is None or self.rank != 0:
            self._report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp), state, epoch, step_in_epoch, files)
            self._report(metrics, Path(tmp))

    def _report(self, metrics: dict, folder: Path | None) -> None:
        raise NotImplementedError

    def dataset(self, name: str):
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, **ddp_kwargs) -> torch.nn.Module:
        raise NotImplementedError


class RaySession(Session):
    """Inside a TorchTrainer worker."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self, map_location="cpu") -> Restored | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return read_checkpoint(Path(d), map_location)

    def _report(self, metrics: dict, folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    def dataset(self, name: str):
        return ray.train.get_dataset_shard(name)

    def prepare(self, model: torch.nn.Module, **ddp_kwargs) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=self.device, parallel_strategy_kwargs=ddp_kwargs)


class LocalSession(Session):
    """The same loop in this process, without Ray Train (one worker): the plain PyTorch baseline of the benchmarks.
    Checkpoints are copied to `folder/checkpoint_NNNNNN`; `reports` keeps every reported metrics dict."""

    def __init__(self, folder: Path, datasets: dict, device: torch.device | str = "cpu", on_report=None):
        self.rank, self.world, self.device = 0, 1, torch.device(device)
        self.datasets = datasets
        self.folder = Path(folder)
        self.reports: list[dict] = []
        self.last_checkpoint: Path | None = None
        self.on_report = on_report

    def restore(self, map_location="cpu") -> Restored | None:
        return None

    def _report(self, metrics: dict, folder: Path | None) -> None:
        self.reports.append(metrics)
        if folder:
            dest = self.folder / f"checkpoint_{len(self.reports):06d}"
            shutil.copytree(folder, dest)
            self.last_checkpoint = dest
        if self.on_report is not None:
            self.on_report(metrics)

    def dataset(self, name: str):
        return self.datasets[name].iterator()

    def prepare(self, model: torch.nn.Module, **ddp_kwargs) -> torch.nn.Module:
        return model.to(self.device)
