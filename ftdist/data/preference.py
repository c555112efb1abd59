"""Preference pairs: tokenisation (as TRL's DPOTrainer does it), caching, and the padded pair batch.

A pair is stored as prompt_ids, chosen_ids and rejected_ids, where the
responses are what follows the prompt in the tokenised prompt+response. For
chats the prompt is rendered with the generation prompt and each full
conversation separately, and the response starts where the two token lists
diverge (TRL's `common_prefix_length`), so templates that render a prompt
differently on its own still give the sequence the model actually sees. A
reward model scores prompt+chosen and prompt+rejected; DPO trains on the
response tokens only.

Truncation: the prompt keeps its last `data.max_prompt_length` tokens (the
question usually sits at the end), then prompt+response keeps its first
`data.max_length` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ftdist.data.formats import RowProblem
from ftdist.data.mixture import list_lengths
from ftdist.data.loading import DataError, RowError, load_rows, resolve_data_path, row_filter
from ftdist.data.preference_rows import PreferencePair, filter_reason, normalize_preference
from ftdist.algos.sft import IGNORE_INDEX, per_sequence_sum
from ftdist.data.parallel import Dropped
from ftdist.data.templates import render_chat, template_label
from ftdist.data.tokenize import _fingerprint, build_cached, column_sum, load_cached, row_format, source_settings


@dataclass
class PreferenceStats:
    rows: int = 0
    skipped: int = 0
    truncated: int = 0
    ties: int = 0
    low_score: int = 0
    tokens: int = 0
    filtered: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.rows} pairs, {self.tokens} tokens"
        if self.filtered:
            s += f"; {self.filtered} left out by data.filter"
        if self.truncated:
            s += f"; {self.truncated} truncated to data.max_prompt_length/data.max_length"
        if self.ties:
            s += f"; {self.ties} ties dropped (data.drop_ties)"
        if self.low_score:
            s += f"; {self.low_score} dropped below data.min_chosen_score"
        if self.skipped:
            s += f"; {self.skipped} malformed rows skipped"
        if self.skipped_examples:
            s += " (e.g. " + "; ".join(self.skipped_examples[:3]) + ")"
        return s


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(tokenizer, value, template: Optional[str] = None, **kw) -> list[int]:
    if isinstance(value, list):
        return list(render_chat(tokenizer, value, template, tokenize=True, return_dict=True, **kw)["input_ids"])
    return list(tokenizer(value)["input_ids"])


def encode_pair(tokenizer, pair: PreferencePair, max_prompt_length: int, max_length: int,
                template: Optional[str] = None):
    """-> (prompt_ids, chosen_ids, rejected_ids, truncated); `template` names the chat template in errors."""
    if pair.conversational:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("the tokenizer has no chat template; preference data with message lists needs one: set "
                            "data.chat_template (chatml, llama3, llama2, mistral, zephyr, or a Jinja file) or "
                            "model.tokenizer")
        prompt = _ids(tokenizer, pair.prompt, template, add_generation_prompt=True)
        full = [_ids(tokenizer, pair.prompt + r, template) for r in (pair.chosen, pair.rejected)]
    else:
        eos = tokenizer.eos_token or ""
        prompt = _ids(tokenizer, pair.prompt)
        full = [_ids(tokenizer, pair.prompt + (r if r.endswith(eos) else r + eos)) for r in (pair.chosen, pair.rejected)]
    n = min(_common_prefix(prompt, f) for f in full)
    prompt, responses = prompt[:n], [f[n:] for f in full]
    if not all(responses):
        raise RowProblem("a response has no tokens of its own after tokenisation")
    # every response keeps at least one token, also with max_prompt_length == max_length (as TRL allows)
    keep = min(max_prompt_length, max_length - 1)
    truncated = len(prompt) > keep
    prompt = prompt[-keep:]
    room = max_length - len(prompt)
    truncated = truncated or any(len(r) > room for r in responses)
    return prompt, responses[0][:room], responses[1][:room], truncated


def load_preference_pairs(spec: str, data_cfg, on_row=None):
    """Yield (row number, PreferencePair) for every usable row; on_row(kind, row, message) sees the others."""
    path = resolve_data_path(spec)
    rows = load_rows(spec, data_cfg)
    mapping = data_cfg.columns
    fmt = row_format(rows, data_cfg, path)
    if fmt != "preference":
        raise DataError(f"{path}: preference stages need data.format=preference (chosen/rejected columns), "
                        f"the file looks like {fmt!r}; map its columns with data.columns")
    keep = row_filter(data_cfg.filter, rows.column_names, path)
    for i, row in enumerate(rows):
        if keep is not None and not keep(row, i):
            if on_row is not None:
                on_row("filtered", i + 1, "")
            continue
        try:
            pair = normalize_preference(row, mapping)
            reason = filter_reason(pair, data_cfg.drop_ties, data_cfg.min_chosen_score)
        except RowProblem as e:
            if data_cfg.on_error == "skip" and on_row is not None:
                on_row("skipped", i + 1, str(e))
                continue
            raise RowError(path, i + 1, str(e)) from None
        if reason is not None:
            if on_row is not None:
                on_row(reason, i + 1, "")
            continue
        yield i + 1, pair


class _PairEncoder:
    """One preference row -> prompt/chosen/rejected token ids (run in tokenising worker processes: picklable)."""

    empty = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "score_chosen": math.nan,
             "score_rejected": math.nan, "margin": math.nan, "truncated": False, "n_tokens": 0}

    def __init__(self, tokenizer, data_cfg, keep, path: str):
        self.tokenizer, self.keep, self.path, self.mapping = tokenizer, keep, path, data_cfg.columns
        self.max_prompt_length, self.max_length = data_cfg.max_prompt_length, data_cfg.max_length
        self.drop_ties, self.min_chosen_score = data_cfg.drop_ties, data_cfg.min_chosen_score
        self.on_error = data_cfg.on_error
        self.template = template_label(data_cfg.chat_template, tokenizer)

    @staticmethod
    def features():
        import datasets

        ids = datasets.Sequence(datasets.Value("int32"))
        return datasets.Features({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids,
                                  **{k: datasets.Value("float64") for k in ("score_chosen", "score_rejected", "margin")},
                                  "truncated": datasets.Value("bool"), "n_tokens": datasets.Value("int64"),
                                  "drop": datasets.Value("string"), "note": datasets.Value("string")})

    def encode_many(self, rows: list[dict], indices: list[int]) -> list:
        return [self._encode(row, index) for row, index in zip(rows, indices)]

    def _encode(self, row: dict, index: int):
        if self.keep is not None and not self.keep(row, index):
            return Dropped("filtered")
        try:
            pair = normalize_preference(row, self.mapping)
            reason = filter_reason(pair, self.drop_ties, self.min_chosen_score)
            if reason is not None:
                return Dropped(reason)
            prompt, chosen, rejected, truncated = encode_pair(self.tokenizer, pair, self.max_prompt_length,
                                                              self.max_length, self.template)
        except RowProblem as e:
            if self.on_error == "skip":
                return Dropped("skipped", f"row {index + 1}: {e}")
            raise RowError(self.path, index + 1, str(e)) from None
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
                **{k: (math.nan if getattr(pair, k) is None else getattr(pair, k))
                   for k in ("score_chosen", "score_rejected", "margin")},
                "truncated": truncated, "n_tokens": 2 * len(prompt) + len(chosen) + len(rejected)}


def tokenize_preference(spec: str, tokenizer, data_cfg, cache_dir: Optional[str], show_progress: bool = False):
    """Tokenise a preference source once (cached, and in data.num_proc processes, like SFT data).
    -> (datasets.Dataset, PreferenceStats, cache key)."""
    path = resolve_data_path(spec)
    settings = {k: getattr(data_cfg, k) for k in ("max_length", "max_prompt_length", "format", "columns",
                                                     "on_error", "drop_ties", "min_chosen_score")}
    settings.update(source_settings(spec, data_cfg))
    key = f"pref-{Path(path).stem}-{_fingerprint(spec, tokenizer, {**settings, 'v': 1}, data_cfg)}"
    cache_path = Path(cache_dir) / key if cache_dir else None
    cached = load_cached(cache_path, PreferenceStats)
    if cached is not None:
        return (*cached, key)

    def make_encoder(rows):
        fmt = row_format(rows, data_cfg, path)
        if fmt != "preference":
            raise DataError(f"{path}: preference stages need data.format=preference (chosen/rejected columns), "
                            f"the file looks like {fmt!r}; map its columns with data.columns")
        return _PairEncoder(tokenizer, data_cfg, row_filter(data_cfg.filter, rows.column_names, path), path)

    def finish(encoded, kept, drops, notes) -> PreferenceStats:
        stats = PreferenceStats(rows=len(kept), skipped=drops.get("skipped", 0), ties=drops.get("ties", 0),
                                low_score=drops.get("low_score", 0), filtered=drops.get("filtered", 0),
                                truncated=column_sum(encoded, "truncated"), tokens=column_sum(encoded, "n_tokens"),
                                skipped_examples=[note for _, note in notes[:5]])
        if not kept:
            raise DataError(f"{path}: no usable preference pairs ({stats.summary()})")
        return stats

    ds, stats = build_cached(spec, data_cfg, cache_path, key, make_encoder, finish,
                             ["prompt_ids", "chosen_ids", "rejected_ids", "score_chosen", "score_rejected", "margin"],
                             f"tokenising {Path(path).name}" if show_progress else None)
    return ds, stats, key


def pair_tokens(ds):
    """Tokens of each tokenised pair, both sequences (the prompt twice and both responses): what PreferenceStats
    counts and what a pair adds to a packed micro-batch."""
    return 2 * list_lengths(ds, "prompt_ids") + list_lengths(ds, "chosen_ids") + list_lengths(ds, "rejected_ids")


class PreferenceData:
    """Random access to tokenised pairs; `lengths` (prompt + longer response: padded rows) or `pair_tokens`
    (both sequences: packed) drive the step planner."""

    def __init__(self, ds, key: str = ""):
        self.key = key
        self.ds = ds.with_format("numpy")
        prompt, chosen, rejected = (list_lengths(ds, c) for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
        self.lengths = (prompt + np.maximum(chosen, rejected)).tolist()  # a padded row's length
        self.pair_tokens = pair_tokens(ds).tolist()  # both sequences' tokens, packed
        self.scores = torch.tensor([ds["score_chosen"], ds["score_rejected"], ds["margin"]],
                                   dtype=torch.float32).T  # (N, 3)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], list[int]]:
        """(prompt_ids, chosen_ids, rejected_ids) of pair i."""
        r = self.ds[int(i)]
        return r["prompt_ids"].tolist(), r["chosen_ids"].tolist(), r["rejected_ids"].tolist()

    def has(self, column: str) -> bool:
        """True when every pair has a value for score_chosen, score_rejected or margin."""
        col = ("score_chosen", "score_rejected", "margin").index(column)
        return not bool(self.scores[:, col].isnan().any())


@dataclass
class PreferenceBatch:
    """B pairs in one batch: chosen sequences first, then the rejected sequences in the same order.

    Padded (seq_ids None): 2B rows, row b and row B + b the two responses to the same prompt, so one forward
    scores both and `.chunk(2)` splits any (2B, ...) result into chosen and rejected.
    Packed (data.packing): one row holding the 2B sequences end to end, in the same order, numbered 1..2B by
    `seq_ids`, positions restarting at 0 for each; per-sequence results (sequence log-probs, rewards) come out
    as (2B,) in that order, so `.chunk(2)` splits them the same way. Attention stays within each sequence
    (models/forward.py) and no token is padding.
    """

    input_ids: torch.Tensor  # (R, T) long, prompt + response, padded with pad_id (R = 2B padded, 1 packed)
    labels: torch.Tensor  # (R, T) long, the response tokens; IGNORE_INDEX on prompt and padding
    attention_mask: torch.Tensor  # (R, T) long, 1 = real token
    position_ids: torch.Tensor  # (R, T) long, 0 at each sequence's first token
    score_chosen: torch.Tensor  # (B,) float32, NaN where the data has no score
    score_rejected: torch.Tensor  # (B,) float32, NaN where the data has no score
    margin: torch.Tensor  # (B,) float32, NaN where the data has no margin column
    index: torch.Tensor  # (B,) long, pair numbers in their split (for precomputed reference log-probs)
    split: str = "train"
    seq_ids: Optional[torch.Tensor] = None  # (1, T) long when packed: sequence number 1..2B of each token

    @property
    def n_pairs(self) -> int:
        return self.index.numel()

    @property
    def n_seqs(self) -> int:
        return 2 * self.n_pairs

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_padded(self) -> int:
        return self.input_ids.numel()

    @property
    def response_lengths(self) -> torch.Tensor:
        """(2B,) long: target tokens per sequence (the causal shift drops each row's column 0)."""
        targets = self.labels[:, 1:] != IGNORE_INDEX
        if self.seq_ids is None:
            return targets.sum(-1)
        return per_sequence_sum(targets.long(), self.seq_ids[:, 1:], self.n_seqs)

    def chosen_text_mask(self) -> torch.Tensor:
        """(R, T) bool: the tokens of the chosen sequences (prompt and response) but each one's first token,
        which nothing before it predicts: ORPO's SFT term in TRL's form."""
        if self.seq_ids is None:
            rows = torch.arange(self.input_ids.shape[0], device=self.input_ids.device)[:, None] < self.n_pairs
            chosen = rows & (self.attention_mask == 1)
        else:
            chosen = (self.seq_ids > 0) & (self.seq_ids <= self.n_pairs)
        return chosen & (self.position_ids > 0)

    def to(self, device) -> "PreferenceBatch":
        return PreferenceBatch(**{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                                  for k, v in self.__dict__.items()})


def collate_pairs(indices: list[int], data: PreferenceData, pad_id: int, split: str = "train",
                  padding_side: str = "right", packed: bool = False) -> PreferenceBatch:
    pairs = [data[i] for i in indices]
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]  # chosen rows, then rejected rows
    scores = data.scores[indices]  # (B, 3)
    tail = (scores[:, 0].clone(), scores[:, 1].clone(), scores[:, 2].clone(), torch.tensor(indices, dtype=torch.long),
            split)
    if packed:
        ids, labels, positions, seq_ids = [], [], [], []
        for k, (prompt, response) in enumerate(seqs):
            n = len(prompt) + len(response)
            ids += prompt + response
            # a sequence's first token is never a target: nothing of its own comes before it
            labels += [IGNORE_INDEX] * max(len(prompt), 1) + response[1 if not prompt else 0:]
            positions += range(n)
            seq_ids += [k + 1] * n
        row = [torch.tensor([x], dtype=torch.long) for x in (ids, labels, positions, seq_ids)]
        return PreferenceBatch(row[0], row[1], torch.ones_like(row[0]), row[2], *tail, seq_ids=row[3])
    T = max(len(p) + len(r) for p, r in seqs)
    rows = len(seqs)
    input_ids = torch.full((rows, T), pad_id, dtype=torch.long)
    labels = torch.full((rows, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, T), dtype=torch.long)
    position_ids = torch.zeros((rows, T), dtype=torch.long)
    for b, (prompt, response) in enumerate(seqs):
        n = len(prompt) + len(response)
        start = 0 if padding_side == "right" else T - n
        input_ids[b, start:start + n] = torch.tensor(prompt + response)
        labels[b, start + len(prompt):start + n] = torch.tensor(response)
        attention_mask[b, start:start + n] = 1
        position_ids[b, start:start + n] = torch.arange(n)
    return PreferenceBatch(input_ids, labels, attention_mask, position_ids, *tail)
