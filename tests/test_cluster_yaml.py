"""cluster.yaml, checked offline with Ray's own cluster-config schema (the check `ray up` runs first), and its values:
a head without GPU, the 1- and 4-GPU worker types with a spot variant, scale-to-zero bounds, the project installed
on every node, and no Ray port reachable from outside."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO

GPU_FAMILIES = re.compile(r"^(g\d|p\d|g\d\w*|p\d\w*)\.")  # g5.xlarge, p4d.24xlarge, g6e.xlarge, ...


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validated(config: dict) -> dict:
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_schema_check(raw):
    cfg = _validated(raw)
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] == "ray.head.default"


@pytest.mark.parametrize("breakage, message", [
    (lambda c: c["available_node_types"]["gpu1"].update(max_worker=3), "max_worker"),
    (lambda c: c.update(idle_timeout=5), "idle_timeout"),
    (lambda c: c["provider"]["security_group"].update(Ports=[8265]), "Ports"),
    (lambda c: c["available_node_types"]["gpu1"].pop("node_config"), "node_config"),
])
def test_a_broken_copy_fails_the_schema_check(raw, breakage, message):
    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises(Exception, match=message):
        _validated(broken)


def test_a_head_node_type_that_does_not_exist_fails(raw):
    broken = copy.deepcopy(raw)
    broken["head_node_type"] = "ray.head.gpu"
    with pytest.raises(ValueError, match="`head_node_type` must be one of `available_node_types`"):
        _validated(broken)


def test_head_has_no_gpu_and_workers_are_the_gpu_types(raw):
    cfg = _validated(raw)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not GPU_FAMILIES.match(head["node_config"]["InstanceType"]), head["node_config"]["InstanceType"]
    assert head["resources"].get("GPU", 0) == 0 and "InstanceMarketOptions" not in head["node_config"]
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    by_instance = {}
    for name, t in workers.items():
        assert GPU_FAMILIES.match(t["node_config"]["InstanceType"]), name
        spot = t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        by_instance.setdefault(t["node_config"]["InstanceType"], set()).add(spot)
        # workers write checkpoints to S3 themselves: they need the instance profile
        assert t["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}, name
    # one GPU (g5.xlarge) and four GPUs (g5.12xlarge) per node, each on demand and as spot
    assert by_instance == {"g5.xlarge": {False, True}, "g5.12xlarge": {False, True}}


def test_autoscaling_bounds(raw):
    cfg = _validated(raw)
    assert 1 <= cfg["max_workers"] <= 16 and 0 < cfg["idle_timeout_minutes"] <= 30
    workers = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    for name, t in workers.items():
        assert 0 == t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name  # scales to zero
    assert sum(t["max_workers"] for t in workers.values()) >= 1
    # spot is an option: off by default, on-demand types can start
    assert all(t["max_workers"] == 0 for n, t in workers.items() if n.endswith("_spot"))
    assert workers["gpu1"]["max_workers"] >= 1 and workers["gpu4"]["max_workers"] >= 1


def test_every_node_installs_this_checkout(raw):
    cfg = _validated(raw)
    assert cfg["file_mounts"] == {"~/acr": "."}
    assert any(re.search(r"pip install .*-e ~/acr\b", c) for c in cfg["setup_commands"])
    assert ".venv" in cfg["rsync_exclude"] and ".gitignore" in cfg["rsync_filter"]
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60.0-")  # the Ray pinned in pyproject.toml
    assert '"ray[train,tune,data,default]==2.60.0"' in (REPO / "pyproject.toml").read_text()


def test_no_ray_port_is_exposed(raw):
    cfg = _validated(raw)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "0.0.0.0" not in " ".join(cfg["worker_start_ray_commands"])
    assert "IpPermissions" not in cfg["provider"].get("security_group", {})
    assert not any(re.match(r"(-p|--publish)\b", o) for o in cfg["docker"]["run_options"])
    text = (REPO / "cluster.yaml").read_text()
    assert "never opened to the internet" in text and "ray dashboard cluster.yaml" in text


def test_the_head_runs_drivers_only(raw):
    """No CPUs for Ray's tasks on the head: every worker, data task and per-image actor runs on a worker node, so a
    job's files cannot land on the head's disk by chance (acr.runtime.reach treats the cluster as several nodes)."""
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    start = " ".join(raw["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--autoscaling-config" in start
