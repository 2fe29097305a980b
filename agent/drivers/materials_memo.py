"""What earlier runs learnt about the apps' materials, kept for the next process (agent.core.materials,
"Sealed materials"): a no-op `once` then plans without running `age` or importing Jinja2.

`<root>/state/materials.memo`, mode 0600, JSON: the memo format, a check digest of the host's inputs key
(a new key makes every entry meaningless), `secrets` (ciphertext + identity files, as one keyed digest ->
{KEY: keyed digest of its value}) and `renders` (template and context with values as their digests, or a
secret env's names and value digests, as one keyed digest -> the output's keyed digest). Only keyed digests,
the same kind plan, status and program files show: no value, no file content, nothing that lets a value be
recovered without the host's key. A file that cannot be read, is malformed, of another format or key, not a
regular file, not owned by this user or readable by others is ignored: the run decrypts and renders, and
writes a good one.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import field
from pathlib import Path

from agent.core._record import record
from agent.core.materials import MEMO_FORMAT, digest
from agent.drivers.fsutil import atomic_write

__all__ = ["Memo", "load", "save"]

log = logging.getLogger(__name__)

_MAX_BYTES = 4 << 20        # far above any real memo: a bigger file is not ours to parse


@record
class Memo:
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    renders: dict[str, str] = field(default_factory=dict)


def _check(key: bytes) -> str:
    return digest(key, f"{MEMO_FORMAT}\0check".encode())


def _strings(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def load(path: Path, key: bytes) -> Memo | None:
    """The memo at `path` if it is ours and sound, else None (never raises for a bad file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077
                or st.st_size > _MAX_BYTES):
            log.debug("ignoring %s: not a private regular file of this user", path)
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(_MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if (not isinstance(data, dict) or data.get("format") != MEMO_FORMAT or data.get("check") != _check(key)
            or not isinstance(data.get("secrets"), dict) or not _strings(data.get("renders"))
            or not all(isinstance(k, str) and _strings(v) for k, v in data["secrets"].items())):
        return None
    return Memo(data["secrets"], data["renders"])


def save(path: Path, key: bytes, memo: Memo) -> None:
    """Replace the memo (atomically, 0600). A failure is logged, not raised: the memo only saves time."""
    text = json.dumps({"format": MEMO_FORMAT, "check": _check(key), "secrets": memo.secrets,
                       "renders": memo.renders}, sort_keys=True)
    try:
        atomic_write(path, text, mode=0o600)
    except OSError as exc:
        log.warning("cannot write %s: %s (the next run decrypts again)", path, exc.strerror or exc)
