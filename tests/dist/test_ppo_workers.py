"""The PPO workers in one plain process (a world-1 gloo group, real DeepSpeed), without Ray:
a learned reward model scores at the last real token exactly like transformers does on the unpadded
text; a critic started from the reward model carries its head; with LoRA the reference is the policy
with its adapter off; a PPO update on a fixed batch moves the log-probs of positive-advantage tokens up."""

import json
import sys

import pytest

from tests.helpers import ROOT, run_group

pytestmark = pytest.mark.dist

SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification
from ftdist.config import load_config
from ftdist.models.tiny import resolve_model_path, tiny_config
from ftdist.rl.experience import Experience, merge_rollouts
from ftdist.rl.workers import CriticWorker, PolicyWorker, ReferenceWorker, RewardWorker
from ftdist.run.seeding import derive_seed

rm_dir = sys.argv[1]
torch.manual_seed(0)
rm = AutoModelForSequenceClassification.from_config(tiny_config(num_labels=1))
with torch.no_grad():
    rm.score.weight.normal_(0, 1.0)  # a head far from a fresh one, so "initialised from the RM" is visible
rm.save_pretrained(rm_dir)

base = ["stage=ppo", "data.train=ftdist/tiny-task/prompts", "model.dtype=fp32", "data.max_length=48",
        "ppo.max_new_tokens=6", "train.micro_batch_size=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
        "deepspeed.zero_stage=2", "ppo.temperature=1.0", "train.scheduler=constant", "train.warmup_ratio=0"]
out = {}
cfg = load_config(None, base + [f"ppo.reward_model={rm_dir}", "ppo.critic_init=reward_model"])
policy = PolicyWorker(cfg)
prompts = ["<|user|>\nSort the digits: 3 1 2<|end|>\n<|assistant|>\n",
           "<|user|>\nSort the digits: 9 8 7 6 5 4<|end|>\n<|assistant|>\n"] * 2
rollout = policy.generate(prompts, derive_seed(0, 0, 0))
exp = Experience.from_rollout(merge_rollouts([rollout], policy.tokenizer.pad_token_id))
out["left_padded"] = bool((exp.attention_mask[:, 0] == 0).any())

reward = RewardWorker(cfg)
scores = reward.score(exp)
hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
with torch.no_grad():
    alone = [float(hf(input_ids=s[m.bool()].unsqueeze(0)).logits[0, 0]) for s, m in zip(exp.sequences, exp.attention_mask)]
out["score_err"] = float((scores - torch.tensor(alone)).abs().max())

critic = CriticWorker(cfg)
out["critic_head_err"] = float((critic.engine.module.score.weight.detach().cpu() - rm.score.weight.detach()).abs().max())
values = critic.values(exp)
out["values_shape"] = list(values.shape) == list(exp.action_mask.shape)

# ppo.vf_coef weighs the critic's loss: 0 leaves the critic exactly where it was (zero gradient, Adam's update 0)
exp.values, exp.returns = values, values + 1.0
for coef in (0.0, 1.0):
    c = CriticWorker(load_config(None, base + [f"ppo.reward_model={rm_dir}", "ppo.critic_init=reward_model",
                                               f"ppo.vf_coef={coef}"]))
    before = {n: p.detach().clone() for n, p in c.engine.module.named_parameters()}
    c.train(exp, 0)
    out[f"critic_moved_{coef}"] = max(float((p.detach() - before[n]).abs().max())
                                      for n, p in c.engine.module.named_parameters())

# with LoRA there is no reference group: the policy with its adapter off must give the base model's log-probs
lora = load_config(None, base + ["ppo.reward_fn=ftdist.data.tiny_task:sort_reward", "model.lora.r=4",
                                 "model.lora.dropout=0.0", "train.lr=5e-3"])
lora_policy = PolicyWorker(lora)
reference = ReferenceWorker(lora)
ref = reference.logprobs(exp)
with_adapter_off = lora_policy.logprobs(exp, reference=True)
out["lora_ref_err_before"] = float((with_adapter_off - ref).abs().max())

exp.old_logp = lora_policy.logprobs(exp)
exp.ref_logp = ref
exp.advantages = exp.action_mask.float()  # every sampled token is good
stats = lora_policy.train(exp, 0, 0.0)
after = lora_policy.logprobs(exp)
gain = ((after - exp.old_logp) * exp.action_mask).sum() / exp.action_mask.sum()
out["mean_logp_gain"] = float(gain)
out["lora_ref_err_after"] = float((lora_policy.logprobs(exp, reference=True) - ref).abs().max())
out["policy_stats"] = sorted(stats)

# ppo.ref_ranks=0: a frozen reference on the policy rank gives the reference group's numbers, also after an update
full = load_config(None, base + ["ppo.reward_fn=ftdist.data.tiny_task:sort_reward", "ppo.ref_ranks=0",
                                 "train.lr=5e-3"])
