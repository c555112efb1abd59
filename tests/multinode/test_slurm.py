"""Slurm with two compute nodes: slurmctld on ftnode1 and one slurmd per host (launch/local_slurm.sh up --hosts),
each task's TMPDIR its node's own. slurm/sft_7b.sh submitted unchanged with --nodes=2 runs to the end in both
launch modes (one rank per task through srun, torchrun per node), the ranks on both hosts; a USR1 makes every
rank on every node checkpoint, the job requeues, resumes and ends with the weights of the uninterrupted job."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_weights, max_abs_diff, read_metrics
from tests.slurm.jobs import (assert_requeued_and_resumed, cancelled_unless_completed, job_id_of, preempted_mid_run,
                              sbatch, sft_env, tail, train_steps, wait_ended, wait_running)

pytestmark = pytest.mark.multinode

STEPS = 20
OVERRIDES = (f"data.eval=null train.max_steps={STEPS} train.log_every=1 train.progress_bar=false "
             "checkpoint.every_steps=0 dist.backend=gloo dist.timeout_s=120")
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]
JOB_TIMEOUT_S = 420
PLACEMENT = "process group: 2 ranks (gloo) on 2 hosts: ftnode1 (10.77.0.11) rank 0; ftnode2 (10.77.0.12) rank 1"


@pytest.fixture(scope="module")
def slurm_hosts(hosts):
    script = ROOT / "launch" / "local_slurm.sh"
    up = subprocess.run(["bash", str(script), "up", "--hosts"], stdin=subprocess.DEVNULL, capture_output=True,
                        text=True, timeout=600)
    if up.returncode != 0:
        subprocess.run(["bash", str(script), "down", "--hosts"], capture_output=True, timeout=120)
        pytest.fail(f"launch/local_slurm.sh up --hosts failed:\n{(up.stdout + up.stderr)[-3000:]}")
    conf = re.search(r"export SLURM_CONF=(\S+)", up.stdout).group(1)
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # sbatch, scontrol and scancel (also in tests/slurm/jobs.py) use this cluster
    try:
        yield conf
    finally:
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        subprocess.run(["bash", str(script), "down", "--hosts"], capture_output=True, timeout=120)


def _sbatch(run_dir: Path, log: Path, launch: str, *extra: str, overrides: str = OVERRIDES, env: dict | None = None,
            timeout: float = 30):
    return sbatch([*TWO_NODES, f"--output={log}", *extra], {**sft_env(run_dir, overrides, launch, 1), **(env or {})},
                  timeout=timeout)


@pytest.fixture(scope="module")
def straight(slurm_hosts, tmp_path_factory):
    base = tmp_path_factory.mktemp("two_nodes")
    r = _sbatch(base / "run", base / "job.out", "srun", "--wait", timeout=JOB_TIMEOUT_S)
    log = tail(base / "job.out", 20000)
    assert r.returncode == 0, f"sbatch --wait rc={r.returncode}\n{r.stderr}\n--- job output\n{log[-6000:]}"
    return base / "run", log


def test_srun_per_rank_on_two_nodes(straight):
    """Alone proves: slurm/sft_7b.sh with --nodes=2 in srun mode runs one rank per task on both nodes, to the end."""
    run_dir, log = straight
    assert "srun: 2 task(s), one rank each" in log and PLACEMENT in log, log[-4000:]
    assert train_steps(run_dir) == list(range(1, STEPS + 1))


def test_torchrun_per_node_preempted_requeued_resumed(straight, tmp_path):
    """Alone proves: with torchrun starting the ranks (one per node) USR1 checkpoints, requeues and resumes exactly.

    torchrun on each node; USR1 to the batch shell: every rank on both nodes checkpoints, the job requeues and
    resumes from that checkpoint; restored state, then the same fp32 operations in the same order as the
    uninterrupted srun job (the same 2 ranks): bit-identical weights. (This is also the USR1 proof of
    slurm/sft_7b.sh's torchrun mode; tests/slurm/test_sbatch_sft.py proves its srun mode.)"""
    run_dir, log_path = tmp_path / "run", tmp_path / "job.out"
    job_id = job_id_of(_sbatch(run_dir, log_path, "torchrun"))
    last, log = preempted_mid_run(job_id, run_dir, log_path, JOB_TIMEOUT_S)
    assert "torchrun on 2 node(s) x 1 process(es)" in log and log.count(PLACEMENT) == 2, log[-6000:]
    assert_requeued_and_resumed(last, log, run_dir, STEPS)
    assert max_abs_diff(load_weights(run_dir / "final"), load_weights(straight[0] / "final")) == 0.0


def test_node_down_mid_run_then_resubmitted_resumes(straight, slurm_hosts, tmp_path):
    """Alone proves: a node lost mid-run stops the surviving ranks with one line naming it; resubmitted, it resumes.

    Every process of ftnode2 killed mid-run (the node going down, its slurmd with it): the surviving rank on
    ftnode1 stops at once with one line naming the lost rank and host, instead of hanging in a collective; with
    the node back, the job submitted again resumes from the newest complete checkpoint and ends with the weights
    of the uninterrupted job (restored state, the same operations in the same order: bit-identical)."""
    run_dir, log_path = tmp_path / "run", tmp_path / "job.out"
    overrides = f"{OVERRIDES} checkpoint.every_steps=5 checkpoint.keep_last=0"
    # 20 steps of at least 0.5 s: time to kill a node between them
    job_id = job_id_of(_sbatch(run_dir, log_path, "torchrun", overrides=overrides, env={"FTDIST_STEP_DELAY_S": "0.5"}))
    lost = "rank 1 (ftnode2) died: every rank on ftnode2 is gone (node down?)"
    with cancelled_unless_completed(job_id) as last:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        wait_running(job_id, lambda: (run_dir / "checkpoints" / "step-10" / "manifest.json").exists(), deadline,
                     lambda: tail(log_path))
        pids = subprocess.run(["ip", "netns", "pids", "ft-ftnode2"], capture_output=True, text=True).stdout.split()
        assert pids
        subprocess.run(["kill", "-KILL", *pids])
        t0 = time.monotonic()
        while lost not in tail(log_path, 20000):
            assert time.monotonic() - t0 < 60, tail(log_path)  # the 10 s check-in wait, then the message
            time.sleep(0.5)
        # the node comes back (its slurmd restarted); the broken job is cancelled and submitted again
        up = subprocess.run(["bash", str(ROOT / "launch" / "local_slurm.sh"), "up", "--hosts"], capture_output=True,
                            text=True, timeout=120)
        assert up.returncode == 0, up.stderr[-3000:]
        subprocess.run(["scancel", job_id], timeout=30)
        wait_ended(job_id, deadline, lambda: tail(log_path), last)
    assert f"ftdist: error (rank 0): a collective failed: lost the connection to another rank ({lost})" in \
        log_path.read_text()
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                   if (p / "manifest.json").exists())
    assert saved and saved[-1] >= 10

    again = tmp_path / "again.out"
    r = _sbatch(run_dir, again, "torchrun", "--wait", overrides=overrides, env={"FTDIST_STEP_DELAY_S": "0"},
                timeout=JOB_TIMEOUT_S)
    log = tail(again, 20000)
    assert r.returncode == 0, f"{r.stderr}\n{log[-6000:]}"
    assert re.search(rf"resumed from \S*step-{saved[-1]} at step {saved[-1]}\b", log), log[-6000:]
    assert max_abs_diff(load_weights(run_dir / "final"), load_weights(straight[0] / "final")) == 0.0


