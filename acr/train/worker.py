"""The per-worker ACR training function run by Ray Train's TorchTrainer (or in-process by the benchmarks).

[1] every worker builds both networks with the same seed (identical initial weights whatever the worker count) and
takes its share of the Ray Data training stream (acr.data.ingest); [2] it restores the latest checkpoint, if any
(networks, optimisers, counters, RNG state, history); [3] the trained networks are wrapped for DDP (gloo on CPU,
NCCL on GPU); [4] every epoch (and every `train.checkpoint_every_steps` steps) all workers report, rank 0 attaching
the checkpoint (acr.runtime.session); [5] after training the eval split is scored by all workers and the result is
reported with the final checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from acr.checkpoint import load_state
from acr.config import Config, config_from_dict, num_classes, to_dict
from acr.data.ingest import CALIBRATION_EPOCH, EvalRows, TrainPlan, TrainRows, augment_kwargs
from acr.errors import CheckpointError, ConfigError
from acr.method.acr import unwrap
from acr.method.optim import build_classifier_optimizer, build_reconstructor_optimizer
from acr.method.schedules import srf_probability
from acr.method.step import StepCounters, bf16_is_fast, memory_layout, train_step, uses_bf16
from acr.models.backbones import calibrate_batchnorm
from acr.models.factory import build_classifier, build_reconstructor, encoder_weights
from acr.runtime.collectives import all_gather, peak_rss_mb, reduce_mean, replica_divergence
from acr.runtime.logs import setup_logging
from acr.runtime.session import RaySession, Session, set_worker_threads
from acr.train.evaluate import evaluate_split
from acr.viz import save_cam_overlays

log = logging.getLogger(__name__)
EVAL_FILE = "eval.json"
HISTORY_FILE = "history.json"
OVERLAYS_FILE = "cam_overlays.png"


@dataclass
class Run:
    """A worker's training state."""
    cfg: Config
    plan: TrainPlan
    classifier: torch.nn.Module
    reconstructor: torch.nn.Module | None
    opt_cls: torch.optim.Optimizer | None
    opt_rec: torch.optim.Optimizer | None
    counters: StepCounters = field(default_factory=StepCounters)
    history: dict = field(default_factory=lambda: {"epochs": [], "steps": []})
    start_epoch: int = 0
    start_step: int = 0


def train_loop_per_worker(loop_config: dict) -> None:
    """The TorchTrainer entry point."""
    setup_logging()
    run_worker(loop_config, RaySession())


def _check_worker(cfg: Config, plan: TrainPlan, session: Session) -> None:
    if plan.world != session.world:
        raise ConfigError(f"the training stream was cut for {plan.world} workers, this run has {session.world}")
    if cfg.train.precision == "bf16" and not bf16_is_fast(session.device):
        raise ConfigError("train.precision=bf16: this CPU has no oneDNN bf16 kernels (they need AVX512-BF16 or AMX); "
                          "bf16 convolutions would fall back to a path hundreds of times slower. Use fp32 here, or "
                          "bf16_where_fast (bf16 where it is fast, fp32 elsewhere).")


def build_run(cfg: Config, plan: TrainPlan, rank: int) -> Run:
    """Both networks (identical on every worker: seeded by train.seed) and their optimisers; from here on only
    dropout draws from torch's RNG, seeded per worker."""
    torch.manual_seed(cfg.train.seed)
    classifier = build_classifier(cfg)
    reconstructor = build_reconstructor(cfg) if cfg.method.reconstructor == "adversarial" else None
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    if cfg.method.init_classifier:
        classifier.load_state_dict(load_state(cfg.method.init_classifier)["classifier"])
    if not cfg.method.train_classifier:
        classifier.requires_grad_(False)
    opt_cls = build_classifier_optimizer(classifier, cfg.optim) if cfg.method.train_classifier else None
    opt_rec = build_reconstructor_optimizer(reconstructor, cfg.optim) if reconstructor is not None else None
    return Run(cfg, plan, classifier, reconstructor, opt_cls, opt_rec)


