"""The jobs on a Ray cluster of several nodes (tests/multinode.py: real `ray start` nodes on this machine, each with a
disk of its own), as on a cloud cluster: the head runs the driver and no workers (cluster.yaml's head), two worker
nodes run everything else, and what they share is an S3 server (moto) and the installed code.

Each failure a first multi-node run met has a test here: the weights and shard cache that exist only on the head's
disk (copied into the run's storage), a search whose trials trained into Tune's folder on the node of the trial's
driver (they train in the search's storage), local folders that no worker can reach (refused, naming the key). And the
losses a cloud cluster sees: a node lost while ACR, IRN, DeepLab, a per-image stage or a search runs, and the whole
cluster replaced under a job: each run resumes from its last checkpoint on S3 and ends as an uninterrupted run."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pytest
import ray
from ray.util.state import list_actors

from acr.checkpoint import load_state
from acr.config import Config, ConfigError, apply_overrides, load_config, parse_overrides
from acr.pseudo.job import job_config, run_pseudo_labels
from acr.data import file_codecs
from acr.runtime.session import read_latest
from acr.segment.job import run_segment
from acr.segment.train_deeplab import MODEL_DIR
from acr.runtime.cluster import init_ray
from acr.runtime.reach import reachable
from acr.storage import RunFolder
from acr.train.job import run_local, run_training
from acr.tune.job import run_tune, trial_limits
from tests.conftest import REPO, TINY_OVERRIDES, wait_for_released_step
from tests.faults import (BUCKET, S3_CREDENTIALS, assert_history_complete, assert_keeps_newest,
                          assert_same_acr_state, assert_same_network, latest_point, s3_server, wait_for_checkpoint)
from tests.multinode import LocalCluster, namespaces_available, token_auth

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux") or not namespaces_available(),
                                 reason="the cluster's nodes need Linux mount namespaces (unshare -m), for a disk of "
                                        "their own")]
NODE_CPUS = 4  # logical CPUs of a worker node: a training worker, its data stream and Ray Data's tasks
TOLERANCE = 1e-7  # as tests/test_fault_tolerance.py: room for summation order only
# dropout on: the final parameters match only if the RNG state is restored too (tests/test_fault_tolerance.py)
ACR_FAULTS = ["model.dropout=true", "eval.enabled=false"]
RUN = ["train.epochs=2", "train.max_steps_per_epoch=2", "train.batch_size=4", "train.checkpoint_every_steps=1",
       "train.keep_checkpoints=2", "train.precision=fp32", "train.threads_per_worker=1", "train.log_every_steps=0"]


@pytest.fixture(scope="module")
def cluster():
    """The head (no CPUs for workers) and two worker nodes; this process is the driver on the head, connected to it,
    with S3 reached through AWS_ENDPOINT_URL as a cloud node reaches its object store."""
    wait_for_released_step()  # three Ray nodes and the float64 run's 15 GiB do not fit this machine's memory together
    with s3_server() as endpoint:
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{endpoint}", "AWS_DEFAULT_REGION": "us-east-1"}
        with token_auth(env):
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


def _training_nodes(c: LocalCluster, alive: bool = False) -> list[str]:
    """The nodes the Ray Train workers of this cluster ran on (alive or not, or those alive), by name."""
    filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")] if alive else [])
    actors = list_actors(address=c.job_address, filters=filters, detail=True, raise_on_missing_output=False)
    return sorted({c.name_of(a.node_id) for a in actors})


@pytest.fixture(scope="module")
def two_node_run(cluster) -> dict:
    """ACR on two workers, one per worker node (2.5 CPUs a worker: two do not fit a node), with the default weights
    (the stand-in, made on the head) and evaluation on: its summary, its checkpoint's config and the nodes that
    trained. Its checkpoint is the classifier of the pseudo-label tests."""
    uri = f"s3://{BUCKET}/mn/two-nodes"
    cfg = load_config(None, _overrides(cluster, "model.pretrained=standin", "scaling.num_workers=2",
                                       "scaling.cpus_per_worker=2.5", "eval.enabled=true"))
    summary = run_training(cfg, uri)
    return {"uri": uri, "summary": summary, "trained": load_state(summary["checkpoint"])["config"],
            "nodes": _training_nodes(cluster)}


def test_training_on_two_nodes_reads_the_standin_and_shards_from_the_run_storage(two_node_run):
    """The default weights (the stand-in, made on the head) and the shards (converted on the head) reach workers on
    two other nodes: both are copied into the run's storage, and the checkpoint's config names the copies."""
    uri, summary, trained = two_node_run["uri"], two_node_run["summary"], two_node_run["trained"]
    assert trained["model"]["pretrained"].startswith(f"{uri}/inputs/weights/resnet18-standin-")
    assert trained["data"]["shards"].startswith(f"{uri}/inputs/shards/synthetic-")
    assert RunFolder(trained["data"]["shards"]).exists("manifest.json")
    assert two_node_run["nodes"] == ["node1", "node2"]  # one worker on each, none on the head
    assert summary["history_last_epoch"]["epoch"] == 1 and summary["num_images"] == 8, summary


def test_a_local_output_folder_is_refused_on_a_cluster(cluster):
    """A folder on the head's disk: no worker could write its checkpoints there. Refused before any worker starts,
    naming the key; so are a local checkpoint and label folder given to the per-image jobs."""
    cfg = load_config(None, _overrides(cluster))
    with pytest.raises(ConfigError, match=r"--output-dir=.*head.*a folder on this machine only.*ray.shared_dirs"):
        run_training(cfg, cluster.head.disk / "outputs" / "run")
    assert not list_actors(address=cluster.job_address, filters=[("class_name", "=", "RayTrainWorker"),
                                                                   ("state", "=", "ALIVE")])
    # a trial needing more CPUs than a node has: on one machine the trials at once are counted from its CPUs; on a
    # cluster that grows as trials ask, they are not bounded by the nodes up at the start
    big = load_config(None, _overrides(cluster, "scaling.cpus_per_worker=4", "tune.num_samples=3"), job="tune")
    assert trial_limits(big) == (3, {"CPU": big.tune.trial_cpus})
    shared = load_config(None, _overrides(cluster, f"ray.shared_dirs=[{cluster.head.disk / 'outputs'}]"))
    assert reachable(shared, cluster.head.disk / "outputs" / "run")
    assert not reachable(shared, cluster.head.disk / "home")


def _final_state(uri: str) -> dict:
    folder = RunFolder(uri)
    return load_state(folder.location_of(folder.latest_checkpoint()))


@pytest.fixture(scope="module")
def acr_reference(cluster, tmp_path_factory) -> dict:
    """The final state of an uninterrupted ACR run of ACR_FAULTS: the same loop and stream in this process."""
    cfg = load_config(None, _overrides(cluster, *ACR_FAULTS))
    session = run_local(cfg, tmp_path_factory.mktemp("reference"), storage=RunFolder(f"s3://{BUCKET}/mn/reference"))
    return load_state(session.last_checkpoint)


def test_a_search_on_two_nodes_that_loses_one_finishes_its_trials_in_the_search_storage(cluster):
    """Two trials at once, one on each worker node; one node is killed after the first trial checkpoint. With
    scaling.max_failures=1 the trial that lost its driver or workers is restarted (Tune) or its worker group is
    (Train), continues its training run from its last checkpoint, and every trial's run reaches its last epoch.
    Each trial's training run is in the search's folder on S3 (not in Tune's folder on the node of the trial's
    driver), and the summary's best checkpoint is there and loads."""
    uri = f"s3://{BUCKET}/mn/search-node-lost"
    cfg = load_config(None, _overrides(cluster, "tune.num_samples=2", "tune.max_concurrent=2", "tune.asha=false",
                                       "tune.select_max_images=8", "train.epochs=2", "scaling.max_failures=1",
                                       # one trial fits a node, with a CPU left for Ray Data's read tasks
                                       "scaling.cpus_per_worker=2", "data.decode_cpus=0.5"), job="tune")
    out: dict = {}
    search = threading.Thread(target=lambda: out.update(summary=run_tune(cfg, REPO / "search_spaces" / "demo.yaml",
                                                                         uri)))
    search.start()
    trials, deadline = RunFolder(uri).sub("trials"), time.monotonic() + 600
    while search.is_alive() and time.monotonic() < deadline and not any(
            trials.sub(f"{i.base_name}/train").latest_checkpoint()
            for i in trials.fs.get_file_info(pafs.FileSelector(trials.path, allow_not_found=True))):
        time.sleep(0.5)
    killed = sorted({cluster.name_of(a.node_id) for a in list_actors(
        address=cluster.job_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])})[:1]
    for name in killed:
        cluster.kill_node(name)
    search.join(timeout=900)
    summary = out.get("summary") or {}
    assert killed and summary.get("n_trials") == 2 and summary["n_errored"] == 0, (killed, summary)
    rows = list(csv.DictReader(io.StringIO(RunFolder(uri).read_text("trials.csv"))))
    assert [r["status"] for r in rows] == ["done", "done"], rows
    # every trial's training run reached its end, and trials.csv has its score after every epoch, also for a trial
    # that Tune restarted (its driver's node lost), whose record in Tune starts at the restart
    for r in rows:
        assert latest_point(trials.sub(f"{r['trial']}/train")) == {"epoch": 2, "step_in_epoch": 0}, r
        assert (r["epochs"], r["stopped_early"]) == ("2", "False"), r
    assert summary["best_checkpoint"].startswith(f"{uri}/trials/{summary['best_trial']}/train/checkpoint_")
    assert load_state(summary["best_checkpoint"])["epoch"] == 2 and summary["best_cam_miou_reported"] is not None
    assert len(trials.fs.get_file_info(pafs.FileSelector(trials.path))) == 2
    cluster.add_node(killed[0], NODE_CPUS)


