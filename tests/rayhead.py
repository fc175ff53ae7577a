"""A Ray head started with `ray start` for a test (or as a bystander that the suite must leave alone), stopped by its
own process group: `ray start` runs as the leader of a new session, and every process of that Ray (GCS, raylet,
dashboard, agents, workers) keeps its process group, so a test stops its Ray and nothing else."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
# The Ray instance started outside the tests (tests/conftest.py): {"pgid": ..., "head": RayHead if started there}.
BYSTANDER: dict = {}
# The background run of tests/test_released_step.py (tests/conftest.py): {"proc", "out", "log"}.
RELEASED_STEP_RUN: dict = {}


# every port of a node its own: two Ray instances on one machine otherwise collide on the defaults (the client
# server's 10001, the dashboard agent's 52365, ...) and the second one's job agent never comes up
PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port", "node-manager-port", "object-manager-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (a zombie no one has reaped yet does not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
            return True
    return False


class RayHead:
    """`env`: the head's environment over this process's (default: token authentication); `cwd`: where it starts
    (default: its temp dir); `extra_args`: more `ray start` flags; `port`: the GCS's (default: a free one)."""

    def __init__(self, num_cpus: float = 1, dashboard: bool = False, env: dict | None = None, cwd: Path | None = None,
                 extra_args: tuple[str, ...] = (), port: int | None = None):
        # a short temp dir of its own (Ray's socket paths must stay under 107 characters)
        self.temp_dir = tempfile.mkdtemp(prefix="acr-ray-", dir="/tmp")
        self.port, self.dashboard_port = port or free_port(), free_port()
        ports = {name: free_port() for name in ("ray-client-server-port", *PORT_FLAGS)}
        self.manager_port = ports["node-manager-port"]
        cmd = ["ray", "start", "--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
               f"--num-cpus={num_cpus}", f"--include-dashboard={'true' if dashboard else 'false'}",
               "--disable-usage-stats", f"--temp-dir={self.temp_dir}", *[f"--{k}={v}" for k, v in ports.items()],
               *extra_args]
        proc = subprocess.Popen(cmd, env=ray_env(**(env or {"RAY_AUTH_MODE": "token"})), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=cwd or self.temp_dir)
        out, _ = proc.communicate(timeout=180)
        self.pgid = proc.pid  # the session (and process group) every process of this Ray belongs to
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {out[-2000:]}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def job_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def alive(self) -> bool:
        return group_alive(self.pgid)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not group_alive(self.pgid):
                break
            os.killpg(self.pgid, sig)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and group_alive(self.pgid):
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
