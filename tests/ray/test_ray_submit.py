"""launch/ray_submit.sh against a real local Ray head: a tiny SFT job through the Jobs API runs
to the end with 2 Ray Train workers; killing one worker after a checkpoint makes Ray Train
restart the worker group, the loop resume from that checkpoint, and the job end with the
weights of the uninterrupted job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_weights, max_abs_diff, read_metrics

pytestmark = pytest.mark.ray

STEPS = 6
OVERRIDES = ["data.eval=null", f"train.max_steps={STEPS}", "train.log_every=1", "train.progress_bar=false",
             "checkpoint.every_steps=2", "checkpoint.keep_last=0", "dist.backend=gloo", "dist.timeout_s=120"]
JOB_TIMEOUT_S = 300
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _submit(ray_head, run_dir: Path, submission_id: str, *, wait: bool, env: dict | None = None,
            recipe: str = "sft_tiny", overrides: list[str] = OVERRIDES):
    full_env = {**os.environ, **ray_head.env, "FTDIST_RAY_WORKERS": "2",
                "FTDIST_RAY_MAX_FAILURES": "2",
                "FTDIST_RAY_SUBMIT_ARGS": f"--submission-id {submission_id}" + ("" if wait else " --no-wait"),
                **(env or {})}
    cmd = ["bash", "launch/ray_submit.sh", recipe, f"output_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def _wait_job(client, submission_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(submission_id)).split(".")[-1]
        if status in TERMINAL:
            return status
        time.sleep(1)
    raise AssertionError(f"job {submission_id} not finished in {timeout}s:\n"
                         f"{client.get_job_logs(submission_id)[-4000:]}")


def _train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


def test_head_listens_on_loopback_only(ray_head):
    import ipaddress

    sockets = ray_head.listening_sockets()
    assert int(ray_head.dashboard.rsplit(":", 1)[1]) in {port for _, port in sockets}
    assert len(sockets) >= 3  # GCS, raylet, dashboard (agents come up a little later)
    exposed = [(a, p) for a, p in sockets if not ipaddress.ip_address(a).is_loopback]
    assert not exposed, exposed


@pytest.fixture(scope="module")
def straight(ray_head, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ray_straight") / "run"
    sid = f"ftdist-straight-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    r = _submit(ray_head, run_dir, sid, wait=True)
    status = _wait_job(ray_head.client(), sid)
    logs = ray_head.client().get_job_logs(sid)
    assert r.returncode == 0 and status == "SUCCEEDED", f"rc={r.returncode} {status}\n{r.stderr[-3000:]}\n{logs[-6000:]}"
    return run_dir, logs, time.monotonic() - t0


def test_submitted_job_completes(straight):
    run_dir, logs, _ = straight
    assert "sft on Ray: 2 worker(s) (CPU)" in logs
    assert _train_steps(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "final" / "config.json").exists() and list((run_dir / "final").glob("*.safetensors"))
    assert "resumed from" not in logs


def test_eval_recipe_runs_on_ray_workers(ray_head, tmp_path):
    """A `stage: eval` recipe submitted as training is: each Ray Train worker evaluates its share of the rows and
    rank 0 writes the results of all 6 rows (perplexity of the bundled held-out conversations)."""
    import json

    from tests.helpers import write_recipe

    recipe = write_recipe(tmp_path / "eval.yaml", stage="eval", dist={"backend": "gloo"},
                          eval={"models": ["tiny=ftdist/tiny"], "suites": ["perplexity=ftdist/tiny-task/eval"],
                                "max_samples": 6, "batch_size": 2})
    sid = f"ftdist-eval-{uuid.uuid4().hex[:8]}"
    r = _submit(ray_head, tmp_path / "run", sid, wait=True, recipe=str(recipe), overrides=[])
    status = _wait_job(ray_head.client(), sid)
    logs = ray_head.client().get_job_logs(sid)
    assert r.returncode == 0 and status == "SUCCEEDED", f"rc={r.returncode} {status}\n{r.stderr[-3000:]}\n{logs[-6000:]}"
    assert "eval on Ray: 2 worker(s) (CPU)" in logs
    res = json.loads((tmp_path / "run" / "eval.json").read_text())["results"]["tiny"]["perplexity"]
    assert res["rows"] == 6 and res["perplexity"] > 1


def test_killed_worker_recovers_from_checkpoint(ray_head, straight, tmp_path):
    run_dir, pid_dir = tmp_path / "run", tmp_path / "pids"
    sid = f"ftdist-kill-{uuid.uuid4().hex[:8]}"
    # both ranks wait after the step-2 checkpoint, so the kill lands at a known point
    env = {"FTDIST_HANG_AFTER_CHECKPOINT": "2", "FTDIST_PID_DIR": str(pid_dir)}
    r = _submit(ray_head, run_dir, sid, wait=False, env=env)
    assert r.returncode == 0, r.stderr
    client = ray_head.client()
    manifest = run_dir / "checkpoints" / "step-2" / "manifest.json"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (manifest.exists() and (pid_dir / "rank1.pid").exists()):
        status = str(client.get_job_status(sid)).split(".")[-1]
        assert status not in TERMINAL, f"job ended early ({status}):\n{client.get_job_logs(sid)[-6000:]}"
        assert time.monotonic() < deadline, f"no step-2 checkpoint in time:\n{client.get_job_logs(sid)[-4000:]}"
        time.sleep(0.5)
    time.sleep(1.0)  # past the checkpoint's last barrier, waiting
    victim = int((pid_dir / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)

    status = _wait_job(client, sid)
    logs = client.get_job_logs(sid)
    assert status == "SUCCEEDED", logs[-6000:]
    assert int((pid_dir / "rank1.pid").read_text()) != victim  # a new worker group ran
    assert re.search(r"resumed from \S*step-2 at step 2\b", logs), logs[-6000:]
    # steps 1-2 from the first group, 3-6 after the restart, each once
    assert _train_steps(run_dir) == list(range(1, STEPS + 1))
    # restored state, then the same fp32 operations in the same order as the straight run: bit-identical
    assert max_abs_diff(load_weights(run_dir / "final"), load_weights(straight[0] / "final")) == 0.0
