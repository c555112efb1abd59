"""From scored samples to advantages: the driver's pure step between scoring and the update.

ppo           token rewards = -kl_coef * KL per token + score at the last real token;
              GAE over the critic's values; advantages whitened over the batch.
reinforce_pp  the same token rewards; whitened discounted returns, no critic.
rloo          sequence reward = score - kl_coef * summed KL; leave-one-out baseline.
grpo          score normalised within the prompt's group; the KL is a loss term
              in the policy update instead of a reward penalty (DeepSeekMath).
"""

from __future__ import annotations

import torch

from ftdist.algos.ppo import (
    compute_token_rewards,
    gae,
    grpo_advantages,
    kl_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)
from ftdist.algos.reward import last_token_index
from ftdist.rl.experience import Experience


def penalised_scores(scores: torch.Tensor, finished: torch.Tensor, penalty) -> torch.Tensor:
    """(B,), (B,) bool -> (B,): the score minus `penalty` where the response never emitted EOS."""
    scores = scores.float()
    if penalty is None:
        return scores
    return scores - penalty * (~finished.bool()).float()


@torch.no_grad()
def compute_advantages(exp: Experience, ppo_cfg, kl_coef: float) -> tuple[Experience, dict[str, float]]:
    """Fills exp.kl, exp.rewards, exp.advantages (and exp.returns for ppo); returns rollout statistics."""
    p = ppo_cfg
    mask = exp.action_mask  # (B, R)
    scores = penalised_scores(exp.scores, exp.finished, p.missing_eos_penalty)  # (B,)
    if p.algorithm in ("ppo", "reinforce_pp"):
        rewards, kl = compute_token_rewards(scores, exp.old_logp, exp.ref_logp, mask, kl_coef, p.kl)
        if p.algorithm == "ppo":
            advantages, returns = gae(rewards, exp.values, mask, p.gamma, p.lam)  # (B, R) each
            if p.whiten_advantages:
                advantages = whiten(advantages, mask)
            exp.returns = returns
        else:
            advantages = reinforce_pp_advantages(rewards, mask, p.gamma)  # (B, R)
    else:
        kl = kl_penalty(exp.old_logp, exp.ref_logp, p.kl).masked_fill(~mask, 0.0)  # (B, R)
        if p.algorithm == "rloo":
            sequence_reward = scores - kl_coef * kl.sum(dim=-1)  # (B,)
            per_sequence = rloo_advantages(sequence_reward, p.samples_per_prompt)  # (B,)
        else:
            sequence_reward = scores
            per_sequence = grpo_advantages(scores, p.samples_per_prompt)  # (B,)
        advantages = per_sequence.unsqueeze(-1) * mask  # (B, R)
        rewards = torch.zeros_like(kl).scatter_add(  # for the record only: the sequence reward at its last token
            -1, last_token_index(mask).unsqueeze(-1), sequence_reward.unsqueeze(-1)) * mask
    exp.kl, exp.rewards, exp.advantages = kl, rewards, advantages.masked_fill(~mask, 0.0)
    raw = exp.scores.float()
    lengths = exp.response_lengths().float()
    stats = {
        "reward_mean": float(raw.mean()),
        "reward_std": float(raw.std()) if raw.numel() > 1 else 0.0,
        "kl": float(kl.sum(dim=-1).mean()),  # per-sequence KL, what the adaptive controller targets
        "kl_coef": float(kl_coef),
        "response_len": float(lengths.mean()),
        "no_eos": int((~exp.finished.bool()).sum()),
        "advantage_mean": float(advantages[mask].mean()) if mask.any() else 0.0,
    }
    if exp.returns is not None:
        stats["return_mean"] = float(exp.returns[mask].mean()) if mask.any() else 0.0
    return exp, stats