# IRN on 4 images in batches of 2, 2 epochs, a checkpoint after every step (as tests/test_stage_fault_tolerance.py)
PSEUDO = ["pseudo.actors=2", "pseudo.scales=[1.0]", "pseudo.flip=false", "pseudo.irn_crop_size=64",
          "pseudo.irn_epochs=2", "pseudo.irn_batch_size=2", "pseudo.irn_checkpoint_every_steps=1", "pseudo.exp_times=2",
          "pseudo.overlays=2", "pseudo.max_images=4", "scaling.max_failures=1", "train.threads_per_worker=1"]


@pytest.fixture(scope="module")
def classifier(two_node_run) -> str:
    """A checkpoint on S3 of a classifier trained on the cluster."""
    return two_node_run["summary"]["checkpoint"]


def _kill_where(cluster: LocalCluster, class_name: str) -> str:
    """Kill the node of an alive actor of `class_name` and start a replacement (as the autoscaler would)."""
    alive = list_actors(address=cluster.job_address, filters=[("class_name", "=", class_name),
                                                               ("state", "=", "ALIVE")], detail=True)
    name = sorted(cluster.name_of(a.node_id) for a in alive if a.node_id)[0]
    cluster.kill_node(name)
    cluster.add_node(f"{name}-replacement", NODE_CPUS, wait=False)
    return name


