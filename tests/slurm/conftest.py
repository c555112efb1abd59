"""Session fixture for the Slurm tests: a real single-node Slurm on this machine.

`launch/local_slurm.sh up` installs the Debian packages when missing (needs root and
apt), starts munged/slurmctld/slurmd and waits until the node is idle; `down` at the
end of the session stops only what `up` started. If the cluster was already up before
the session (a developer ran `up` by hand), it is left running.

The tests are skipped, with the reason, only when Slurm cannot be had here: not root
and no sbatch, or `up` failed and sbatch is still missing (e.g. apt-get failed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "local_slurm.sh"
UP_TIMEOUT_S = 600  # a fresh machine installs packages first (~10 s here, slower mirrors in CI)


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ours_running() -> bool:
    """True when slurmctld from an earlier `up` (not this session's) is already alive."""
    if shutil.which("sinfo") is None:
        return False
    try:
        st = _run("status", timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return st.returncode == 0 and "slurmctld: running" in st.stdout


@pytest.fixture(scope="session", autouse=True)
def local_slurm():
    if os.geteuid() != 0:
        if shutil.which("sbatch") is None:
            pytest.skip("local Slurm needs root to install and start it (launch/local_slurm.sh up)")
        pytest.skip("launch/local_slurm.sh up must run as root to start slurmctld/slurmd")

    was_running = _ours_running()
    try:
        up = _run("up", timeout=UP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launch/local_slurm.sh up did not finish in {UP_TIMEOUT_S}s")
    if up.returncode != 0:
        out = (up.stdout + up.stderr)[-3000:]
        if shutil.which("sbatch") is None:
            pytest.skip(f"Slurm could not be installed (launch/local_slurm.sh up rc={up.returncode}):\n{out}")
        pytest.fail(f"launch/local_slurm.sh up failed (rc={up.returncode}):\n{out}")

    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=60).stdout.split()
    if not cpus or int(cpus[0].rstrip("+")) < 2:
        pytest.fail(f"the local Slurm node has {cpus} CPUs; these tests run jobs of 2 tasks (slurm.conf CPUs=)")

    yield up.stdout.strip()

    if not was_running:
        _run("down", timeout=120)
