"""What the fault-tolerance tests share: a local S3-compatible server (moto), a local Ray as the jobs start it, and the
means to kill a job's driver (its whole session) or a Ray Train worker at a chosen checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import torch

from acr.config import load_config
from acr.runtime.cluster import LOCAL_RAY_ENV, RAY_ENV, init_ray
from acr.runtime.session import read_latest
from acr.storage import RunFolder
from tests.rayhead import free_port

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
BUCKET = "acr-test"


@contextlib.contextmanager
def environment(values: dict):
    """Set environment variables for the block (restored after)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def s3_server():
    """A local S3-compatible server (moto) with a bucket `acr-test`: yields "host:port". Its (dummy) credentials are
    in the environment of this process before Ray starts, so that Ray's workers inherit them, as instance credentials
    are on a cloud node."""
    port = free_port()
    with environment(S3_CREDENTIALS):
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                   str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                              allow_bucket_creation=True).create_dir(BUCKET)
            yield f"127.0.0.1:{port}"
        finally:
            server.kill()
            server.wait()


@contextlib.contextmanager
def local_ray(num_cpus: int = 4):
    """A local Ray as the jobs start it (their Train settings: reports are polled every 0.25 s), for the block."""


    settings = {**RAY_ENV, **LOCAL_RAY_ENV}
    with environment({k: os.environ.get(k, v) for k, v in settings.items()}):  # what init_ray sets, restored after
        init_ray(load_config(None, [f"ray.num_cpus={num_cpus}"]))
        try:
            yield
        finally:
            ray.shutdown()


def s3_uri(endpoint: str, path: str) -> str:
    return f"s3://{BUCKET}/{path}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line) of every process visible in /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(d)] = (int(fields[1]), int(fields[3]), cmd)
    return out


def descendants(root: int) -> dict[int, str]:
    procs = processes()
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, cmd) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = cmd
                todo.append(pid)
    return found


def training_workers() -> list[int]:
    """The Ray Train workers of the Ray this process started."""
    return [pid for pid, cmd in descendants(os.getpid()).items() if cmd.startswith("ray::RayTrainWorker")]


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL to every process of the session that `proc` leads (a job's driver, its Ray, its workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(s == proc.pid for _, s, _ in processes().values()):
        time.sleep(0.2)
    for pid, (_, sid, _) in processes().items():  # anything of that session still alive
        if sid == proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def latest_point(folder: RunFolder) -> dict | None:
    latest = folder.latest_checkpoint()
    return json.loads(folder.read_text("", fs_path=f"{latest}/progress.json") or "null") if latest else None


def wait_for_checkpoint(folder: RunFolder, alive, after: dict | None, timeout: float = 600) -> dict:
    """Wait (while `alive()`) until Ray's record of the run holds a checkpoint other than `after`; its point."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and alive():
        try:
            point = latest_point(folder)
            if point is not None and point != after:
                return point
        except (ValueError, TypeError):  # the record or the checkpoint is being written
            pass
        time.sleep(0.05)
    raise AssertionError(f"no new checkpoint recorded in {folder.uri()} (run alive: {alive()})")


def run_killed_at_first_checkpoint(args: list[str], folder: RunFolder, cwd: Path) -> tuple[dict, int, str]:
    """Run a job script in a session of its own and SIGKILL the session once `folder` records its first checkpoint;
    (that checkpoint's point, the script's return code, the end of its output)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, start_new_session=True, stdout=log,
                                stderr=log)
        try:
            wait_for_checkpoint(folder, lambda: proc.poll() is None, after=None)
        except AssertionError as exc:
            log.seek(0)
            raise AssertionError(f"{exc}; the job said: {log.read()[-3000:]}") from None
        finally:
            kill_session(proc)
        log.seek(0)
        return latest_point(folder), proc.returncode, log.read()[-3000:]


def run_with_a_worker_killed(fn, folder: RunFolder, after: dict | None) -> dict:
    """Run `fn()` (a job, in this process, on its Ray) and SIGKILL its Ray Train worker once `folder` records a
    checkpoint other than `after`: {"result" or "error", "before_kill": that point, "workers": the pids found}."""
    def kill(out: dict) -> None:
        out["workers"] = training_workers()
        if len(out["workers"]) == 1:
            os.kill(out["workers"][0], signal.SIGKILL)

    return run_with_a_kill(fn, folder, after, kill)


