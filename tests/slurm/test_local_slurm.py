"""End-to-end checks of the local single-node Slurm (launch/local_slurm.sh).

They submit real batch jobs: a 2-task `srun` step, and the preemption path our
sbatch scripts rely on (`--signal=B:USR1@N` + `--requeue`, a USR1 trap that
requeues the job, SLURM_RESTART_COUNT on the second run).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.slurm.jobs import assert_none_alive, job_info

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 60


def _sh(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def _live_procs_with_env(needle: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment contains `needle`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle.encode() in env and state != b"Z":
            found.append(int(entry))
    return found


def _wait_for(pred, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_sbatch_two_tasks_srun(tmp_path: Path):
    """Alone proves: launch/local_slurm.sh's cluster runs a 2-task srun step (the Slurm side, without ftdist)."""
    out = tmp_path / "out.txt"
    script = tmp_path / "two_tasks.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=ftdist-two-tasks\n"
        "#SBATCH --ntasks=2\n"
        f"#SBATCH --output={out}\n"
        "set -euo pipefail\n"
        "srun --ntasks=2 bash -c 'echo \"procid=$SLURM_PROCID ntasks=$SLURM_NTASKS host=$(hostname -s)\"'\n"
    )
    t0 = time.monotonic()
    r = _sh("sbatch", "--wait", "--parsable", str(script), timeout=JOB_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    text = out.read_text() if out.exists() else ""
    assert r.returncode == 0, f"sbatch --wait rc={r.returncode}\nstderr: {r.stderr}\noutput file:\n{text}"
    procids = sorted(int(m) for m in re.findall(r"procid=(\d+) ntasks=2", text))
    assert procids == [0, 1], f"expected one line per task, got:\n{text}"
    assert elapsed < JOB_TIMEOUT_S


def test_usr1_trap_requeues_and_restarts(tmp_path: Path):
    """Alone proves: --signal=B:USR1 reaches a trap that requeues the job, and nothing of the first run survives."""
    out = tmp_path / "out.txt"
    ready = tmp_path / "ready"
    marker = tmp_path / "usr1_marker"
    done = tmp_path / "done"
    script = tmp_path / "requeue.sh"
    token = f"FTDIST_REQUEUE_TOKEN={uuid.uuid4().hex}"
    # First run: trap USR1 -> write a marker, requeue itself, exit. The sleep stands in
    # for training launched in the background (`wait` lets bash run the trap at once);
    # the trap leaves it to Slurm to kill, as real scripts do, and the test checks that
    # nothing of the first run survives. Second run (SLURM_RESTART_COUNT=1): write `done`.
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=ftdist-requeue\n"
        "#SBATCH --ntasks=1\n"
        "#SBATCH --requeue\n"
        "#SBATCH --signal=B:USR1@60\n"
        "#SBATCH --open-mode=append\n"
        f"#SBATCH --output={out}\n"
        f"export {token}\n"
        'echo "start restart=${SLURM_RESTART_COUNT:-0}"\n'
        "on_usr1() {\n"
        f'  echo "usr1 restart=${{SLURM_RESTART_COUNT:-0}}" >> {marker}\n'
        '  scontrol requeue "$SLURM_JOB_ID"\n'
        "  exit 0\n"
        "}\n"
        "trap on_usr1 USR1\n"
        'if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then\n'
        f'  echo "restart=$SLURM_RESTART_COUNT" > {done}\n'
        "  exit 0\n"
        "fi\n"
        f"touch {ready}\n"
        "sleep 300 &\n"
        "wait $!\n"
        'echo "no signal arrived" >&2\n'
        "exit 3\n"
    )
    r = _sh("sbatch", "--parsable", str(script))
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    try:
        t0 = time.monotonic()
        _wait_for(ready.exists, 30, "the first run to start")
        r = _sh("scancel", "--signal=USR1", "--batch", job_id)
        assert r.returncode == 0, r.stderr

        # Poll until the job ends; remember the last record seen (it disappears
        # MinJobAge=5 s after the end, we poll every 0.25 s).
        last: dict[str, str] = {}

        def finished() -> bool:
            info = job_info(job_id)
            if info is None:
                return done.exists()
            last.clear()
            last.update(info)
            return info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}

        remaining = JOB_TIMEOUT_S - (time.monotonic() - t0)
        _wait_for(finished, remaining, f"job {job_id} to requeue, restart and finish")
    finally:
        if not done.exists():
            _sh("scancel", job_id)

    text = out.read_text()
    assert marker.read_text().split() == ["usr1", "restart=0"], marker.read_text()
    assert done.read_text().strip() == "restart=1"
    assert re.findall(r"start restart=(\d)", text) == ["0", "1"], text
    assert "no signal arrived" not in text
    assert last.get("Restarts") == "1", last
    assert last.get("JobState") == "COMPLETED", last
    assert last.get("ExitCode") == "0:0", last
    # Nothing of the first run may keep running after the requeue (proctrack/pgid kills
    # the batch shell's background children; proctrack/linuxproc lets them escape).
    assert_none_alive(_live_procs_with_env(token), "processes of the requeued first run")
