"""Session fixture for the multi-host tests: hosts made of network namespaces on this machine.

`launch/local_cluster.sh up 2` creates ftnode1 (10.77.0.11) and ftnode2 (10.77.0.12) on a bridge, each with
its own hostname and node-local TMPDIR, sharing the file system; `down` at the end of the session removes
exactly what `up` made, even when a test failed. Traffic goes only to those addresses. Skipped, with the
reason, where hosts cannot be made: not root, or no network namespaces.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "local_cluster.sh"
HOSTS = {"ftnode1": "10.77.0.11", "ftnode2": "10.77.0.12"}


def cluster(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def on_host(host: str, cmd: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    """cmd started on `host` (its namespace, hostname and TMPDIR), in its own process group; `env` is passed
    through `env` so it survives the namespace switch."""
    full = ["bash", str(SCRIPT), "run", host, "env", *[f"{k}={v}" for k, v in (env or {}).items()], *cmd]
    return subprocess.Popen(full, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


@pytest.fixture(scope="session")
def hosts():
    if os.geteuid() != 0:
        pytest.skip("multi-host tests make network namespaces: they need root")
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no network namespaces here (ip netns list: {probe.stderr.strip()})")
    up = cluster("up", "2")
    if up.returncode != 0:
        cluster("down")
        pytest.fail(f"launch/local_cluster.sh up 2 failed:\n{up.stderr[-3000:]}")
    try:
        yield HOSTS
    finally:
        cluster("down")
