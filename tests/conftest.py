"""Shared fixtures. Real data fixtures are read from ../shared/data (never copied into the repository); tests that
need them skip with the reason when that folder is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.faults import local_ray, s3_server
from tests.rayhead import BYSTANDER, RELEASED_STEP_RUN, RayHead

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ACR_SHARED_DATA", REPO.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real-data fixture {path} is absent (set ACR_SHARED_DATA to the folder holding voc_mini/)")
    return path


@pytest.fixture(scope="session")
def voc_mini() -> Path:
    return _need(SHARED_DATA / "voc_mini")


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    return _need(SHARED_DATA / "coco_mini")


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for the tests of one module, started as the jobs start it (acr.runtime.cluster.init_ray: a Ray
    of its own, never another one, with the jobs' Train settings) with 4 logical CPUs, so that training workers, the
    Ray Data decode actor and Ray's own tasks never wait on each other on a 2-core machine."""

    with local_ray():
        yield


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3-compatible server for the tests of one module (tests.faults.s3_server): "host:port"."""

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """A local Ray as the jobs start it, for one module, after the S3 server (its workers see the credentials)."""

    with local_ray():
        yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A per-session cache so tests never touch the user's ~/.cache/acr."""
    return tmp_path_factory.mktemp("acr-cache")


TINY_OVERRIDES = [
    # A tiny, fast, deterministic model for tests: resnet18 at 64 px, 6-level U-Net, no dropout.
    "model.backbone=resnet18", "model.output_stride=16", "model.encoder_tap_channels=[8,8,16]",
    "model.decoder_depth=6", "model.decoder_width=8", "model.dropout=false", "augment.crop_size=64",
    "augment.resize_mode=scale", "augment.resize_range=[0.4,0.6]", "method.srf.grid_size=8",
    "synthetic.image_size=128", "synthetic.train_images=32", "synthetic.val_images=8",
    "eval.split=val", "eval.scales=[1.0]", "eval.overlays=2", "model.bn_calibration_images=8",
    "model.pretrained=null",  # random initialisation (the demo's stand-in weights are tested in test_standin.py)
]


def pytest_collection_modifyitems(session, config, items):
    """The released step's test runs first: it waits for its float64 run (up to 15 GiB), which no Ray test may
    overlap (Ray's memory monitor kills their workers on this 24 GiB machine). The multi-node tests run last, before
    tests/test_zz_other_ray_survives.py."""
    first = [i for i in items if i.nodeid.startswith("tests/test_released_step.py")]
    late = [i for i in items if i.nodeid.startswith("tests/test_multinode.py")]
    last = [i for i in items if i.nodeid.startswith("tests/test_zz_")]
    items[:] = first + [i for i in items if i not in first + late + last] + late + last


# A Ray instance the suite did not start and must leave running ("outside the suite"): started by .ci/run before
# `make test` (its process group in ACR_BYSTANDER_RAY_PGID), else here once the test that checks it is collected.
# tests/test_zz_other_ray_survives.py (collected last) checks that it is still alive after every other test.


def pytest_collection_finish(session):
    _start_released_step(session)
    if not any(item.nodeid.startswith("tests/test_zz_other_ray_survives.py") for item in session.items):
        return
    if os.environ.get("ACR_BYSTANDER_RAY_PGID"):
        BYSTANDER["pgid"] = int(os.environ["ACR_BYSTANDER_RAY_PGID"])
        return
    BYSTANDER["head"] = RayHead(num_cpus=1)
    BYSTANDER["pgid"] = BYSTANDER["head"].pgid


def _start_released_step(session) -> None:
    """tests/test_released_step.py's two float64 iterations, started in a process of their own at niceness 19 as
    soon as the test is collected (see the test)."""
    if not any(item.nodeid.startswith("tests/test_released_step.py") for item in session.items):
        return
    if not (REPO.parent / "shared" / "golden" / "acr_released_step_fp64.json").is_file():
        return  # the test skips, naming the missing folder
    folder = Path(tempfile.mkdtemp(prefix="acr-released-step-"))
    RELEASED_STEP_RUN.update(out=folder / "numbers.json", log=folder / "log.txt", folder=folder)
    log = open(RELEASED_STEP_RUN["log"], "w")
    RELEASED_STEP_RUN["proc"] = subprocess.Popen(
        ["nice", "-n", "19", sys.executable, "-m", "tests.test_released_step", "--out", str(RELEASED_STEP_RUN["out"])],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_for_released_step(timeout: float = 3600) -> None:
    """Wait for the background float64 run to end: it holds up to 15 GiB at its peak, which a test starting several
    Ray nodes on this machine cannot share (Ray's memory monitor would kill that test's workers)."""
    proc = RELEASED_STEP_RUN.get("proc")
    if proc is not None:
        proc.wait(timeout=timeout)


def pytest_sessionfinish(session, exitstatus):
    if "head" in BYSTANDER:
        BYSTANDER.pop("head").stop()
    proc = RELEASED_STEP_RUN.pop("proc", None)
    if proc is not None:
        proc.kill()
        proc.wait()
        shutil.rmtree(RELEASED_STEP_RUN["folder"], ignore_errors=True)
