"""Preference rows -> one canonical pair: prompt, chosen, rejected, optional scores.

Accepted shapes (column names can be mapped with `data.columns`):
- TRL "explicit prompt": prompt + chosen + rejected, each a string or a message list
  ({"prompt": [user...], "chosen": [assistant...], ...}).
- Full conversations with no prompt column (hh-rlhf transcripts, or message lists
  that share their first turns): the shared prefix becomes the prompt.
- A string prompt with full-conversation message lists (UltraFeedback-binarized
  style): the conversations win, the prompt column is ignored.
- orca_dpo_pairs style: system + question + chosen + rejected strings, with
  `data.columns: {prompt: question}`. A system column makes the row a chat.
Optional columns: score_chosen, score_rejected (annotator ratings) and margin.

Strings with no system column and no message lists are plain text (TRL's
"standard" format): the sequence is prompt + response, with EOS appended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from ftdist.data.formats import RowProblem, normalize_messages

Text = Union[str, list]  # a plain string, or a list of {role, content} messages

# where a transcript hands over to the assistant: the prompt is cut right after the last one
ASSISTANT_MARKERS = ("\n\nAssistant:", "\nAssistant:", "Assistant:", "### Response:", "<|assistant|>")


@dataclass
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    score_chosen: Optional[float] = None
    score_rejected: Optional[float] = None
    margin: Optional[float] = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


def _column(row: dict, mapping: dict[str, str], name: str):
    col = mapping.get(name, name)
    return col, row.get(col)


def _number(row: dict, mapping: dict[str, str], name: str) -> Optional[float]:
    col, value = _column(row, mapping, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowProblem(f"'{col}' must be a finite number, got {value!r}")
    return float(value)


def _text(value, what: str) -> Text:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return normalize_messages(value, what)
    raise RowProblem(f"{what} must be a string or a list of {{role, content}} messages, got {type(value).__name__}")


def _as_messages(value: Text, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _is_full_conversation(value: Text) -> bool:
    return isinstance(value, list) and value[0]["role"] != "assistant"


def shared_message_prefix(chosen: list[dict], rejected: list[dict]) -> int:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def split_shared_text(chosen: str, rejected: str) -> int:
    """Where the prompt of two transcripts ends: after the last assistant marker of their common prefix,
    else at the last whitespace before they differ (never inside a word)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prefix = chosen[:n]
    after_marker = max((prefix.rfind(m) + len(m) for m in ASSISTANT_MARKERS if m in prefix), default=-1)
    if after_marker >= 0:
        return after_marker
    return max(0, max(prefix.rfind(c) for c in " \n\t"))


def _extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise RowProblem("chosen and rejected must both be strings or both be message lists")
    if isinstance(chosen, list):
        n = shared_message_prefix(chosen, rejected)
        if n == len(chosen) == len(rejected):  # identical: split before the last assistant turn (a tie)
            n = max((i for i, m in enumerate(chosen) if m["role"] == "assistant"), default=0)
    else:
        n = split_shared_text(chosen, rejected)
    return chosen[:n], chosen[n:], rejected[n:]


def normalize_preference(row: dict, mapping: dict[str, str]) -> PreferencePair:
    """One file row -> PreferencePair, or RowProblem naming the field."""
    out = {}
    for name in ("chosen", "rejected"):
        col, value = _column(row, mapping, name)
        if value is None:
            raise RowProblem(f"missing field '{col}'")
        out[name] = _text(value, col)
    prompt_col, prompt = _column(row, mapping, "prompt")
    system_col, system = _column(row, mapping, "system")
    chosen, rejected = out["chosen"], out["rejected"]
    if prompt is not None:
        prompt = _text(prompt, prompt_col)
    if prompt is None or (isinstance(prompt, str) and _is_full_conversation(chosen)
                          and _is_full_conversation(rejected)):
        prompt, chosen, rejected = _extract_prompt(chosen, rejected)

    conversational = system is not None or any(isinstance(v, list) for v in (prompt, chosen, rejected))
    if conversational:
        prompt = _as_messages(prompt, "user") if prompt else []
        chosen, rejected = _as_messages(chosen, "assistant"), _as_messages(rejected, "assistant")
        if system is not None:
            if not isinstance(system, str):
                raise RowProblem(f"'{system_col}' must be a string, got {type(system).__name__}")
            if system and not (prompt and prompt[0]["role"] == "system"):
                prompt = [{"role": "system", "content": system}] + prompt
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value:
            raise RowProblem(f"{name} response is empty (after taking out the prompt shared with the other response)")
        if isinstance(value, list) and value[0]["role"] != "assistant":
            raise RowProblem(f"{name} response must start with an assistant turn, got {value[0]['role']!r}")
    return PreferencePair(prompt, chosen, rejected, _number(row, mapping, "score_chosen"),
                          _number(row, mapping, "score_rejected"), _number(row, mapping, "margin"))


def filter_reason(pair: PreferencePair, drop_ties: bool, min_chosen_score: Optional[float]) -> Optional[str]:
    """Why the pair is filtered out ('ties', 'low_score'), or None to keep it."""
    if drop_ties:
        if pair.chosen == pair.rejected:
            return "ties"
        if pair.score_chosen is not None and pair.score_chosen == pair.score_rejected:
            return "ties"
    if min_chosen_score is not None:
        if pair.score_chosen is None:
            raise RowProblem("data.min_chosen_score is set but the row has no score_chosen (map it with data.columns)")
        if pair.score_chosen < min_chosen_score:
            return "low_score"
    return None
