"""Tokenisation with the tokenizer's chat template and assistant-only labels.

Labels are found from the rendered text, not from template-specific markers:
each assistant turn spans from the end of the conversation rendered up to it
(with the generation prompt) to the end of the conversation rendered through it.
That works for any prefix-stable template (Llama, Qwen, Mistral, ChatML, ...),
including those without `{% generation %}` blocks. Each assistant span ends
with EOS: the template's own end-of-turn token when it is the EOS, otherwise
EOS is inserted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ftdist.algos.sft import IGNORE_INDEX
from ftdist.data.formats import SFT_NORMALIZERS, RowProblem, detect_format
from ftdist.data.loading import (DataError, RowError, load_rows, resolve_data_path, row_filter, source_digest,
                                 split_of)



@dataclass
class EncodeStats:
    rows: int = 0
    skipped: int = 0
    truncated: int = 0
    no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    filtered: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.rows} rows, {self.tokens} tokens ({self.target_tokens} trained on)"
        if self.filtered:
            s += f"; {self.filtered} left out by data.filter"
        if self.truncated:
            s += f"; {self.truncated} truncated to data.max_length"
        if self.skipped:
            s += f"; {self.skipped} malformed rows skipped"
        if self.no_target:
            s += f"; {self.no_target} rows dropped with no target tokens left"
        return s


def _assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise RowProblem("the tokenizer's chat template is not prefix-stable; cannot locate assistant turns "
                             "(use data.train_on_prompt=true or a different template)")
        spans.append((len(before), len(through)))
    return full, spans


def encode_messages(tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool = False):
    """-> (input_ids, labels, truncated). Labels are IGNORE_INDEX outside assistant turns."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template (a base model?): set data.chat_template (chatml, llama3, "
                        "llama2, mistral, zephyr, or a Jinja file) or model.tokenizer, or use data.format=text")
    text, spans = _assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    eos = tokenizer.eos_token_id
    out_ids, labels = [], []
    span_idx = 0
    for tok, (start, end) in zip(ids, offsets):
        while span_idx < len(spans) and start >= spans[span_idx][1]:
            span_idx += 1
        in_span = span_idx < len(spans) and spans[span_idx][0] <= start < spans[span_idx][1]
        out_ids.append(tok)
        labels.append(tok if (in_span or train_on_prompt) else IGNORE_INDEX)
    _close_turns_with_eos(text, out_ids, labels, offsets, spans, eos, train_on_prompt)
    truncated = len(out_ids) > max_length
    return out_ids[:max_length], labels[:max_length], truncated


def _close_turns_with_eos(text: str, ids: list[int], labels: list[int], offsets, spans, eos: int,
                          train_on_prompt: bool) -> None:
    """Each assistant turn ends with exactly one trained EOS; template whitespace after it is not trained."""
    for s, e in reversed(spans):  # reversed: inserting keeps earlier indices valid
        end = next((j for j, (a, _) in enumerate(offsets) if a >= e), len(offsets))
        k = end - 1
        while k >= 0 and offsets[k][0] >= s and ids[k] != eos and not text[offsets[k][0]:offsets[k][1]].strip():
            k -= 1
        if not (k >= 0 and offsets[k][0] >= s and ids[k] == eos):
            # the template does not close the turn with EOS: insert one after the content
            k += 1
            ids.insert(k, eos)
            labels.insert(k, eos)
            end += 1
        if not train_on_prompt:
            for t in range(k + 1, end):
                labels[t] = IGNORE_INDEX


def encode_text(tokenizer, text: str, max_length: int):
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    return ids, list(ids), truncated


def encode_sft_row(tokenizer, row: dict, max_length: int, train_on_prompt: bool):
    if "messages" in row:
        return encode_messages(tokenizer, row["messages"], max_length, train_on_prompt)
    return encode_text(tokenizer, row["text"], max_length)


