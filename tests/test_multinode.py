"""The jobs on a Ray cluster of several nodes (tests/multinode.py: real `ray start` nodes on this machine, each with a
disk of its own), as on a cloud cluster: the head runs the driver and no workers (cluster.yaml's head), two worker
nodes run everything else, and what they share is an S3 server (moto) and the installed code.

Each failure a first multi-node run met has a test here: the weights and shard cache that exist only on the head's
disk (now copied into the run's storage), a search whose trials trained into Tune's folder on the node of the trial's
driver (now into the search's storage), local folders that no worker can reach (now refused, naming the key). And a
node lost mid-epoch: the training resumes on the other node from its last checkpoint on S3 and ends as an
uninterrupted run."""

from __future__ import annotations

import json
import sys

import pyarrow.fs as pafs
import pytest
import ray
import torch
from ray.util.state import list_actors

from acr.checkpoint import load_state
from acr.config import ConfigError, load_config
from acr.runtime.cluster import init_ray
from acr.runtime.reach import reachable
from acr.storage import RunFolder
from acr.train.driver import run_local, run_training
from acr.tuning import run_tune
from tests.conftest import REPO, TINY_OVERRIDES
from tests.faults import BUCKET, S3_CREDENTIALS, environment, run_with_a_kill, s3_server
from tests.multinode import LocalCluster, namespaces_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux") or not namespaces_available(),
                                 reason="the cluster's nodes need Linux mount namespaces (unshare -m), for a disk of "
                                        "their own")]
NODE_CPUS = 4  # logical CPUs of a worker node: a training worker, its data stream and Ray Data's tasks
TOLERANCE = 1e-7  # as tests/test_fault_tolerance.py: room for summation order only
RUN = ["train.epochs=2", "train.max_steps_per_epoch=2", "train.batch_size=4", "train.checkpoint_every_steps=1",
       "train.keep_checkpoints=2", "train.precision=fp32", "train.threads_per_worker=1", "train.log_every_steps=0"]


@pytest.fixture(scope="module")
def cluster():
    """The head (no CPUs for workers) and two worker nodes; this process is the driver on the head, connected to it,
    with S3 reached through AWS_ENDPOINT_URL as a cloud node reaches its object store."""
    with s3_server() as endpoint:
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{endpoint}", "AWS_DEFAULT_REGION": "us-east-1",
               "RAY_AUTH_MODE": "disabled"}
        with environment(env):
            c = LocalCluster(head_cpus=0, env=env)
            try:
                for name in ("node1", "node2"):
                    c.add_node(name, NODE_CPUS, wait=False)
                init_ray(load_config(None, [f"ray.address={c.address}"]))  # as every job joins it
                c.wait_for_nodes()
                yield c
            finally:
                ray.shutdown()
                c.stop()


def _overrides(c: LocalCluster, *extra: str) -> list[str]:
    """A tiny run whose caches (dataset, shards, stand-in) are on the head's disk, as ~/.cache/acr is there."""
    return TINY_OVERRIDES + [f"data.cache_dir={c.head.disk / 'home' / 'cache'}", f"ray.address={c.address}",
                             *RUN, *extra]


def _training_nodes(c: LocalCluster) -> list[str]:
    """The nodes the Ray Train workers of this cluster ran on (alive or not), by name."""
    actors = list_actors(address=c.job_address, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                         raise_on_missing_output=False)
    return sorted({c.name_of(a.node_id) for a in actors})


def test_training_on_two_nodes_reads_the_standin_and_shards_from_the_run_storage(cluster):
    """The default weights (the stand-in, made on the head) and the shards (converted on the head) reach workers on
    two other nodes: both are copied into the run's storage, and the checkpoint's config names the copies."""
    uri = f"s3://{BUCKET}/mn/two-nodes"
    # 2.5 CPUs a worker: one worker fits a node, not two
    cfg = load_config(None, _overrides(cluster, "model.pretrained=standin", "scaling.num_workers=2",
                                       "scaling.cpus_per_worker=2.5", "eval.enabled=true"))
    summary = run_training(cfg, uri)
    state = load_state(summary["checkpoint"])
    trained = state["config"]
    assert trained["model"]["pretrained"].startswith(f"{uri}/inputs/weights/resnet18-standin-")
    assert trained["data"]["shards"].startswith(f"{uri}/inputs/shards/synthetic-")
    assert RunFolder(trained["data"]["shards"]).exists("manifest.json")
    assert _training_nodes(cluster) == ["node1", "node2"]  # one worker on each, none on the head
    assert summary["history_last_epoch"]["epoch"] == 1 and summary["num_images"] == 8, summary


