"""What the Slurm tests share (tests/slurm and tests/multinode): submitting slurm/sft_7b.sh, reading a job's record
and output, preempting it as Slurm would, waiting for its end."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

from tests.helpers import ROOT, read_metrics

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def job_info(job_id: str) -> dict[str, str] | None:
    """Key=value fields of `scontrol show job -o`, or None once the record is gone (MinJobAge after the end)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0 or "JobId=" not in r.stdout:
        return None
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))


def wait_running(job_id: str, ready: Callable[[], bool], deadline: float, context: Callable[[], str]) -> None:
    """Until ready(); the job must stay pending or running meanwhile."""
    while not ready():
        assert time.monotonic() < deadline, f"job {job_id} not ready in time:\n{context()}"
        info = job_info(job_id)
        assert info is None or info["JobState"] in ("PENDING", "RUNNING"), (info, context())
        time.sleep(0.25)


def preempt(job_id: str) -> None:
    """What Slurm does GRACE seconds before the time limit with --signal=B:USR1@GRACE: USR1 to the batch shell."""
    sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr


def wait_ended(job_id: str, deadline: float, context: Callable[[], str], last: dict) -> dict:
    """Polls until the job has ended; `last` keeps the last record seen (it disappears soon after the end)."""
    while True:
        assert time.monotonic() < deadline, f"job {job_id} did not finish:\n{context()}"
        info = job_info(job_id)
        if info is None:
            return last
        last.clear()
        last.update(info)
        if info["JobState"] in ENDED:
            return last
        time.sleep(0.25)


@contextlib.contextmanager
def cancelled_unless_completed(job_id: str) -> Iterator[dict]:
    """Yields the dict wait_ended fills; on the way out a job that has not completed is cancelled."""
    last: dict[str, str] = {}
    try:
        yield last
    finally:
        if job_info(job_id) is not None and last.get("JobState") != "COMPLETED":
            subprocess.run(["scancel", job_id], timeout=30)


def sbatch(args: list[str], env: dict[str, str], script: str = "slurm/sft_7b.sh",
           timeout: float = 30) -> subprocess.CompletedProcess:
    """`sbatch --parsable ARGS SCRIPT` from the checkout, `env` on top of this process's environment (one thread)."""
    return subprocess.run(["sbatch", "--parsable", *args, script], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def sft_env(run_dir: Path, overrides: str, launch: str, nproc: int) -> dict[str, str]:
    """What slurm/sft_7b.sh reads: sft_tiny into run_dir, launched one rank per task (srun) or torchrun per task."""
    return {"RECIPE": "sft_tiny", "OVERRIDES": f"output_dir={run_dir} {overrides}", "FTDIST_LAUNCH": launch,
            "FTDIST_NPROC_PER_NODE": str(nproc)}


def job_id_of(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def train_steps(run_dir: Path) -> list[int]:
    """The steps metrics.jsonl logged a loss for, in order (none before it exists)."""
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r] if (run_dir / "metrics.jsonl").exists() else []


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text()[-n:] if path.exists() else "(no output yet)"


def preempted_mid_run(job_id: str, run_dir: Path, log_path: Path, timeout: float) -> tuple[dict, str]:
    """USR1 to the job's batch shell once 2 steps are logged, then until the job ends: (its last record, its output)."""
    with cancelled_unless_completed(job_id) as last:
        deadline = time.monotonic() + timeout
        wait_running(job_id, lambda: len(train_steps(run_dir)) >= 2, deadline, lambda: tail(log_path))
        preempt(job_id)
        wait_ended(job_id, deadline, lambda: tail(log_path), last)
    return last, log_path.read_text()


def assert_requeued_and_resumed(last: dict, log: str, run_dir: Path, steps: int) -> int:
    """The job stopped mid-run at a USR1 checkpoint, requeued itself once and resumed from that checkpoint to the
    end, every step logged once; returns the step it stopped at."""
    assert last.get("JobState") == "COMPLETED" and last.get("Restarts") == "1", (last, log[-6000:])
    assert "restart 0" in log and "restart 1" in log
    assert "requeueing job" in log
    stopped = re.search(r"checkpoint saved at step (\d+); exiting for requeue", log)
    assert stopped, log[-6000:]
    k = int(stopped.group(1))
    assert 2 <= k < steps  # stopped mid-run
    assert re.search(rf"resumed from \S*step-{k} at step {k}\b", log), log[-6000:]
    # every step logged once: the first run up to the stop checkpoint, the second run after it
    assert train_steps(run_dir) == list(range(1, steps + 1))
    return k


def assert_none_alive(pids: list[int], what: str) -> None:
    """No process in `pids` (those found still alive after a job); any found is killed before the test fails."""
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not pids, f"{what} still alive: {pids}"
