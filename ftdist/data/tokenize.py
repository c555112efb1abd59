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

import bisect
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ftdist.algos.sft import IGNORE_INDEX
from ftdist.data.formats import SFT_NORMALIZERS, RowProblem, detect_format
from ftdist.data.loading import (DataError, RowError, load_rows, resolve_data_path, row_filter, source_digest,
                                 split_of)
from ftdist.data.parallel import Dropped, drop_summary, encode_dataset
from ftdist.data.templates import render_chat, template_label

log = logging.getLogger("ftdist")


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


def _assistant_char_spans(tokenizer, messages: list[dict], template: str | None = None):
    """(the rendered conversation, the character span of each assistant turn); `template` names the template in
    errors (templates.template_label)."""
    full = render_chat(tokenizer, messages, template, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], template, tokenize=False, add_generation_prompt=True) if i else ""
        # the conversation through its last message is the whole conversation
        through = full if i == len(messages) - 1 else render_chat(tokenizer, messages[: i + 1], template,
                                                                  tokenize=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise RowProblem("the tokenizer's chat template is not prefix-stable; cannot locate assistant turns "
                             "(use data.train_on_prompt=true or a different template)")
        spans.append((len(before), len(through)))
    return full, spans


def require_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template (a base model?): set data.chat_template (chatml, llama3, "
                        "llama2, mistral, zephyr, or a Jinja file) or model.tokenizer, or use data.format=text")


def encode_messages(tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool = False):
    """-> (input_ids, labels, truncated). Labels are IGNORE_INDEX outside assistant turns."""
    require_chat_template(tokenizer)
    text, spans = _assistant_char_spans(tokenizer, messages)
    return _label_tokens(tokenizer, text, spans, *_ids_and_offsets(tokenizer, [text])[0], max_length, train_on_prompt)


def encode_messages_batch(tokenizer, conversations: list, max_length: int, train_on_prompt: bool = False,
                          template: str | None = None) -> list:
    """encode_messages for many conversations, tokenised in one call (the tokenizer's per-call overhead is a
    third of the time of one short conversation); an item is a RowProblem where its conversation has one."""
    require_chat_template(tokenizer)
    rendered = []
    for messages in conversations:
        try:
            rendered.append(_assistant_char_spans(tokenizer, messages, template))
        except RowProblem as e:
            rendered.append(e)
    ok = [r for r in rendered if not isinstance(r, RowProblem)]
    encoded = iter(_ids_and_offsets(tokenizer, [text for text, _ in ok]))
    return [r if isinstance(r, RowProblem) else _label_tokens(tokenizer, *r, *next(encoded), max_length,
                                                             train_on_prompt) for r in rendered]


def _ids_and_offsets(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, without special tokens added: from the fast tokenizer's
    backend in one call where there is one (what the tokenizer's own call returns, without its conversion to
    Python dicts: a fifth of the time)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    # the backend keeps the padding and truncation of the tokenizer's last padded call (e.g. left padding for
    # generation), which the tokenizer's own call resets: only a backend without them is called directly
    if backend is not None and backend.padding is None and backend.truncation is None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def _label_tokens(tokenizer, text: str, spans, ids, offsets, max_length: int, train_on_prompt: bool):
    """Labels: the tokens whose first character lies in an assistant span (all with train_on_prompt), each span
    closed with EOS; then truncation."""
    ids = list(ids)
    starts = [a for a, _ in offsets]
    if starts != sorted(starts):  # offsets out of order (not seen with fast tokenizers): one token at a time
        labels = [t if (train_on_prompt or any(s <= a < e for s, e in spans)) else IGNORE_INDEX
                  for t, a in zip(ids, starts)]
    elif train_on_prompt:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in spans:
            a, b = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
            labels[a:b] = ids[a:b]
    _close_turns_with_eos(text, ids, labels, starts, offsets, spans, tokenizer.eos_token_id, train_on_prompt)
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def _close_turns_with_eos(text: str, ids: list[int], labels: list[int], starts: list[int], offsets, spans,
                          eos: int, train_on_prompt: bool) -> None:
    """Each assistant turn ends with exactly one trained EOS; template whitespace after it is not trained."""
    ordered = starts == sorted(starts)
    for s, e in reversed(spans):  # reversed: inserting keeps earlier indices valid
        end = (bisect.bisect_left(starts, e) if ordered else
               next((j for j, a in enumerate(starts) if a >= e), len(starts)))
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


class _SFTEncoder:
    """One row -> input_ids/labels (run in tokenising worker processes: picklable)."""

    empty = {"input_ids": [], "labels": [], "truncated": False, "n_target": 0}

    def __init__(self, tokenizer, normalize, data_cfg, keep, path: str, template: str | None = None):
        self.tokenizer, self.normalize, self.keep, self.path = tokenizer, normalize, keep, path
        self.mapping, self.max_length = data_cfg.columns, data_cfg.max_length
        self.train_on_prompt, self.on_error = data_cfg.train_on_prompt, data_cfg.on_error
        self.template = template or template_label(data_cfg.chat_template, tokenizer)

    @staticmethod
    def features():
        import datasets

        return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "truncated": datasets.Value("bool"), "n_target": datasets.Value("int32"),
                                  "drop": datasets.Value("string"), "note": datasets.Value("string")})

    def encode_many(self, rows: list[dict], indices: list[int]) -> list:
        """Per row: its columns, or the Dropped that leaves it out. Conversations are tokenised in one call."""
        out: list = [None] * len(rows)
        chats = []  # (position, normalised row)
        for k, (row, index) in enumerate(zip(rows, indices)):
            if self.keep is not None and not self.keep(row, index):
                out[k] = Dropped("filtered")
                continue
            try:
                chats.append((k, self.normalize(row, self.mapping)))
            except RowProblem as e:
                out[k] = self._problem(e, index)
        convs = [(k, r) for k, r in chats if "messages" in r]
        # text rows need no chat template: only conversations are rendered with one
        encoded = dict(zip([k for k, _ in convs], encode_messages_batch(
            self.tokenizer, [r["messages"] for _, r in convs], self.max_length, self.train_on_prompt,
            self.template))) if convs else {}
        for k, r in chats:
            try:
                if k in encoded:
                    if isinstance(encoded[k], RowProblem):
                        raise encoded[k]
                    ids, lab, truncated = encoded[k]
                else:
                    ids, lab, truncated = encode_text(self.tokenizer, r["text"], self.max_length)
            except RowProblem as e:
                out[k] = self._problem(e, indices[k])
                continue
            n_target = sum(1 for t in lab[1:] if t != IGNORE_INDEX)
            out[k] = (Dropped("no_target") if n_target == 0 else
                      {"input_ids": ids, "labels": lab, "truncated": truncated, "n_target": n_target})
        return out

    def _problem(self, e: RowProblem, index: int) -> Dropped:
        if self.on_error == "skip":
            return Dropped("skipped", f"row {index + 1}: {e}")
        raise RowError(self.path, index + 1, str(e)) from None


