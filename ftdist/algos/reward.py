"""Pairwise (Bradley-Terry) reward-model loss and the last-token pooling it needs.

A reward model scores a sequence with the value of its scalar head at the last real
token. Batches are right-padded by our collators but left-padded by generation
(PPO rollouts), so the pooling must work for both; `attention_mask.sum() - 1`
only works for right padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row.

    attention_mask (B, T) of 0/1 (any dtype) -> (B,) int64.
    Works for right padding, left padding and masks with holes. A row with no 1
    gives 0, so gathering with it never goes out of range.
    """
    mask = attention_mask.bool()
    positions = torch.arange(mask.size(-1), device=mask.device)  # (T,)
    # the largest masked position; argmax returns the first maximum, so an
    # all-zero row (or a row whose only 1 is at 0) yields 0.
    return (positions * mask).argmax(dim=-1)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values (B, T) -> (B,): the value at each row's last real token."""
    index = last_token_index(attention_mask)  # (B,)
    return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def gather_last_per_sequence(values: torch.Tensor, seq_ids: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """Packed rows: values (B, T), seq_ids (B, T) numbering the sequences 1..n_seqs (0 = padding) -> (n_seqs,),
    the value at each sequence's last token, in number order. A number that never occurs gives values[0, 0]."""
    flat_ids = seq_ids.reshape(-1)
    positions = torch.arange(flat_ids.numel(), device=values.device)
    last = torch.zeros(n_seqs + 1, dtype=torch.long, device=values.device)
    last = last.scatter_reduce(0, flat_ids, positions, reduce="amax")[1:]  # (n_seqs,) flat index of each last token
    return values.reshape(-1)[last]


def score_diff_weights(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-pair weights from annotator scores: (s_chosen - s_rejected)^2, divided by their batch mean.

    chosen_scores (B,), rejected_scores (B,) -> (B,) float32, no gradient.
    Pairs with a clear preference count more; ties count nothing. Dividing by the
    mean keeps the mean weight at 1, so the loss scale (and so the effective
    learning rate) stays comparable to the unweighted loss whatever the score
    scale (1-10 ratings or 0-1 probabilities). The mean is the micro-batch's, so
    a pair's weight depends a little on its batch neighbours; that is the price of
    not needing a pass over the data set first.
    """
    diff_sq = (chosen_scores.float() - rejected_scores.float()).detach() ** 2  # (B,)
    return diff_sq / diff_sq.mean().clamp(min=eps)


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss mean(w * -log sigmoid((r_chosen - r_rejected - margin) * scale)).

    chosen_rewards (B,), rejected_rewards (B,), margin (B,) or None (the Llama-2
    margin: larger when annotators were more certain), weights (B,) or None,
    scale (B,) or None (e.g. (s_chosen - s_rejected)^2: the score-difference loss
    -log sigmoid((r_chosen - r_rejected) * score_diff^2) of the fine-tuning guides).
    Without margin and weights this is TRL's RewardTrainer loss.
    Metrics: accuracy (fraction with r_chosen > r_rejected, ties count as wrong),
    margin (mean r_chosen - r_rejected, without the target margin),
    rewards/chosen and rewards/rejected (means).
    """
    chosen = chosen_rewards.float()
    rejected = rejected_rewards.float()
    diff = chosen - rejected  # (B,)
    logits = diff if margin is None else diff - margin.float()
    if scale is not None:
        logits = logits * scale.float()
    per_pair = -F.logsigmoid(logits)  # (B,)
    if weights is not None:
        per_pair = per_pair * weights.float()
    loss = per_pair.mean()

    with torch.no_grad():
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": diff.mean(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
        }
    return loss, metrics