def test_a_local_output_folder_is_refused_on_a_cluster(cluster, tmp_path):
    """A folder on the head's disk: no worker could write its checkpoints there. Refused before any worker starts,
    naming the key; so are a local checkpoint and label folder given to the per-image jobs."""
    cfg = load_config(None, _overrides(cluster))
    with pytest.raises(ConfigError, match=r"--output-dir=.*head.*a folder on this machine only.*ray.shared_dirs"):
        run_training(cfg, cluster.head.disk / "outputs" / "run")
    assert not list_actors(address=cluster.job_address, filters=[("class_name", "=", "RayTrainWorker"),
                                                                   ("state", "=", "ALIVE")])
    shared = load_config(None, _overrides(cluster, f"ray.shared_dirs=[{cluster.head.disk / 'outputs'}]"))
    assert reachable(shared, cluster.head.disk / "outputs" / "run")
    assert not reachable(shared, cluster.head.disk / "home")


def test_a_search_on_two_nodes_keeps_its_trials_in_the_search_storage(cluster):
    """Two concurrent trials, their drivers and workers on the worker nodes: each trial's training run is in the
    search's folder on S3 (not in Tune's folder on the node of the trial's driver), and the summary's best
    checkpoint is there and loads."""
    uri = f"s3://{BUCKET}/mn/search"
    cfg = load_config(None, _overrides(cluster, "tune.num_samples=2", "tune.max_concurrent=2", "tune.asha=false",
                                       "tune.select_max_images=8", "train.epochs=1", "eval.enabled=true"),
                      job="tune")
    space = REPO / "search_spaces" / "demo.yaml"
    summary = run_tune(cfg, space, uri)
    assert summary["n_trials"] == 2 and summary["n_errored"] == 0
    assert summary["best_checkpoint"].startswith(f"{uri}/trials/{summary['best_trial']}/train/checkpoint_")
    state = load_state(summary["best_checkpoint"])
    assert state["epoch"] == 1 and summary["best_cam_miou_reported"] is not None
    trials = RunFolder(uri).sub("trials")
    assert len(trials.fs.get_file_info(pafs.FileSelector(trials.path))) == 2
    assert set(_training_nodes(cluster)) <= {"node1", "node2"}


def _final_state(uri: str) -> dict:
    folder = RunFolder(uri)
    return load_state(folder.location_of(folder.latest_checkpoint()))


def test_a_node_lost_mid_epoch_resumes_on_the_other_node_from_s3(cluster, tmp_path):
    """The node running the only training worker is killed (raylet, object store, workers) after the run's first
    checkpoint, mid-epoch; with scaling.max_failures=1 Ray Train starts the group on the remaining node, which
    resumes from that checkpoint on S3; the run ends with the parameters and optimiser state of an uninterrupted
    one. A replacement node joins afterwards, as the autoscaler would start one."""
    uri = f"s3://{BUCKET}/mn/node-lost"
    extra = ["model.dropout=true", "eval.enabled=false", "scaling.max_failures=1"]
    cfg = load_config(None, _overrides(cluster, *extra))
    reference = run_local(cfg, tmp_path / "reference", storage=RunFolder(f"s3://{BUCKET}/mn/reference"))
    ref = load_state(reference.last_checkpoint)

    def kill(out: dict) -> None:
        alive = list_actors(address=cluster.job_address, filters=[("class_name", "=", "RayTrainWorker"),
                                                                   ("state", "=", "ALIVE")], detail=True)
        out["killed"] = [cluster.name_of(a.node_id) for a in alive]
        for name in out["killed"]:
            cluster.kill_node(name)

    run = run_with_a_kill(lambda: run_training(cfg, uri), RunFolder(uri), None, kill)
    assert "error" not in run, run.get("error")
    assert len(run["killed"]) == 1 and run["killed"][0] in ("node1", "node2"), run["killed"]
    survivor = {"node1", "node2"} - set(run["killed"])
    state = _final_state(uri)
    summary = json.loads(RunFolder(uri).read_text("summary.json"))
    resumes = [(r["epoch"], r["step_in_epoch"]) for r in summary["resumes"]]
    assert len(resumes) == 1 and (0, 1) <= resumes[0] < (2, 0), resumes  # from a checkpoint recorded before the end
    assert state["counters"] == ref["counters"] and (state["epoch"], state["step_in_epoch"]) == (2, 0)
    worst = max(float((state[net][k].double() - v.double()).abs().max())
                for net in ("classifier", "reconstructor") for k, v in ref[net].items() if v.is_floating_point())
    assert worst <= TOLERANCE, worst
    for opt in ("opt_cls", "opt_rec"):
        assert state[opt]["param_groups"] == ref[opt]["param_groups"]
        for i, s in ref[opt]["state"].items():
            for k, v in s.items():
                assert torch.allclose(state[opt]["state"][i][k].double(), v.double(), atol=TOLERANCE, rtol=0)
    assert survivor <= set(_training_nodes(cluster))
    cluster.add_node(run["killed"][0], NODE_CPUS)  # the replacement, for the tests after this one
