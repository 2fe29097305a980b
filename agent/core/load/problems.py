"""Collecting validation problems: every one, with file, line and field, raised together at the end."""

from __future__ import annotations

from typing import Iterable

from agent.core.errors import InvalidState, Problem
from agent.core.load._yaml import Located

__all__ = ["Collector"]


class Collector:
    """Accumulates problems; `check()` raises them all at once."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, doc: Located, path: tuple, message: str) -> None:
        self.problems.append(Problem(doc.file, doc.line(path), ".".join(str(p) for p in path), message))

    def file(self, file: str, message: str, line: int | None = None, field: str = "") -> None:
        self.problems.append(Problem(file, line, field, message))

    def extend(self, problems: Iterable[Problem]) -> None:
        self.problems.extend(problems)

    def unique(self) -> list[Problem]:
        return list(dict.fromkeys(self.problems))

    def check(self) -> None:
        if self.problems:
            raise InvalidState(self.unique())
