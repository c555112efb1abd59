"""One policy rank of tests/dist/test_rollout_zero3.py (started by torchrun, 2 ranks, ZeRO-3)."""

import json
import sys

import torch

from ftdist.config import load_config
from ftdist.rl.experience import Experience, merge_rollouts
from ftdist.rl.workers import PolicyWorker

out_file = sys.argv[1]
cfg = load_config(None, ["stage=ppo", "data.train=ftdist/tiny-task/prompts", "model.dtype=fp32", "data.max_length=48",
                         "ppo.max_new_tokens=8", "train.micro_batch_size=2", "ppo.rollout_batch_size=2",
                         "ppo.samples_per_prompt=2", "ppo.mini_batch_size=4", "deepspeed.zero_stage=3",
                         "ppo.temperature=0.7", "ppo.reward_fn=ftdist.data.tiny_task:sort_reward", "train.lr=1e-2",
                         "train.scheduler=constant", "train.warmup_ratio=0", "ppo.policy_ranks=2"])
policy = PolicyWorker(cfg)
rank = policy.info.rank
# each rank its own prompts, of other lengths than the other rank's
prompts = (["<|user|>\nSort the digits: 3 1 2<|end|>\n<|assistant|>\n"] * 2 if rank == 0 else
           ["<|system|>\nSort in ascending order.<|end|>\n<|user|>\nSort the digits: 9 8 7 6 5 4<|end|>\n"
            "<|assistant|>\n"] * 2)
res = {}


def both_ways(tag):
    """Greedy rollouts decoded from the gathered replica and by synced generate on the shards."""
    policy.rollout.gather = True
    gathered = policy.generate(prompts, None)
    policy.rollout.gather = False
    synced = policy.generate(prompts, None)
    policy.rollout.gather = True
    res[f"{tag}_equal"] = torch.equal(gathered.response_ids, synced.response_ids)
    res[f"{tag}_tokens"] = gathered.response_ids.tolist()


both_ways("before")
sampled = policy.generate(prompts, 1000 + rank)
exp = Experience.from_rollout(merge_rollouts([sampled], policy.tokenizer.pad_token_id))
recomputed = policy.logprobs(exp)  # the ZeRO-3 training forward, sharded
res["logp_err"] = float(((recomputed - exp.old_logp) * exp.action_mask).abs().max())
exp.ref_logp = recomputed
exp.advantages = exp.action_mask.float()  # every sampled token is good
policy.train(exp, 0, 0.0)
both_ways("after")  # the replica is refreshed from the updated shards
params = dict(policy.engine.module.named_parameters())
with policy.engine.gathered():
    res["replica_err"] = max(float((p.detach() - params[n].detach()).abs().max())
                             for n, p in policy.rollout.replica.named_parameters())
with open(f"{out_file}.{rank}", "w") as f:
    json.dump(res, f)
