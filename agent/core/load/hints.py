"""Hints that make a problem say how to fix it: the names that are defined, the closest one."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["did_you_mean", "defined"]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
    word = str(word)
    cutoff = 0.5 if len(word) <= 3 else 0.65       # one wrong letter in a short name is still a typo
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def defined(word: str, choices: Iterable[str], what: str) -> str:
    """What to write instead of an undefined `word`: the closest name and the names there are."""
    names = sorted(str(c) for c in choices)
    if not names:
        return f"; no {what} is defined"
    hint = did_you_mean(word, names)
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return f"{hint}; defined: {shown}"
