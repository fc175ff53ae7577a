"""Collected last: a Ray instance started outside the suite (by .ci/run, or by conftest before the first test) is
still running after every other test, i.e. no test stopped a Ray it did not start (as `ray stop --force` would)."""

from __future__ import annotations

import subprocess
import sys

from tests.rayhead import BYSTANDER, group_alive, ray_env


def test_a_ray_started_outside_the_suite_is_still_running():
    assert BYSTANDER.get("pgid"), "no bystander Ray was started (see tests/conftest.py)"
    assert group_alive(BYSTANDER["pgid"]), "a test stopped a Ray instance it did not start"
    if "head" in BYSTANDER:  # started here: it still answers
        probe = f"import ray; ray.init(address='{BYSTANDER['head'].address}'); print(ray.cluster_resources()['CPU'])"
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                              env=ray_env(RAY_AUTH_MODE="token"))
        assert proc.returncode == 0 and proc.stdout.strip().endswith("1.0"), proc.stderr[-2000:]