def restore(run: Run, session: Session, dtype: torch.dtype) -> bool:
    """Load the latest checkpoint into `run` (networks in the checkpoint's precision first: fp64 stays fp64, and the
    optimisers' momentum buffers take the parameters' dtype). False if there is none."""
    restored = session.restore()
    if restored is None:
        return False
    for net in (run.classifier, run.reconstructor):
        if net is not None:
            net.to(dtype)
    state = restored.state
    run.classifier.load_state_dict(state["classifier"])
    if run.opt_cls is not None:
        run.opt_cls.load_state_dict(state["opt_cls"])
    if run.reconstructor is not None:
        run.reconstructor.load_state_dict(state["reconstructor"])
        run.opt_rec.load_state_dict(state["opt_rec"])
    run.start_epoch, run.start_step = restored.epoch, restored.step_in_epoch
    run.counters = StepCounters(**state["counters"])
    torch.set_rng_state(state["torch_rng"][session.rank % len(state["torch_rng"])])
    if HISTORY_FILE in restored.files:
        run.history = json.loads(restored.files[HISTORY_FILE])
    # every restart from a checkpoint (a failed worker group, or a rerun in the same folder) is on record
    run.history.setdefault("resumes", []).append({"epoch": run.start_epoch, "step_in_epoch": run.start_step})
    if run.plan.batches_before(run.start_epoch, run.start_step) < 0:
        raise CheckpointError(f"the checkpoint is at epoch {run.start_epoch} step {run.start_step}, before the start "
                              f"of the training stream (epoch {run.plan.start_epoch} step {run.plan.start_step})")
    return True


def calibrate(run: Run, rows: TrainRows, device: torch.device) -> None:
    """Random init: the frozen BatchNorm statistics estimated from the same training images on every worker (for each
    network whose backbone starts without weights; a ViT classifier has no BatchNorm, its CNN encoder has)."""
    cfg = run.cfg
    nets = [net for net, weights in ((None if cfg.method.init_classifier else run.classifier, cfg.model.pretrained),
                                     (run.reconstructor, encoder_weights(cfg))) if net is not None and weights is None]
    if not nets or not cfg.model.freeze_bn or not cfg.model.bn_calibration_images:
        return
    first = run.plan.indices[: cfg.model.bn_calibration_images]
    images = torch.from_numpy(rows.decode(np.full(len(first), CALIBRATION_EPOCH), np.array(first))["image"])
    calib = [images[j:j + 8].to(device) for j in range(0, len(images), 8)]
    for net in nets:
        net.to(device)
        calibrate_batchnorm(net.backbone, calib)


