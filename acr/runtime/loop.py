"""The resumable training loop of the batch jobs' networks (IRN's boundary branch, DeepLab), one for both.

The driver builds one Ray Data dataset per remaining epoch (:func:`epoch_datasets`), each the epoch's images in a
permuted order from (seed, epoch), starting at the run's resume point; every worker runs :func:`train_epochs`: SGD
with the one poly LR over all steps, the one non-finite-loss policy, and a checkpoint (model, optimiser, counters,
history) after every epoch and every `checkpoint_every` steps, through the session's checkpoint contract. A worker
group restarted by Ray Train, or a rerun of the job in the same folder, resumes from the latest checkpoint: it skips
the batches that checkpoint had trained on and ends with the parameters of an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from acr.config import Config, config_from_dict
from acr.method.optim import guarded_step, set_poly_lr
from acr.runtime.collectives import reduce_mean
from acr.runtime.logs import setup_logging
from acr.runtime.session import RaySession, Session, set_worker_threads

log = logging.getLogger(__name__)


@dataclass
class LoopPlan:
    name: str  # in messages: "IRN", "DeepLab"
    epochs: int
    steps_per_epoch: int
    batch_size: int  # global, divided among the workers
    lr: float
    poly_power: float
    max_consecutive_nonfinite: int
    checkpoint_every: int | None = None
    start: tuple[int, int] = (0, 0)  # (epoch, step) where the driver's datasets start
    seed: int = 0  # torch's RNG (dropout) is seeded from (seed, rank, step) before every step

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class LoopCounters:
    steps: int = 0  # optimiser steps taken (a skipped step does not count)
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0


@dataclass
class LoopState:
    epoch: int = 0
    step: int = 0
    counters: LoopCounters = field(default_factory=LoopCounters)
    history: list = field(default_factory=list)
    resumes: list = field(default_factory=list)  # [epoch, step] of every checkpoint a worker group restarted from


def epoch_datasets(plan: LoopPlan, make_epoch: Callable[[int, int], object], workers: int) -> dict:
    """{"epoch<e>": make_epoch(e, first_row)} for every epoch from the plan's start; the first starts at row
    start_step * batch_size of its epoch's order. Cut into blocks of exactly batch_size / workers rows, in order:
    Ray Train hands them to the workers in turn, so global batch k is the epoch's rows kB..kB+B-1 for any number of
    workers (acr.data.ingest does the same for ACR)."""
    e0, s0 = plan.start
    return {f"epoch{e}": make_epoch(e, s0 * plan.batch_size if e == e0 else 0).repartition(
        target_num_rows_per_block=plan.batch_size // workers, strict=True) for e in range(e0, plan.epochs)}


def start_worker(loop_config: dict) -> tuple[Config, RaySession, LoopPlan]:
    """A TorchTrainer function's start: logging, its config, session and plan, its threads, and torch's seed (the
    network's initial weights: the same in every run). The first epoch's stream is asked for before the network is
    built: its coordinator (a process of its own) starts meanwhile instead of after."""
    setup_logging()
    cfg, session, plan = config_from_dict(loop_config["config"]), RaySession(), LoopPlan(**loop_config["plan"])
    session.dataset(f"epoch{plan.start[0]}")
    set_worker_threads(cfg)
    torch.manual_seed(cfg.train.seed)
    return cfg, session, plan


def restore_into(session: Session, model: nn.Module, optimizer: torch.optim.Optimizer) -> LoopState:
    """The loop's state after the latest checkpoint (loaded into `model` and `optimizer`), or a fresh one."""
    restored = session.restore(map_location=session.device)
    if restored is None:
        return LoopState()
    model.load_state_dict(restored.state["model"])
    optimizer.load_state_dict(restored.state["optimizer"])
    return LoopState(restored.epoch, restored.step_in_epoch, LoopCounters(**restored.state["counters"]),
                     list(restored.state["history"]),
                     list(restored.state.get("resumes", [])) + [[restored.epoch, restored.step_in_epoch]])


def _batches(session: Session, plan: LoopPlan, state: LoopState, epoch: int):
    """This worker's batches of `epoch` that the state has not trained on yet."""
    it = iter(session.dataset(f"epoch{epoch}").iter_torch_batches(batch_size=plan.batch_size // session.world,
                                                                  device=session.device, drop_last=True))
    first = state.step if epoch == state.epoch else 0  # the epoch's step this worker continues from
    streamed_from = plan.start[1] if epoch == plan.start[0] else 0  # the step the driver's dataset starts at
    for _ in range(first - streamed_from):
        next(it)
    return it, first


def train_epochs(session: Session, model: nn.Module, ddp: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[nn.Module, dict], torch.Tensor], plan: LoopPlan, extra_state: dict | None = None
                 ) -> LoopState:
    """Train `ddp` (DDP-wrapped) from the latest checkpoint to the end of the plan; checkpoints hold `model`'s state
    (the trained module, or the trained part of it); returns the loop's state."""
    state = restore_into(session, model, optimizer)

    def checkpoint(metrics: dict, epoch: int, step: int) -> None:
        snapshot = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "counters": asdict(state.counters), "history": state.history, "resumes": state.resumes,
                    **(extra_state or {})}
        session.report(metrics, epoch, step, state=snapshot if session.rank == 0 else None)

    for epoch in range(state.epoch, plan.epochs):
        batches, step = _batches(session, plan, state, epoch)
        if epoch + 1 < plan.epochs:  # the next epoch's stream starts its coordinator (a process) while this one trains
            session.dataset(f"epoch{epoch + 1}")
        losses, t0 = [], time.perf_counter()
        for batch in batches:
            if step >= plan.steps_per_epoch:
                break
            global_step = epoch * plan.steps_per_epoch + step
            set_poly_lr(optimizer, plan.lr, global_step, plan.total_steps, plan.poly_power)
            torch.manual_seed(hash((plan.seed, session.rank, global_step)) & 0x7FFFFFFF)  # no RNG state to restore
            ddp.train()
            loss = loss_fn(ddp, batch)
            optimizer.zero_grad(set_to_none=True)
            value, ok = guarded_step(loss, optimizer, reduce_mean, state.counters, plan.max_consecutive_nonfinite,
                                     plan.name)
            state.counters.steps += ok
            losses.append(value)
            step += 1
            if plan.checkpoint_every and step % plan.checkpoint_every == 0 and step < plan.steps_per_epoch:
                checkpoint({"epoch": epoch, "step_in_epoch": step}, epoch, step)
        state.history.append(_epoch_record(plan, epoch, losses, time.perf_counter() - t0, optimizer))
        if session.rank == 0:
            log.info("%s epoch %d/%d: loss %s", plan.name, epoch + 1, plan.epochs, state.history[-1]["loss"])
        state.epoch, state.step = epoch + 1, 0
        checkpoint({"epoch": epoch + 1, "loss": state.history[-1]["loss"]}, epoch + 1, 0)
    return state


def _epoch_record(plan: LoopPlan, epoch: int, losses: list[float], seconds: float, optimizer) -> dict:
    finite = [v for v in losses if np.isfinite(v)]
    return {"epoch": epoch + 1, "loss": float(np.mean(finite)) if finite else None, "steps": len(losses),
            "images_per_second": len(losses) * plan.batch_size / seconds if losses and seconds > 0 else None,
            "lr_last_step": optimizer.param_groups[0]["lr"]}
