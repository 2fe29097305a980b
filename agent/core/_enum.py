"""A str-valued Enum whose str() and format() are its value (Python 3.10 has no enum.StrEnum): JSON, log
lines and metric labels read the plain word, while code compares members, not text."""

from __future__ import annotations

import enum

__all__ = ["StrEnum"]


class StrEnum(str, enum.Enum):
    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__