def source_settings(spec: str, data_cfg) -> dict:
    """Which rows of a source are read, beyond its content: keys only when they differ from the defaults (so
    the cache keys of plain files stay as they were)."""
    out = {}
    split = split_of(spec, data_cfg)
    if split != ("train" if spec == data_cfg.train else "test"):
        out["split"] = split
    for key, default in (("subset", None), ("revision", None), ("max_samples", 0), ("shuffle_seed", None),
                         ("filter", [])):
        if getattr(data_cfg, key) != default:
            out[key] = getattr(data_cfg, key)
    return out


def _fingerprint(spec: str, tokenizer, settings: dict, data_cfg=None) -> str:
    """The tokenised cache's key: the data's content (not its file times), the settings and the tokenizer itself
    (its full definition where the tokenizer can write it out, so a changed vocabulary or merges miss the cache)."""
    h = hashlib.sha256()
    h.update(source_digest(spec, data_cfg).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(str(len(tokenizer)).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else str(getattr(tokenizer, "name_or_path", "")).encode())
    return h.hexdigest()[:16]


def tokenize_sft(spec: str, tokenizer, data_cfg, cache_dir: str | None, show_progress: bool = False):
    """Tokenise a data file once; the result is cached under cache_dir and reused by every rank and restart.

    Returns (datasets.Dataset with input_ids/labels, EncodeStats).
    """
    import datasets

    path = resolve_data_path(spec)
    settings = {"max_length": data_cfg.max_length, "train_on_prompt": data_cfg.train_on_prompt,
                "format": data_cfg.format, "columns": data_cfg.columns, "on_error": data_cfg.on_error, "v": 1,
                **source_settings(spec, data_cfg)}
    cache_path = None
    if cache_dir:
        cache_path = Path(cache_dir) / f"sft-{Path(path).stem}-{_fingerprint(spec, tokenizer, settings, data_cfg)}"
        if (cache_path / "stats.json").exists():
            stats = EncodeStats(**json.loads((cache_path / "stats.json").read_text()))
            return datasets.load_from_disk(str(cache_path / "data")), stats

    rows = load_rows(spec, data_cfg)
    mapping = data_cfg.columns
    fmt = data_cfg.format
    if fmt == "auto":
        try:
            fmt = detect_format(rows.column_names, mapping)
        except RowProblem as e:
            raise DataError(f"{path}: {e}") from None
    if fmt not in SFT_NORMALIZERS:
        raise DataError(f"{path}: data.format={fmt!r} is not an SFT format (use messages, alpaca or text)")
    normalize = SFT_NORMALIZERS[fmt]
    stats = EncodeStats()
    input_ids, labels = [], []
    it = enumerate(rows)
    if show_progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(rows), desc=f"tokenising {Path(path).name}", unit="row")
    keep = row_filter(data_cfg.filter, rows.column_names, path)
    for i, row in it:
        if keep is not None and not keep(row, i):
            stats.filtered += 1
            continue
        try:
            ids, lab, truncated = encode_sft_row(tokenizer, normalize(row, mapping), data_cfg.max_length,
                                                 data_cfg.train_on_prompt)
        except RowProblem as e:
            if data_cfg.on_error == "skip":
                stats.skipped += 1
                if len(stats.skipped_examples) < 5:
                    stats.skipped_examples.append(f"row {i + 1}: {e}")
                continue
            raise RowError(path, i + 1, str(e)) from None
        n_target = sum(1 for t in lab[1:] if t != IGNORE_INDEX)
        if n_target == 0:
            stats.no_target += 1
            continue
        stats.rows += 1
        stats.truncated += int(truncated)
        stats.tokens += len(ids)
        stats.target_tokens += n_target
        input_ids.append(ids)
        labels.append(lab)
    if not input_ids:
        raise DataError(f"{path}: no usable rows ({stats.summary()})")
    ds = datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    if cache_path is not None:
        _save_atomically(ds, stats, cache_path)
    return ds, stats


def _save_atomically(ds, stats: EncodeStats, cache_path: Path) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_path.parent, prefix=".tmp-"))
    ds.save_to_disk(str(tmp / "data"))
    (tmp / "stats.json").write_text(json.dumps(stats.__dict__))
    try:
        os.rename(tmp, cache_path)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
