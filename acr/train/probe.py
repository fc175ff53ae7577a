"""A TorchTrainer function that only pulls this worker's share of the training stream, as training would (for the
ingest tests and benchmarks/data_throughput.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray.train


def stream_probe(config: dict) -> None:
    """Writes what arrived to `record_dir/rank<r>.json`: the delivery rate after `warmup` batches and every batch's
    epochs, image indices and target uniforms."""
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
