"""Keeping secret values out of text the agent shows (DESIGN §3a): every spelling of a value, and tails of
output that never start inside a value.

A value is hidden in the forms Python and JSON print it (raw, inside repr() quotes, JSON-escaped), since a
traceback or a JSON log of the app shows those. Output tails are cut at line boundaries: a dotenv value holds
no line break, so a tail made of whole lines holds whole values, which exact matching then hides; a tail cut
inside a line could start with the end of a value, which no matching can recognise.
"""

from __future__ import annotations

import json
from typing import Iterable

__all__ = ["spellings", "redact", "whole_lines_tail", "MASK"]

MASK = "***"


def spellings(value: str) -> set[str]:
    """A value as it may appear in text: raw, inside repr() quotes, JSON-escaped (ASCII or not)."""
    return {value, repr(value)[1:-1], json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}


def redact(text: str, values: Iterable[str]) -> str:
    """`text` with every spelling of every value replaced by `***`, longest first (a value holding another is
    hidden whole). Callers pass only values long enough to be secrets."""
    for form in sorted({s for v in values for s in spellings(v) if s}, key=len, reverse=True):
        if form in text:
            text = text.replace(form, MASK)
    return text


def whole_lines_tail(text: str, limit: int, capped: bool) -> str:
    """The last whole lines of `text` that fit in `limit` characters. `capped`: `text` is itself the end of a
    longer output, so its first line is partial and dropped. A last line longer than `limit` is not shown."""
    lines = text.rstrip("\n").split("\n")
    if capped and len(lines) > 1:
        lines = lines[1:]
    elif capped:
        return f"(a line longer than {len(text)} characters, not shown)"
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        if size + len(line) + 1 > limit:
            break
        kept.append(line)
        size += len(line) + 1
    if not kept and lines:
        return f"(a line longer than {limit} characters, not shown)"
    return "\n".join(reversed(kept)).strip()
