"""This commit's ACR iteration against an earlier commit's, side by side: same weights, batch and RNG draws,
interleaved runs in fresh processes (benchmarks/step_timer.py), ratios of medians from this one run only.

    python benchmarks/side_by_side.py                          # the released workload and the demo's, vs f623edb
    python benchmarks/side_by_side.py --reference f623edb --workloads released --repeats 3 --steps 3
    python benchmarks/side_by_side.py --device cuda [--compile] # on a GPU: bf16 autocast, channels_last, MFU

The reference is f623edb, the landed step that was timed within about 10% of the authors' released step
(issue 17); it is exported with `git archive` to a temporary folder. Results: benchmarks/results/side_by_side.json
and the "Side-by-side" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from acr.config import load_config  # noqa: E402
from benchmarks.common import (RESULTS, commit, loss_deviation, machine, models, reference_rates,  # noqa: E402
                               tiny_batch)
from benchmarks.throughput import profile_step, write_section  # noqa: E402

# name -> (config relative to a checkout, overrides). The released workload: resnet38d, batch 2, 256 px crops,
# random init, 20 classes (the released code's setting, with synthetic data: the data does not change the time).
WORKLOADS = {
    "released": ("configs/voc_official.yaml", ["data.format=synthetic", "synthetic.image_size=300",
                                               "train.batch_size=2", "scaling.use_gpu=false",
                                               "synthetic.num_classes=20"]),
    "demo": ("configs/demo.yaml", ["model.pretrained=null"]),
}
# (label, which checkout, overrides); the first row is the reference every ratio divides by.
VARIANTS = [
    ("reference, fp32", "reference", ["train.precision=fp32"]),
    ("this commit, fp32", "this", ["train.precision=fp32"]),
    ("this commit, fp32, trunk run twice (train.share_classifier_trunk=false)", "this",
     ["train.precision=fp32", "train.share_classifier_trunk=false"]),
    ("this commit, bf16 autocast (train.precision=bf16)", "this", ["train.precision=bf16"]),
]
# Dense bf16 / fp32 (non-tensor-core) peaks in TFLOP/s, from the vendors' data sheets, for MFU on a GPU.
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L4": (121.0, 30.3),
                   "A10G": (70.0, 31.2)}


def export_commit(rev: str, dest: Path) -> Path:
    """`rev`'s tree (acr/ and configs/) in `dest`, without touching this checkout."""
    archive = subprocess.run(["git", "archive", rev, "acr", "configs"], cwd=REPO, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def write_inputs(config: str, overrides: list[str], path: Path) -> int:
    """Both networks' initial weights (this commit's builders, the config's seed) and one batch, for every run."""
    cfg = load_config(REPO / config, overrides)
    cls, rec, _, _ = models(cfg)
    torch.save({"classifier": cls.state_dict(), "reconstructor": rec.state_dict(),
                "batch": tiny_batch(cfg, cfg.train.batch_size), "seed": cfg.train.seed + 1}, path)
    return cfg.train.batch_size


def run_once(repo: Path, workload: str, overrides: list[str], inputs: Path, args, count_flops: bool) -> dict:
    config, base = WORKLOADS[workload]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(REPO / "benchmarks" / "step_timer.py"), "--repo", str(repo), "--inputs",
               str(inputs), "--out", out.name, "--config", config, "--steps", str(args.steps[workload]),
               "--threads", str(args.threads), "--device", args.device, *(["--compile"] if args.compile else []),
               *(["--count-flops"] if count_flops else []), *base, *overrides]
        subprocess.run(cmd, check=True)
        return json.loads(Path(out.name).read_text())


def measure(workload: str, checkouts: dict[str, Path], tmp: Path, args) -> dict:
    """Every variant `args.repeats` times, in turn, the order reversed every other repeat (a shared machine's speed
    drifts over minutes: interleaved runs see the same drift, and an A B B A order cancels a steady trend). Per run:
    the median iteration after the first; per variant: the median run."""
    inputs = tmp / f"{workload}-inputs.pt"
    batch = write_inputs(*WORKLOADS[workload], inputs)
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in VARIANTS}
    for r in range(args.repeats):
        for label, which, overrides in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            if "bf16" in label and not args.bf16:
                continue
            res = run_once(checkouts[which], workload, overrides, inputs, args, count_flops=r == 0)
            res["seconds_per_step"] = float(np.median(res["seconds"][1:]))
            runs[label].append(res)
            print(f"  {workload} run {r + 1}/{args.repeats}, {label}: {res['seconds_per_step']:.3f} s/step", flush=True)
    return summarise(runs, batch)


