"""PPO and critic-free policy-gradient math: KL estimators, token rewards, GAE,
clipped policy/value losses, GRPO/RLOO/REINFORCE++ advantages, KL controllers.

Per-token tensors are (B, T) over the response positions of a rollout, aligned with
the action log-probs (`token_logprobs` output), with `mask`/`action_mask` (B, T)
true on generated tokens. A batch may be left-padded (prompt) and right-padded
(response), so real tokens need not start at 0; everything here finds positions
from the mask, never from lengths. Rollout inputs (logps, values, scores) carry no
gradient; advantages and returns are detached targets.
"""

from __future__ import annotations

import torch

from ftdist.algos.reward import last_token_index
from ftdist.algos.sft import masked_mean

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman, "Approximating KL").

    logp, ref_logp (B, T) -> (B, T) float32.
    k1 = log r, unbiased but can be negative; k2 = (log r)^2 / 2, low variance,
    biased; k3 = r' - 1 - log r' with r' = ref/policy, unbiased and >= 0.
    """
    log_ratio = logp.float() - ref_logp.float()  # (B, T)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # exp(20) is already far past any useful penalty; the clamp stops one
        # degenerate token from turning the whole batch's rewards into inf.
        neg = (-log_ratio).clamp(max=20.0)
        # >= 0 exactly: near log r = 0 the fp32 rounding of exp(x) - x - 1 can come out at -1e-8
        return (torch.exp(neg) - neg - 1).clamp(min=0.0)
    raise ValueError(f"kl estimator={estimator!r} is not one of {KL_ESTIMATORS}")


def compute_token_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    action_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: -kl_coef * KL on every response token plus the
    reward-model score on the last response token.

    scores (B,), logp/ref_logp/action_mask (B, T) -> rewards (B, T), kl (B, T), both
    float32 and 0 off the mask. The score goes to the last 1 of action_mask: with
    left-padded prompts `action_mask.sum() - 1` points into the middle of the
    response. A response cut at max length (no EOS) gets its score at its last
    generated token, like any other. A row without response tokens gets nothing.
    """
    mask = action_mask.bool()
    kl = kl_penalty(logp, ref_logp, estimator).masked_fill(~mask, 0.0)  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = last_token_index(mask)  # (B,)
    has_response = mask.any(dim=-1)  # (B,)
    bonus = torch.where(has_response, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
    rewards = rewards.scatter_add(-1, last.unsqueeze(-1), bonus.unsqueeze(-1))
    return rewards, kl


def _reverse_scan(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Shared reverse loop of GAE (values given) and discounted returns (values = 0, lam = 1).

    Masked positions are skipped: they get 0 and pass the running sums through
    untouched, so a hole inside a response (e.g. masked tool output) is bridged by
    bootstrapping from the next real token; past the last real token the next
    value is 0 (the episode ended).
    """
    batch, seq = x.shape
    out = torch.zeros_like(x)
    running = x.new_zeros(batch)  # discounted sum of future deltas
    next_value = x.new_zeros(batch)  # value of the next real token
    for t in reversed(range(seq)):
        m = mask[:, t]
        delta = x[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        out[:, t] = torch.where(m, step, torch.zeros_like(step))
        running = torch.where(m, step, running)
        next_value = torch.where(m, values[:, t], next_value)
    return out


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).

    rewards, values, mask (B, T) -> advantages (B, T), returns (B, T) = advantages + values,
    both float32, detached, 0 off the mask. Not whitened: call `whiten` on the advantages.
    """
    mask = mask.bool()
    values = values.float().masked_fill(~mask, 0.0)
    advantages = _reverse_scan(rewards.float(), values, mask, gamma, lam)
    returns = (advantages + values).masked_fill(~mask, 0.0)
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to unit variance (and zero mean if shift_mean) over the masked positions.

    x, mask (B, T) -> (B, T), 0 off the mask. Statistics are over ALL masked tokens of
    the batch, with Bessel's correction like TRL's masked_whiten. shift_mean=False
    keeps the mean (used for rewards, whose sign matters).
    """
    mask = mask.bool()
    x = x.float()
    mean = masked_mean(x, mask)
    count = mask.sum()
    centered = (x - mean).masked_fill(~mask, 0.0)
    var = (centered**2).sum() / (count - 1).clamp(min=1)
    whitened = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(~mask, 0.0)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate, token mean over the mask.

    logp (B, T) current policy (with grad), old_logp (B, T) rollout policy,
    advantages (B, T) or (B,) (per-sequence GRPO/RLOO advantages broadcast over T).
    loss = mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - old_logp).
    Metrics: clipfrac (fraction of tokens where the clipped term is the larger one,
    i.e. carries no gradient), approx_kl = mean (logp - old)^2 / 2 (TRL's estimate).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1)
    log_ratio = logp.float() - old_logp.float()  # (B, T)
    ratio = torch.exp(log_ratio)
    advantages = advantages.float().detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)

    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped critic loss 0.5 * max((V - R)^2, (V_clip - R)^2), token mean over the mask.

    values (B, T) current critic (with grad), old_values (B, T) rollout critic,
    returns (B, T) from `gae`. V_clip = old + clip(V - old, -eps, eps) keeps the
    critic from moving far from its rollout estimate in one epoch.
    Metric vf_clipfrac: fraction of tokens where the clipped error is the larger.
    """
    values = values.float()
    old_values = old_values.float()
    returns = returns.float().detach()
    values_clipped = old_values + (values - old_values).clamp(-clip_eps_value, clip_eps_value)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)

    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution: logits (B, T, V) -> (B, T) float32.

    H = logsumexp(z) - sum softmax(z) * z, which needs no log of a probability that
    may underflow to 0.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / G, G); rows [g*G, (g+1)*G) are the G samples of one prompt."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size} must be >= 2 to have a baseline")
    if scores.numel() % group_size:
        raise ValueError(f"batch of {scores.numel()} scores is not a multiple of group_size={group_size}")
    return scores.float().view(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (s - group mean) / (group std + eps), per sequence.

    scores (B,) with the G samples of a prompt contiguous -> (B,); broadcast over the
    response mask (policy_loss accepts (B,)). std has Bessel's correction like TRL's.
    A group with identical scores gets advantage 0.
    """
    grouped = _grouped(scores, group_size)  # (B/G, G)
    mean = grouped.mean(dim=-1, keepdim=True)
    std = grouped.std(dim=-1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): s_i minus the mean of the OTHER G-1 samples of its prompt.

    scores (B,) with the G samples of a prompt contiguous -> (B,), per sequence.
    """
    grouped = _grouped(scores, group_size)  # (B/G, G)
    baseline = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): discounted return-to-go of the token rewards, whitened over the batch.

    token_rewards (B, T) (from compute_token_rewards: KL penalty per token plus the
    score at the last token), mask (B, T) -> (B, T) per-token advantages, 0 off the
    mask. Whitening uses every response token of the batch (no per-prompt
    baseline), which is what lets it drop the critic without GRPO's groups.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(token_rewards, dtype=torch.float32)
    returns = _reverse_scan(token_rewards.float(), zeros, mask, gamma, 1.0)
    return whiten(returns, mask)


class FixedKLController:
    """Constant KL coefficient; same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    Moves the coefficient proportionally to how far the measured KL is from target:
    value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon.
    The clip keeps one noisy batch from swinging the coefficient.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
