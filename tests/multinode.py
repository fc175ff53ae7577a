"""A Ray cluster of several nodes on this machine, each node with a disk of its own, for the multi-node tests and the
cluster rehearsal (acr/rehearse.py).

Every node is a real Ray node (`ray start`: its own raylet, object store and worker processes, its own process group
so that it can be killed whole, as a reclaimed spot instance is). Worker nodes run in a mount namespace of their own
(`unshare -m`) in which the other nodes' disks are hidden: a file that the driver writes on the head's disk (its HOME,
its cache, a relative output folder) does not exist on a worker node, as on a cloud cluster. What every node shares is
what a cloud cluster shares: the network (an S3 server, the GCS) and the installed code (the repository folder, as
cluster.yaml's setup commands install it on every node). Each node has a temp folder of Ray's own (sockets, logs).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (NODE_KIND_WORKER, STATUS_UP_TO_DATE, TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME,
                                 TAG_RAY_NODE_STATUS, TAG_RAY_USER_NODE_TYPE)

from tests.faults import environment
from tests.rayhead import PORT_FLAGS, RayHead, free_port, group_alive, ray_env


def namespaces_available() -> bool:
    """Whether this process may make mount namespaces (root, or a container that allows them)."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


def node_disk(root: Path, name: str) -> Path:
    """The disk of node `name`: root/disks/<name>, with its HOME and TMPDIR."""
    disk = root / "disks" / name
    for sub in ("home", "tmp"):
        (disk / sub).mkdir(parents=True, exist_ok=True)
    return disk


@functools.cache
def auth_token() -> str:
    """This user's Ray token (~/.ray/auth_token, made if absent): the cluster's nodes, whose HOME is elsewhere, get
    it in RAY_AUTH_TOKEN, so that this process (whose Ray settings are fixed once per process) and every job
    client talk to them with token authentication, as to any other Ray started here."""
    out = subprocess.run(["ray", "get-auth-token", "--generate"], env=ray_env(), capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def token_auth(env: dict):
    """`env` and token authentication in this process, for the block: the mode every Ray of the suite uses. Ray caches
    the mode in its process-wide config, which ray.init refreshes only when it starts a Ray: refreshed here."""

    with environment({**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token()}):
        ray._raylet.Config.initialize("")
        yield


# The GCS marks a node dead after 5 failed health checks 1 s apart (Ray's default: 3 s apart); a killed raylet
# refuses each at once, a busy one has 5 s to answer each.
NODE_LOSS_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "5000"}


def node_env(disk: Path, env: dict) -> dict:
    """A node's environment: `env` over this process's, HOME and TMPDIR on the node's disk, token authentication."""
    token = env.get("RAY_AUTH_TOKEN") or auth_token()  # given: a node the autoscaler starts (HOME elsewhere)
    return ray_env(**{"RAY_AUTH_MODE": "token", **env, "RAY_AUTH_TOKEN": token, "HOME": str(disk / "home"),
                      "TMPDIR": str(disk / "tmp")})