def _wait_for(condition, alive, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline and not condition():
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pseudo_reference(cluster, classifier) -> tuple:
    """The pseudo-label job's config and the folder of its uninterrupted run on the cluster."""
    overrides = dict(parse_overrides(PSEUDO + [f"data.cache_dir={cluster.head.disk / 'home' / 'cache'}"]))
    cfg = job_config(apply_overrides(Config(), {"pseudo.checkpoint": classifier}), overrides)
    reference = RunFolder(f"s3://{BUCKET}/mn/pseudo-ref")
    run_pseudo_labels(cfg, reference.location)
    return cfg, reference


def _same_files(folder: RunFolder, reference: RunFolder, kinds) -> None:
    for kind in kinds:
        names = reference.names(kind)
        assert names and folder.names(kind) == names, kind
        for name in names:
            assert folder.read_bytes(f"{kind}/{name}") == reference.read_bytes(f"{kind}/{name}"), f"{kind}/{name}"


def test_the_pseudo_label_job_loses_a_node_in_a_per_image_stage_and_in_irn(cluster, pseudo_reference):
    """A node running a CAM actor is killed once the first CAM files are written, and later the node running IRN's
    training worker after IRN's first checkpoint: the job completes, every per-image file equals an uninterrupted
    run's, and IRN ends with the parameters and optimiser state of an uninterrupted IRN."""
    cfg, reference = pseudo_reference
    folder = RunFolder(f"s3://{BUCKET}/mn/pseudo-lost")
    out: dict = {}
    job = threading.Thread(target=lambda: out.update(summary=run_pseudo_labels(cfg, folder.location)))
    job.start()
    _wait_for(lambda: folder.names(file_codecs.CAMS), job.is_alive)
    out["cams_node"] = _kill_where(cluster, "MapWorker(MapBatches(CamStage))") if job.is_alive() else None
    _wait_for(lambda: folder.sub("irn").latest_checkpoint(), job.is_alive)
    out["irn_node"] = _kill_where(cluster, "RayTrainWorker") if job.is_alive() else None
    job.join(timeout=900)
    assert out.get("summary") and out["cams_node"] and out["irn_node"], out
    _same_files(folder, reference, (file_codecs.CAMS, file_codecs.CRF, file_codecs.IR_LABELS, file_codecs.MASKS))
    resumes = out["summary"]["stages"]["irn"].get("resumes") or []
    assert resumes, out["summary"]["stages"]["irn"]
    assert_same_network(folder.sub("irn"), reference.sub("irn"), TOLERANCE)


# DeepLab on the 4 labelled images: 2 epochs of 2 steps of 2 images, a checkpoint after every step; 2 val images
SEGMENT = ["segment.backbone=resnet18", "segment.output_stride=16", "segment.epochs=2", "segment.max_images=4",
           "segment.max_val_images=2", "segment.batch_size=2", "segment.crop_size=64", "segment.eval_scales=[1.0]",
           "segment.eval_flip=false", "segment.actors=2", "segment.overlays=2", "segment.checkpoint_every_steps=1",
           "segment.pretrained=null", "scaling.max_failures=1", "train.threads_per_worker=1"]


def test_deeplab_loses_a_node_and_ends_as_an_uninterrupted_run(cluster, pseudo_reference):
    """DeepLab on the pseudo-labels on S3; the node of its training worker is killed after its first checkpoint: the
    group restarts on another node from that checkpoint, the network ends as an uninterrupted run's, and the
    predictions (per-image files of actors on both nodes) are the same files."""
    _, labels = pseudo_reference
    cfg = load_config(None, _overrides(cluster, f"segment.labels={labels.location}", *SEGMENT), job="segment")
    reference, folder = RunFolder(f"s3://{BUCKET}/mn/deeplab-ref"), RunFolder(f"s3://{BUCKET}/mn/deeplab-lost")
    ref_summary = run_segment(cfg, reference.location)
    out: dict = {}
    job = threading.Thread(target=lambda: out.update(summary=run_segment(cfg, folder.location)))
    job.start()
    _wait_for(lambda: folder.sub(MODEL_DIR).latest_checkpoint(), job.is_alive)
    out["node"] = _kill_where(cluster, "RayTrainWorker") if job.is_alive() else None
    job.join(timeout=900)
    assert out.get("summary") and out["node"], out
    assert_same_network(folder.sub(MODEL_DIR), reference.sub(MODEL_DIR), TOLERANCE)
    assert read_latest(folder.sub(MODEL_DIR)).state["resumes"]
    assert out["summary"]["val_miou"] == ref_summary["val_miou"]


def test_the_whole_cluster_replaced_then_a_node_lost_the_resubmitted_job_ends_as_an_uninterrupted_run(
        cluster, acr_reference, tmp_path):
    """train.py on the cluster as `ray job submit` runs it (its driver on the head, scaling.max_failures=1):
    [1] the whole cluster is stopped (the head and every node, the driver with them) after the run's first
    checkpoint; on a new cluster (new disks) the same command resumes from that checkpoint on S3; [2] there the node
    running the training worker is killed (raylet, object store, workers) after the next checkpoint: Ray Train starts
    the group on the other node, which resumes from its last checkpoint on S3. The run ends with the parameters,
    optimiser states, counters and RNG state of an uninterrupted run, every step trained once. Last in this module:
    it stops the module's cluster."""
    uri, folder = f"s3://{BUCKET}/mn/cluster-replaced", RunFolder(f"s3://{BUCKET}/mn/cluster-replaced")
    ray.shutdown()  # this process's connection: a driver whose cluster dies is ended by Ray

    def submit(c: LocalCluster, log) -> subprocess.Popen:
        cmd = [sys.executable, "ray_jobs/train.py", "--output-dir", uri,
               *_overrides(c, *ACR_FAULTS, "scaling.max_failures=1")]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    with open(tmp_path / "first.log", "w") as log:
        proc = submit(cluster, log)
        _wait_for(lambda: folder.latest_checkpoint(), lambda: proc.poll() is None)
        cluster.stop()
        proc.kill()
        proc.wait()
    first = latest_point(folder)  # the checkpoint the stopped run recorded last
    assert first and (first["epoch"], first["step_in_epoch"]) < (2, 0), (tmp_path / "first.log").read_text()[-3000:]
    new = LocalCluster(head_cpus=0, env=cluster.env)
    try:
        for name in ("node1", "node2"):
            new.add_node(name, NODE_CPUS, wait=False)
        init_ray(load_config(None, [f"ray.address={new.address}"]))
        new.wait_for_nodes()
        with open(tmp_path / "rerun.log", "w") as log:
            proc = submit(new, log)
            before_kill = wait_for_checkpoint(folder, lambda: proc.poll() is None, after=first)
            killed = _training_nodes(new, alive=True)
            for name in killed:
                new.kill_node(name)
            returncode = proc.wait(timeout=900)
    finally:
        ray.shutdown()
        new.stop()
    assert returncode == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert len(killed) == 1 and killed[0] in ("node1", "node2"), killed
    resumes = [(r["epoch"], r["step_in_epoch"]) for r in folder.read_json("summary.json")["resumes"]]
    before_kill = (before_kill["epoch"], before_kill["step_in_epoch"])
    assert len(resumes) == 2 and resumes[0] == (first["epoch"], first["step_in_epoch"]), resumes
    assert before_kill <= resumes[1] < (2, 0), (before_kill, resumes)  # the new group: from the newest checkpoint
    assert_history_complete(folder, [(0, 0), (0, 1), (1, 0), (1, 1)])
    worst = assert_same_acr_state(_final_state(uri), acr_reference, TOLERANCE)
    print(f"largest difference from the uninterrupted run: {worst}")
    assert_keeps_newest(folder, keep=2, kills=2)
