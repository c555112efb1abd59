"""slurm/sft_7b.sh submitted unchanged to the local Slurm, with CPU settings from the sbatch
command line and the environment: a run to the end (one task per rank, srun), and a run
preempted mid-way by USR1 (one task starting torchrun) that requeues itself, resumes from its
checkpoint and ends with the weights of the uninterrupted run."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_weights, max_abs_diff, read_metrics
from tests.slurm.jobs import cancelled_unless_completed, preempt, wait_ended, wait_running

pytestmark = pytest.mark.slurm

STEPS = 30
OVERRIDES = (f"data.eval=null train.max_steps={STEPS} train.log_every=1 train.progress_bar=false "
             "checkpoint.every_steps=0 dist.backend=gloo")
CPU_ONLY = ["--nodes=1", "--gpus-per-node=0", "--time=30"]
# one task per rank, or one task that starts torchrun with two ranks
LAUNCH = {"srun": ["--ntasks-per-node=2", "--cpus-per-task=1"],
          "torchrun": ["--ntasks-per-node=1", "--cpus-per-task=2"]}
JOB_TIMEOUT_S = 420


def _sbatch(run_dir: Path, log: Path, launch: str, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECIPE": "sft_tiny", "OVERRIDES": f"output_dir={run_dir} {OVERRIDES}",
           "FTDIST_LAUNCH": launch, "FTDIST_NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    cmd = ["sbatch", "--parsable", *CPU_ONLY, *LAUNCH[launch], f"--output={log}", *extra, "slurm/sft_7b.sh"]
    return subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def _train_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    base = tmp_path_factory.mktemp("sbatch_straight")
    t0 = time.monotonic()
    r = _sbatch(base / "run", base / "job.out", "srun", "--wait", timeout=JOB_TIMEOUT_S)
    log = (base / "job.out").read_text() if (base / "job.out").exists() else ""
    assert r.returncode == 0, f"sbatch --wait rc={r.returncode}\n{r.stderr}\n--- job output\n{log[-6000:]}"
    return base / "run", log, time.monotonic() - t0


def test_sft_script_runs_to_the_end(straight):
    run_dir, log, _ = straight
    assert "srun: 2 task(s), one rank each" in log
    assert _train_steps(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "final" / "config.json").exists() and list((run_dir / "final").glob("*.safetensors"))
    assert (run_dir / "checkpoints" / f"step-{STEPS}" / "manifest.json").exists()
    assert "ftdist-slurm: finished" in log


@pytest.mark.parametrize("launch", ["torchrun", "srun"])
def test_usr1_checkpoints_requeues_and_resumes(straight, tmp_path, launch):
    run_dir, log_path = tmp_path / "run", tmp_path / "job.out"
    r = _sbatch(run_dir, log_path, launch)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    with cancelled_unless_completed(job_id) as last:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        wait_running(job_id, lambda: len(_train_steps(run_dir)) >= 2, deadline, lambda: _tail(log_path))
        preempt(job_id)
        wait_ended(job_id, deadline, lambda: _tail(log_path), last)

    log = log_path.read_text()
    assert last.get("JobState") == "COMPLETED" and last.get("Restarts") == "1", (last, log[-6000:])
    assert "restart 0" in log and "restart 1" in log
    assert "requeueing job" in log
    stopped = re.search(r"checkpoint saved at step (\d+); exiting for requeue", log)
    assert stopped, log[-6000:]
    k = int(stopped.group(1))
    assert 2 <= k < STEPS  # stopped mid-run
    assert re.search(rf"resumed from \S*step-{k} at step {k}\b", log), log[-6000:]
    # every step logged once: the first run up to the stop checkpoint, the second run after it
    assert _train_steps(run_dir) == list(range(1, STEPS + 1))
    straight_dir = straight[0]
    # restored state, then the same fp32 operations in the same order as the straight run: bit-identical
    assert max_abs_diff(load_weights(run_dir / "final"), load_weights(straight_dir / "final")) == 0.0


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text()[-n:] if path.exists() else "(no output yet)"
