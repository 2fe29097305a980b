"""Hashed lockfiles: parse and validate them, and derive a venv's identity. Pure: no I/O.

A lockfile is the one thing that says what goes into a venv, so it must pin everything and change no
sources: every requirement `name==version` with at least one sha256 hash, and nothing else that pip would
obey (no `-r`/`-c` includes, no `--index-url`/`--find-links`, no URLs, paths or editables, no `${VAR}`
expansion). Then the same bytes always give the same venv, which is what lets a venv be named by a hash.

The reading of lines follows pip's own requirements-file rules (backslash continuations, `#` comments at
the start of a line or after whitespace, options after the requirement), so what we accept is what pip
installs: files written by `pip-compile --generate-hashes` and `uv pip compile --generate-hashes`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator

from agent.core._record import record
from agent.core.errors import InvalidState, Problem

__all__ = ["LockedRequirement", "parse_lock", "venv_identity"]

# pip: a comment starts at '#' at the beginning of a line or after whitespace.
_COMMENT = re.compile(r"(^|\s+)#.*$")
# pip accepts these hash algorithms; the lock must carry sha256 (the one every tool agrees on).
_HASH_HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}
_HEX = re.compile(r"^[0-9a-fA-F]+$")
# File-level options that change nothing about sources or contents: allowed as a courtesy.
_HARMLESS_OPTIONS = frozenset({"--require-hashes"})
_PATHLIKE = re.compile(r"(^\.|/|\\|\.(whl|zip|tar\.gz|tgz|tar\.bz2)$)", re.IGNORECASE)


@record
class LockedRequirement:
    """One pinned distribution: canonical name, exact version, allowed hashes ('sha256:<hex>')."""

    name: str
    version: str
    hashes: tuple[str, ...]
    line: int


@record
class _Logical:
    """A logical line: physical lines joined at backslashes, comments removed; `line` is its first."""

    line: int
    text: str


def _logical_lines(text: str) -> Iterator[_Logical]:
    """Join continuations and drop comments exactly like pip, so line numbers point at the start."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):  # pip drops a BOM too
        is_comment = _COMMENT.match(raw) is not None
        if raw.endswith("\\") and not is_comment:
            if not pending:
                start = number
            pending.append(raw[:-1])
            continue
        if pending:
            pending.append(" " + raw if is_comment else raw)
            yield _Logical(start, _COMMENT.sub("", "".join(pending)).strip())
            pending = []
        else:
            yield _Logical(number, _COMMENT.sub("", raw).strip())
    if pending:  # a file ending in a backslash: pip still takes what it has
        yield _Logical(start, _COMMENT.sub("", "".join(pending)).strip())


def _split_options(text: str) -> tuple[str, list[str]]:
    """pip's split: words up to the first one starting with '-' are the requirement, the rest options."""
    words = text.split()
    for i, word in enumerate(words):
        if word.startswith("-"):
            return " ".join(words[:i]), words[i:]
    return " ".join(words), []


def _parse_hash_options(options: list[str], problem) -> tuple[list[str], set[str]]:
    """Normalized 'algo:hex' hashes from `--hash=a:h` / `--hash a:h`, and every algorithm named (even in
    a malformed hash, so one typo gives one problem); report anything else."""
    hashes: list[str] = []
    algos: set[str] = set()
    words = iter(options)
    for word in words:
        if word == "--hash":
            value = next(words, "")
        elif word.startswith("--hash="):
            value = word.removeprefix("--hash=")
        else:
            problem(f"option {word!r} is not allowed on a requirement line (only --hash)")
            continue
        algo, _, digest = value.partition(":")
        algo = algo.lower()
        algos.add(algo)
        if algo not in _HASH_HEX_LEN:
            problem(f"hash {value!r}: algorithm must be one of {', '.join(sorted(_HASH_HEX_LEN))}")
        elif len(digest) != _HASH_HEX_LEN[algo] or not _HEX.match(digest):
            problem(f"hash {value!r}: expected {_HASH_HEX_LEN[algo]} hex digits")
        else:
            hashes.append(f"{algo}:{digest.lower()}")
    return hashes, algos


