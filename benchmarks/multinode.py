"""What scales across nodes, measured on a local multi-node cluster (tests/multinode.py: real `ray start` nodes with a
disk each, the head without CPUs for workers, a local S3 server): ACR training images/s and the pseudo-label CAM
stage's images/s with 1 and 2 worker nodes (one training worker / one CAM actor per node), and the time from a
node's loss to its training resumed on the other node. Prints a table; writes benchmarks/results/multinode.json and
the multi-node section of BENCHMARKS.md.

    python benchmarks/multinode.py [--steps 6] [--images 16]

On one machine every node shares its cores: the rates show what the distribution costs (DDP over gloo, S3 round
trips, the data stream on another node), not the speed-up of adding machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from acr.config import Config, apply_overrides, load_config, parse_overrides  # noqa: E402
from acr.pseudo.job import job_config, run_pseudo_labels  # noqa: E402
from acr.runtime.cluster import init_ray  # noqa: E402
from acr.storage import RunFolder  # noqa: E402
from acr.train.job import run_training  # noqa: E402
from benchmarks.common import commit, machine, write_benchmarks_md  # noqa: E402
from tests.faults import BUCKET, S3_CREDENTIALS, latest_point, s3_server  # noqa: E402
from tests.multinode import LocalCluster, token_auth  # noqa: E402

NODE_CPUS = 4
# 2.5 CPUs a worker: one worker per node; 0.5 for the decode actor: a CPU left on every node for Ray Data's reads
DEMO = ["train.batch_size=8", "train.log_every_steps=0", "train.precision=fp32", "eval.enabled=false",
        "scaling.cpus_per_worker=2.5", "data.decode_cpus=0.5", "model.pretrained=null", "train.threads_per_worker=1"]


def _cfg(cluster: LocalCluster, *extra: str) -> Config:
    return load_config(REPO / "configs" / "demo.yaml", [f"data.cache_dir={cluster.head.disk / 'home' / 'cache'}",
                                                         f"ray.address={cluster.address}", *DEMO, *extra])


def train_rate(cluster: LocalCluster, nodes: int, steps: int) -> float:
    """Median images/s of the epochs of an ACR run on `nodes` workers, one per node."""
    cfg = _cfg(cluster, f"scaling.num_workers={nodes}", "train.epochs=2", f"train.max_steps_per_epoch={steps}")
    summary = run_training(cfg, f"s3://{BUCKET}/bench/train-{nodes}")
    return summary["train_images_per_second"]


def cam_rate(cluster: LocalCluster, nodes: int, checkpoint: str, images: int) -> float:
    """Images/s of the pseudo-label job's multi-scale CAM stage with one actor per node."""
    overrides = dict(parse_overrides([f"pseudo.actors={nodes}", f"pseudo.max_images={images}", "pseudo.irn_epochs=1",
                                      "pseudo.overlays=0"]))
    cfg = job_config(apply_overrides(Config(), {"pseudo.checkpoint": checkpoint}), overrides)
    summary = run_pseudo_labels(cfg, f"s3://{BUCKET}/bench/pseudo-{nodes}")
    return images / summary["stages"]["cams"]["seconds"]


def recovery(cluster: LocalCluster, steps: int) -> dict:
    """Kill the node of the only training worker after the first checkpoint: seconds to the next checkpoint of the
    run (resumed on the other node), and the seconds a step took before."""
    cfg = _cfg(cluster, "train.epochs=1", f"train.max_steps_per_epoch={steps}", "train.checkpoint_every_steps=1",
               "scaling.max_failures=1")
    folder = RunFolder(f"s3://{BUCKET}/bench/recovery")
    job = threading.Thread(target=run_training, args=(cfg, folder.location))
    job.start()
    points = []
    while job.is_alive() and len(points) < 2:
        point = latest_point(folder)
        if point and point not in [p for _, p in points]:
            points.append((time.monotonic(), point))
        time.sleep(0.05)
    step_seconds = points[1][0] - points[0][0]
    worker = list_actors(address=cluster.job_address, filters=[("class_name", "=", "RayTrainWorker"),
                                                                ("state", "=", "ALIVE")], detail=True)[0]
    name = cluster.name_of(worker.node_id)
    killed_at = time.monotonic()
    cluster.kill_node(name)
    after = points[-1][1]
    while job.is_alive() and latest_point(folder) == after:
        time.sleep(0.05)
    resumed = time.monotonic() - killed_at
    job.join()
    return {"seconds_to_next_checkpoint": round(resumed, 1), "step_seconds": round(step_seconds, 1)}


def measure(steps: int, images: int) -> dict:
    with s3_server() as endpoint:
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{endpoint}", "AWS_DEFAULT_REGION": "us-east-1"}
        with token_auth(env):
            cluster = LocalCluster(head_cpus=0, env=env)
            try:
                cluster.add_node("node1", NODE_CPUS, wait=False)
                init_ray(load_config(None, [f"ray.address={cluster.address}"]))
                cluster.wait_for_nodes()
                checkpoint = run_training(_cfg(cluster, "train.epochs=1", "train.max_steps_per_epoch=2"),
                                          f"s3://{BUCKET}/bench/classifier")["checkpoint"]
                rows = {}
                for nodes in (1, 2):
                    if nodes == 2:
                        cluster.add_node("node2", NODE_CPUS)
                    rows[nodes] = {"train_images_per_second": train_rate(cluster, nodes, steps),
                                   "cam_images_per_second": cam_rate(cluster, nodes, checkpoint, images)}
                return {"rows": rows, "recovery": recovery(cluster, steps)}
            finally:
                ray.shutdown()  # first: Ray ends a driver whose cluster stops
                cluster.stop()


def markdown(res: dict) -> str:
    lines = ["| worker nodes | ACR training, images/s | CAM stage, images/s |", "|---|---|---|"]
    for nodes, r in res["rows"].items():
        lines.append(f"| {nodes} | {r['train_images_per_second']:.2f} | {r['cam_images_per_second']:.2f} |")
    rec = res["recovery"]
    lines += ["", f"A node lost mid-epoch (scaling.max_failures=1, a checkpoint every step): the run's next checkpoint "
              f"{rec['seconds_to_next_checkpoint']} s after the kill, against {rec['step_seconds']} s a step before "
              "it (the GCS's health checks, 1 s apart on this cluster's head, 3 s by Ray's default; a new worker "
              "group on the other node; the restore from S3; one step).", "",
              "fp32, one thread per training worker (train.threads_per_worker=1), batch 8 of the demo's 128 px crops. "
              "All nodes share this machine's 2 cores: one node's worker uses one core and two use both, so the second "
              "row shows what the distribution costs against a second core (gloo all-reduce, S3 checkpoints, the "
              "data stream and decode actors on the same cores), not the speed-up of adding machines, which needs "
              "a real cluster."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="training steps per epoch (batch 8)")
    p.add_argument("--images", type=int, default=16, help="images of the CAM stage")
    args = p.parse_args()
    res = {"command": "python benchmarks/multinode.py " + " ".join(sys.argv[1:]), "commit": commit(),
           "date": time.strftime("%Y-%m-%d"), "machine": machine(), **measure(args.steps, args.images)}
    out = REPO / "benchmarks" / "results" / "multinode.json"
    out.write_text(json.dumps(res, indent=1))
    text = markdown(res)
    write_benchmarks_md("multi-node", f"Command: `{res['command']}` (commit {res['commit']}, {res['date']}, "
                                      f"{res['machine']['cpu']}).\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
