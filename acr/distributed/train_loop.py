"""The per-worker training function run by Ray Train's TorchTrainer.

[1] each worker takes its share of the Ray Data training stream (acr.data.ingest) and builds both networks; [2] the trained networks are wrapped for DDP by
`ray.train.torch.prepare_model` (gloo on CPU, NCCL on GPU); [3] every epoch (and every N steps if configured) all
workers call `ray.train.report`, rank 0 attaching the checkpoint; [4] after training the eval split is scored by all
workers (each a strided share of the images, confusion matrices summed) and the result is reported with the final
checkpoint. Rerunning with the same storage path and name hands the last checkpoint back through
`ray.train.get_checkpoint()` and training resumes from it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from acr.cam import evaluate_image, infer_cams
from acr.checkpoint import load_state, save_state
from acr.config import Config, config_from_dict, num_classes, to_dict
from acr.data.ingest import CALIBRATION_EPOCH, EvalRows, TrainPlan, TrainRows, augment_kwargs, eval_item
from acr.data.voc import DataError
from acr.method.acr import unwrap
from acr.method.optim import build_optimizer, build_reconstructor_optimizer
from acr.method.schedules import srf_probability
from acr.method.step import StepCounters, memory_layout, train_step
from acr.metrics import scores, thresholds_from
from acr.models.backbones import calibrate_batchnorm
from acr.models.factory import build_classifier, build_reconstructor
from acr.viz import save_cam_overlays

EVAL_FILE = "eval.json"
HISTORY_FILE = "history.json"
PROGRESS_FILE = "progress.json"
OVERLAYS_FILE = "cam_overlays.png"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def replica_divergence(*models: torch.nn.Module | None) -> float:
    """Largest difference between the workers' copies of the parameters (0.0 when DDP keeps them in sync), from
    one float64 fingerprint per model and worker."""
    models = [unwrap(m) for m in models if m is not None]
    local = torch.stack([sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(m.parameters()))
                         for m in models]).cpu()
    if not _distributed():
        return 0.0
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return float(max((g - gathered[0]).abs().max() for g in gathered))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (the largest over workers), in MiB."""
    import resource

    t = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def reduce_sum_numpy(a: np.ndarray) -> np.ndarray:
    if not _distributed():
        return a
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    dist.all_reduce(t)
    return t.numpy()


