"""Model forward on typed batches, with packed samples kept apart.

Packed rows carry `seq_ids`; attention must stay within a sample. With
flash-attention (and flex attention) the packed position_ids drive the varlen
kernel (block mask); for sdpa and
eager an explicit block-diagonal causal mask is passed, because models and
versions differ in whether they infer one from position_ids.

A block-diagonal mask still makes sdpa compute every (query, key) pair of the row
and then throw most of them away: a 1024-token row of four samples does 2-3x the
attention work of the samples alone (measured on CPU). Models loaded with sdpa
therefore run `segment_sdpa`, which, given each packed sample's span, calls sdpa
once per sample with the causal kernel: the CPU and no-flash-attn analogue of
flash-attention's varlen path. Without spans (unpacked batches, generation) it is
plain sdpa; a model that is not switched to it ignores the spans and uses the mask.
"""

from __future__ import annotations

import torch

SEGMENT_SDPA = "ftdist_segment_sdpa"  # registered with transformers' AttentionInterface


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
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids,
              "attention_mask": packed_attention_mask(batch.seq_ids, attn_impl, dtype)}
    if attn_impl == "sdpa":
        inputs["packed_spans"] = packed_spans(batch.seq_ids)
    return inputs


def packed_spans(seq_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(B, T) sample ids (0 = padding) -> per row, the [start, end) of each packed sample."""
    out = []
    for row in seq_ids.tolist():
        spans, start = [], 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                if row[start] > 0:
                    spans.append((start, t))
                start = t
        out.append(spans)
    return out


def segment_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                 packed_spans=None, **kwargs):
    """transformers attention function: sdpa within each packed sample when spans are given.

    query (B, H, T, D), key/value (B, KV, T, D) -> ((B, T, H, D), None). Padding positions get
    zeros: no real token attends to them, and their labels are ignored.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_spans is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, H, T, D = query.shape
    gqa = key.shape[1] != H
    rows = []
    for b, spans in enumerate(packed_spans):
        parts, pos = [], 0
        for start, end in spans:
            if start > pos:
                parts.append(query.new_zeros(1, H, start - pos, D))
            parts.append(torch.nn.functional.scaled_dot_product_attention(
                query[b:b + 1, :, start:end], key[b:b + 1, :, start:end], value[b:b + 1, :, start:end],
                dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa))
            pos = end
        if pos < T:
            parts.append(query.new_zeros(1, H, T - pos, D))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def segment_sdpa_kernel() -> str:
    """Adds `segment_sdpa` to transformers' attention registry under its own name (it replaces no kernel) and
    returns that name, to load a model with: from_pretrained(..., attn_implementation=segment_sdpa_kernel())."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa)
    AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)
    return SEGMENT_SDPA


def use_segment_sdpa(model) -> None:
    """Switch an already built sdpa model to `segment_sdpa` (same masks, same results)."""
    model.set_attn_implementation(segment_sdpa_kernel())


def causal_logits(model, batch, attn_impl: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, V) logits."""
    out = model(**model_inputs(batch, attn_impl, dtype), use_cache=False)
    return out.logits
