"""A rollout batch and the masking rules every PPO worker shares.

Shapes: B samples, P prompt width (left-padded), R response width (right-padded),
S = P + R. A sample's tokens are `sequences[b]`: pad ... pad, prompt, response,
EOS, pad ... pad. Per-token tensors (B, R) are aligned with the response: column j
belongs to the token `sequences[b, P + j]` and holds its log-prob under the model
that saw `sequences[b, :P + j]`, the critic's value of that same prefix, and so on.

Everything here is CPU tensors when it travels between actor groups (Ray object
refs); a worker moves what it needs to its device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from ftdist.algos.sft import token_logprobs


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Generated tokens up to and including the first EOS.

    response_ids (B, R) as generate returns them (finished rows continue with pad)
    -> (B, R) bool. A row without EOS ran to max_new_tokens: every column is real.
    Looking for the first EOS, not for pad, keeps this right when pad == eos.
    """
    is_eos = response_ids == eos_token_id  # (B, R)
    # True strictly after the first EOS: an EOS has already been seen in an earlier column
    seen_before = (is_eos.long().cumsum(dim=-1) - is_eos.long()) > 0
    return ~seen_before


def ends_with_eos(response_ids: torch.Tensor, mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, R), (B, R) -> (B,) bool: did the sample stop on its own (EOS) rather than at max_new_tokens."""
    return ((response_ids == eos_token_id) & mask.bool()).any(dim=-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, S): positions count real tokens only, as generate counts them for left-padded prompts.

    Without this a left-padded prompt would start at position 3 instead of 0 and its
    log-probs would not be those of the distribution that sampled it.
    """
    pos = attention_mask.long().cumsum(dim=-1) - 1
    return pos.clamp(min=0)


def action_logprobs(logits: torch.Tensor, sequences: torch.Tensor, num_actions: int) -> torch.Tensor:
    """Log-prob of each response token.

    logits (B, S, V) of the whole sequence, sequences (B, S) -> (B, R) float32 with
    R = num_actions. Logits at column P - 1 + j predict response token j, so only the
    last R + 1 columns are needed (no (B, S, V) float32 copy of the prompt part).
    """
    logps, _ = token_logprobs(logits[:, -num_actions - 1:], sequences[:, -num_actions - 1:])
    return logps  # (B, R)


def action_values(values: torch.Tensor, num_actions: int) -> torch.Tensor:
    """(B, S) per-position scalar head -> (B, R): the value of the prefix each response token follows."""
    return values[:, -num_actions - 1:-1]


@dataclass
class Rollout:
    """What one policy rank generated: left-padded prompts and right-padded responses, plus texts."""

    prompt_ids: torch.Tensor  # (b, P) long, left-padded
    prompt_mask: torch.Tensor  # (b, P) long
    response_ids: torch.Tensor  # (b, R) long, pad after the first EOS
    action_mask: torch.Tensor  # (b, R) bool, response_mask()
    finished: torch.Tensor  # (b,) bool: ended with EOS (False = cut at max_new_tokens)
    prompts: list[str]  # rendered prompt text given to the reward function
    responses: list[str]  # decoded response, special tokens dropped
    logprobs: Optional[torch.Tensor] = None  # (b, R) float32: each token's log-prob under the sampling policy
    # (tempered), 0 off the mask; set when the rollout engine's numbers are the training forward's


