"""slurm/sft_7b.sh submitted unchanged to the local Slurm, with CPU settings from the sbatch
command line and the environment: a run to the end (one task per rank, srun), and a run
preempted mid-way by USR1 (one task per rank) that requeues itself, resumes from its
checkpoint and ends with the weights of the uninterrupted run. The same preemption with torchrun
starting the ranks is proven on two nodes by
tests/multinode/test_slurm.py::test_torchrun_per_node_preempted_requeued_resumed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import load_weights, max_abs_diff
from tests.slurm.jobs import assert_requeued_and_resumed, job_id_of, preempted_mid_run, sbatch, sft_env, tail, \
    train_steps

pytestmark = pytest.mark.slurm

STEPS = 30
OVERRIDES = (f"data.eval=null train.max_steps={STEPS} train.log_every=1 train.progress_bar=false "
             "checkpoint.every_steps=0 dist.backend=gloo")
# one node, one task per rank
SRUN_2 = ["--nodes=1", "--gpus-per-node=0", "--time=30", "--ntasks-per-node=2", "--cpus-per-task=1"]
JOB_TIMEOUT_S = 420


def _sbatch(run_dir: Path, log: Path, *extra: str, timeout: float = 30):
    return sbatch([*SRUN_2, f"--output={log}", *extra], sft_env(run_dir, OVERRIDES, "srun", 2), timeout=timeout)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    base = tmp_path_factory.mktemp("sbatch_straight")
    r = _sbatch(base / "run", base / "job.out", "--wait", timeout=JOB_TIMEOUT_S)
    log = tail(base / "job.out", 10**9)
    assert r.returncode == 0, f"sbatch --wait rc={r.returncode}\n{r.stderr}\n--- job output\n{log[-6000:]}"
    return base / "run", log


def test_sft_script_runs_to_the_end(straight):
    """Alone proves: slurm/sft_7b.sh (srun, 2 tasks on one node) runs SFT to its final model and last checkpoint."""
    run_dir, log = straight
    assert "srun: 2 task(s), one rank each" in log
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "final" / "config.json").exists() and list((run_dir / "final").glob("*.safetensors"))
    assert (run_dir / "checkpoints" / f"step-{STEPS}" / "manifest.json").exists()
    assert "ftdist-slurm: finished" in log


def test_usr1_checkpoints_requeues_and_resumes(straight, tmp_path):
    """Alone proves: in srun mode USR1 reaches every rank, which checkpoint; the job requeues and resumes exactly."""
    run_dir, log_path = tmp_path / "run", tmp_path / "job.out"
    job_id = job_id_of(_sbatch(run_dir, log_path))
    last, log = preempted_mid_run(job_id, run_dir, log_path, JOB_TIMEOUT_S)
    assert "srun: 2 task(s), one rank each" in log
    assert_requeued_and_resumed(last, log, run_dir, STEPS)
    # restored state, then the same fp32 operations in the same order as the straight run: bit-identical
    assert max_abs_diff(load_weights(run_dir / "final"), load_weights(straight[0] / "final")) == 0.0