def _load_frozen_reconstructor(cfg: Config, device: torch.device) -> torch.nn.Module:
    rec = build_reconstructor(cfg)
    state = load_state(cfg.method.pretrained_reconstructor)
    if state.get("reconstructor") is None:
        raise ValueError(f"{cfg.method.pretrained_reconstructor} holds no reconstructor")
    missing, unexpected = rec.load_state_dict(state["reconstructor"], strict=False)
    if missing or [k for k in unexpected if not k.startswith("cls_head.")]:
        raise ValueError(f"{cfg.method.pretrained_reconstructor}: reconstructor does not fit this config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    rec.requires_grad_(False)
    return rec.to(device).eval()


class RaySession:
    """What the loop needs from Ray Train inside a TorchTrainer worker."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def get_checkpoint(self):
        return ray.train.get_checkpoint()

    def get_dataset_shard(self, name: str):
        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        # Frozen BN buffers never change: broadcasting them before every forward would be wasted work.
        return ray.train.torch.prepare_model(model, move_to_device=self.device,
                                             parallel_strategy_kwargs={"broadcast_buffers": False})


class LocalSession:
    """The same loop in this process, without Ray (one worker): the plain PyTorch baseline of the benchmarks.
    Checkpoints are copied to `folder/checkpoint_NNNNNN`; `reports` keeps every reported metrics dict."""

    def __init__(self, folder: Path, datasets: dict, device: torch.device | str = "cpu"):
        self.rank, self.world, self.device = 0, 1, torch.device(device)
        self.datasets = datasets
        self.folder = Path(folder)
        self.reports: list[dict] = []
        self.last_checkpoint: Path | None = None

    def get_checkpoint(self):
        return None

    def get_dataset_shard(self, name: str):
        return self.datasets[name].iterator()

    def report(self, metrics: dict, folder: Path | None) -> None:
        self.reports.append(metrics)
        if folder:
            import shutil

            dest = self.folder / f"checkpoint_{len(self.reports):06d}"
            shutil.copytree(folder, dest)
            self.last_checkpoint = dest

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)


def train_loop_per_worker(loop_config: dict) -> None:
    """The TorchTrainer entry point."""
    run_worker(loop_config, RaySession())


def run_worker(loop_config: dict, session) -> None:
    """`loop_config`: {"config": to_dict(cfg), "shards": URI, "manifest": dict, "plan": TrainPlan dict} (see
    acr.distributed.trainer.prepare_run); `session` gives rank, device, checkpoints and the Ray Data shards."""
    cfg = config_from_dict(loop_config["config"])
    uri, manifest, plan = loop_config["shards"], loop_config["manifest"], TrainPlan(**loop_config["plan"])
    rank, world, device = session.rank, session.world, session.device
    if plan.world != world:
        raise ValueError(f"the training stream was cut for {plan.world} workers, this run has {world}")
    if cfg.train.precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError("train.precision=bf16: this CPU has no oneDNN bf16 kernels (they need AVX512-BF16 or AMX); "
                         "bf16 convolutions would fall back to a path hundreds of times slower. Use fp32 here.")
    threads = cfg.train.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker, whatever their number

    # [1] data and networks
    steps_per_epoch = plan.steps_per_epoch
    max_step = steps_per_epoch * (cfg.optim.schedule_epochs or cfg.train.epochs)
    rows = TrainRows(uri, manifest, plan.to_dict(), num_classes(cfg), augment_kwargs(cfg), cfg.method.srf.grid_size)

    classifier = build_classifier(cfg)
    mode = cfg.method.reconstructor
    reconstructor = build_reconstructor(cfg) if mode == "adversarial" else None
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # from here on only dropout draws from torch's RNG
    if cfg.method.init_classifier:
        init = load_state(cfg.method.init_classifier)
        classifier.load_state_dict(init["classifier"])
    if not cfg.method.train_classifier:
        classifier.requires_grad_(False)
    start_epoch, start_step, counters, history = 0, 0, StepCounters(), {"epochs": [], "steps": []}
    opt_cls = build_optimizer(classifier, cfg.optim) if cfg.method.train_classifier else None
    opt_rec = build_reconstructor_optimizer(reconstructor, cfg.optim) if reconstructor is not None else None

    dtype = torch.float64 if cfg.train.precision == "fp64" else torch.float32
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        for net in (classifier, reconstructor):  # in the checkpoint's precision before loading (fp64 stays fp64,
            if net is not None:                  # and the optimisers' momentum buffers take the parameters' dtype)
                net.to(dtype)
        with checkpoint.as_directory() as d:
            state = load_state(d)
            hist_file = Path(d) / HISTORY_FILE
            history = json.loads(hist_file.read_text()) if hist_file.is_file() else history
        classifier.load_state_dict(state["classifier"])
        if opt_cls is not None:
            opt_cls.load_state_dict(state["opt_cls"])
        if reconstructor is not None:
            reconstructor.load_state_dict(state["reconstructor"])
            opt_rec.load_state_dict(state["opt_rec"])
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        counters = StepCounters(**state["counters"])
        torch.set_rng_state(state["torch_rng"][rank % len(state["torch_rng"])])
        # every restart from a checkpoint (a failed worker group, or a rerun in the same folder) is on record
        history.setdefault("resumes", []).append({"epoch": start_epoch, "step_in_epoch": start_step})
        if plan.batches_before(start_epoch, start_step) < 0:
            raise RuntimeError(f"the checkpoint is at epoch {start_epoch} step {start_step}, before the start of the "
                               f"training stream (epoch {plan.start_epoch} step {plan.start_step})")

    if checkpoint is None and cfg.model.pretrained is None and cfg.model.freeze_bn and cfg.model.bn_calibration_images:
        # Random init: estimate the frozen BatchNorm statistics from the same training images on every worker.
        first = plan.indices[: cfg.model.bn_calibration_images]
        images = torch.from_numpy(rows.decode(np.full(len(first), CALIBRATION_EPOCH), np.array(first))["image"])
        calib = [images[j:j + 8].to(device) for j in range(0, len(images), 8)]
        for net in (None if cfg.method.init_classifier else classifier, reconstructor):
            if net is not None:
                net.to(device)
                calibrate_batchnorm(net.backbone, calib)

    for net in (classifier, reconstructor):
        if net is not None:
            net.to(dtype=dtype, memory_format=memory_layout(cfg))

    # [2] DDP
    # A frozen classifier (reconstructor pre-training) has nothing for DDP to synchronise.
    classifier = session.prepare(classifier) if opt_cls is not None else classifier.to(device)
    if reconstructor is not None:
        reconstructor = session.prepare(reconstructor)
    elif mode == "pretrained":
        reconstructor = _load_frozen_reconstructor(cfg, device).to(dtype=dtype, memory_format=memory_layout(cfg))

    def state_dict(epoch: int, step_in_epoch: int) -> dict:
        rngs = [torch.zeros(0, dtype=torch.uint8) for _ in range(world)]
        local = torch.get_rng_state()
        if _distributed():
            gathered = [torch.zeros_like(local) for _ in range(world)]
            dist.all_gather(gathered, local)
            rngs = gathered
        else:
            rngs = [local]
        return {
            "config": to_dict(cfg), "epoch": epoch, "step_in_epoch": step_in_epoch,
            "counters": counters.__dict__.copy(), "torch_rng": rngs,
            "classifier": unwrap(classifier).state_dict(),
            "opt_cls": opt_cls.state_dict() if opt_cls is not None else None,
            "reconstructor": unwrap(reconstructor).state_dict() if opt_rec is not None else None,
            "opt_rec": opt_rec.state_dict() if opt_rec is not None else None,
        }

    def report(metrics: dict, epoch: int, step_in_epoch: int, extra=None) -> None:
        state = state_dict(epoch, step_in_epoch)  # every rank joins the RNG all-gather
        if rank != 0:
            session.report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(Path(tmp), state)
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
            (Path(tmp) / PROGRESS_FILE).write_text(json.dumps({"epoch": epoch, "step_in_epoch": step_in_epoch}))
            if extra:
                extra(Path(tmp))
            session.report(metrics, Path(tmp))

    # [3] training: one pass over this worker's share of the stream, which holds every remaining epoch
    batches = iter(session.get_dataset_shard("train").iter_torch_batches(
        batch_size=cfg.train.batch_size // world, prefetch_batches=cfg.data.prefetch_batches, device="cpu",
        drop_last=False))
    for _ in range(plan.batches_before(start_epoch, start_step)):  # restarted from a later checkpoint
        next(batches)
    collate_keys = ("image", "labels", "target_u", "grid_u")
    for epoch in range(start_epoch, cfg.train.epochs):
        q = srf_probability(cfg.method.srf, epoch)
        sums: dict[str, float] = {}
        n_steps, t_steps = 0, 0.0
        step = start_step
        t_prev = time.perf_counter()
        for _ in range(start_step, steps_per_epoch):
            batch = next(batches, None)
            t0 = time.perf_counter()  # t0 - t_prev: waiting for data
            if batch is None or bool((batch["epoch"] != epoch).any()):
                raise RuntimeError(f"the training stream is out of step: epoch {epoch} step {step} received "
                                   f"{'nothing' if batch is None else 'rows of epoch ' + str(batch['epoch'].tolist())}")
            batch = {k: batch[k].to(device, dtype=dtype if batch[k].is_floating_point() else None,
                                    non_blocking=True) for k in collate_keys}
            out = train_step(classifier, reconstructor, opt_cls, opt_rec, batch, cfg, q, max_step, counters,
                             reduce_mean, device)
            t1 = time.perf_counter()
            t_steps += t1 - t_prev
            history["steps"].append({"epoch": epoch, "step": step, "ru/loss": out.get("ru/loss"),
                                     "cu/loss": out.get("cu/loss"), "seconds": t1 - t_prev,
                                     "data_seconds": t0 - t_prev})
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
            step += 1
            if rank == 0 and cfg.train.log_every_steps and step % cfg.train.log_every_steps == 0:
                print(f"epoch {epoch + 1}/{cfg.train.epochs} step {step}/{steps_per_epoch}: "
                      + " ".join(f"{k} {out[k]:.4f}" for k in ("ru/loss", "cu/loss") if k in out)
                      + f" ({n_steps * cfg.train.batch_size / max(t_steps, 1e-9):.2f} img/s)", flush=True)
            every = cfg.train.checkpoint_every_steps
            if every and step % every == 0 and step < steps_per_epoch:
                report({"epoch": epoch, "step_in_epoch": step}, epoch, step)
            t_prev = time.perf_counter()
        start_step = 0
        keys = sorted(sums)
        means = reduce_mean(torch.tensor([sums[k] / max(n_steps, 1) for k in keys], dtype=torch.float64)).tolist()
        speed = float(reduce_mean(torch.tensor(n_steps * cfg.train.batch_size / world / max(t_steps, 1e-9))) * world)
        epoch_stats = {"epoch": epoch, **dict(zip(keys, means)), "srf_q": q, "images_per_second": speed,
                       "skipped_steps": counters.skipped_steps, "peak_rss_mb": peak_rss_mb(),
                       "dropped_images": plan.dropped_per_epoch,
                       "replica_divergence": replica_divergence(classifier, reconstructor)}
        if mode == "adversarial":  # after the epoch's last CU step G holds no gradients
            epoch_stats["reconstructor_grads_after_cu"] = sum(p.grad is not None for p in reconstructor.parameters())
        if cfg.eval.enabled and cfg.eval.every_epoch and epoch + 1 < cfg.train.epochs:
            scored, _ = evaluate_split(unwrap(classifier), cfg, EvalRows(uri, manifest, cfg.eval.split), uri, rank, world,
                                       device)
            epoch_stats.update({k: scored[k] for k in ("cam_miou", "precision", "recall", "threshold")})
            # (each phase sets the train/eval mode of both networks itself)
        history["epochs"].append(epoch_stats)
        if rank == 0:
            print(f"epoch {epoch + 1}/{cfg.train.epochs} done: "
                  + " ".join(f"{k} {v:.4f}" for k, v in epoch_stats.items() if "/" in k)
                  + f" ({speed:.2f} img/s)", flush=True)
        if epoch + 1 < cfg.train.epochs or not cfg.eval.enabled:
            report(epoch_stats, epoch + 1, 0)

    # [4] evaluation, reported with the final checkpoint
    final_epoch = cfg.train.epochs
    if not cfg.eval.enabled:
        if start_epoch >= cfg.train.epochs:  # resumed after the end: nothing left to do
            report({"epoch": final_epoch}, final_epoch, 0)
        return
    if rank == 0:
        print(f"evaluating CAMs on split '{cfg.eval.split}'", flush=True)
    result, overlays = evaluate_split(unwrap(classifier), cfg, EvalRows(uri, manifest, cfg.eval.split), uri, rank, world,
                                      device)
    last = history["epochs"][-1] if history["epochs"] else {}

    def write_eval(folder: Path) -> None:
        (folder / EVAL_FILE).write_text(json.dumps(result, indent=1))
        save_cam_overlays(folder / OVERLAYS_FILE, overlays, manifest["class_names"], result["threshold"])

    report({**last, "epoch": final_epoch, "cam_miou": result["cam_miou"], "precision": result["precision"],
            "recall": result["recall"], "threshold": result["threshold"]}, final_epoch, 0, extra=write_eval)


def evaluate_split(classifier: torch.nn.Module, cfg: Config, eval_rows, shards: str, rank: int, world: int,
                   device: torch.device) -> tuple[dict, list[dict]]:
    """CAM quality on `eval.split`: `eval_rows` iterates the whole split (not split among workers); worker r scores rows r, r+W, ...; the confusion matrices are summed over workers; the background
    threshold is swept and the best mIoU reported with its precision and recall. Also scores the two floors. Rank 0
    returns the first `eval.overlays` images for pictures. An undecodable row stops with an error naming it, or with
    data.skip_corrupt is skipped and counted (`skipped_corrupt`)."""
    thresholds = thresholds_from(cfg.eval.thresholds)
    n = num_classes(cfg) + 1
    sweep = np.zeros((len(thresholds), n, n), np.int64)
    floor_bg = np.zeros((n, n), np.int64)
    floor_whole = np.zeros((n, n), np.int64)
    overlays = []
    classifier.eval()
    skipped = 0
    total = 0
    for j, row in enumerate(eval_rows.iter_rows()):
        if cfg.eval.max_images and j >= cfg.eval.max_images:
            break
        total += 1
        if j % world != rank:
            continue
        if rank == 0 and j and j % 20 == 0:
            print(f"  CAMs: {j} images (rank 0 of {world})", flush=True)
        where = f"row id '{row['id']}' of the {cfg.eval.split} shards in {shards}"
        try:
            item = eval_item(row, num_classes(cfg), where)
        except (DataError, ValueError):
            if not cfg.data.skip_corrupt:
                raise
            skipped += 1
            continue
        if item["mask"] is None:
            raise DataError(f"{where} has no ground-truth mask; eval.split must have masks")
        dtype = next(classifier.parameters()).dtype
        cams = infer_cams(classifier, item["image"].to(device, dtype), item["labels"].to(device, dtype),
                          cfg.eval.scales, cfg.eval.flip).float().cpu().numpy()
        conf = evaluate_image(cams, item["labels"].numpy(), item["mask"], thresholds)
        sweep += conf["sweep"]
        floor_bg += conf["floor_background"]
        floor_whole += conf["floor_whole_image"]
        if rank == 0 and len(overlays) < cfg.eval.overlays:
            overlays.append({**{k: item[k] for k in ("id", "raw", "mask")}, "labels": item["labels"].numpy(),
                             "cams": cams})
    sweep, floor_bg, floor_whole = (reduce_sum_numpy(a) for a in (sweep, floor_bg, floor_whole))
    skipped = int(reduce_sum_numpy(np.array([skipped]))[0])
    per_t = [scores(c) for c in sweep]
    best = int(np.argmax([s["miou"] for s in per_t]))
    return {
        "split": cfg.eval.split, "num_images": total - skipped, "eval_skipped_corrupt": skipped,
        "cam_miou": per_t[best]["miou"], "precision": per_t[best]["precision"], "recall": per_t[best]["recall"],
        "threshold": float(thresholds[best]), "per_class_iou": per_t[best]["iou"],
        "sweep": {"thresholds": thresholds.tolist(), "miou": [s["miou"] for s in per_t],
                  "precision": [s["precision"] for s in per_t], "recall": [s["recall"] for s in per_t]},
        "floor_background_miou": scores(floor_bg)["miou"], "floor_whole_image_miou": scores(floor_whole)["miou"],
    }, overlays


def stream_probe(config: dict) -> None:
    """A TorchTrainer function that only pulls this worker's share of the training stream, as training would, and
    writes what arrived to `record_dir/rank<r>.json`: the delivery rate after `warmup` batches and every batch's
    epochs, image indices and target uniforms (for tests and benchmarks/data_throughput)."""
    rank = ray.train.get_context().get_world_rank()
    it = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=config["per_worker"], prefetch_batches=config.get("prefetch", 2), device="cpu")
    batches, n, t0 = [], 0, None
    for i, b in enumerate(it):
        if i == config.get("warmup", 0):
            t0 = time.perf_counter()
        elif t0 is not None:
            n += len(b["index"])
        batches.append({"epoch": b["epoch"].tolist(), "index": b["index"].tolist(),
                        "target_u": b["target_u"].tolist(), "shape": list(b["image"].shape)})
    rate = n / (time.perf_counter() - t0) if n else float("nan")
    if config.get("record_dir"):
        (Path(config["record_dir"]) / f"rank{rank}.json").write_text(json.dumps({"images_per_second": rate,
                                                                                "batches": batches}))
