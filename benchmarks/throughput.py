"""Throughput of one ACR iteration (RU + CU) and of the inference stages, printed as a table and written to
benchmarks/results/throughput.json (and the throughput section of BENCHMARKS.md).

    python benchmarks/throughput.py      # demo size: plain loop vs TorchTrainer 1 and 2 workers, CAM, CRF

The released code's workload, side by side with an earlier commit: benchmarks/side_by_side.py.

Every variant uses the same number of compute threads in total (--threads, split evenly among workers); Ray runs
without its dashboard. Steady state = the median wall time per step (data loading included) over the steps after
--warmup; the rest of each run (Ray start, worker group, BN calibration, teardown) is reported as overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from acr.cam import infer_cams  # noqa: E402
from acr.config import Config, load_config, num_classes  # noqa: E402
from acr.data.ingest import eval_item  # noqa: E402
from acr.data.sources import ensure_shards  # noqa: E402
from acr.method.acr import Batch, classifier_trunk, cu_phase, ru_phase, sample_target  # noqa: E402
from acr.method.step import autocast_context, memory_layout, shares_trunk  # noqa: E402
from acr.models.factory import build_classifier  # noqa: E402
from acr.refine.crf import crf_from_cams  # noqa: E402
from acr.runtime.cluster import init_ray  # noqa: E402
from acr.train.job import prepare_run, run_local, training_trainer  # noqa: E402
from benchmarks.common import (RESULTS, acr_flops_per_image, commit, machine, models, reference_rates,  # noqa: E402
                               steady_state, tiny_batch, write_benchmarks_md)


def run_plain(cfg: Config, threads: int, warmup: int) -> dict:
    """The training loop in this process, without Ray."""

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        session = run_local(cfg, Path(tmp))
        wall = time.perf_counter() - t
        history = json.loads((session.last_checkpoint / "history.json").read_text())
    out = steady_state(history, cfg.train.batch_size, warmup)
    out["overhead_seconds"] = wall - sum(s["seconds"] for s in history["steps"])
    out["peak_rss_mb"] = history["epochs"][-1]["peak_rss_mb"]
    return out


def run_trainer(cfg: Config, workers: int, threads: int, warmup: int) -> dict:


    cfg.scaling.num_workers = workers
    cfg.scaling.cpus_per_worker = threads // workers
    cfg.train.threads_per_worker = threads // workers
    init_ray(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = training_trainer(cfg, Path(tmp) / "run", *prepare_run(cfg, progress=False)[:2]).fit()
        wall = time.perf_counter() - t
        if result.error:
            raise result.error
        with result.checkpoint.as_directory() as d:
            history = json.loads((Path(d) / "history.json").read_text())
    ray.shutdown()
    out = steady_state(history, cfg.train.batch_size, warmup)
    out["overhead_seconds"] = wall - sum(s["seconds"] for s in history["steps"])
    out["peak_rss_mb"] = history["epochs"][-1]["peak_rss_mb"]
    return out


def profile_step(cfg: Config, batch: int, threads: int, repeats: int = 2) -> dict:
    """Seconds per phase and pass of one iteration as train_step runs it (cfg's precision and trunk sharing), from
    torch.profiler scopes and autograd's backward timing."""

    torch.set_num_threads(threads)
    cls, rec, oc, orr = models(cfg)
    raw = tiny_batch(cfg, batch)
    b = Batch(raw["image"].contiguous(memory_format=memory_layout(cfg)), raw["labels"],
              sample_target(raw["labels"], raw["target_u"]), raw["grid_u"])
    timings: dict[str, list[float]] = {}
    cpu = torch.device("cpu")

    def timed(name, fn, scopes=False):
        t = time.perf_counter()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if scopes else None
        with prof or contextlib.nullcontext(), autocast_context(cpu, cfg.train.precision):
            r = fn()
        timings.setdefault(name, []).append(time.perf_counter() - t)
        for ev in prof.key_averages() if scopes else ():
            if ev.key.startswith(("ru/", "cu/")):
                timings.setdefault(f"  {ev.key}", []).append(ev.cpu_time_total / 1e6)
        return r

    def ru():
        trunk = classifier_trunk(cls, b.image) if shares_trunk(cfg) else None
        return ru_phase(cls, rec, b, cfg.method, 0.5, trunk)[0], trunk

    for i in range(repeats + 1):
        if i == 1:
            timings.clear()  # the first iteration warms up
        orr.zero_grad(set_to_none=True)
        loss, trunk = timed("ru/forward (classifier + encoder + 3 decoder passes)", ru, scopes=True)
        timed("ru/backward (encoder + decoder)", loss.backward)
        timed("ru/optimizer step", orr.step)
        orr.zero_grad(set_to_none=True)
        oc.zero_grad(set_to_none=True)
        loss = timed("cu/forward (classifier + encoder no-grad + 2 decoder passes)",
                     lambda: cu_phase(cls, rec, b, cfg.method, trunk)[0], scopes=True)
        timed("cu/backward (classifier, through the frozen decoder)", loss.backward)
        timed("cu/optimizer step", oc.step)
    return {k: float(np.median(v)) for k, v in timings.items()}


def cam_and_crf(cfg: Config, threads: int, images: int) -> dict:


    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cls = build_classifier(cfg).eval()
    uri, manifest = ensure_shards(cfg, [cfg.eval.split], progress=False)
    rows = pq.read_table(f"{uri}/{manifest['splits'][cfg.eval.split]['shards'][0]['file']}").to_pylist()[:images]
    items = [eval_item(r, num_classes(cfg), r["id"]) for r in rows]
    items = [{**it, "image": torch.from_numpy(it["image"]), "labels": torch.from_numpy(it["labels"])} for it in items]
    infer_cams(cls, items[0]["image"], items[0]["labels"], cfg.eval.scales, cfg.eval.flip)
    t = time.perf_counter()
    cams = [infer_cams(cls, it["image"], it["labels"], cfg.eval.scales, cfg.eval.flip).numpy() for it in items]
    cam_ips = len(items) / (time.perf_counter() - t)
    t = time.perf_counter()
    for it, c in zip(items, cams):
        crf_from_cams(it["raw"], c, it["labels"].numpy(), alpha=6)
    crf_ips = len(items) / (time.perf_counter() - t)
    h, w = items[0]["raw"].shape[:2]
    return {"cam_inference": {"images_per_second": cam_ips, "scales": cfg.eval.scales, "flip": cfg.eval.flip,
                              "image_size": [h, w]},
            "dense_crf": {"images_per_second": crf_ips, "params": "psa (10 iterations)", "image_size": [h, w]}}


def markdown(res: dict) -> str:
    ref = res["reference"]
    mm = ref["matmul_fp32_gflops"]
    rows = [("plain PyTorch loop, 1 process", res["plain_loop"]),
            ("TorchTrainer, 1 worker", res["trainer_1_worker"]),
            ("TorchTrainer, 2 workers", res["trainer_2_workers"])]
    t = res["threads_total"]
    lines = [f"This machine in this run: fp32 matmul {ref['matmul_fp32_gflops']:.0f} GFLOP/s, fp32 3x3 conv "
             f"{ref['conv3x3_fp32_gflops']:.0f} GFLOP/s ({t} threads); oneDNN bf16 kernels: "
             f"{'yes' if ref['onednn_bf16'] else 'no'}. Compare rates as fractions, not absolute times across machines.", "",
             f"### One ACR iteration (RU + CU), {res['size']}, {t} compute threads in total", "",
             "| variant | images/s (steady) | s/step (median) | data wait | start-up + teardown (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['images_per_second']:.2f} | {r['seconds_per_step_median']:.2f} | "
                     f"{100 * r['data_wait_share']:.1f}% | {r['overhead_seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    p, t1 = res["plain_loop"]["images_per_second"], res["trainer_1_worker"]["images_per_second"]
    each = "; ".join(f"{name}: " + ", ".join(f"{v:.2f}" for v in r["runs_images_per_second"]) for name, r in rows)
    lines += ["", f"TorchTrainer (1 worker) versus the plain loop: {100 * (t1 / p - 1):+.1f}% throughput (median of "
              f"{len(res['plain_loop']['runs_images_per_second'])} interleaved runs each; every run's images/s: "
              f"{each}).",
              f"FLOPs of one iteration: {res['gflop_per_image']:.1f} GFLOP per image (forward + backward, both phases, "
              f"`torch.utils.flop_counter`); the plain loop reaches "
              f"{res['gflop_per_image'] * p:.0f} GFLOP/s ({100 * res['gflop_per_image'] * p / mm:.0f}% "
              f"of the {mm:.0f} GFLOP/s fp32 matmul rate measured in the same run).", "",
              "| inference stage | images/s | setting |", "|---|---|---|",
              f"| CAM inference | {res['cam_inference']['images_per_second']:.2f} | scales {res['cam_inference']['scales']}"
              f", flip, {res['cam_inference']['image_size'][0]}x{res['cam_inference']['image_size'][1]} |",
              f"| dense CRF | {res['dense_crf']['images_per_second']:.2f} | {res['dense_crf']['params']}, "
              f"{res['dense_crf']['image_size'][0]}x{res['dense_crf']['image_size'][1]} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="training steps per variant")
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the steady state")
    ap.add_argument("--images", type=int, default=16, help="images for the CAM and CRF timings")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each training variant (median)")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the BENCHMARKS.md section from benchmarks/results/throughput.json")
    args = ap.parse_args()
    if args.render:
        res = json.loads((RESULTS / "throughput.json").read_text())
        write_section(res)
        return

    def cfg_for(extra=()):
        return load_config(args.config, [f"train.max_steps_per_epoch={args.steps}", "train.epochs=1",
                                         "eval.enabled=false", "train.log_every_steps=0",
                                         "model.pretrained=null",  # the weights do not change the time
                                         *args.overrides, *extra])

    cfg = cfg_for()
    res = {"reference": reference_rates(args.threads), "size": f"{cfg.model.backbone}, batch {cfg.train.batch_size}, {cfg.augment.crop_size}x"
                   f"{cfg.augment.crop_size} ({Path(args.config).name})", "threads_total": args.threads}
    # The variants run in turn, --repeats times: on a shared machine the load drifts over minutes, and interleaved
    # runs see the same drift. Each variant reports its median run.
    runs: dict[str, list[dict]] = {"plain_loop": [], "trainer_1_worker": [], "trainer_2_workers": []}
    for _ in range(args.repeats):
        runs["plain_loop"].append(run_plain(cfg_for(), args.threads, args.warmup))
        runs["trainer_1_worker"].append(run_trainer(cfg_for(), 1, args.threads, args.warmup))
        runs["trainer_2_workers"].append(run_trainer(cfg_for(), 2, args.threads, args.warmup))
    for name, rs in runs.items():
        rates = [r["images_per_second"] for r in rs]
        res[name] = {**sorted(rs, key=lambda r: r["images_per_second"])[(len(rs) - 1) // 2],
                     "runs_images_per_second": rates}
    res["gflop_per_image"] = acr_flops_per_image(cfg, cfg.train.batch_size) / 1e9
    res.update(cam_and_crf(cfg_for(), args.threads, args.images))
    res.update({"commit": commit(), "command": " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
                "machine": machine(), "date": time.strftime("%Y-%m-%d")})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(res, indent=1))
    write_section(res)


def write_section(res: dict, section: str = "throughput", render=None) -> None:
    """BENCHMARKS.md's `section` from a results dict: its command, commit, date and machine, then `render(res)`
    (default: this script's markdown)."""
    text = (render or markdown)(res)
    write_benchmarks_md(section, f"Command: `{res['command']}` (commit {res['commit']}, {res['date']}, "
                                 f"{res['machine']['cpu']}).\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