def summarise(runs: dict[str, list[dict]], batch: int) -> dict:
    ref_label = VARIANTS[0][0]
    ref = runs[ref_label]
    out = {"batch": batch, "variants": {}}
    for label, rs in runs.items():
        if not rs:
            out["variants"][label] = {"skipped": "no fast bf16 kernels on this device"}
            continue
        per_repeat = [a["seconds_per_step"] / b["seconds_per_step"] for a, b in zip(ref, rs)]
        seconds = float(np.median([r["seconds_per_step"] for r in rs]))
        dev = loss_deviation(rs[0]["losses"], ref[0]["losses"])
        out["variants"][label] = {
            "seconds_per_step": seconds, "images_per_second": batch / seconds,
            "speedup": float(np.median([r["seconds_per_step"] for r in ref])) / seconds,
            "speedup_per_repeat": per_repeat, "runs_seconds_per_step": [r["seconds_per_step"] for r in rs],
            "gflop_per_image": rs[0].get("gflop_per_image"), "loss_deviation_first_last": [dev[0], dev[-1]],
            "losses": rs[0]["losses"], **({"peak_memory_gib": rs[0]["peak_memory_gib"]}
                                          if "peak_memory_gib" in rs[0] else {})}
    return out


def gpu_peaks(device: str) -> tuple[float, float] | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)


def table(name: str, res: dict, rates: dict, peaks: tuple[float, float] | None) -> list[str]:
    vs = res["variants"]
    ref = vs[VARIANTS[0][0]]
    mm, conv = rates["matmul_fp32_gflops"], rates["conv3x3_fp32_gflops"]
    rate_cols = "of the GPU's dense peak" if peaks else "of fp32 matmul / 3x3 conv"
    lines = [f"#### {name}", "",
             "| implementation | s/step | images/s | x reference (each repeat; of the medians) | GFLOP/image | "
             f"GFLOP/s | {rate_cols} | loss deviation, first / last iteration |", "|---|---|---|---|---|---|---|---|"]
    for label, v in vs.items():
        if "skipped" in v:
            lines.append(f"| {label} | - | - | - | - | - | - | skipped: {v['skipped']} |")
            continue
        flops = v["gflop_per_image"] or ref["gflop_per_image"]
        rate = flops * v["images_per_second"]
        if peaks:
            share = f"{100 * rate / (1e3 * peaks[0 if 'bf16' in label else 1]):.1f}% MFU"
        else:
            share = f"{100 * rate / mm:.0f}% / {100 * rate / conv:.0f}%"
        (k0, d0), (k1, d1) = v["loss_deviation_first_last"]
        each = ", ".join(f"{x:.2f}" for x in v["speedup_per_repeat"])
        lines.append(f"| {label} | {v['seconds_per_step']:.3g} | {v['images_per_second']:.3g} | "
                     f"**{np.median(v['speedup_per_repeat']):.2f}** ({each}; {v['speedup']:.2f}) | {flops:.0f} | "
                     f"{rate:.0f} | {share} | "
                     f"{100 * d0:.2g}% ({k0}) / {100 * d1:.2g}% ({k1}) |")
    return lines + [""]


