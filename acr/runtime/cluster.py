"""Starting or joining Ray, sized for the job at hand.

A job joins the cluster named by `ray.address` or RAY_ADDRESS (e.g. under `ray job submit`); otherwise it starts a
Ray of its own, on this machine only (never one that another `ray start` left running: `address="local"`), with as
many logical CPUs as its workers, actors and Ray Data tasks need at once (:func:`job_cpus`). Ray Data's tasks need
CPUs of their own or they never run while the training workers hold theirs (a silent deadlock); the logical count may
exceed the cores, the OS shares them.
"""

from __future__ import annotations

import logging
import math
import os
import socket

import ray
import torch
from ray._private.services import find_gcs_addresses  # Ray 2.60 (pinned): the GCS processes on this machine
from ray._private.worker import get_dashboard_url
from ray.util.state import list_actors

from acr.config import Config, stage_workers
from acr.runtime.quiet import quiet_local_ray

log = logging.getLogger(__name__)

# Ray Train V2 polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and each report() waits for a poll.
# Its print patch would log every progress line of the workers twice (once as stdout, once through logging).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# On a Ray the job started itself (one machine, no node to preempt) Train's preemption watcher would be one more actor
# process per run, and it logs an error line at every start ("PreemptionWatcher ... has constructor arguments in
# the object store"). On a joined cluster (spot nodes) it is kept.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# A custom Ray resource, one unit per Tune trial that fits at once. Tune sees only a trial's driver (0.1 CPU; the
# trial's TorchTrainer reserves its workers itself), so when a search is resumed Tune would restart every unfinished
# trial at once (its concurrency limit applies to new trials only), their workers would take every CPU and their data
# streams would wait forever. A local Ray started for a search has these slots; on a cluster give them to `ray start`
# (--resources='{"acr_trial_slot": N}').
TRIAL_SLOT = "acr_trial_slot"