def run_with_a_kill(fn, folder: RunFolder, after: dict | None, kill) -> dict:
    """Run `fn()` in a thread and call `kill(out)` once `folder` records a checkpoint other than `after`:
    {"result" or "error", "before_kill": that point, and what `kill` adds}."""
    out: dict = {}

    def target():
        try:
            out["result"] = fn()
        except BaseException as exc:  # reported by the tests
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    try:
        out["before_kill"] = wait_for_checkpoint(folder, thread.is_alive, after=after)
        kill(out)
    finally:
        thread.join(timeout=900)
    return out


def assert_same_network(folder: RunFolder, reference: RunFolder, tolerance: float = 1e-7) -> float:
    """The largest difference over the final model and optimiser state of two IRN or DeepLab runs (4 steps, 2
    epochs), asserted below `tolerance`."""
    got, ref = read_latest(folder), read_latest(reference)
    assert (got.epoch, got.step_in_epoch) == (ref.epoch, ref.step_in_epoch) == (2, 0)
    assert got.state["counters"] == ref.state["counters"] and ref.state["counters"]["steps"] == 4
    assert got.state["optimizer"]["param_groups"] == ref.state["optimizer"]["param_groups"]  # LR schedule position
    pairs = [(f"model.{k}", got.state["model"][k], v) for k, v in ref.state["model"].items()]
    pairs += [(f"optimizer {i} {k}", got.state["optimizer"]["state"][i][k], v)
              for i, s in ref.state["optimizer"]["state"].items() for k, v in s.items()]
    worst = 0.0
    for name, a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape, name
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        assert diff <= tolerance, f"{name} differs by {diff}"
        worst = max(worst, diff)
    return worst


def assert_same_acr_state(state: dict, ref: dict, tolerance: float) -> float:
    """The largest difference over both ACR networks and both optimisers' states of two fp32 runs of 2 epochs,
    asserted below `tolerance`; the step counters, LR schedule position and torch RNG state equal."""
    assert state["counters"] == ref["counters"]
    assert (state["epoch"], state["step_in_epoch"]) == (2, 0)
    pairs = [(f"{net}.{k}", state[net][k], v) for net in ("classifier", "reconstructor") for k, v in ref[net].items()]
    for opt in ("opt_cls", "opt_rec"):
        assert state[opt]["param_groups"] == ref[opt]["param_groups"]  # LR schedule position
        pairs += [(f"{opt} {i} {k}", state[opt]["state"][i][k], v) for i, s in ref[opt]["state"].items()
                  for k, v in s.items()]
    worst = 0.0
    for name, a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert b.dtype == torch.float32 or not b.is_floating_point(), name  # train.precision=fp32 throughout
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        assert diff <= tolerance, f"{name} differs by {diff}"
        worst = max(worst, diff)
    assert len(state["torch_rng"]) == 1 and torch.equal(state["torch_rng"][0], ref["torch_rng"][0])
    return worst


def assert_history_complete(folder: RunFolder, steps: list[tuple[int, int]]) -> None:
    """Every (epoch, step) of the run in its history once, none lost or repeated; its resumes as the summary's."""
    hist = json.loads(folder.read_text("history.json"))
    assert [(s["epoch"], s["step"]) for s in hist["steps"]] == steps
    assert [e["epoch"] for e in hist["epochs"]] == sorted({e for e, _ in steps})
    assert hist["resumes"] == json.loads(folder.read_text("summary.json"))["resumes"]


def assert_keeps_newest(folder: RunFolder, keep: int, kills: int) -> None:
    """Ray's record holds the newest `keep` checkpoints, which exist; older recorded ones are deleted. A folder
    outside the record can only be an upload that a kill cut short (at most one per kill): Ray never resumes from it,
    nor deletes it."""
    recorded = [r["checkpoint_dir_name"] for r in
                json.loads(folder.read_text("checkpoint_manager_snapshot.json"))["checkpoint_results"]]
    dirs = [i.base_name for i in folder.fs.get_file_info(pafs.FileSelector(folder.path))
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    assert len(recorded) == keep and set(recorded) <= set(dirs), (recorded, dirs)
    assert len(set(dirs) - set(recorded)) <= kills, dirs
