"""An apply that did not finish (the agent killed mid-way): its rollback targets, kept across runs. Pure.

A program file is replaced before its health gate runs. When the agent dies in between (SIGKILL, OOM, a
power cut), the new config runs unverified and the config it replaced is gone from disk: the next run's
plan sees the file already written, plans only the gate again, and a failure then had nothing to roll back
to (it was retried on every poll, never quarantined). So before an apply the reconciler records, for each
program file it writes, what it replaces (`Pending`); the next run resumes with that record: the rollback
target of a program still on the interrupted, never-verified config is the config from before it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from agent.core._record import record
from agent.core.facts import Facts, text_digest
from agent.core.actions import SwitchVenv, WriteProgram

__all__ = ["Pending", "still_pending", "resumed", "recorded", "settled", "to_json", "from_json"]


@record
class Pending:
    """A program file an apply wrote, and what it replaced."""

    digest: str                          # sha256 of the text written
    previous: str | None                 # the config supervisord ran before (None: none known)
    existed: bool
    venv: tuple[str, str] | None = None  # (environment, identity before) switched in the same apply


def _program(key: str) -> str | None:
    kind, _, name = key.partition(":")
    return name if kind == "program" else None


def still_pending(journal: Mapping[str, Pending], facts: Facts) -> dict[str, Pending]:
    """The entries whose program still runs the interrupted config, which never passed its health gate."""
    out = {}
    for name, entry in journal.items():
        fact = facts.programs.get(name)
        if fact is not None and fact.file_text is not None and text_digest(fact.file_text) == entry.digest \
                and fact.verified != entry.digest:
            out[name] = entry
    return out


def resumed(todo: tuple, journal: Mapping[str, Pending], facts: Facts) -> tuple:
    """`todo` with the interrupted apply's rollback targets put back: a planned rewrite of such a program
    rolls back to the config from before the interruption (not to the unverified one); a program with other
    actions only (its gate again) gets a rewrite of its current file first, which carries that target (and
    a switch of its venv to the current one, which carries the venv's)."""
    out, seen = [], set()
    for action in todo:
        name = _program(action.key)
        entry = journal.get(name) if name else None
        if entry is not None and name not in seen:
            seen.add(name)
            if isinstance(action, WriteProgram):
                action = replace(action, previous=entry.previous, existed=entry.existed)
            else:
                venv = facts.venvs.get(entry.venv[0]) if entry.venv else None
                if venv is not None and venv.current and venv.current != entry.venv[1]:
                    out.append(SwitchVenv(f"venv:{entry.venv[0]}", "an interrupted apply switched it: kept, with "
                                          f"{entry.venv[1]} as its rollback target", name=entry.venv[0],
                                          identity=venv.current, previous=entry.venv[1]))
                out.append(WriteProgram(action.key, "an interrupted apply wrote it and its health gate never passed: "
                                        "kept, with the config from before as its rollback target", action.needs,
                                        name=name, text=facts.programs[name].file_text or "",
                                        previous=entry.previous, existed=entry.existed))
        out.append(action)
    return tuple(out)


def recorded(todo: tuple, journal: Mapping[str, Pending]) -> dict[str, Pending]:
    """The record to keep while `todo` is applied: what is still pending, and every program file `todo`
    writes with what it replaces (its venv's previous identity when `todo` switches that venv too)."""
    out = dict(journal)
    switches = {a.key: a for a in todo if isinstance(a, SwitchVenv) and a.previous}
    for action in todo:
        if isinstance(action, WriteProgram):
            venv = next(((s.name, s.previous) for k, s in switches.items() if k in action.needs), None)
            old = journal.get(action.name)
            out[action.name] = Pending(text_digest(action.text), action.previous, action.existed,
                                       venv or (old.venv if old else None))
    return out


def settled(journal: Mapping[str, Pending], outcomes) -> dict[str, Pending]:
    """After the apply returned: a program it ran an action of was gated, rolled back or failed for good
    (the executor finished with it), so only the others stay recorded (e.g. one whose actions were all
    skipped because something they need failed)."""
    done = {n for o in outcomes if (n := _program(o.action.key)) and o.verdict.value != "skipped_blocked"}
    return {name: entry for name, entry in journal.items() if name not in done}


def to_json(journal: Mapping[str, Pending]) -> dict:
    return {name: {"digest": e.digest, "previous": e.previous, "existed": e.existed,
                   "venv": list(e.venv) if e.venv else None} for name, e in sorted(journal.items())}


def from_json(raw) -> dict[str, Pending]:
    out = {}
    for name, e in (raw or {}).items() if isinstance(raw, dict) else ():
        if isinstance(e, dict) and isinstance(e.get("digest"), str):
            venv = e.get("venv")
            out[str(name)] = Pending(e["digest"], e.get("previous") if isinstance(e.get("previous"), str) else None,
                                     bool(e.get("existed")), tuple(venv) if isinstance(venv, list) and len(venv) == 2 else None)
    return out
