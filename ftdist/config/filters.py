"""data.filter conditions: 'column op value' strings, parsed when the recipe loads (ftdist.data applies them)."""

from __future__ import annotations

import re

_FILTER_RE = re.compile(r"^\s*(?P<col>[^\s=!<>]+)\s*(?P<op>==|!=|>=|<=|>|<|\s+not\s+in\s+|\s+in\s+)\s*(?P<val>.+?)\s*$")
FILTER_OPS = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    ">=": lambda a, b: a is not None and a >= b, "<=": lambda a, b: a is not None and a <= b,
    ">": lambda a, b: a is not None and a > b, "<": lambda a, b: a is not None and a < b,
    "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
}


def parse_filter(text: str) -> tuple[str, str, object]:
    """'column op value' -> (column, op, value); value is read as YAML (8, true, tie, [a, b], "quoted")."""
    import yaml

    m = _FILTER_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not 'column op value' (op one of ==, !=, >=, <=, >, <, in, not in)")
    op = " ".join(m.group("op").split())
    try:
        value = yaml.safe_load(m.group("val"))
    except yaml.YAMLError:
        value = m.group("val")
    if op in ("in", "not in") and not isinstance(value, list):
        raise ValueError(f"{text!r}: '{op}' needs a list, e.g. [a, b]")
    return m.group("col"), op, value
