"""Memory and time of the random walk (acr.refine.irn.propagate) at VOC and larger sizes, versus the dense
transition matrix that IRN's make_sem_seg_labels builds (N x N floats, then squared exp_times times).

Each size runs in a fresh process; peak memory is that process's peak RSS minus its RSS before the walk (after
imports and inputs). IRN's dense need is N^2 x 4 bytes for the matrix alone (its squaring holds two more of the
same size), computed, not run, except at the smallest size where both are run and compared.
Prints a table; writes benchmarks/results/random_walk.json and the random-walk section of BENCHMARKS.md.

    python benchmarks/random_walk_memory.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, image height, width, stride of the walk, classes)
SIZES = [("small (dense check)", 64, 64, 4, 2), ("VOC 500x375", 375, 500, 4, 3),
         ("VOC 500x375 at stride 1", 375, 500, 1, 3), ("1024x2048 (Cityscapes)", 1024, 2048, 4, 3)]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(h: int, w: int, stride: int, k: int) -> dict:
    import torch

    from acr.refine.irn import path_affinity, path_offsets, propagate, transition_matrix

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    hs, ws = -(-h // stride), -(-w // stride)
    edge = torch.rand(hs, ws, generator=g) * 0.5
    cams = torch.rand(k, hs, ws, generator=g)
    before = _rss_mb()
    t0 = time.perf_counter()
    rw = propagate(cams, edge, beta=10.0, exp_times=8, radius=5)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = hs * ws
    out = {"grid": [hs, ws], "pixels": n, "classes": k, "seconds": round(seconds, 3),
           "peak_extra_mb": round(peak - before, 1), "dense_matrix_mb": round(n * n * 4 / 2**20, 1)}
    if n <= 4096:  # IRN's dense formula at this size: the same result
        offsets = path_offsets(5)
        aff = path_affinity(edge[None], offsets)[0]
        dense = transition_matrix(aff, offsets, 10.0).to_dense()
        for _ in range(8):
            dense = dense @ dense
        x = (cams * (1 - edge)).reshape(k, n)
        out["max_abs_diff_vs_dense"] = float((x @ dense - rw.reshape(k, n)).abs().max())
    return out


def main() -> None:
    if len(sys.argv) == 5:  # child process: one size
        print(json.dumps(one(*map(int, sys.argv[1:]))))
        return
    # here, not at the top: the measuring child processes (this script) import only what the walk needs
    from benchmarks.common import commit, machine, write_benchmarks_md

    rows = []
    for name, h, w, stride, k in SIZES:
        res = subprocess.run([sys.executable, __file__, str(h), str(w), str(stride), str(k)], capture_output=True,
                             text=True, cwd=REPO)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-2000:])
        rows.append({"name": name, "image": [h, w], "stride": stride, **json.loads(res.stdout.splitlines()[-1])})
    lines = ["| size | walk grid | pixels N | seconds (256 steps) | peak extra memory | IRN's dense N x N matrix |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['grid'][0]}x{r['grid'][1]} | {r['pixels']} | {r['seconds']} | "
                     f"{r['peak_extra_mb']} MB | {r['dense_matrix_mb']} MB |")
    check = [r for r in rows if "max_abs_diff_vs_dense" in r]
    text = "\n".join(lines) + "\n"
    if check:
        text += (f"\nAt the smallest size the sparse walk equals IRN's dense T^256 to "
                 f"{check[0]['max_abs_diff_vs_dense']:.1e} (max abs difference).\n")
    text += (f"\nCommand: `python benchmarks/random_walk_memory.py`; commit {commit()}; {machine()['cpu']}, "
             f"{machine()['cores']} cores.\n")
    print(text)
    (REPO / "benchmarks" / "results" / "random_walk.json").write_text(json.dumps(
        {"rows": rows, "commit": commit(), "command": "python benchmarks/random_walk_memory.py",
         "machine": machine()}, indent=1))
    write_benchmarks_md("random-walk", text)


if __name__ == "__main__":
    main()
