"""Supervised fine-tuning loss and the log-prob helpers that DPO and PPO share.

Conventions for the whole `algos` package:
- `labels` (B, T) are aligned with `input_ids`, NOT pre-shifted: logits at
  position t predict labels[:, t + 1]. Positions whose label is `ignore_index`
  (prompt, padding) are not targets.
- Losses are computed in float32 whatever the dtype of the logits: bf16 log-probs
  lose about 3 significant digits, which is enough to flip DPO accuracies.
- Metrics are detached 0-dim float32 tensors, so the training loop can reduce them
  across ranks before calling `.item()` once per logging step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V), (B, T) -> flat float32 logits (B*(T-1), V) and flat labels (B*(T-1),)."""
    vocab = logits.size(-1)
    # .float() on bf16 makes the one contiguous copy we need; on float32 the
    # reshape of the sliced view makes it instead. never two copies.
    flat_logits = logits[:, :-1].float().reshape(-1, vocab)
    flat_labels = labels[:, 1:].reshape(-1)
    return flat_logits, flat_labels


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every next-token label.

    logits (B, T, V), labels (B, T) ->
        logps (B, T-1) float32, 0.0 where the label is ignored
        mask  (B, T-1) bool, True on target tokens
    """
    batch, seq = labels.shape
    flat_logits, flat_labels = _shifted(logits, labels)
    # cross_entropy's fused log_softmax+gather never builds a second (B, T, V)
    # tensor of log-probs, and it writes 0 at ignored positions for us.
    logps = -F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="none")
    mask = labels[:, 1:] != ignore_index  # (B, T-1)
    return logps.view(batch, seq - 1), mask


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    average: bool = False,
    seq_ids: torch.Tensor | None = None,
    n_seqs: int | None = None,
) -> torch.Tensor:
    """Sum (or, with average=True, per-token mean) of log-probs over the target tokens.

    logits (B, T, V), labels (B, T) -> (B,) float32. A row with no target token gives 0.
    DPO uses the sum; ORPO and length-normalised variants use the mean.
    Packed rows: seq_ids (B, T) numbers the sequences 1..n_seqs (0 = padding) and the result is (n_seqs,), one
    value per sequence in number order; a label must never be predicted across a sequence boundary (the first
    token of each packed sequence carries ignore_index).
    """
    logps, mask = token_logprobs(logits, labels, ignore_index)  # (B, T-1)
    if seq_ids is None:
        total, count = logps.sum(dim=-1), mask.sum(dim=-1)  # ignored positions are already 0
    else:
        total = per_sequence_sum(logps, seq_ids[:, 1:], n_seqs)  # (n_seqs,)
        count = per_sequence_sum(mask.float(), seq_ids[:, 1:], n_seqs)
    if average:
        return total / count.clamp(min=1)
    return total


def per_sequence_sum(values: torch.Tensor, seq_ids: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """values (B, T) summed per packed sequence: seq_ids (B, T) in 0..n_seqs (0 = padding, dropped) -> (n_seqs,)
    in the values' dtype, with gradient."""
    out = values.new_zeros(n_seqs + 1)
    return out.index_add(0, seq_ids.reshape(-1), values.reshape(-1))[1:]


def sft_loss_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the target tokens of a micro-batch.

    logits (B, T, V), labels (B, T) ->
        loss_sum () float32: sum over target tokens of the (label-smoothed) cross-entropy
        n_tokens () int64: number of target tokens

    A sum, not a mean: the loop divides by the number of target tokens in the whole
    optimizer step (all micro-batches, all ranks), so the update does not depend on
    how samples were split. n_tokens is a tensor so it can be all-reduced as is.
    Label smoothing has exactly torch's semantics:
    (1 - eps) * nll + eps * mean over the vocabulary of -log p.
    """
    flat_logits, flat_labels = _shifted(logits, labels)
    loss_sum = F.cross_entropy(
        flat_logits,
        flat_labels,
        ignore_index=ignore_index,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    n_tokens = (flat_labels != ignore_index).sum()
    return loss_sum, n_tokens


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is true, along dim (all dims when None).

    x and mask broadcast to each other, e.g. (B, T) and (B, T). An empty mask gives 0
    rather than NaN: a micro-batch made only of padding must not poison the step.
    masked_fill rather than x * mask, so that -inf at masked positions stays out.
    """
    mask = mask.bool()
    x, mask = torch.broadcast_tensors(x, mask)
    summed = x.masked_fill(~mask, 0).sum(dim=dim)
    count = mask.sum(dim=dim)
    return summed / count.clamp(min=1).to(summed.dtype)