@contextlib.contextmanager
def scratch_dir(cache_dir: str | None):
    """A directory for intermediate files (rows read from a file, encoded rows), removed afterwards; inside the
    cache directory when there is one (the same disk as the result)."""
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir or None, prefix=".tmp-encode-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def row_format(rows, data_cfg, path: str) -> str:
    """data.format, or the format detected from the columns for 'auto' (a DataError naming the file if none)."""
    if data_cfg.format != "auto":
        return data_cfg.format
    try:
        return detect_format(rows.column_names, data_cfg.columns)
    except RowProblem as e:
        raise DataError(f"{path}: {e}") from None


def column_sum(encoded, column: str) -> int:
    """The sum of a numeric column, or of the lengths of a list column, over all encoded rows (in Arrow)."""
    import pyarrow.compute as pc

    col = encoded.with_format("arrow")[column]
    if hasattr(col.type, "value_type"):
        col = pc.list_value_length(col)
    return int(pc.sum(col.cast("int64")).as_py() or 0)


def build_cached(spec: str, data_cfg, cache_path: Path | None, fingerprint: str, make_encoder, finish,
                 columns: list[str], desc: str | None):
    """Read a source, encode every row in data.num_proc processes (data/parallel.py), keep the rows not dropped
    and save their `columns` atomically at cache_path (or return them in memory when it is None).

    make_encoder(rows) -> the encoder (may raise DataError, e.g. for the format); finish(encoded, kept, drops,
    notes) -> stats (raises DataError when no row is usable). Returns (datasets.Dataset, stats)."""
    import datasets

    with scratch_dir(str(cache_path.parent) if cache_path is not None else None) as scratch:
        rows = load_rows(spec, data_cfg, scratch=scratch)
        encoder = make_encoder(rows)
        encoded = encode_dataset(rows, encoder, features=encoder.features(), num_proc=data_cfg.num_proc,
                                 scratch=scratch, fingerprint=fingerprint, desc=desc)
        kept, drops, notes = drop_summary(encoded)
        stats = finish(encoded, kept, drops, notes)
        ds = encoded.select(kept).select_columns(columns)
        if cache_path is None:
            return ds.flatten_indices(keep_in_memory=True), stats
        _save_atomically(ds, stats, cache_path)
    return datasets.load_from_disk(str(cache_path / "data")), stats


