"""PPO on a real local Ray when a reward function hangs or fails in the second iteration: the run stops with
one line naming the group, rank and cause (not a Ray traceback), and leaves a checkpoint of the first
iteration to resume from."""

from __future__ import annotations

import pytest

from tests.helpers import ROOT, run_ftdist

pytestmark = [pytest.mark.faults, pytest.mark.ray]

ENV = {"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "PYTHONPATH": str(ROOT)}
COMMON = ["data.eval=null", "train.progress_bar=false", "logging.tensorboard=false", "ppo.rollout_batch_size=4",
          "ppo.samples_per_prompt=2", "ppo.mini_batch_size=8", "ppo.max_new_tokens=4", "ppo.iterations=3",
          "ppo.algorithm=grpo", "checkpoint.every_steps=0", "ppo.cpus_per_actor=0.5", "train.micro_batch_size=2",
          "ppo.policy_ranks=1"]


@pytest.mark.parametrize("fn,words", [
    ("hangs_on_second_call", ["reward rank 0: score gave no answer within ppo.call_timeout_s=10s"]),
    ("raises_on_second_call", ["reward rank 0: score failed: ValueError: the grader's service answered 503",
                               "error.log"]),
])
def test_a_failing_reward_function_stops_with_one_line_and_a_checkpoint(tmp_path, fn, words):
    out = tmp_path / "run"
    # 10 s: above every call of an iteration here (each well under 1 s; a checkpoint a few seconds under load), and
    # below the workers' start on a loaded 2-core machine (12-20 s measured: three actors importing deepspeed and
    # loading models on two cores), which is bounded by dist.timeout_s and not by this
    overrides = [f"output_dir={out}", *COMMON, f"ppo.reward_fn=tests.faults.faulty_rewards:{fn}", "ppo.call_timeout_s=10"]
    proc = run_ftdist(1, "grpo_tiny", overrides, timeout=600, env=ENV, check=False, inprocess=False)
    assert proc.returncode == 1, proc.stderr[-6000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ftdist: error")]
    assert len(lines) == 1, proc.stderr[-6000:]
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in proc.stderr.split(lines[0])[0][-3000:]  # no Ray traceback before the line
    # the first iteration completed; the failure came before the second changed anything: its checkpoint
    assert (out / "checkpoints" / "step-1" / "manifest.json").exists(), proc.stderr[-4000:]
    assert not (out / "final").exists()
