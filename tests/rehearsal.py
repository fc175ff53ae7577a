"""Rehearse the cluster workflow on this machine before paying for one (`make rehearse`).

A local autoscaling Ray cluster (tests/multinode.py) whose node types come from cluster.yaml: the head with no CPUs
for workers, each worker type with its instance's CPU count and a custom resource `acr_gpu` standing for its GPUs,
the same min/max workers, a short idle timeout; every node with a disk of its own. An S3 server (moto) stands for the
bucket. The cluster commands of docs/ray.md, scaled down, go through `ray job submit --working-dir .`: train.py on 2
workers, tune.py with 2 concurrent trials, pseudo_labels.py, segment.py and pipeline.py, all writing to S3. Printed:
each job's result, the nodes it ran on (its summary's `nodes`), and the autoscaler's launches and terminations.
Exits non-zero if a job failed; stops every process it started.

    python -m tests.rehearsal [--keep-going]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from acr.storage import RunFolder
from tests.conftest import TINY_OVERRIDES
from tests.faults import BUCKET, S3_CREDENTIALS, environment, s3_server
from tests.multinode import autoscaling_cluster

REPO = Path(__file__).resolve().parents[1]
# What each instance type of cluster.yaml has: CPUs, and GPUs (as the custom resource acr_gpu: no GPU here).
INSTANCES = {"g5.xlarge": (4, 1), "g5.12xlarge": (48, 4)}
# The suite's tiny model and dataset, with the default weights (the stand-in, made on the head) and short runs.
TINY = [o for o in TINY_OVERRIDES if not o.startswith("model.pretrained=")] + [
    "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4", "train.log_every_steps=0",
    "train.precision=fp32"]
PSEUDO = ["pseudo.actors=2", "pseudo.scales=[1.0]", "pseudo.flip=false", "pseudo.irn_crop_size=64",
          "pseudo.irn_epochs=1", "pseudo.irn_batch_size=8", "pseudo.exp_times=4", "pseudo.overlays=2",
          "pseudo.max_images=8"]
SEGMENT = ["segment.backbone=resnet18", "segment.output_stride=16", "segment.epochs=1", "segment.max_steps_per_epoch=2",
           "segment.batch_size=2", "segment.crop_size=64", "segment.eval_scales=[1.0]", "segment.eval_flip=false",
           "segment.actors=2", "segment.overlays=2", "segment.max_val_images=4", "segment.pretrained=null"]


def node_types(cluster_yaml: Path) -> dict:
    """cluster.yaml's worker node types as the local autoscaler's: CPUs and acr_gpu from INSTANCES."""
    raw = yaml.safe_load(cluster_yaml.read_text())
    out = {}
    for name, t in raw["available_node_types"].items():
        if name == raw["head_node_type"]:
            continue
        cpus, gpus = INSTANCES[t["node_config"]["InstanceType"]]
        out[name] = {"resources": {"CPU": cpus, "acr_gpu": gpus}, "min_workers": t.get("min_workers", 0),
                     "max_workers": t.get("max_workers", 0)}
    return out


def jobs(s3: str) -> list[tuple[str, list[str], str]]:
    """(name, the script and its arguments, the summary it writes): docs/ray.md's cluster commands, scaled down."""
    return [
        ("train", ["ray_jobs/train.py", "--output-dir", f"{s3}/train", *TINY, "scaling.num_workers=2",
                   "scaling.cpus_per_worker=3", "scaling.max_failures=1", "train.checkpoint_every_steps=1"],
         f"{s3}/train/summary.json"),
        ("tune", ["ray_jobs/tune.py", "--output-dir", f"{s3}/tune", *TINY, "tune.num_samples=2",
                  "tune.max_concurrent=2", "tune.asha=false", "tune.select_max_images=8", "scaling.cpus_per_worker=2"],
         f"{s3}/tune/summary.json"),
        ("pseudo_labels", ["ray_jobs/pseudo_labels.py", f"checkpoint={s3}/train", "--output-dir", f"{s3}/pseudo",
                           *PSEUDO], f"{s3}/pseudo/summary.json"),
        ("segment", ["ray_jobs/segment.py", f"labels={s3}/pseudo", "--output-dir", f"{s3}/segment", *SEGMENT],
         f"{s3}/segment/summary.json"),
        ("pipeline", ["ray_jobs/pipeline.py", "--output-dir", f"{s3}/pipeline", *TINY, *PSEUDO, *SEGMENT,
                      "pipeline.search=false", "pipeline.upper_bound=false"], f"{s3}/pipeline/report.json"),
    ]


def submit(address: str, args: list[str], env: dict) -> tuple[bool, str, float]:
    """`ray job submit --working-dir . -- python ...` from this checkout: (succeeded, its output's end, seconds)."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--", "python", *args]
    t0 = time.perf_counter()
    for _ in range(12):  # the head's job agent comes up a few seconds after `ray start` returns
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    out = proc.stdout + proc.stderr
    return proc.returncode == 0 and "succeeded" in out, out[-2500:], time.perf_counter() - t0


def node_name(node_id: str) -> str:
    """The head, or the n-th node the autoscaler launched (the provider numbers the node ids it gives)."""
    return "head" if node_id == FAKE_HEAD_NODE_ID else f"worker node {int(node_id[-5:])} ({node_id[-8:]})"


def autoscaler_events(cluster) -> list[str]:
    """The autoscaler's launches and terminations, from its log on the head."""
    logs = Path(cluster.head_ray.temp_dir) / "session_latest" / "logs" / "monitor.log"
    text = logs.read_text(errors="replace") if logs.is_file() else ""
    return re.findall(r":event_summary:((?:Adding|Removing|Resized).*)", text)


def rehearse(keep_going: bool) -> int:
    failed, done = 0, 0
    with s3_server() as endpoint:
        # a process of its own: its cluster and job clients without token authentication
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{endpoint}", "AWS_DEFAULT_REGION": "us-east-1",
               "RAY_AUTH_MODE": "disabled"}
        with environment(env):
            cluster = autoscaling_cluster(node_types(REPO / "cluster.yaml"), env)
            try:
                job_env = {**os.environ, **env}
                job_env.pop("RAY_ADDRESS", None)
                for name, args, summary in jobs(f"s3://{BUCKET}/rehearsal"):
                    ok, out, seconds = submit(cluster.job_address, args, job_env)
                    written = RunFolder(summary.rsplit("/", 1)[0]).read_json(summary.rsplit("/", 1)[1]) or {}
                    nodes = written.get("nodes", {})
                    print(f"[{name}] {'succeeded' if ok else 'FAILED'} in {seconds:.0f} s; {summary}; ran on "
                          f"{len(nodes)} node(s):\n  " + "\n  ".join(f"{node_name(n)}: {', '.join(c)}"
                                                                    for n, c in nodes.items()), flush=True)
                    done += 1
                    if not ok:
                        failed += 1
                        print(out, flush=True)
                        if not keep_going:
                            break
                time.sleep(45)  # the idle timeout: the autoscaler terminates the idle workers
                print("autoscaler:\n  " + "\n  ".join(autoscaler_events(cluster)), flush=True)
            finally:
                cluster.stop()
    print(f"rehearsal: {done - failed} of {len(jobs(''))} jobs succeeded, {failed} failed")
    return 1 if failed else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep-going", action="store_true", help="run every job even after one failed")
    sys.exit(rehearse(p.parse_args().keep_going))


if __name__ == "__main__":
    main()
