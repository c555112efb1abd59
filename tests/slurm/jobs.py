"""What the Slurm tests share: reading a job's record, preempting it as Slurm would, waiting for its end."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from typing import Callable, Iterator

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
