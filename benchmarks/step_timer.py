"""Time ACR iterations (RU + CU) of one checkout of this project: the worker that `benchmarks/throughput.py
--side-by-side` runs in a fresh process per implementation and repeat, so that two checkouts (each with its own
`acr` package) run with the same weights, batch and RNG draws, interleaved.

    python benchmarks/step_timer.py --repo CHECKOUT --inputs inputs.pt --out result.json \\
        [--config configs/voc_official.yaml] [--steps 3] [--threads 2] [--device cpu|cuda] [--compile] \\
        [--count-flops] [key=value ...]

`inputs.pt` holds {"classifier": state_dict, "reconstructor": state_dict, "batch": {...}, "seed": int}; the
config (relative to CHECKOUT) and the overrides are read by CHECKOUT's own loader. The result lists every
iteration's seconds and losses (the first iteration warms up).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

LOSS_KEYS = ("ru/loss", "cu/loss", "cu/loss_cls", "cu/loss_t", "cu/loss_nt")


def import_checkout(repo: Path):
    """`acr` from `repo`, not from the installed project (asserted: an editable install could shadow it)."""
    sys.path.insert(0, str(repo))
    import acr

    if Path(acr.__file__).resolve().parents[1] != repo.resolve():
        raise RuntimeError(f"imported acr from {acr.__file__}, not from {repo}")
    return acr


def compile_blocks(net: torch.nn.Module) -> None:
    """torch.compile each block of a backbone and each level of the U-Net, in place (`Module.compile`): every call
    path (forward, trunk/tail) then runs compiled code, and the ACR glue between the blocks stays eager."""
    for part in ("backbone", "decoder"):
        module = getattr(net, part, None)
        if module is None:
            continue
        for child in module.children():
            for block in (child if isinstance(child, torch.nn.ModuleList) else [child]):
                block.compile()


def build(cfg, inputs: dict, device: torch.device, compile_: bool):
    from acr.method.optim import build_optimizer, build_reconstructor_optimizer
    from acr.method.step import memory_layout
    from acr.models.factory import build_classifier, build_reconstructor

    cls, rec = build_classifier(cfg), build_reconstructor(cfg)
    cls.load_state_dict(inputs["classifier"])
    rec.load_state_dict(inputs["reconstructor"])
    for net in (cls, rec):
        net.to(device=device, memory_format=memory_layout(cfg))
        if compile_:
            compile_blocks(net)
    return cls, rec, build_optimizer(cls, cfg.optim), build_reconstructor_optimizer(rec, cfg.optim)


def run_steps(cfg, inputs: dict, device: torch.device, steps: int, compile_: bool, count_flops: bool) -> dict:
    from acr.method.step import StepCounters, train_step

    cls, rec, oc, orr = build(cfg, inputs, device, compile_)
    batch = {k: v.to(device) for k, v in inputs["batch"].items()}
    counters, seconds, losses = StepCounters(), [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(inputs["seed"])

    def step():
        return train_step(cls, rec, oc, orr, batch, cfg, 0.5, 100, counters, lambda v: v, device)

    for _ in range(steps + 1):
        sync()
        t = time.perf_counter()
        out = step()
        sync()
        seconds.append(time.perf_counter() - t)
        losses.append({k: out[k] for k in LOSS_KEYS if k in out})
    result = {"seconds": seconds, "losses": losses}
    if count_flops:  # one more iteration, after the timed ones
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step()
        result["gflop_per_image"] = fc.get_total_flops() / batch["image"].shape[0] / 1e9
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", default="configs/voc_official.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--count-flops", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    acr = import_checkout(args.repo)
    from acr.config import load_config

    cfg = load_config(args.repo / args.config, args.overrides)
    inputs = torch.load(args.inputs, weights_only=True)
    result = run_steps(cfg, inputs, torch.device(args.device), args.steps, args.compile, args.count_flops)
    result["acr"] = acr.__file__
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
