"""An apply with a record of the program files it replaces (`<root>/state/inflight.json`), so an apply the
agent did not live to finish is rolled back by the next run (the decisions: agent.core.interrupted).

The file is 0600 (a replaced config may hold env values) and replaced atomically; it exists only while an
apply runs, or while a program an interrupted apply wrote still waits for its health gate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from agent.core import interrupted
from agent.core.plan import Plan
from agent.drivers.fsutil import atomic_write

__all__ = ["apply_recorded"]

log = logging.getLogger("gitops_agent.reconcile")


def _load(path: Path) -> dict:
    try:
        return interrupted.from_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _save(path: Path, journal: dict) -> None:
    try:
        if journal:
            atomic_write(path, json.dumps(interrupted.to_json(journal), sort_keys=True) + "\n", mode=0o600)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("cannot write %s: %s", path, exc)


def apply_recorded(todo: tuple, notes: tuple, facts, drivers, path: Path) -> tuple:
    """`apply_plan(Plan(todo, notes))`, resumed from and recorded in `path`; the outcomes."""
    from agent.service.executor import apply_plan

    journal = interrupted.still_pending(_load(path), facts)
    if journal:
        log.warning("an earlier apply was interrupted before the health gate of %s: resuming with their "
                    "previous configs as rollback targets", ", ".join(sorted(journal)))
        todo = interrupted.resumed(todo, journal, facts)
    journal = interrupted.recorded(todo, journal)
    if journal:
        _save(path, journal)
    outcomes = apply_plan(Plan(todo, notes), drivers)
    _save(path, interrupted.settled(journal, outcomes))
    return outcomes
