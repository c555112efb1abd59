"""What the Ray tests share (tests/ray and tests/multinode): the environment a Ray node is started with,
submitting a recipe through launch/ray_submit.sh and waiting for the job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from tests.helpers import ROOT, read_metrics

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
VENV_BIN = os.path.dirname(sys.executable)
# a short SFT run with a checkpoint every 2 steps, as the submitted jobs train it
SFT_STEPS = 6
SFT_OVERRIDES = ["data.eval=null", f"train.max_steps={SFT_STEPS}", "train.log_every=1", "train.progress_bar=false",
                 "checkpoint.every_steps=2", "checkpoint.keep_last=0", "dist.backend=gloo", "dist.timeout_s=120"]


def node_env(token: str) -> dict[str, str]:
    """What `ray start` gets besides the caller's environment: the venv's python for job entrypoints, one thread,
    this cluster's token, and a SIGTERM that stops the node at once (no 30 s drain)."""
    return {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def client_env(dashboard: str, token: str) -> dict[str, str]:
    """What a shell that talks to the cluster needs (ray job submit, launch/ray_submit.sh)."""
    return {"RAY_ADDRESS": dashboard, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def job_client(dashboard: str, token: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard, headers={"authorization": f"Bearer {token}"})


def submit(cluster_env: dict, run_dir: Path, sid: str, *, wait: bool, env: dict | None = None,
           recipe: str = "sft_tiny", overrides: list[str] = SFT_OVERRIDES, workers: int | None = 2,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """launch/ray_submit.sh RECIPE output_dir=RUN_DIR OVERRIDES as submission `sid` (2 Ray Train workers, at most
    2 restarts of their group); with wait=False it returns once the job is accepted."""
    group = {"FTDIST_RAY_WORKERS": str(workers), "FTDIST_RAY_MAX_FAILURES": "2"} if workers else {}
    full = {**os.environ, **cluster_env, **group,
            "FTDIST_RAY_SUBMIT_ARGS": f"--submission-id {sid}" + ("" if wait else " --no-wait"), **(env or {})}
    cmd = ["bash", "launch/ray_submit.sh", recipe, f"output_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def job_status(client, sid: str) -> str:
    return str(client.get_job_status(sid)).split(".")[-1]


def wait_job(client, sid: str, timeout: float) -> str:
    """The job's terminal status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(client, sid)
        if status in TERMINAL:
            return status
        time.sleep(1)
    raise AssertionError(f"job {sid} not finished in {timeout}s:\n{client.get_job_logs(sid)[-4000:]}")


def wait_while_running(client, sid: str, ready: Callable[[], bool], timeout: float) -> None:
    """Until ready(); the job must not end meanwhile."""
    deadline = time.monotonic() + timeout
    while not ready():
        status = job_status(client, sid)
        assert status not in TERMINAL, f"job ended early ({status}):\n{client.get_job_logs(sid)[-6000:]}"
        assert time.monotonic() < deadline, f"not ready in {timeout}s:\n{client.get_job_logs(sid)[-4000:]}"
        time.sleep(0.5)


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]