def _train_cpus(cfg: Config, workers: int) -> float:
    """One ACR training run: its workers, its Ray Data decode actors and one CPU for Ray Data's small tasks."""
    return workers * cfg.scaling.cpus_per_worker + cfg.data.decode_actors * cfg.data.decode_cpus + 1


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one Tune trial holds: its driver and one training run."""
    s = cfg.scaling
    return {"CPU": cfg.tune.trial_cpus + _train_cpus(cfg, s.num_workers),
            "GPU": float(s.num_workers) if s.use_gpu else 0.0}


def concurrent_trials(cfg: Config, resources: dict) -> int:
    """tune.max_concurrent, or where null as many trials as the cluster's CPUs (and GPUs, where used) hold."""
    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    need = trial_resources(cfg)
    n = int(resources.get("CPU", 0) // need["CPU"])
    if need["GPU"]:
        n = min(n, int(resources.get("GPU", 0) // need["GPU"]))
    return max(1, n)


def job_cpus(cfg: Config, job: str, trials: int = 1) -> int:
    """Logical CPUs a local Ray needs for `job` (train, tune, pseudo_labels, segment, pipeline): the most that its
    stages hold at once, and never fewer than this machine's cores."""
    cores = os.cpu_count() or 1
    s = cfg.scaling
    if job == "train":
        return int(math.ceil(max(cores, s.num_workers * s.cpus_per_worker) + _train_cpus(cfg, 0)))
    if job == "tune":
        return int(math.ceil(max(cores, trials * trial_resources(cfg)["CPU"])))
    if job == "pseudo_labels":
        ps = cfg.pseudo
        irn = stage_workers(cfg, "irn") * s.cpus_per_worker + ps.actor_cpus + 1
        return max(job_cpus(cfg, "train"), int(math.ceil(max(irn, ps.actors * ps.actor_cpus + 1))))
    if job == "segment":
        sg = cfg.segment
        need = stage_workers(cfg, "segment") * s.cpus_per_worker + max(sg.actors, 1) * sg.actor_cpus + 1
        return max(job_cpus(cfg, "train"), int(math.ceil(need)))
    if job == "pipeline":
        first = "tune" if cfg.pipeline.search else "train"
        return max(job_cpus(cfg, j, trials) for j in (first, "pseudo_labels", "segment"))
    raise ValueError(f"unknown job {job!r}")


def init_ray(cfg: Config, job: str = "train", trials: int = 0) -> None:
    """Join the cluster named by `ray.address` or RAY_ADDRESS, else start a local Ray sized for `job` (for a search,
    `trials` concurrent Tune trials). Does nothing if this process is connected already."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}}
    if address:
        _join(address, runtime_env)
        return
    runtime_env["env_vars"].update({k: os.environ.get(k, v) for k, v in LOCAL_RAY_ENV.items()})
    for k, v in runtime_env["env_vars"].items():
        os.environ.setdefault(k, v)
    runtime_env["worker_process_setup_hook"] = f"{quiet_local_ray.__module__}.{quiet_local_ray.__qualname__}"
    quiet_local_ray()
    # Tune stops a trial (ASHA, or at its last epoch) by killing its driver, and with it Train's controller; the
    # worker group's placement group is then removed by Train's cleaner, which asks the state API, served by the
    # dashboard. Without it every stopped trial leaks its workers' CPUs and the next trial's data stream waits
    # forever for a CPU. So a search always runs with the dashboard.
    dashboard = cfg.ray.include_dashboard or trials > 0
    # Train's cleaner finds the state API through RAY_API_SERVER_ADDRESS, else it looks for "the" local Ray and dies
    # with a traceback ("Found multiple active Ray instances") where other Ray instances run on the machine: with
    # the dashboard every stopped trial would leak its CPUs as above. So the dashboard gets a free port, and every
    # worker its address; without the dashboard the address is one where nothing answers, and the cleaner only
    # notes (quietly, acr.runtime.quiet) that it cannot ask, while Train removes the group itself at the end.
    options: dict = {"dashboard_port": free_port()}
    runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{options['dashboard_port']}"
    if not dashboard:
        options.pop("dashboard_port")
    num_cpus = cfg.ray.num_cpus or job_cpus(cfg, job, max(trials, 1))
    if trials:  # Tune sees a trial's driver only (0.1 CPU): this resource caps the trials at once
        gpus = torch.cuda.device_count() if cfg.scaling.use_gpu else 0
        options["resources"] = {TRIAL_SLOT: concurrent_trials(cfg, {"CPU": num_cpus, "GPU": gpus})}
    log.info("starting a local Ray with %d logical CPUs", num_cpus)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, runtime_env=runtime_env, **options)


def _join(address: str, runtime_env: dict) -> None:
    """Connect to the cluster at `address`. Where this machine runs several Ray instances (a cluster's head beside
    another user's Ray), Train's placement-group cleaner cannot tell which one is "the" local Ray and dies with a
    traceback ("Found multiple active Ray instances"); it is then told the cluster's dashboard (its state API), which
    takes a second connection."""
    ctx = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    url = getattr(ctx, "dashboard_url", None)
    if not url or "RAY_API_SERVER_ADDRESS" in runtime_env["env_vars"] or len(find_gcs_addresses()) < 2:
        return
    ray.shutdown()
    runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = url if "://" in url else f"http://{url}"
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_nodes() -> dict[str, list[str]]:
    """The nodes this job's actors ran on (training workers, Tune trials, Ray Data and stage actors): {Ray node id:
    sorted actor class names}. Empty where Ray's state API is not served (a local Ray without its dashboard)."""
    url = get_dashboard_url()
    if not url:
        return {}
    try:
        actors = list_actors(address=url if "://" in url else f"http://{url}", limit=10_000,
                             filters=[("job_id", "=", ray.get_runtime_context().get_job_id())],
                             raise_on_missing_output=False)
    except Exception as exc:  # the state API's errors have no common type (HTTP, timeouts, a dashboard still up)
        log.debug("the job's nodes are unknown: %s", exc)
        return {}
    nodes: dict[str, set] = {}
    for a in actors:
        if a.node_id:  # an actor never placed has none
            nodes.setdefault(a.node_id, set()).add(a.class_name)
    return {node: sorted(names) for node, names in sorted(nodes.items())}
