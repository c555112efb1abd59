"""The full demo pipeline: SFT -> reward model -> DPO on the tiny digit-sorting task (2 gloo ranks, CPU).

    python launch/demo.py --stages sft,rm,dpo [--out runs/demo] [key=value ...]
    python launch/demo.py --stages sft,rm,ppo,dpo   # PPO on Ray actors, DPO as the alternative branch

PPO also starts from the SFT model: its policy group (2 ranks, ZeRO-2), reference, reward and critic
run as local Ray actors. With the rm stage its reward is the learned reward model (and the critic starts
from it); without it, the rule-based reward of the task. PPO reports the mean reward of greedy answers
to held-out prompts before (= the SFT model) and after.

The reward model and DPO both start from the SFT model; DPO's reference is the
frozen SFT model. After each stage it prints the reward model's held-out pair
accuracy, DPO's held-out reward accuracy (implicit reward of chosen > rejected)
and the task accuracy (exact match of greedy answers on held-out prompts).
"""

from __future__ import annotations

from pathlib import Path

STAGE_RECIPES = {"sft": "sft_tiny", "rm": "rm_tiny", "dpo": "dpo_tiny", "ppo": "ppo_tiny"}
# a short, cautious PPO, evaluated on the same 200 held-out prompts as SFT: the SFT model is near the ceiling, and
# larger steps on a 0.9M-parameter model trade held-out accuracy for reward (with the learned RM even at these
# settings: the policy over-optimises an imperfect reward model)
PPO_DEMO = ["ppo.iterations=10", "train.lr=1e-5", "ppo.kl_coef=0.1", "ppo.eval_every=0", "train.eval_max_samples=200",
            "checkpoint.every_steps=0"]


def _last_eval(records: list[dict]) -> dict:
    return [r for r in records if any(k.startswith("eval/") for k in r)][-1]


def _first_eval(records: list[dict]) -> dict:
    return [r for r in records if any(k.startswith("eval/") for k in r)][0]


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def run_pipeline(run_stage, stages: list[str], nproc: int, out: Path, sft_overrides: list[str],
                 sft_report=None) -> list[dict]:
    """Run the stages in order; returns one row per stage: rm_accuracy, dpo_reward_accuracy, task_accuracy.
    sft_report(records), if given, prints the SFT stage's own table (the one `make demo` prints) once it ends."""
    unknown = [s for s in stages if s not in STAGE_RECIPES]
    if unknown or stages[0] != "sft":
        raise SystemExit(f"demo: --stages must start with sft and use {', '.join(STAGE_RECIPES)} (got {stages})")
    rows: list[dict] = []
    task_acc = rm_acc = dpo_acc = reward = None
    policy = "ftdist/tiny"
    for stage in stages:
        overrides = ["checkpoint.resume=never"]
        if stage == "sft":
            overrides += sft_overrides
        else:
            overrides.append(f"model.name_or_path={policy}")
        if stage == "ppo":
            overrides += PPO_DEMO
            if "rm" in stages[:stages.index("ppo")]:
                overrides += ["ppo.reward_fn=null", f"ppo.reward_model={out / 'rm' / 'final'}"]
        # PPO is one controller process that starts its own Ray actors
        records = run_stage(1 if stage == "ppo" else nproc, STAGE_RECIPES[stage], out / stage, overrides)
        last = _last_eval(records)
        if stage == "sft":
            task_acc = last.get("eval/accuracy")
            policy = str(out / "sft" / "final")
            if sft_report is not None:
                sft_report(records)
        elif stage == "rm":
            rm_acc = last["eval/accuracy"]
        elif stage == "ppo":
            start = _first_eval(records)
            if rows and rows[0]["stage"] == "sft":  # PPO's first evaluation is of the SFT model
                rows[0]["reward_mean"] = start["eval/reward_mean"]
            reward, task_acc = last["eval/reward_mean"], last.get("eval/accuracy")
        else:
            dpo_acc, task_acc = last["eval/rewards/accuracies"], last.get("eval/accuracy")
            sft_acc = _first_eval(records).get("eval/accuracy")
            print(f"demo: task accuracy of the DPO starting point (SFT model) {_pct(sft_acc)}", flush=True)
        rows.append({"stage": stage, "rm_accuracy": rm_acc, "dpo_reward_accuracy": dpo_acc,
                     "task_accuracy": task_acc, "reward_mean": reward if stage == "ppo" else None})
        print(f"demo: after {stage}: reward-model held-out accuracy {_pct(rm_acc)}, DPO reward accuracy "
              f"{_pct(dpo_acc)}, task accuracy {_pct(task_acc)}"
              + (f", PPO mean reward {reward:.3f}" if stage == "ppo" else ""), flush=True)
    print(f"\n{' -> '.join(s.upper() for s in stages)} on the tiny Llama, digit sorting ({nproc} gloo ranks, CPU)")
    print(f"{'after':10s}{'RM held-out acc':>18s}{'DPO reward acc':>18s}{'task accuracy':>16s}{'mean reward':>14s}")
    for r in rows:
        mean = "-" if r.get("reward_mean") is None else f"{r['reward_mean']:.3f}"
        print(f"{r['stage']:10s}{_pct(r['rm_accuracy']):>18s}{_pct(r['dpo_reward_accuracy']):>18s}"
              f"{_pct(r['task_accuracy']):>16s}{mean:>14s}")
    print("\n" + "\n".join(f"{s}: {out / s / 'final'}" for s in stages))
    return rows