def start_worker_node(root: Path, name: str, address: str, cpus: float, resources: dict | None, env: dict) -> "Node":
    """`ray start` a worker node `name` in a mount namespace where every other node's disk is hidden: its own disk
    is kept aside, an empty file system is mounted over root/disks, and its disk is put back in its place."""
    disk, aside = node_disk(root, name), root / "mnt" / name
    aside.mkdir(parents=True, exist_ok=True)
    ports = {flag: free_port() for flag in PORT_FLAGS}
    temp_dir = tempfile.mkdtemp(prefix="r", dir=root)  # Ray's own, one per node: short (socket paths < 108 bytes)
    ray_cmd = ["ray", "start", f"--address={address}", f"--num-cpus={cpus}", "--block", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", *[f"--{flag}={port}" for flag, port in ports.items()]]
    if resources:
        ray_cmd.append(f"--resources={json.dumps(resources)}")
    script = " && ".join([f"mount --bind {disk} {aside}", f"mount -t tmpfs tmpfs {root / 'disks'}", f"mkdir -p {disk}",
                          f"mount --move {aside} {disk}", f"cd {disk}", "exec " + shlex.join(ray_cmd)])
    with open(root / f"{name}.log", "w") as log:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=node_env(disk, env), cwd="/", stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    (root / "pgids").mkdir(exist_ok=True)
    (root / "pgids" / name).write_text(str(proc.pid))  # LocalCluster.stop kills it, whoever started it
    return Node(name, proc.pid, disk, {"CPU": cpus, **(resources or {})}, ports["node-manager-port"], proc)


@dataclass
class Node:
    name: str
    pgid: int
    disk: Path
    resources: dict = field(default_factory=dict)
    manager_port: int = 0  # the raylet's port: how the GCS's node record is matched to this node
    proc: subprocess.Popen | None = None  # a worker node's `unshare` process (reaped when the node is killed)

    def alive(self) -> bool:
        return group_alive(self.pgid)


class LocalCluster:
    """A head (`head_cpus` CPUs for workers, as cluster.yaml's head has none) and worker nodes added with
    :meth:`add_node`. `env`: environment every node's processes get (S3 credentials, as instance credentials)."""

    def __init__(self, head_cpus: int = 0, env: dict | None = None, dashboard: bool = True,
                 root: Path | None = None, extra_args: tuple[str, ...] = (), port: int | None = None):
        # short: Ray's socket paths < 107 chars
        self.root = root or Path(tempfile.mkdtemp(prefix="acr-mn-", dir="/tmp"))
        self.env = dict(env or {})
        self.nodes: dict[str, Node] = {}  # the worker nodes this cluster started that still run
        self.started: list[Node] = []  # every node it started, killed or not
        head = node_disk(self.root, "head")
        self.head_ray = RayHead(head_cpus, dashboard=dashboard, env={**node_env(head, self.env), **NODE_LOSS_DETECTION},
                                cwd=head, extra_args=extra_args, port=port)
        self.head = Node("head", self.head_ray.pgid, head, {"CPU": head_cpus}, self.head_ray.manager_port)

    @property
    def address(self) -> str:
        return self.head_ray.address

    @property
    def job_address(self) -> str:
        return self.head_ray.job_address

    def add_node(self, name: str, cpus: float, resources: dict | None = None, wait: bool = True) -> Node:
        """Start worker node `name` with `cpus` logical CPUs (and custom `resources`), the other disks hidden."""
        node = start_worker_node(self.root, name, self.address, cpus, resources, self.env)
        self.nodes[name] = node
        self.started.append(node)
        if wait:
            self.wait_for_nodes()
        return node

    def alive_nodes(self) -> list[dict]:
        return [n for n in ray.nodes() if n["Alive"]]

    def name_of(self, node_id: str) -> str | None:
        """The name of the node (of this cluster) whose Ray node id is `node_id` (call while connected)."""
        ports = {n["NodeID"]: n["NodeManagerPort"] for n in ray.nodes()}
        return next((node.name for node in [self.head, *self.started] if ports.get(node_id) == node.manager_port),
                    None)

    def wait_for_nodes(self, timeout: float = 120) -> None:
        """Wait until the GCS sees every node this cluster started and still runs (call while connected)."""
        want = 1 + sum(n.alive() for n in self.nodes.values())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.alive_nodes()) >= want:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{want} nodes expected, {len(self.alive_nodes())} alive; logs in {self.root}")

    def kill_node(self, name: str) -> None:
        """A node lost without warning: every process of it killed at once."""
        stop_node(self.nodes.pop(name))

    def stop(self) -> None:
        """Stop every node of this cluster, those its autoscaler launched too (and nothing else), then remove its
        folders."""
        for name in list(self.nodes):
            self.kill_node(name)
        self.head_ray.stop()  # the autoscaler first: it launches no node after this
        for f in (self.root / "pgids").glob("*"):
            stop_node(Node(f.name, int(f.read_text()), self.root))
        shutil.rmtree(self.root, ignore_errors=True)


class NamespaceNodeProvider(FakeMultiNodeProvider):
    """The node provider of an autoscaling LocalCluster (Ray's fake multi-node provider, whose nodes would share one
    disk): each node the autoscaler launches is a worker node of :func:`start_worker_node`, with a disk of its own,
    and each it terminates is killed whole. provider_config: `root` (the cluster's folder), `env`, `gcs_address`."""

    def __init__(self, provider_config: dict, cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self._root, self._env = Path(provider_config["root"]), provider_config.get("env", {})
        self._launched: dict[str, int] = {}

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        resources = dict(resources)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            node_id = self._next_hex_node_id()
            self._launched[node_type] = self._launched.get(node_type, 0) + 1
            env = {**self._env, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id, "RAY_CLOUD_INSTANCE_ID": node_id,
                   "RAY_NODE_TYPE_NAME": node_type}
            node = start_worker_node(self._root, f"{node_type}-{self._launched[node_type]}", self._gcs_address,
                                     resources.pop("CPU", 0), resources, env)
            self._nodes[node_id] = {"tags": {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                                             TAG_RAY_NODE_NAME: node_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
                                             **tags}, "node": node}

    def _terminate_node(self, node):
        stop_node(node["node"])


def stop_node(node: Node) -> None:
    """SIGKILL to every process of the node (raylet, object store, workers), waited for."""
    if node.alive():
        os.killpg(node.pgid, signal.SIGKILL)
    if node.proc is not None:
        node.proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and node.alive():
        time.sleep(0.2)


def autoscaling_cluster(node_types: dict, env: dict, idle_timeout_minutes: float = 0.5,
                        max_workers: int = 4) -> LocalCluster:
    """A LocalCluster whose worker nodes Ray's autoscaler launches and terminates (NamespaceNodeProvider) from
    `node_types` ({name: {"resources": {...}, "min_workers": n, "max_workers": n}}), the head with no CPUs."""
    root = Path(tempfile.mkdtemp(prefix="acr-as-", dir="/tmp"))
    port = free_port()
    config = {
        "cluster_name": "acr-rehearsal", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes, "head_node_type": "ray.head.default",
        "provider": {"type": "external", "module": f"{NamespaceNodeProvider.__module__}.NamespaceNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{port}", "root": str(root),
                     "env": {**env, "RAY_AUTH_TOKEN": auth_token()}},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                 **{name: {"node_config": {}, **t} for name, t in node_types.items()}},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [],
        "rsync_filter": [], "file_mounts_sync_continuously": False, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": []}
    (root / "autoscaling.yaml").write_text(json.dumps(config))
    repo = str(Path(__file__).resolve().parents[1])  # the autoscaler imports this module's provider
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    return LocalCluster(0, head_env, root=root, port=port,
                        extra_args=(f"--autoscaling-config={root / 'autoscaling.yaml'}",))
