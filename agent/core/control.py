"""Release control (DESIGN §3b): which planned actions a suspension or a quarantine holds back. Pure.

A held action is not applied but still reported (drift stays visible in `plan`, status and metrics), so
a person who suspended the agent during an incident sees what it would do, and a quarantined revision
is not retried on every poll. The decision is made on action keys and the app each key belongs to.
"""

from __future__ import annotations

import hashlib
from dataclasses import field, fields, is_dataclass
from enum import Enum
from pathlib import PurePath
from typing import Iterable, Mapping

from agent.core._record import record
from agent.core.model import App, DesiredState

__all__ = ["HOST", "Suspension", "Quarantine", "Control", "Held", "app_of", "inputs_digest", "hold"]

HOST = "*"          # the key of a host-wide suspension, and its metrics label


@record
class Suspension:
    reason: str
    at: float = 0.0


@record
class Quarantine:
    """A revision that failed for one app, held until the app's inputs change or `retry`."""

    sha: str
    inputs: str             # inputs_digest of the app at that revision
    reason: str
    at: float = 0.0


@record
class Control:
    suspended: Mapping[str, Suspension] = field(default_factory=dict)    # app or HOST -> why
    quarantined: Mapping[str, Quarantine] = field(default_factory=dict)  # app -> the failed revision

    def suspension(self, app: str | None) -> Suspension | None:
        """The suspension that covers `app` (the host-wide one first); None when it may apply."""
        return self.suspended.get(HOST) or (self.suspended.get(app) if app else None)

    def to_json(self) -> dict:
        return {"suspended": {k: vars(v) for k, v in sorted(self.suspended.items())},
                "quarantined": {k: vars(v) for k, v in sorted(self.quarantined.items())}}

    @classmethod
    def from_json(cls, raw: Mapping) -> "Control":
        sus = {str(k): Suspension(str(v.get("reason", "")), float(v.get("at", 0)))
               for k, v in (raw.get("suspended") or {}).items() if isinstance(v, Mapping)}
        qua = {str(k): Quarantine(str(v["sha"]), str(v["inputs"]), str(v.get("reason", "")), float(v.get("at", 0)))
               for k, v in (raw.get("quarantined") or {}).items() if isinstance(v, Mapping) and "sha" in v and "inputs" in v}
        return cls(sus, qua)


@record
class Held:
    """An action not applied, and why (`suspended`, `quarantined`, `window`)."""

    action: object          # agent.core.actions.Action
    app: str | None
    cause: str
    why: str


def app_of(key: str, desired: DesiredState) -> str | None:
    """The app an action key belongs to (None: the host's own, e.g. supervisord or the load balancer)."""
    kind, _, name = key.partition(":")
    if kind in ("program", "secretenv"):
        owner = desired.services.get(name)
        return owner.app if owner else None
    if kind == "venv":
        owner = desired.environments.get(name)
        return owner.app if owner else None
    if kind in ("file", "job", "data", "files"):
        return name.partition("/")[0] or None
    return None


def inputs_digest(app: App) -> str:
    """A digest of everything the state repo says about `app` on this host, independent of where the
    commit was checked out (paths count by name, file contents by digest): it changes exactly when a
    commit changes the app's inputs, which is what lifts a quarantine."""
    h = hashlib.sha256()
    _feed(h, app)
    return h.hexdigest()[:32]


def _feed(h, value) -> None:
    if is_dataclass(value) and not isinstance(value, type):
        h.update(type(value).__name__.encode() + b"(")
        for f in fields(value):
            h.update(f.name.encode() + b"=")
            _feed(h, getattr(value, f.name))
        h.update(b")")
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"b" + hashlib.sha256(value).digest())
    elif isinstance(value, PurePath):
        h.update(b"p" + value.name.encode())
    elif isinstance(value, Enum):
        h.update(repr(value.value).encode())
    elif isinstance(value, (tuple, list)):
        h.update(b"[")
        for item in value:
            _feed(h, item)
            h.update(b",")
        h.update(b"]")
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value, key=repr):
            _feed(h, k)
            h.update(b":")
            _feed(h, value[k])
        h.update(b"}")
    else:
        h.update(repr(value).encode())


AHEAD = frozenset({"build_venv"})   # what a closed window still lets run: opening it is then a switch, not a build


def hold(actions: Iterable, desired: DesiredState, control: Control, digests: Mapping[str, str],
         closed: Mapping[str, str] | None = None) -> tuple[tuple, tuple[Held, ...]]:
    """(actions to apply, actions held). A suspension holds every action of its app (host-wide: every
    action); a quarantine holds its app's actions while the app's inputs are still those that failed; a
    closed release window (`closed`: app -> why) holds all but the venv builds."""
    closed = closed or {}
    todo, held = [], []
    for action in actions:
        app = app_of(action.key, desired)
        sus = control.suspension(app)
        q = control.quarantined.get(app) if app else None
        if sus is not None:
            scope = "the host" if HOST in control.suspended else f"app {app}"
            held.append(Held(action, app, "suspended", f"{scope} is suspended: {sus.reason}"))
        elif q is not None and digests.get(app) == q.inputs:
            held.append(Held(action, app, "quarantined",
                             f"app {app}: revision {q.sha[:12]} is quarantined ({q.reason}); "
                             f"a commit that changes the app, or `gitops-agent retry --app {app}`, lifts it"))
        elif app in closed and action.kind not in AHEAD:
            held.append(Held(action, app, "window", f"app {app}: {closed[app]}"))
        else:
            todo.append(action)
    return tuple(todo), tuple(held)
