"""Greedy answers to held-out prompts and their exact-match accuracy (collective across ranks)."""

from __future__ import annotations

import torch

from ftdist.data.formats import SFT_NORMALIZERS, RowProblem, detect_format
from ftdist.data.loading import load_rows
from ftdist.engine.dist import all_reduce_sum


def load_eval_conversations(spec: str, data_cfg, max_samples: int) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) for rows whose last turn is the assistant's."""
    rows = load_rows(spec)
    fmt = data_cfg.format if data_cfg.format != "auto" else detect_format(rows.column_names, data_cfg.columns)
    if fmt not in ("messages", "alpaca"):
        return []
    out = []
    for row in rows:
        try:
            msgs = SFT_NORMALIZERS[fmt](row, data_cfg.columns)["messages"]
        except RowProblem:
            continue
        if msgs[-1]["role"] == "assistant":
            out.append((msgs[:-1], msgs[-1]["content"]))
        if len(out) >= max_samples:
            break
    return out


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def generate(engine, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, **sampling) -> list[str]:
    """Left-padded batched generation; every rank must call it with the same number of batches under ZeRO-3."""
    model = engine.module
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs = []
    synced = engine.zero_stage == 3 and engine.info.world_size > 1
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(engine.device) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=bool(sampling.get("do_sample")),
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced, **{k: v for k, v in sampling.items() if k != "do_sample"})
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def exact_match_accuracy(engine, tokenizer, convs, max_new_tokens: int, batch_size: int) -> float:
    if not convs:
        return float("nan")
    info = engine.info
    # every rank runs the same number of generate calls (ZeRO-3 gathers weights collectively)
    per_rank = -(-len(convs) // info.world_size)
    mine = [convs[(info.rank + k * info.world_size) % len(convs)] for k in range(per_rank)]
    valid = [info.rank + k * info.world_size < len(convs) for k in range(per_rank)]
    prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _ in mine]
    answers = generate(engine, tokenizer, prompts, max_new_tokens, batch_size)
    correct = sum(int(v and normalise_answer(a) == normalise_answer(ref)) for v, a, (_, ref) in zip(valid, answers, mine))
    total = sum(valid)
    correct, total = all_reduce_sum([correct, total], engine.device)
    return correct / max(total, 1)
