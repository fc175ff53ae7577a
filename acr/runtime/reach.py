"""What a job's Ray workers read and write, where every one of them can.

On one machine (a Ray the job started, or a joined Ray of this one node, with CPUs for the workers) every local path
works. On a cluster of several nodes a local path exists only on the machine where it was made, so, checked by the
job's driver once it is connected and before any worker starts:
- folders the workers write or read that the user names (the output folder, a label folder, a checkpoint) must be a
  URI or lie under `ray.shared_dirs` (folders every node mounts); anything else is refused, naming the key;
- the inputs the driver made or found on its own disk (the shard cache, weights files: the stand-in or the user's)
  are copied once into the run's storage, under `inputs/`, and the config names the copies. The checkpoint keeps that
  config, so IRN and DeepLab find the same files from any node.
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path

import ray

from acr.config import Config, ConfigError, apply_overrides
from acr.data.shards import MANIFEST
from acr.storage import RunFolder, is_uri

log = logging.getLogger(__name__)

WEIGHT_KEYS = ("model.pretrained", "model.vit.encoder_pretrained", "segment.pretrained")
INPUTS = "inputs"


def driver_disk_is_shared() -> bool:
    """Whether every worker of the connected Ray reads this machine's files: the cluster is this one node, with CPUs
    for the workers (a head without them, as cluster.yaml's, runs its workers on nodes still to come). A head with CPUs
    whose autoscaler has started no worker node yet counts as one machine: there, name an s3:// output or set
    ray.shared_dirs."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    me = ray.get_runtime_context().get_node_id()
    return len(nodes) == 1 and nodes[0]["NodeID"] == me and nodes[0]["Resources"].get("CPU", 0) > 0


def _under_shared_dir(cfg: Config, location: str) -> bool:
    path = Path(location).expanduser().resolve()
    return any(path.is_relative_to(Path(d).expanduser().resolve()) for d in cfg.ray.shared_dirs)


def reachable(cfg: Config, location: str | Path | None) -> bool:
    """Whether every worker reaches `location` (nothing, a URI, a folder under ray.shared_dirs, or one machine)."""
    if location is None or is_uri(location) or _under_shared_dir(cfg, str(location)):
        return True
    return driver_disk_is_shared()


def require_reachable(cfg: Config, items: dict[str, str | Path | None]) -> None:
    """Refuse (ConfigError naming the key) each {key: location} that the cluster's workers cannot reach."""
    for key, location in items.items():
        if not reachable(cfg, location):
            raise ConfigError(
                f"{key}={location}: a folder on this machine only, and this Ray cluster's workers run on other "
                "nodes, which cannot read it. Give a URI (s3://bucket/...), or a folder that every node mounts at "
                "the same path, listed in ray.shared_dirs")


def _copy_file(location: str, storage: RunFolder) -> str:
    """`location` copied to storage/inputs/weights/ (kept where a copy of that name and size is there)."""
    local = Path(location).expanduser()
    if not local.is_file():
        return location  # the loader names the missing file
    name = f"{INPUTS}/weights/{local.name}"
    info = storage.fs.get_file_info(f"{storage.path}/{name}")
    if info.size != local.stat().st_size:
        log.info("copying %s into the run's storage for the workers on other nodes: %s", local, storage.uri(name))
        storage.put_file(local, name)
    return storage.sub(name).location


def _copy_shards(uri: str, storage: RunFolder) -> str:
    """The local shard folder `uri` copied to storage/inputs/shards/<its name> (kept where complete there)."""
    target = storage.sub(f"{INPUTS}/shards/{posixpath.basename(str(Path(uri).resolve()))}")
    if not target.exists(MANIFEST):
        log.info("copying the shards %s into the run's storage for the workers on other nodes: %s", uri,
                 target.uri())
        target.put_tree(Path(uri), "", last=MANIFEST)
    return target.location


def stage_inputs(cfg: Config, storage: RunFolder, shards: str) -> Config:
    """`cfg` with its shards (`shards`: where acr.data.sources.ensure_shards found or made them) and weights files
    where every worker reads them (see the module docstring), after checking that `storage`, the run's folder, is such
    a place. Call it connected to Ray, after the data checks."""
    if driver_disk_is_shared():
        return cfg
    require_reachable(cfg, {"--output-dir": storage.location if is_uri(storage.location) else storage.path,
                            "method.pretrained_reconstructor": cfg.method.pretrained_reconstructor})
    changes = {}
    uri = shards
    if not reachable(cfg, uri):
        changes["data.shards"] = _copy_shards(uri, storage)
    for key in WEIGHT_KEYS:
        section, *rest = key.split(".")
        value = getattr(cfg, section)
        for part in rest:
            value = getattr(value, part)
        if value and value != "standin" and not reachable(cfg, value):
            changes[key] = _copy_file(value, storage)
    return apply_overrides(cfg, changes) if changes else cfg
