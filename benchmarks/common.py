"""What the benchmarks (benchmarks/) and the studies (experiments/) share: the machine and commit a table names,
this machine's reference rates, the ACR workload (networks, a batch, its FLOPs), steady-state rates, loss
deviations and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from acr.config import Config, num_classes  # noqa: E402
from acr.method.optim import build_classifier_optimizer, build_reconstructor_optimizer  # noqa: E402
from acr.method.step import StepCounters, memory_layout, train_step  # noqa: E402
from acr.models.factory import build_classifier, build_reconstructor  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def reference_rates(threads: int) -> dict:
    """What this machine can do right now: fp32 matmul and 3x3 conv GFLOP/s with `threads` threads, and whether
    oneDNN has bf16 kernels here (without them bf16 convolutions fall back to a path hundreds of times slower)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    matmul = 3 * 2 * 4096**3 / (time.perf_counter() - t) / 1e9
    conv, x = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False), torch.randn(8, 256, 64, 64)
    with torch.no_grad():
        conv(x)
        t = time.perf_counter()
        for _ in range(3):
            conv(x)
    conv_rate = 3 * 2 * 8 * 256 * 256 * 9 * 64 * 64 / (time.perf_counter() - t) / 1e9
    return {"matmul_fp32_gflops": matmul, "conv3x3_fp32_gflops": conv_rate,
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def steady_state(history: dict, batch: int, warmup: int) -> dict:
    steps = history["steps"][warmup:]
    secs = np.array([s["seconds"] for s in steps])
    data = np.array([s["data_seconds"] for s in steps])
    # The median step: robust to the CPU time Ray's helper actors take while they start next to the first steps.
    return {"images_per_second": batch / float(np.median(secs)), "seconds_per_step_median": float(np.median(secs)),
            "images_per_second_mean": batch * len(secs) / secs.sum(),
            "data_wait_share": float(data.sum() / secs.sum()), "steps_measured": len(secs)}


def tiny_batch(cfg: Config, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = num_classes(cfg)
    labels = torch.zeros(batch, c)
    labels[torch.arange(batch), torch.randint(c, (batch,), generator=g)] = 1
    s = cfg.augment.crop_size
    return {"image": torch.randn(batch, 3, s, s, generator=g), "labels": labels,
            "target_u": torch.rand(batch, generator=g), "grid_u": torch.rand(batch, cfg.method.srf.grid_size,
                                                                             cfg.method.srf.grid_size, generator=g)}


def models(cfg: Config):
    """Both networks in the training layout (train.channels_last) with their optimisers, as the training loop has
    them, from the config's seed."""
    torch.manual_seed(cfg.train.seed)
    cls, rec = build_classifier(cfg), build_reconstructor(cfg)
    for net in (cls, rec):
        net.to(memory_format=memory_layout(cfg))
    return cls, rec, build_classifier_optimizer(cls, cfg.optim), build_reconstructor_optimizer(rec, cfg.optim)


def acr_flops_per_image(cfg: Config, batch: int) -> float:
    """FLOPs of one RU + CU iteration (both networks, every decoder pass, forward and backward) per image."""
    cls, rec, oc, orr = models(cfg)
    b = tiny_batch(cfg, batch)
    with FlopCounterMode(display=False) as fc:
        train_step(cls, rec, oc, orr, b, cfg, 0.5, 100, StepCounters(), lambda t: t, torch.device("cpu"))
    return fc.get_total_flops() / batch


def loss_deviation(losses: list[dict], reference: list[dict]) -> list[tuple[str, float]]:
    """For each iteration, the loss that differs most from the reference run's, relative to that loss's mean
    magnitude in the reference, and that relative difference. Terms that stay near 0 (|mean| < 1e-3, such as L_nt^CU
    at random init) have no meaningful relative difference and are left out."""
    keys = [k for k in reference[0] if np.mean([abs(r[k]) for r in reference]) >= 1e-3]
    scale = {k: float(np.mean([abs(r[k]) for r in reference])) for k in keys}
    out = []
    for a, r in zip(losses, reference):
        k = max(keys, key=lambda k: abs(a[k] - r[k]) / scale[k])
        out.append((k, abs(a[k] - r[k]) / scale[k]))
    return out


def write_benchmarks_md(section: str, text: str) -> None:
    path = REPO / "BENCHMARKS.md"
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    doc = path.read_text() if path.is_file() else "# Benchmarks and experiments\n\nEvery table is written by a " \
                                                   "script of `benchmarks/` or `experiments/`; rerun it to refresh.\n"
    block = f"{begin}\n{text}{end}"
    if begin in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + f"\n\n## {section.capitalize()}\n\n" + block + "\n"
    path.write_text(doc)
