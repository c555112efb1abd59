"""Model forward on typed batches, with packed samples kept apart.

Packed rows carry `seq_ids`; attention must stay within a sample. With
flash-attention (and flex attention) the packed position_ids drive the varlen
kernel (block mask); for sdpa and
eager an explicit block-diagonal causal mask is passed, because models and
versions differ in whether they infer one from position_ids.
"""

from __future__ import annotations

import torch


def packed_attention_mask(seq_ids: torch.Tensor, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) sample ids (0 = padding) -> (B, 1, T, T) mask: causal and within one sample."""
    B, T = seq_ids.shape
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    allowed = same & causal & (seq_ids[:, :, None] > 0)
    # padding queries attend to themselves only: a fully masked row would give NaN in softmax
    allowed |= torch.eye(T, dtype=torch.bool, device=seq_ids.device)
    allowed = allowed[:, None]
    if attn_impl == "sdpa":
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def model_inputs(batch, attn_impl: str, dtype: torch.dtype) -> dict:
    if batch.seq_ids is None:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "position_ids": batch.position_ids}
    if attn_impl in ("flash_attention_2", "flex_attention"):
        # transformers builds the varlen / block mask from the restarting position_ids
        return {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    return {"input_ids": batch.input_ids, "position_ids": batch.position_ids,
            "attention_mask": packed_attention_mask(batch.seq_ids, attn_impl, dtype)}


def causal_logits(model, batch, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, V) logits."""
    out = model(**model_inputs(batch, attn_impl, dtype), use_cache=False)
    return out.logits
