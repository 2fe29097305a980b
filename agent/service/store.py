"""Persistent status: the applied revision, per-resource state, the last error.

One JSON file written atomically (temp + fsync + rename): a crash at any moment leaves either the
previous status or the new one, never a torn file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.drivers.fsutil import atomic_write

__all__ = ["RevisionRecord", "Status", "load_status", "save_status"]

VERSION = 1


@dataclass
class RevisionRecord:
    sha: str
    ref: str = ""
    committed_at: float = 0.0
    summary: str = ""
    at: float = 0.0                      # when it was applied / attempted


@dataclass
class Status:
    host: str = ""
    applied: RevisionRecord | None = None          # the last good revision, fully applied
    attempted: RevisionRecord | None = None        # the last revision tried
    result: str = ""                               # converged | applied | failed | invalid | error
    last_error: str | None = None
    last_error_at: float | None = None
    resources: dict[str, dict] = field(default_factory=dict)   # key -> {state, message, at}
    last_reconcile_at: float = 0.0
    rollouts: dict[str, dict] = field(default_factory=dict)   # app -> canary progress (survives restarts)

    def to_json(self) -> dict:
        return {"version": VERSION, **asdict(self)}


def load_status(path: Path) -> Status:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return Status()
    raw.pop("version", None)
    for key in ("applied", "attempted"):
        if raw.get(key):
            raw[key] = RevisionRecord(**raw[key])
    known = Status.__dataclass_fields__
    return Status(**{k: v for k, v in raw.items() if k in known})


def save_status(path: Path, status: Status) -> None:
    atomic_write(Path(path), json.dumps(status.to_json(), indent=2, sort_keys=True) + "\n", mode=0o600)
