"""The one generate call: left-padded prompts, one response each, greedy or sampled, stopping at EOS.

Used by evaluation (greedy answers for exact match) and by the PPO policy (rollouts).
"""

from __future__ import annotations

from typing import Optional

import torch


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: Optional[int] = None) -> dict:
    """input_ids, attention_mask (B, P) on the CPU: left-padded and, with max_prompt_tokens, cut from the left."""
    side = (tokenizer.padding_side, tokenizer.truncation_side)
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # keep the end of a long prompt, next to the response
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                         truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side


@torch.no_grad()
def generate(module, tokenizer, prompts: list[str], *, max_new_tokens: int, device, synced_gpus: bool = False,
             max_prompt_tokens: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             min_new_tokens: int = 0, streamer=None) -> tuple[dict, torch.Tensor]:
    """Returns (the encoded prompts: input_ids, attention_mask (B, P) on the CPU, left-padded and, with
    max_prompt_tokens, cut from the left; the response ids (B, R) on the device, padded after EOS).

    synced_gpus: every rank keeps stepping until all are done (ZeRO-3 gathers weights in every forward).
    streamer: a transformers streamer that receives the tokens as they are generated (`ftdist chat`).
    """
    enc = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    sampling = {"do_sample": False}
    if do_sample:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    if repetition_penalty != 1.0:
        sampling["repetition_penalty"] = repetition_penalty
    if min_new_tokens:
        sampling["min_new_tokens"] = min_new_tokens
    was_training = module.training
    module.eval()
    try:
        out = module.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                              max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id,
                              use_cache=True,  # off in training when gradient checkpointing is on
                              synced_gpus=synced_gpus, streamer=streamer, **sampling)
    finally:
        module.train(was_training)
    return enc, out[:, enc["input_ids"].size(1):]