def _pad_to(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    extra = width - x.size(1)
    if extra == 0:
        return x
    pad = x.new_full((x.size(0), extra), value)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def merge_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Concatenate the ranks' rollouts in order; prompts re-padded on the left, responses on the right."""
    P = max(p.prompt_ids.size(1) for p in parts)
    R = max(p.response_ids.size(1) for p in parts)
    return Rollout(
        prompt_ids=torch.cat([_pad_to(p.prompt_ids, P, pad_token_id, left=True) for p in parts]),
        prompt_mask=torch.cat([_pad_to(p.prompt_mask, P, 0, left=True) for p in parts]),
        response_ids=torch.cat([_pad_to(p.response_ids, R, pad_token_id, left=False) for p in parts]),
        action_mask=torch.cat([_pad_to(p.action_mask, R, False, left=False) for p in parts]),
        finished=torch.cat([p.finished for p in parts]),
        prompts=[t for p in parts for t in p.prompts],
        responses=[t for p in parts for t in p.responses],
        logprobs=(None if any(p.logprobs is None for p in parts)
                  else torch.cat([_pad_to(p.logprobs, R, 0.0, left=False) for p in parts])),
    )


@dataclass
class Experience:
    """One iteration's samples and everything the PPO update needs about them.

    The G samples of a prompt are contiguous (rows g*G .. g*G+G-1), which the
    group estimators (GRPO, RLOO) rely on. Fields filled later in the iteration
    are None until their phase has run.
    """

    sequences: torch.Tensor  # (B, S) long: prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # (B, S) long: 1 on prompt and response tokens
    action_mask: torch.Tensor  # (B, R) bool: 1 on generated tokens up to and including EOS
    finished: Optional[torch.Tensor] = None  # (B,) bool: the response ended with EOS
    prompts: list[str] = field(default_factory=list)  # (B,) rendered prompts
    responses: list[str] = field(default_factory=list)  # (B,) decoded responses
    extras: dict[str, list] = field(default_factory=dict)  # other prompt-file columns, (B,) each
    old_logp: Optional[torch.Tensor] = None  # (B, R) float32: policy that sampled
    ref_logp: Optional[torch.Tensor] = None  # (B, R) float32: frozen reference
    values: Optional[torch.Tensor] = None  # (B, R) float32: critic at rollout time (PPO only)
    scores: Optional[torch.Tensor] = None  # (B,) float32: reward model or reward function
    kl: Optional[torch.Tensor] = None  # (B, R) float32: per-token KL estimate, 0 off the mask
    rewards: Optional[torch.Tensor] = None  # (B, R) float32: -kl_coef * kl, plus the score at the last token
    advantages: Optional[torch.Tensor] = None  # (B, R) float32, 0 off the mask
    returns: Optional[torch.Tensor] = None  # (B, R) float32: critic targets (PPO only)

    @classmethod
    def from_rollout(cls, r: Rollout, extras: Optional[dict[str, list]] = None) -> "Experience":
        return cls(sequences=torch.cat([r.prompt_ids, r.response_ids], dim=1),
                   attention_mask=torch.cat([r.prompt_mask, r.action_mask.long()], dim=1),
                   action_mask=r.action_mask.bool(), finished=r.finished.bool(), prompts=list(r.prompts),
                   responses=list(r.responses), extras=dict(extras or {}), old_logp=r.logprobs)

    @property
    def batch_size(self) -> int:
        return self.sequences.size(0)

    @property
    def num_actions(self) -> int:
        return self.action_mask.size(1)

    def response_lengths(self) -> torch.Tensor:
        """(B,) generated tokens per sample, EOS included."""
        return self.action_mask.sum(dim=-1)

    def _map(self, tensor_fn, list_fn) -> "Experience":
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = tensor_fn(v)
            elif isinstance(v, list):
                out[f.name] = list_fn(v)
            elif isinstance(v, dict):
                out[f.name] = {k: list_fn(col) for k, col in v.items()}
            else:
                out[f.name] = v
        return Experience(**out)

    def select(self, index) -> "Experience":
        """Rows `index` (a slice, or a 1-D tensor/list of row numbers) of every field."""
        if isinstance(index, slice):
            return self._map(lambda t: t[index], lambda xs: xs[index])
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        return self._map(lambda t: t[idx], lambda xs: [xs[i] for i in rows] if xs else xs)

    def split(self, n_parts: int) -> list["Experience"]:
        """n_parts contiguous shards of equal size (the caller checks divisibility)."""
        size = self.batch_size // n_parts
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(n_parts)]

    def chunks(self, size: int) -> list["Experience"]:
        return [self.select(slice(i, i + size)) for i in range(0, self.batch_size, size)]

    def trimmed(self) -> "Experience":
        """The same rows without the columns that are padding in all of them: prompt columns on the left, response
        columns on the right. Positions count real tokens only, so every log-prob and value stays the same."""
        P = self.sequences.size(1) - self.num_actions
        prompt_cols = self.attention_mask[:, :P].any(dim=0).nonzero()
        first = int(prompt_cols[0]) if len(prompt_cols) else P
        response_cols = self.action_mask.any(dim=0).nonzero()
        R = int(response_cols[-1]) + 1 if len(response_cols) else 1
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() == 2:
                out[f.name] = v[:, first:P + R] if f.name in ("sequences", "attention_mask") else v[:, :R]
            else:
                out[f.name] = v
        return Experience(**out)

    def by_length(self) -> torch.Tensor:
        """(B,) row order, shortest response first (then shortest prompt): micro-batches of neighbours in this order
        carry little padding once trimmed."""
        response = self.action_mask.sum(dim=-1).long()
        prompt = self.attention_mask.sum(dim=-1).long() - response
        return torch.argsort(response * (self.sequences.size(1) + 1) + prompt, stable=True)

    def to(self, device) -> "Experience":
        return self._map(lambda t: t.to(device), lambda xs: xs)

    def cpu(self) -> "Experience":
        return self._map(lambda t: t.detach().cpu(), lambda xs: xs)

    def without_text(self) -> "Experience":
        """Tensors only: what the model workers need (saves pickling the texts for every group)."""
        return dataclasses.replace(self, prompts=[], responses=[], extras={})

    @staticmethod
    def concat(parts: list["Experience"]) -> "Experience":
        """Row-wise concatenation of shards that share P and R (split() output, in order)."""
        first = parts[0]
        out = {}
        for f in dataclasses.fields(first):
            vals = [getattr(p, f.name) for p in parts]
            if isinstance(vals[0], torch.Tensor):
                out[f.name] = torch.cat(vals)
            elif isinstance(vals[0], list):
                out[f.name] = [x for v in vals for x in v]
            elif isinstance(vals[0], dict):
                out[f.name] = {k: [x for v in vals for x in v[k]] for k in vals[0]}
            else:
                out[f.name] = None
        return Experience(**out)