def cache_location(kind: str, spec: str, tokenizer, settings: dict, data_cfg, cache_dir: str | None):
    """(cache path or None, fingerprint): the fingerprint also names the intermediate files (a fresh one when
    nothing is cached)."""
    if not cache_dir:
        return None, uuid.uuid4().hex
    fingerprint = _fingerprint(spec, tokenizer, settings, data_cfg)
    return Path(cache_dir) / f"{kind}-{Path(resolve_data_path(spec)).stem}-{fingerprint}", fingerprint


def tokenize_sft(spec: str, tokenizer, data_cfg, cache_dir: str | None, show_progress: bool = False,
                 template: str | None = None):
    """Tokenise a data source once; the result is cached under cache_dir and reused by every rank and restart.
    template: how errors name the tokenizer's chat template where data.chat_template does not (eval's
    --chat-template).

    Rows are read and tokenised in data.num_proc processes and streamed to Arrow files (see data/parallel.py).
    Returns (datasets.Dataset with input_ids/labels, EncodeStats).
    """
    path = resolve_data_path(spec)
    settings = {"max_length": data_cfg.max_length, "train_on_prompt": data_cfg.train_on_prompt,
                "format": data_cfg.format, "columns": data_cfg.columns, "on_error": data_cfg.on_error, "v": 1,
                **source_settings(spec, data_cfg)}
    cache_path, fingerprint = cache_location("sft", spec, tokenizer, settings, data_cfg, cache_dir)
    cached = load_cached(cache_path, EncodeStats)
    if cached is not None:
        return cached

    def make_encoder(rows):
        fmt = row_format(rows, data_cfg, path)
        if fmt not in SFT_NORMALIZERS:
            raise DataError(f"{path}: data.format={fmt!r} is not an SFT format (use messages, alpaca or text)")
        if fmt != "text":
            require_chat_template(tokenizer)  # before any worker starts
        return _SFTEncoder(tokenizer, SFT_NORMALIZERS[fmt], data_cfg,
                           row_filter(data_cfg.filter, rows.column_names, path), path, template)

    def finish(encoded, kept, drops, notes) -> EncodeStats:
        stats = EncodeStats(rows=len(kept), filtered=drops.get("filtered", 0), skipped=drops.get("skipped", 0),
                            no_target=drops.get("no_target", 0), tokens=column_sum(encoded, "input_ids"),
                            target_tokens=column_sum(encoded, "n_target"),
                            truncated=column_sum(encoded, "truncated"),
                            skipped_examples=[note for _, note in notes[:5]])
        if not kept:
            raise DataError(f"{path}: no usable rows ({stats.summary()})")
        return stats

    return build_cached(spec, data_cfg, cache_path, fingerprint, make_encoder, finish, ["input_ids", "labels"],
                        f"tokenising {Path(path).name}" if show_progress else None)


def load_cached(cache_path: Path | None, stats_type):
    """(datasets.Dataset, stats) from a tokenised cache, or None where there is none. A cache that cannot be read
    (a truncated Arrow file, a damaged stats.json: a full disk, a copy cut short) is removed with a warning naming
    it, and the caller builds it again."""
    if cache_path is None or not (cache_path / "stats.json").exists():
        return None
    import datasets

    try:
        stats = stats_type(**json.loads((cache_path / "stats.json").read_text()))
        return datasets.load_from_disk(str(cache_path / "data")), stats
    except Exception as e:  # pyarrow, json and datasets each raise their own types for a damaged file
        first = (str(e).strip().splitlines() or [""])[0]
        log.warning("%s: the tokenised cache cannot be read (%s: %s); building it again", cache_path,
                    type(e).__name__, first)
        shutil.rmtree(cache_path, ignore_errors=True)
        return None


def _save_atomically(ds, stats: EncodeStats, cache_path: Path) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_path.parent, prefix=".tmp-"))
    ds.save_to_disk(str(tmp / "data"))
    (tmp / "stats.json").write_text(json.dumps(stats.__dict__))
    try:
        os.rename(tmp, cache_path)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
