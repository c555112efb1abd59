"""PPO and GRPO through `ftdist train` on a real local Ray: a policy group of 2 gloo ranks under ZeRO-2,
and reference, reward and critic actors, each group its own process group. The tiny model, warmed up by
a short SFT, learns the digit-sorting task from the rule-based reward on a pool of 16 prompts (so the
same prompts come back every iteration and a few iterations show a clear rise); a run resumed from its
iteration-5 checkpoint ends with the metrics and weights of the uninterrupted run. The GRPO run has its
reference colocated with the policy as a 2-rank group, and its driver started by torchrun (as the demo does)
with no RAY_ADDRESS: it starts a local Ray of its own. The other drivers join the session's Ray head
(tests/ray/conftest.py) through RAY_ADDRESS, as on a cluster, instead of starting one each (~15 s a start)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import _free_port, load_weights, max_abs_diff, read_metrics, run_ftdist, run_group

pytestmark = pytest.mark.ray

ITERATIONS = 10
# a local Ray of the run's own unless the session's head is given, never an address inherited from the caller's shell
ENV = {"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
COMMON = ["data.eval=null", "train.progress_bar=false", "logging.tensorboard=false", "ppo.temperature=0.7",
          "ppo.rollout_batch_size=16", "ppo.samples_per_prompt=8", "ppo.mini_batch_size=32", "ppo.ppo_epochs=1",
          "ppo.kl_coef=0.01", "train.lr=3e-4", "train.scheduler=constant", "ppo.eval_every=0",
          f"ppo.iterations={ITERATIONS}", "checkpoint.keep_last=0", "ppo.cpus_per_actor=0.5"]
PER_ITERATION = {"reward_mean", "reward_std", "kl", "kl_coef", "policy_loss", "clipfrac", "entropy", "response_len",
                 "no_eos", "samples_per_s", "time/generate", "time/score", "time/train", "step", "lr", "elapsed_s"}


@pytest.fixture(scope="module")
def warm(ppo_warm) -> dict:
    """An SFT-warmed tiny policy and a prompt pool (tests/conftest.py: one per session, also for tests/multinode)."""
    return ppo_warm


def _train(recipe: str, out: Path, warm: dict, *extra: str, torchrun: bool = False, head=None):
    """`ftdist train` as its own process (the driver); joining `head` (the session's Ray) when given."""
    overrides = [f"output_dir={out}", f"model.name_or_path={warm['policy']}", f"data.train={warm['pool']}",
                 *COMMON, *extra]
    if not torchrun:
        env = {**ENV, **head.driver_env} if head is not None else ENV
        return run_ftdist(1, recipe, overrides, timeout=900, env=env, inprocess=False)
    # the driver under a launcher (as `make demo` runs its stages): its torchrun variables must not leak into
    # the actor groups' own process groups
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
           str(_free_port()), "-m", "ftdist", "train", recipe, *overrides]
    assert head is None, "the torchrun driver starts its own Ray"
    proc = run_group(cmd, 900, env={**os.environ, "OMP_NUM_THREADS": "1", **ENV})
    assert proc.returncode == 0, proc.stderr[-8000:]
    return proc


def _iterations(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "reward_mean" in r]


def _rise(rows: list[dict]) -> float:
    rewards = [r["reward_mean"] for r in rows]
    return sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3


@pytest.fixture(scope="module")
def ppo_run(warm, ray_head) -> Path:
    out = warm["base"] / "ppo"
    _train("ppo_tiny", out, warm, "ppo.critic_lr=1e-3", "checkpoint.every_steps=5", "ppo.kl_target=2.0",
           "ppo.kl_horizon=2000", f"data.eval={warm['pool']}", head=ray_head)
    return out


def test_ppo_reward_rises_with_separate_actor_groups(ppo_run):
    """Alone proves: PPO with policy, reference, reward and critic groups learns the task (reward rises)."""
    rows = _iterations(ppo_run)
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1))
    assert PER_ITERATION | {"value_loss", "vf_clipfrac", "critic/lr"} <= set(rows[0]), sorted(rows[0])
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["policy_loss"]) for r in rows)
    assert _rise(rows) > 0.08, [round(r["reward_mean"], 3) for r in rows]
    assert len({r["kl_coef"] for r in rows}) > 1  # the adaptive controller moved the coefficient
    evals = [r for r in read_metrics(ppo_run) if "eval/reward_mean" in r]
    assert [e["step"] for e in evals] == [0, ITERATIONS] and "eval/accuracy" in evals[0]
    ckpt = ppo_run / "checkpoints" / f"step-{ITERATIONS}"
    assert (ckpt / "manifest.json").exists() and (ckpt / "policy").is_dir() and (ckpt / "critic").is_dir()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["iteration"] == ITERATIONS and state["prompts"]["epoch"] == ITERATIONS  # 16 of 16 prompts each time
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ppo_run / "final")


