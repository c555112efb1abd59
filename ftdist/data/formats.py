"""Row formats -> one canonical form.

Every SFT row becomes either {"messages": [{"role", "content"}, ...]} or
{"text": str}. Column names can be mapped (`data.columns`), e.g.
{messages: conversations} or {instruction: question, output: answer}.
"""

from __future__ import annotations

from typing import Any, Callable

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT-style role names are common enough to accept as they are
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}

FORMAT_COLUMNS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
    "prompt": ("prompt",),
}


class RowProblem(ValueError):
    """Raised by a normaliser; the caller adds file and row number."""


def detect_format(columns: list[str], mapping: dict[str, str]) -> str:
    cols = set(columns)
    for fmt in ("messages", "preference", "alpaca", "text", "prompt"):
        if all(mapping.get(c, c) in cols for c in FORMAT_COLUMNS[fmt]):
            return fmt
    raise RowProblem(
        f"cannot detect the data format from columns {sorted(cols)}; set data.format "
        f"(messages needs 'messages', alpaca 'instruction'+'output', text 'text', "
        f"preference 'chosen'+'rejected', prompt 'prompt') or map columns with data.columns")


def _get(row: dict, mapping: dict[str, str], name: str, required: bool = True) -> Any:
    col = mapping.get(name, name)
    if col not in row or row[col] is None:
        if required:
            raise RowProblem(f"missing field '{col}'")
        return None
    return row[col]


def _str(value, what: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(f"{what} must be a string, got {type(value).__name__}")
    return value


def normalize_messages(value, what: str = "messages") -> list[dict]:
    if not isinstance(value, list):
        raise RowProblem(f"{what} must be a list of {{role, content}}, got {type(value).__name__}")
    if not value:
        raise RowProblem(f"{what} is an empty conversation")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowProblem(f"{what}[{i}] must be a mapping with role and content")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None or content is None:
            raise RowProblem(f"{what}[{i}] needs 'role' and 'content'")
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise RowProblem(f"{what}[{i}]: unknown role {role!r} (allowed: {', '.join(ROLES)})")
        out.append({"role": role, "content": _str(content, f"{what}[{i}].content")})
    return out


def sft_messages(row: dict, mapping: dict[str, str]) -> dict:
    msgs = normalize_messages(_get(row, mapping, "messages"))
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowProblem("conversation has no assistant turn to learn from")
    return {"messages": msgs}


def sft_alpaca(row: dict, mapping: dict[str, str]) -> dict:
    instruction = _str(_get(row, mapping, "instruction"), "instruction")
    inp = _get(row, mapping, "input", required=False) or ""
    output = _str(_get(row, mapping, "output"), "output")
    system = _get(row, mapping, "system", required=False)
    user = instruction if not inp else f"{instruction}\n\n{_str(inp, 'input')}"
    msgs = ([{"role": "system", "content": _str(system, "system")}] if system else [])
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": msgs}


def sft_text(row: dict, mapping: dict[str, str]) -> dict:
    text = _str(_get(row, mapping, "text"), "text")
    if not text:
        raise RowProblem("text is empty")
    return {"text": text}


SFT_NORMALIZERS: dict[str, Callable[[dict, dict], dict]] = {
    "messages": sft_messages,
    "alpaca": sft_alpaca,
    "text": sft_text,
}
