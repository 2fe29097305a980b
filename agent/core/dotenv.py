"""Parse a decrypted secret file (DESIGN §3a "Secrets"): `KEY=VALUE` lines, values taken literally.

The format is Docker's `--env-file` rule, chosen so that a value reaches the process byte for byte:
nothing in it is interpreted, so no character of a password can be lost, split or expanded.

- The file is UTF-8 (a UTF-8 byte order mark at its start is ignored, as Docker does). Lines end at
  `\\n`; a `\\r` right before it (a CRLF line end) is removed, and nothing else.
- A line that is empty or only spaces/tabs, or whose first character after them is `#`, is skipped.
- Any other line is `KEY=VALUE`. Spaces and tabs before KEY are allowed, and so is an `export `
  prefix (so the file can also be sourced by a shell). KEY matches `[A-Za-z_][A-Za-z0-9_]*`.
- VALUE is everything after the first `=`, exactly: quotes are kept, `\\` is not an escape, `$` is not
  expanded, `#` does not start a comment, spaces at either end are kept. `KEY=` is the empty string.
- So a value cannot hold a newline, a NUL byte, or end with `\\r`. Multi-line material (a PEM key)
  goes base64-encoded, or into its own secret file.

Refused, with the line number and never the value: a line without `=`, a bad KEY, a KEY given twice,
bytes that are not UTF-8, and a NUL byte anywhere (no process environment can carry one).
"""

from __future__ import annotations

import re

from agent.core.errors import Permanent

__all__ = ["DotenvProblem", "parse_dotenv"]

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EXPORT = re.compile(r"export[ \t]+")
_BOM = "\ufeff"


class DotenvProblem(Permanent, ValueError):
    """A secret file is not a valid dotenv file. `file` and `line` say where; the message never
    holds a value (nor the text of the line: a value may have been meant)."""

    def __init__(self, file: str, line: int | None, message: str):
        self.file = file
        self.line = line
        self.message = message
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {message}")


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def parse_dotenv(data: bytes, file: str) -> dict[str, str]:
    """The KEY -> VALUE pairs of a decrypted secret file, in file order (see the module docstring)."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise DotenvProblem(file, _line_of(data, nul), "a NUL byte (no process environment can hold one)")
    bad_utf8: int | None = None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_utf8 = e.start
    if bad_utf8 is not None:   # raised outside the except: the decode error quotes the bytes
        raise DotenvProblem(file, _line_of(data, bad_utf8), "not valid UTF-8")
    text = text.removeprefix(_BOM)
    values: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        stripped = line.lstrip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        key, equals, value = stripped.partition("=")
        if not equals:
            raise DotenvProblem(file, number, "not a KEY=VALUE line (no '=')")
        export = _EXPORT.match(key)
        if export and _KEY.match(key[export.end():]):
            key = key[export.end():]
        if not _KEY.match(key):
            raise DotenvProblem(file, number, "the text before the first '=' is not a key: a key is letters, "
                                              "digits and '_', not starting with a digit, with no spaces")
        if key in values:
            raise DotenvProblem(file, number, f"{key} is given twice (first on line {first_line[key]})")
        values[key] = value
        first_line[key] = number
    return values