def test_ppo_script_brings_up_ray_across_both_nodes(slurm_hosts, tmp_path):
    """Alone proves: slurm/ppo_7b.sh on two nodes brings up one Ray cluster across both and runs GRPO on it.

    slurm/ppo_7b.sh with --nodes=2: its Ray cluster spans both nodes (head on ftnode1, a worker node on
    ftnode2) and GRPO's groups run on both, the policy on one and reference and reward on the other."""
    log_path = tmp_path / "job.out"
    pin = "{policy: {node:10.77.0.11: 0.01}, ref: {node:10.77.0.12: 0.01}, reward: {node:10.77.0.12: 0.01}}"
    env = {"RECIPE": "grpo_tiny",
           "OVERRIDES": f"output_dir={tmp_path / 'run'} data.eval=null train.progress_bar=false ppo.iterations=3 "
                        f"ppo.eval_every=0 dist.backend=gloo 'ppo.resources={pin}'"}
    r = sbatch([*TWO_NODES, f"--output={log_path}", "--wait"], env, script="slurm/ppo_7b.sh", timeout=JOB_TIMEOUT_S)
    log = tail(log_path, 30000)
    assert r.returncode == 0, f"{r.stderr}\n{log[-6000:]}"
    assert re.search(r"Ray head on ftnode1 \(10\.77\.0\.11:\d+\).*; 2 node\(s\)", log), log[-4000:]
    assert ("placement: policy on ftnode1 (10.77.0.11) ranks 0-1; ref on ftnode2 (10.77.0.12) rank 0; "
            "reward on ftnode2 (10.77.0.12) rank 0") in log, log[-4000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "reward_mean" in r] == [1, 2, 3]
    assert "ftdist-slurm: finished" in log
