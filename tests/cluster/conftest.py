"""Tests against real launch services: a throwaway SLURM cluster and Open MPI.

``.ci/setup_services.sh`` installs them from Debian packages and starts the cluster; ``make
test-cluster`` runs this directory's ``cluster``-marked tests after it. Outside CI a missing
service skips; with ``MEGATRON_GLM_REQUIRE_CLUSTER=1`` (set by ``make test-cluster``) it fails, so
CI cannot pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def require_tools(*names: str) -> None:
    """Skip (or fail under ``MEGATRON_GLM_REQUIRE_CLUSTER=1``) unless every program is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        _unavailable(f"not installed: {', '.join(missing)}")


def require_ssh(host: str) -> None:
    """Skip (or fail, as :func:`require_tools`) unless ``ssh HOST`` logs in without a password:
    pdsh needs it, and without it DeepSpeed's error says only that the host is unreachable."""
    require_tools("ssh")
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host, "true"]
    probe = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0:
        _unavailable(f"no passwordless `ssh {host}` ({probe.stderr.strip()})")


def _unavailable(what: str) -> None:
    message = f"{what} (run .ci/setup_services.sh as root)"
    if os.environ.get("MEGATRON_GLM_REQUIRE_CLUSTER") == "1":
        pytest.fail(message)
    pytest.skip(message)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this directory is a cluster test."""
    for item in items:
        if "tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.cluster)
