"""Greedy answers to held-out prompts and their exact-match accuracy (collective across ranks)."""

from __future__ import annotations

import torch

from ftdist.data.answers import exact_match
from ftdist.data.formats import SFT_NORMALIZERS, RowProblem, detect_format
from ftdist.data.loading import DataError, load_rows
from ftdist.data.templates import render_chat
from ftdist.engine.dist import all_reduce_sum, rank_batches
from ftdist.models.generate import generate as generate_ids


def load_eval_conversations(spec: str, data_cfg, max_samples: int) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) for rows whose last turn is the assistant's."""
    rows = load_rows(spec, data_cfg)
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


@torch.no_grad()
def generate(engine, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers in batches; collective under ZeRO-3 (every rank calls it with the same number of batches)."""
    synced = engine.zero_stage == 3 and engine.info.world_size > 1
    outs = []
    for i in range(0, len(prompts), batch_size):
        _, response = generate_ids(engine.module, tokenizer, prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                                   device=engine.device, synced_gpus=synced)
        outs += tokenizer.batch_decode(response, skip_special_tokens=True)
    return outs


def exact_match_accuracy(engine, tokenizer, convs, max_new_tokens: int, batch_size: int,
                         template: str | None = None) -> float:
    """Share of conversations whose greedy answer matches the reference (all ranks, each its share). `template`
    names the chat template in errors (templates.template_label)."""
    if not convs:
        return float("nan")
    # every rank renders every prompt: a conversation the template refuses stops all ranks alike, in one line
    try:
        texts = [render_chat(tokenizer, m, template, tokenize=False, add_generation_prompt=True) for m, _ in convs]
    except RowProblem as e:
        raise DataError(f"data.eval: a prompt for the exact-match accuracy: {e}") from None
    correct = total = 0
    for chunk in rank_batches(len(convs), batch_size, engine.info):
        # an empty share still generates (collective under ZeRO-3), and is not counted
        index = chunk or [0]
        batch = [convs[i] for i in index]
        answers = generate(engine, tokenizer, [texts[i] for i in index], max_new_tokens, batch_size)
        if chunk:
            correct += sum(exact_match(a, ref) for a, (_, ref) in zip(answers, batch))
            total += len(chunk)
    correct, total = all_reduce_sum([correct, total], engine.device)
    return correct / max(total, 1)