def markdown(res: dict) -> str:
    r0, r1 = res["rates_before"], res["rates_after"]
    peaks = gpu_peaks(res["device"])
    lines = [f"Reference: commit {res['reference']} (exported with `git archive`), against this commit "
             f"{res['commit']}; {res['repeats']} interleaved runs per row, each the median of its iterations after "
             f"the first, the order reversed every other repeat, {res['threads']} threads, device {res['device']}"
             f"{' (' + res['machine']['cuda'] + ')' if res['machine']['cuda'] else ''}"
             f"{', torch.compile on every block' if res['compile'] else ''}. "
             f"This machine in this run: fp32 matmul {r0['matmul_fp32_gflops']:.0f} / {r1['matmul_fp32_gflops']:.0f} "
             f"GFLOP/s and fp32 3x3 conv {r0['conv3x3_fp32_gflops']:.0f} / {r1['conv3x3_fp32_gflops']:.0f} GFLOP/s "
             "(before / after the runs; the table uses the first).", ""]
    for name, w in res["workloads"].items():
        lines += table(f"{name} workload ({' '.join(WORKLOADS[name][1]) or WORKLOADS[name][0]})", w, r0, peaks)
    lines += ["x reference: the median over the repeats of the reference's s/step divided by the row's in the same "
              "repeat (each repeat's ratio, then the ratio of the two medians). s/step and images/s: the row's "
              "median run. GFLOP/image: counted by `torch.utils.flop_counter` in one more iteration of that row; "
              "the shared trunk removes a forward of the classifier's trunk, so this commit counts fewer. Loss "
              "deviation: the loss that differs most from the reference's, relative to its mean magnitude, at the "
              "first and the last iteration (same weights, batch, dropout draws): rounding only in fp32; "
              "the two implementations agree to 1e-13 in fp64 (tests/test_released_step.py, tests/test_phases.py)."]
    if "profile" in res:
        lines += ["", "Where the time goes in this commit's iteration on the released workload (seconds per "
                  "iteration with the profiler on; indented rows are forward scopes inside the phase):", "",
                  "| part | " + " | ".join(res["profile"]) + " |", "|---|" + "---|" * len(res["profile"])]
        keys = list(next(iter(res["profile"].values())))
        lines += [f"| {k} | " + " | ".join(f"{p.get(k, float('nan')):.2f}" for p in res["profile"].values()) + " |"
                  for k in keys]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", default="f623edb", help="the commit to compare with")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--released-steps", type=int, default=3, help="timed iterations per run, released workload")
    ap.add_argument("--demo-steps", type=int, default=10, help="timed iterations per run, demo workload")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile every block (both implementations)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite BENCHMARKS.md from the results file")
    ap.add_argument("--prepare", type=Path, default=None,
                    help="only export --reference into DIR/reference and write DIR/inputs.pt (weights and a batch of "
                         "--config with the overrides), to run benchmarks/step_timer.py by hand")
    ap.add_argument("--config", default="configs/demo.yaml", help="the config of --prepare's inputs")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of --prepare's inputs")
    args = ap.parse_args()
    if args.render:
        return write_section(json.loads((RESULTS / "side_by_side.json").read_text()), "side-by-side", markdown)
    if args.prepare:
        (args.prepare / "reference").mkdir(parents=True, exist_ok=True)
        export_commit(args.reference, args.prepare / "reference")
        write_inputs(args.config, args.overrides, args.prepare / "inputs.pt")
        return print(args.prepare)
    args.steps = {"released": args.released_steps, "demo": args.demo_steps}
    args.bf16 = args.device == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    res = {"reference": args.reference, "commit": commit(), "device": args.device, "repeats": args.repeats,
           "threads": args.threads, "compile": args.compile, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(["python", "benchmarks/side_by_side.py", *sys.argv[1:]]),
           "rates_before": reference_rates(args.threads), "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="acr-side-by-side-") as tmp:
        (Path(tmp) / "reference").mkdir()
        ref = export_commit(args.reference, Path(tmp) / "reference")
        for w in args.workloads:
            res["workloads"][w] = measure(w, {"reference": ref, "this": REPO}, Path(tmp), args)
    res["rates_after"] = reference_rates(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "side_by_side.json").write_text(json.dumps(res, indent=1))  # kept if the profile fails
    if args.device == "cpu" and "released" in args.workloads and not args.no_profile:
        config, overrides = WORKLOADS["released"]
        res["profile"] = {p: profile_step(load_config(REPO / config, [*overrides, f"train.precision={p}"]), 2,
                                          args.threads) for p in (["fp32", "bf16"] if args.bf16 else ["fp32"])}
    (RESULTS / "side_by_side.json").write_text(json.dumps(res, indent=1))
    write_section(res, "side-by-side", markdown)


if __name__ == "__main__":
    main()