def _file_option_message(word: str) -> str:
    if word in ("-e", "--editable") or word.startswith("--editable="):
        return "editable requirements are not allowed: they install from a path or URL, not a hashed wheel"
    if word in ("-r", "--requirement", "-c", "--constraint") or word.startswith(("--requirement=", "--constraint=")):
        return f"{word.split('=')[0]!r} includes another file: a lockfile must be self-contained"
    return f"option {word.split('=')[0]!r} is not allowed: sources come from the environment's find_links"


def _requirement(logical: _Logical, add) -> LockedRequirement | None:
    from packaging.requirements import InvalidRequirement, Requirement   # lazy: a no-op reconcile never parses a lock
    from packaging.utils import canonicalize_name

    """Validate one logical requirement line; report every problem via `add(field, message)`."""
    spec, options = _split_options(logical.text)
    if not spec:  # the line is only options
        word = options[0]
        if word in _HARMLESS_OPTIONS and len(options) == 1:
            return None
        add("", _file_option_message(word))
        return None
    if "${" in logical.text:
        add("", "environment variables ('${...}') are not allowed: the lock must mean the same on every host")
        return None
    try:
        req = Requirement(spec)
    except InvalidRequirement as exc:
        hint = " (paths and archives are not allowed: pin name==version)" if _PATHLIKE.search(spec) else ""
        add("", f"invalid requirement {spec!r}: {exc}{hint}")
        return None
    name = canonicalize_name(req.name)
    field_problems: list[str] = []
    if req.url:
        field_problems.append(f"URL requirement {spec!r} is not allowed: pin name==version with hashes")
    if req.marker is not None:
        field_problems.append(f"environment marker '{req.marker}' is not allowed: compile the lock for the target python")
    specifiers = list(req.specifier)
    version = ""
    if len(specifiers) == 1 and specifiers[0].operator == "==" and "*" not in specifiers[0].version:
        version = specifiers[0].version
    elif not req.url:
        field_problems.append(f"{spec!r} is not pinned: use exactly one '==' with a full version")
    hashes, algos = _parse_hash_options(options, field_problems.append)
    if "sha256" not in algos:
        field_problems.append("no --hash=sha256:... given: every requirement needs at least one sha256 hash")
    for message in field_problems:
        add(name, message)
    if field_problems:
        return None
    return LockedRequirement(name=name, version=version, hashes=tuple(dict.fromkeys(hashes)), line=logical.line)


def parse_lock(text: str, filename: str) -> tuple[LockedRequirement, ...]:
    """Parse a hashed requirements file; raise InvalidState listing *all* problems found.

    `filename` only labels the problems (use the path relative to the state repo).
    """
    problems: list[Problem] = []
    found: list[LockedRequirement] = []
    first_line: dict[str, int] = {}
    for logical in _logical_lines(text):
        if not logical.text:
            continue

        def add(field: str, message: str, line: int = logical.line) -> None:
            problems.append(Problem(filename, line, field, message))

        req = _requirement(logical, add)
        if req is None:
            continue
        if req.name in first_line:
            add(req.name, f"{req.name} is listed twice (first on line {first_line[req.name]})")
            continue
        first_line[req.name] = req.line
        found.append(req)
    if not found and not problems:
        problems.append(Problem(filename, None, "", "the lockfile pins no requirements"))
    if problems:
        raise InvalidState(problems)
    return tuple(found)


def venv_identity(python: str, lock_bytes: bytes, installer: str, options: tuple[str, ...]) -> str:
    """Content address of a venv: the first 16 hex chars of sha256 over a canonical JSON encoding.

    JSON with sorted keys (and the lock as its own sha256) leaves no ambiguity between fields, unlike
    plain concatenation ('3.1' + '1...' vs '3.11' + '...'). Option order is kept: it is the installer's
    argument order. Bump "v" if the encoding or the build recipe changes, so old venvs are not reused.
    """
    document = {
        "v": 1,
        "python": python,
        "lock_sha256": hashlib.sha256(lock_bytes).hexdigest(),
        "installer": installer,
        "options": list(options),
    }
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode("ascii")).hexdigest()[:16]
