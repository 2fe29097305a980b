"""Persistent status: the applied revision, per-resource state, the last error.

One JSON file written atomically (temp + fsync + rename): a crash at any moment leaves either the
previous status or the new one, never a torn file. A filesystem without data journaling can still
leave garbage after a power cut: an unreadable status file never stops the agent. `load_status`
returns an empty status and says so; a writer (`set_aside=True`, holding the root lock) first moves
the bad file to `status.json.corrupt-<time>` so it can be inspected, while `status`/`plan` only read.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

from json.encoder import encode_basestring_ascii

from agent.drivers.fsutil import atomic_write

__all__ = ["RevisionRecord", "Status", "CorruptStatus", "load_status", "save_status"]

log = logging.getLogger("gitops_agent.store")

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
    apps: dict[str, dict] = field(default_factory=dict)       # app -> services, environments, frontend (status page)
    traffic: dict[str, dict] = field(default_factory=dict)    # frontend -> {backend: weight} the LB serves
    events: list[dict] = field(default_factory=list)          # the last events, oldest first (agent.core.status_view)
    deployed: dict[str, str] = field(default_factory=dict)    # app -> the revision it last fully applied (windows heal to it)

    def to_json(self) -> dict:
        """The file's content as plain JSON data, a copy (a caller may change it). Hand-written: `asdict`
        deep-copies every leaf through `copy.deepcopy`, ~0.9 ms of a 10-app no-op reconcile, twice."""
        return _copy(self.view())

    def view(self) -> dict:
        """The file's content as `to_json` gives it, but sharing this status's containers: for a reader that
        changes nothing (serialising, `agent.core.status_view.recorded`), without the copy."""
        return {"version": VERSION, "host": self.host, "applied": _record(self.applied),
                "attempted": _record(self.attempted), "result": self.result, "last_error": self.last_error,
                "last_error_at": self.last_error_at, "resources": self.resources,
                "last_reconcile_at": self.last_reconcile_at, "rollouts": self.rollouts, "apps": self.apps,
                "traffic": self.traffic, "events": self.events, "deployed": self.deployed}


def _record(rec: RevisionRecord | None) -> dict | None:
    if rec is None:
        return None
    return {"sha": rec.sha, "ref": rec.ref, "committed_at": rec.committed_at, "summary": rec.summary, "at": rec.at}


def _copy(value):
    """A deep copy of JSON-shaped data (dicts, lists, tuples, scalars), as `asdict` makes it."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


class CorruptStatus(ValueError):
    """The status file is not a status this agent wrote (torn, empty, garbage, wrong shape)."""


def load_status(path: Path, set_aside: bool = False) -> Status:
    path = Path(path)
    try:
        return _parse(path.read_bytes())
    except FileNotFoundError:
        return Status()
    except (CorruptStatus, OSError) as exc:
        where = path
        if set_aside and not isinstance(exc, OSError):
            where = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            try:
                os.replace(path, where)
            except OSError:
                where = path
        log.warning("status file %s is unreadable (%s): starting from an empty status%s", path, exc,
                    f"; the bad file is kept as {where}" if where != path else "")
        return Status()


def _parse(data: bytes) -> Status:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptStatus(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CorruptStatus(f"a JSON {type(raw).__name__}, not an object")
    raw.pop("version", None)
    known = Status.__dataclass_fields__
    fields = {k: v for k, v in raw.items() if k in known}
    try:
        for key in ("applied", "attempted"):
            if fields.get(key):
                fields[key] = RevisionRecord(**fields[key])
        status = Status(**fields)
    except TypeError as exc:
        raise CorruptStatus(f"unexpected shape: {exc}") from None
    for name, kind in (("resources", dict), ("rollouts", dict), ("apps", dict), ("traffic", dict), ("events", list),
                       ("deployed", dict)):
        if not isinstance(getattr(status, name), kind):
            raise CorruptStatus(f"{name} is a {type(getattr(status, name)).__name__}, not an object")
    if any(not isinstance(v, dict) for v in (*status.resources.values(), *status.rollouts.values(),
                                             *status.apps.values(), *status.traffic.values(), *status.events)):
        raise CorruptStatus("a resource, rollout, app, traffic or event entry is not an object")
    return status


def save_status(path: Path, status: Status, previous: dict | None = None) -> None:
    """Write `status` atomically. `previous`: the status as it was read (`view()`); when only the times of
    this reconcile differ from it (the daemon's no-op polls), the rename is not made durable (no fsync of
    the directory, ~0.3 ms): a crash then leaves the previous file, complete, and only its times older."""
    path = Path(path)
    view = status.view()
    text = _dumps(view)
    if previous is None or _untimed(previous) != _untimed(view):
        atomic_write(path, text, mode=0o600)
        return
    # atomic_write's steps but its last (fsync_dir): the file's own fsync keeps it whole. The temp name is
    # this process's own (the root lock makes it the only writer; O_EXCL still refuses a leftover), not
    # mkstemp's random one: mkstemp cost 0.12 ms of Python per call.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_serial)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:     # left by a crashed process that had this pid
        atomic_write(path, text, mode=0o600)
        return
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_serial = itertools.count()


def _untimed(view: dict) -> dict:
    """A status view without the times every reconcile sets: when it ran, when it attempted, and each
    resource's `at` (the last reconcile that saw it)."""
    out = {**view, "last_reconcile_at": None,
           "resources": {k: {**r, "at": None} for k, r in view["resources"].items()}}
    if out["attempted"] is not None:
        out["attempted"] = {**out["attempted"], "at": None}
    return out


_ENCODER = json.JSONEncoder(sort_keys=True)     # no indent: the C encoder (indent=2 runs the pure-Python one)
_key = encode_basestring_ascii                  # a key as JSON, as the encoder writes it (C, without its checks)


def _dumps(data: dict) -> str:
    """`data` as JSON text for a person to read too: one line per top-level field, and per entry of a
    field that is an object or an array (a resource, an app, an event). Each line is made by the C
    encoder; `json.dumps(indent=2)` made the same file 4x slower, on every reconcile."""
    enc = _ENCODER.encode
    fields = []
    for key in sorted(data):
        value = data[key]
        if isinstance(value, dict) and value:
            inner = ",\n".join(f"    {_key(str(k))}: {enc(value[k])}" for k in sorted(value, key=str))
            text = "{\n" + inner + "\n  }"
        elif isinstance(value, (list, tuple)) and value:
            text = "[\n" + ",\n".join(f"    {enc(v)}" for v in value) + "\n  ]"
        else:
            text = enc(value)
        fields.append(f"  {_key(str(key))}: {text}")
    return "{\n" + ",\n".join(fields) + "\n}\n"