def test_ppo_resumes_from_a_checkpoint_identically(ppo_run, warm, ray_head):
    """Alone proves: PPO resumed from its iteration-5 checkpoint repeats the straight run's numbers exactly."""
    resumed = warm["base"] / "resumed"
    resumed.mkdir()
    # the same output_dir layout, cut at iteration 5: the run must pick it up by itself (checkpoint.resume=auto)
    shutil.copytree(ppo_run / "checkpoints" / "step-5", resumed / "checkpoints" / "step-5")
    shutil.copy(ppo_run / "run.json", resumed / "run.json")  # the same run: auto-resume takes only its own
    _train("ppo_tiny", resumed, warm, "ppo.critic_lr=1e-3", "checkpoint.every_steps=5", "ppo.kl_target=2.0",
           "ppo.kl_horizon=2000", head=ray_head)
    straight = {r["step"]: r for r in _iterations(ppo_run)}
    again = _iterations(resumed)
    assert [r["step"] for r in again] == list(range(6, ITERATIONS + 1))
    # restored weights, optimizer and sampling RNG, then the same fp32 operations in the same order as the
    # straight run: the same samples and bit-identical numbers
    for r in again:
        for key in ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "response_len"):
            assert r[key] == straight[r["step"]][key], (r["step"], key)
    assert max_abs_diff(load_weights(ppo_run / "final"), load_weights(resumed / "final")) == 0.0


def test_a_ppo_checkpoint_is_exported_and_evaluated_by_step(ppo_run, tmp_path):
    """Alone proves: `ftdist export/eval RUN --step N` read the policy group's engine state of a PPO checkpoint."""
    from ftdist.cli import main

    assert main(["export", str(ppo_run), "--step", str(ITERATIONS), "--out", str(tmp_path / "last")]) == 0
    # the last checkpoint holds the policy final/ was written from: fp32 master weights of an fp32 model, equal
    assert max_abs_diff(load_weights(ppo_run / "final"), load_weights(tmp_path / "last")) == 0.0
    assert main(["export", str(ppo_run), "--step", "5", "--out", str(tmp_path / "step5")]) == 0
    assert max_abs_diff(load_weights(tmp_path / "step5"), load_weights(tmp_path / "last")) > 0  # 5 updates apart
    suite = ["--suite", "perplexity=ftdist/tiny-task/eval", "--max-samples", "4"]
    assert main(["eval", str(ppo_run), "--step", "5", *suite, "--out", str(tmp_path / "by_step")]) == 0
    assert main(["eval", str(tmp_path / "step5"), *suite, "--out", str(tmp_path / "exported")]) == 0
    by_step, exported = (json.loads((tmp_path / d / "eval.json").read_text())["results"] for d in ("by_step", "exported"))
    assert next(iter(by_step.values())) == next(iter(exported.values()))


def test_grpo_reward_rises_without_a_critic(warm):
    """Alone proves: GRPO (no critic) learns with the reference colocated, its driver under torchrun, Ray local."""
    out = warm["base"] / "grpo"
    # the reference shares the policy's bundles and is a 2-rank group of its own
    _train("grpo_tiny", out, warm, "ppo.kl_estimator=k3", "ppo.colocation=policy_ref", "ppo.ref_ranks=2",
           torchrun=True)
    rows = _iterations(out)
    assert PER_ITERATION <= set(rows[0]) and "value_loss" not in rows[0]
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)  # k3 is non-negative
    assert _rise(rows) > 0.08, [round(r["reward_mean"], 3) for r in rows]
    assert not (out / "checkpoints" / f"step-{ITERATIONS}" / "critic").exists()


def test_grpo_reward_rises_with_async_rollouts_and_the_reference_beside_the_policy(warm, ray_head):
    """Alone proves: one-step off-policy rollouts (ppo.async_rollouts) with no reference group still learn."""
    out = warm["base"] / "grpo_async"
    # one step off-policy: each batch generated beside the previous update; no reference group (ppo.ref_ranks=0)
    # each update trains on samples of the weights one update older: the reward rises more slowly per iteration
    iterations = 16
    _train("grpo_tiny", out, warm, "ppo.async_rollouts=true", "ppo.ref_ranks=0", "deepspeed.zero_stage=0",
           "ppo.generate_batch_size=8", "checkpoint.every_steps=5", f"ppo.iterations={iterations}", head=ray_head)
    rows = _iterations(out)
    assert len(rows) == iterations and all(math.isfinite(r["kl"]) for r in rows)
    # the second batch was generated beside the first update, by the starting weights = the reference: KL 0 up
    # to fp32 rounding (exp(x) - x - 1 near x = 0 is off by up to an ulp at 1.0, 1.2e-7, per token; ~10 tokens
    # per sequence: ~1e-6; 1e-5 is 10x that); the third by updated weights
    assert rows[0]["kl"] < 1e-5 and rows[1]["kl"] < 1e-5 and rows[2]["kl"] > 1e-3
    # noise: 128 samples of reward std ~0.3 per iteration give a mean within ~0.027; the difference of two means
    # of 4 iterations is within ~0.019 (one standard error), so a rise above 0.05 (2.6 of them) is learning
    rewards = [r["reward_mean"] for r in rows]
    assert sum(rewards[-4:]) / 4 - sum(rewards[:4]) / 4 > 0.05, [round(x, 3) for x in rewards]
    placement = {k for r in read_metrics(out) for k in r if k.startswith("placement/")}
    assert placement == {"placement/policy", "placement/reward"}  # no reference group was started
    assert (out / "checkpoints" / f"step-{iterations}" / "policy").is_dir()


def test_bad_reward_function_fails_before_any_actor_starts(tmp_path):
    """Alone proves: a ppo.reward_fn that does not resolve is an input error (exit 2), before any actor starts."""
    proc = run_ftdist(1, "ppo_tiny", [f"output_dir={tmp_path}", "ppo.reward_fn=ftdist.data.tiny_task:nope"],
                      check=False, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ppo.reward_fn" in proc.stderr and "nope" in proc.stderr and "Traceback" not in proc.stderr