beside = PolicyWorker(full)
exp.old_logp = beside.logprobs(exp)
# at the start every reference is the policy: KL 0
out["start_kl_beside"] = float((beside.logprobs(exp, reference=True) - exp.old_logp).abs().max())
out["start_kl_group"] = float((ReferenceWorker(full).logprobs(exp) - exp.old_logp).abs().max())
beside.train(exp, 0, 0.0)
out["beside_ref_err"] = float((beside.logprobs(exp, reference=True) - ReferenceWorker(full).logprobs(exp)).abs().max())
out["beside_policy_moved"] = float((beside.logprobs(exp) - exp.old_logp).abs().max())

# a quantised (QLoRA) GRPO policy: its reference (the adapter off, whatever ppo.ref_ranks) and a frozen reference
# built for its recipe are its 4-bit starting point, not the full-precision base
qlora = load_config(None, base + ["ppo.reward_fn=ftdist.data.tiny_task:sort_reward", "ppo.algorithm=grpo",
                                  "ppo.samples_per_prompt=2", "model.lora.r=4", "model.lora.dropout=0.0",
                                  "model.quantization.load_in_4bit=true", "model.quantization.compute_dtype=fp32"])
qpolicy = PolicyWorker(qlora)
qstart = qpolicy.logprobs(exp)
out["qlora_start_kl_adapter_off"] = float((qpolicy.logprobs(exp, reference=True) - qstart).abs().max())
out["qlora_start_kl_frozen"] = float((ReferenceWorker(qlora).logprobs(exp) - qstart).abs().max())
out["qlora_vs_full_base"] = float((ref - qstart).abs().max())  # ref: the full-precision base's log-probs

# ppo.async_rollouts: a rollout started after refresh_rollout and decoded beside (here: after) an update samples
# from the weights before the update, and its recorded log-probs (the importance ratio's denominator) are theirs
async_cfg = load_config(None, base + ["ppo.reward_fn=ftdist.data.tiny_task:sort_reward", "ppo.async_rollouts=true",
                                      "train.lr=5e-3"])
trained, untouched = PolicyWorker(async_cfg), PolicyWorker(async_cfg)  # the same seeded start
trained.refresh_rollout()
exp.old_logp = trained.logprobs(exp)
trained.train(exp, 0, 0.0)
late = Experience.from_rollout(merge_rollouts([trained.generate(prompts, 7, refresh=False)],
                                              trained.tokenizer.pad_token_id))
out["async_old_err"] = float((late.old_logp - untouched.logprobs(late)).abs().max())
out["async_new_gap"] = float((late.old_logp - trained.logprobs(late)).abs().max())
print("RESULT " + json.dumps(out))
"""


def test_reward_critic_and_lora_reference_workers(tmp_path):
    proc = run_group([sys.executable, "-c", SCRIPT, str(tmp_path / "rm")], 300,
                     env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["left_padded"]  # the two prompt lengths differ, so the check covers left padding
    # a left-padded batch against one sequence at a time: the same fp32 sums over other shapes (~1e-6 of
    # scores of size ~1-10); 1e-4 is 10x that. Reading the score at a wrong position would differ by O(1).
    assert r["score_err"] < 1e-4, r
    assert r["critic_head_err"] == 0.0 and r["values_shape"], r
    assert r["critic_moved_0.0"] == 0.0 and r["critic_moved_1.0"] > 0.0, r  # ppo.vf_coef reaches the loss
    # the same base weights through the same kernels with the adapter path off (peft still adds a zero): the
    # rounding of per-token log-probs of size ~5, ~1e-6; 1e-5 is 10x that
    assert r["lora_ref_err_before"] < 1e-5, r
    assert r["mean_logp_gain"] > 0.01, r
    assert r["lora_ref_err_after"] < 1e-5, r  # the update touched only the adapter
    # the same frozen weights through the same kernels in the same process: exactly equal
    assert r["beside_ref_err"] == 0.0 and r["beside_policy_moved"] > 0.01, r
    # the starting policy's own weights through the same kernels (a frozen copy, or the policy in eval mode):
    # equal up to fp32 rounding of log-probs of size ~5 (~1e-6); 1e-5 is 10x that
    assert r["start_kl_beside"] < 1e-5 and r["start_kl_group"] < 1e-5, r
    assert r["qlora_start_kl_adapter_off"] < 1e-5 and r["qlora_start_kl_frozen"] < 1e-5, r
    # ... and the 4-bit start is visibly not the full-precision base (NF4 rounding moves log-probs by ~1e-2),
    # which a reference loaded without the policy's quantisation would be
    assert r["qlora_vs_full_base"] > 1e-3, r
    # the generating weights' log-probs within fp32 rounding of incremental decoding (~1e-6; 1e-5 is 10x), and
    # visibly not the updated policy's (lr 5e-3 moved every sampled token's log-prob)
    assert r["async_old_err"] < 1e-5 and r["async_new_gap"] > 1e-3, r
    assert {"policy_loss", "clipfrac", "approx_kl", "entropy", "lr", "grad_norm"} <= set(r["policy_stats"])