def _load_frozen_reconstructor(cfg: Config, device: torch.device) -> torch.nn.Module:
    rec = build_reconstructor(cfg)
    state = load_state(cfg.method.pretrained_reconstructor)
    if state.get("reconstructor") is None:
        raise CheckpointError(f"{cfg.method.pretrained_reconstructor} holds no reconstructor")
    missing, unexpected = rec.load_state_dict(state["reconstructor"], strict=False)
    if missing or [k for k in unexpected if not k.startswith("cls_head.")]:
        raise CheckpointError(f"{cfg.method.pretrained_reconstructor}: reconstructor does not fit this config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    rec.requires_grad_(False)
    return rec.to(device).eval()


def wrap(run: Run, session: Session, dtype: torch.dtype) -> None:
    """Networks in the run's precision and layout, the trained ones wrapped for DDP (a frozen classifier, in
    reconstructor pre-training, has nothing to synchronise); frozen BN buffers never change, so DDP does not
    broadcast them before every forward."""
    cfg, layout = run.cfg, memory_layout(run.cfg)
    for net in (run.classifier, run.reconstructor):
        if net is not None:
            net.to(dtype=dtype, memory_format=layout)
    run.classifier = (session.prepare(run.classifier, broadcast_buffers=False) if run.opt_cls is not None
                      else run.classifier.to(session.device))
    if run.reconstructor is not None:
        run.reconstructor = session.prepare(run.reconstructor, broadcast_buffers=False)
    elif cfg.method.reconstructor == "pretrained":
        run.reconstructor = _load_frozen_reconstructor(cfg, session.device).to(dtype=dtype, memory_format=layout)


def checkpoint_state(run: Run, epoch: int, step: int) -> dict:
    """What a checkpoint holds (every rank joins the RNG all-gather)."""
    return {
        "config": to_dict(run.cfg), "epoch": epoch, "step_in_epoch": step, "counters": run.counters.__dict__.copy(),
        "torch_rng": all_gather(torch.get_rng_state()),
        "classifier": unwrap(run.classifier).state_dict(),
        "opt_cls": run.opt_cls.state_dict() if run.opt_cls is not None else None,
        "reconstructor": unwrap(run.reconstructor).state_dict() if run.opt_rec is not None else None,
        "opt_rec": run.opt_rec.state_dict() if run.opt_rec is not None else None,
    }


def report(run: Run, session: Session, metrics: dict, epoch: int, step: int, files: dict | None = None) -> None:
    state = checkpoint_state(run, epoch, step)
    session.report(metrics, epoch, step, state=state, files={HISTORY_FILE: json.dumps(run.history), **(files or {})})


def train_one_epoch(run: Run, session: Session, batches, epoch: int, max_step: int) -> dict:
    """The epoch's steps (from run.start_step); its statistics averaged over workers."""
    cfg, plan = run.cfg, run.plan
    q = srf_probability(cfg.method.srf, epoch)
    dtype = torch.float64 if cfg.train.precision == "fp64" else torch.float32
    sums, n_steps, t_steps, t_prev = {}, 0, 0.0, time.perf_counter()
    for step in range(run.start_step, plan.steps_per_epoch):
        batch = next(batches, None)
        t0 = time.perf_counter()  # t0 - t_prev: waiting for data
        if batch is None or bool((batch["epoch"] != epoch).any()):
            raise RuntimeError(f"the training stream is out of step: epoch {epoch} step {step} received "
                               f"{'nothing' if batch is None else 'rows of epoch ' + str(batch['epoch'].tolist())}")
        batch = {k: batch[k].to(session.device, dtype=dtype if batch[k].is_floating_point() else None,
                                non_blocking=True) for k in ("image", "labels", "target_u", "grid_u")}
        out = train_step(run.classifier, run.reconstructor, run.opt_cls, run.opt_rec, batch, cfg, q, max_step,
                         run.counters, reduce_mean, session.device)
        t1 = time.perf_counter()
        t_steps += t1 - t_prev
        run.history["steps"].append({"epoch": epoch, "step": step, "ru/loss": out.get("ru/loss"),
                                     "cu/loss": out.get("cu/loss"), "seconds": t1 - t_prev, "data_seconds": t0 - t_prev})
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v
        n_steps += 1
        _log_step(run, session, epoch, step + 1, out, n_steps, t_steps)
        every = cfg.train.checkpoint_every_steps
        if every and (step + 1) % every == 0 and step + 1 < plan.steps_per_epoch:
            report(run, session, {"epoch": epoch, "step_in_epoch": step + 1}, epoch, step + 1)
        t_prev = time.perf_counter()
    run.start_step = 0
    return _epoch_stats(run, epoch, q, sums, n_steps, t_steps, session.world)


def _log_step(run: Run, session: Session, epoch: int, step: int, out: dict, n_steps: int, t_steps: float) -> None:
    cfg = run.cfg
    if session.rank == 0 and cfg.train.log_every_steps and step % cfg.train.log_every_steps == 0:
        log.info("epoch %d/%d step %d/%d: %s (%.2f img/s)", epoch + 1, cfg.train.epochs, step,
                 run.plan.steps_per_epoch, " ".join(f"{k} {out[k]:.4f}" for k in ("ru/loss", "cu/loss") if k in out),
                 n_steps * cfg.train.batch_size / max(t_steps, 1e-9))


def _epoch_stats(run: Run, epoch: int, q: float, sums: dict, n_steps: int, t_steps: float, world: int) -> dict:
    keys = sorted(sums)
    means = reduce_mean(torch.tensor([sums[k] / max(n_steps, 1) for k in keys], dtype=torch.float64)).tolist()
    speed = float(reduce_mean(torch.tensor(n_steps * run.cfg.train.batch_size / world / max(t_steps, 1e-9))) * world)
    stats = {"epoch": epoch, **dict(zip(keys, means)), "srf_q": q, "images_per_second": speed,
             "skipped_steps": run.counters.skipped_steps, "peak_rss_mb": peak_rss_mb(),
             "dropped_images": run.plan.dropped_per_epoch,  # and what train.precision meant on this device:
             "bf16_autocast": uses_bf16(next(unwrap(run.classifier).parameters()).device, run.cfg.train.precision),
             "replica_divergence": replica_divergence(run.classifier, run.reconstructor)}
    if run.cfg.method.reconstructor == "adversarial":  # after the epoch's last CU step G holds no gradients
        stats["reconstructor_grads_after_cu"] = sum(p.grad is not None for p in run.reconstructor.parameters())
    return stats


def run_worker(loop_config: dict, session: Session) -> None:
    """`loop_config`: {"config": to_dict(cfg), "shards": URI, "manifest": dict, "plan": TrainPlan dict} (see
    acr.train.job.prepare_run); `session` gives rank, device, checkpoints and the Ray Data shards."""
    cfg = config_from_dict(loop_config["config"])
    uri, manifest, plan = loop_config["shards"], loop_config["manifest"], TrainPlan(**loop_config["plan"])
    _check_worker(cfg, plan, session)
    stream = session.dataset("train")  # asked for first: its coordinator process starts while the networks are built
    set_worker_threads(cfg)
    rows = TrainRows(uri, manifest, plan.to_dict(), num_classes(cfg), augment_kwargs(cfg), cfg.method.srf.grid_size)
    run = build_run(cfg, plan, session.rank)
    dtype = torch.float64 if cfg.train.precision == "fp64" else torch.float32
    if not restore(run, session, dtype):
        calibrate(run, rows, session.device)
    wrap(run, session, dtype)
    max_step = plan.steps_per_epoch * (cfg.optim.schedule_epochs or cfg.train.epochs)
    batches = iter(stream.iter_torch_batches(
        batch_size=cfg.train.batch_size // session.world, prefetch_batches=cfg.data.prefetch_batches, device="cpu",
        drop_last=False))
    for _ in range(plan.batches_before(run.start_epoch, run.start_step)):  # restarted from a later checkpoint
        next(batches)
    for epoch in range(run.start_epoch, cfg.train.epochs):
        stats = train_one_epoch(run, session, batches, epoch, max_step)
        if cfg.eval.enabled and cfg.eval.every_epoch and epoch + 1 < cfg.train.epochs:
            scored, _ = evaluate_split(unwrap(run.classifier), cfg, EvalRows(uri, manifest, cfg.eval.split), uri,
                                       session.rank, session.world, session.device)
            stats.update({k: scored[k] for k in ("cam_miou", "precision", "recall", "threshold")})
            stats["threshold_at_edge"] = scored["threshold_at_edge"] or ""  # "low", "high" or "" (Tune's table)
        run.history["epochs"].append(stats)
        if session.rank == 0:
            log.info("epoch %d/%d done: %s (%.2f img/s)", epoch + 1, cfg.train.epochs,
                     " ".join(f"{k} {v:.4f}" for k, v in stats.items() if "/" in k), stats["images_per_second"])
        if epoch + 1 < cfg.train.epochs or not cfg.eval.enabled:
            report(run, session, stats, epoch + 1, 0)
    final_evaluation(run, session, uri, manifest)


def final_evaluation(run: Run, session: Session, uri: str, manifest: dict) -> None:
    """[5] The eval split's CAM scores, reported with the final checkpoint (eval.json and the overlays in it)."""
    cfg, final = run.cfg, run.cfg.train.epochs
    if not cfg.eval.enabled:
        if run.start_epoch >= final:  # resumed after the end: nothing left to do
            report(run, session, {"epoch": final}, final, 0)
        return
    if session.rank == 0:
        log.info("evaluating CAMs on split '%s'", cfg.eval.split)
    result, overlays = evaluate_split(unwrap(run.classifier), cfg, EvalRows(uri, manifest, cfg.eval.split), uri,
                                      session.rank, session.world, session.device)
    last = run.history["epochs"][-1] if run.history["epochs"] else {}
    files = {EVAL_FILE: json.dumps(result, indent=1),
             OVERLAYS_FILE: lambda p: save_cam_overlays(Path(p), overlays, manifest["class_names"], result["threshold"])}
    report(run, session, {**last, "epoch": final, "cam_miou": result["cam_miou"], "precision": result["precision"],
                          "recall": result["recall"], "threshold": result["threshold"],
                          "threshold_at_edge": result["threshold_at_edge"] or ""}, final, 0, files)
