"""Suspensions and quarantines on disk (`<root>/state/control.json`), so they survive agent restarts.

Written by two parties: the CLI (`suspend`, `resume`, `retry`, while a daemon may run and hold the root
lock) and the reconciler (a quarantine). Every change is a read-modify-write under an flock of its own
(`control.lock`), and the file is replaced atomically: a crash leaves the old or the new state, and two
writers never lose each other's change. An unreadable file reads as "nothing suspended" and says so.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from agent.core.control import Control
from agent.drivers.fsutil import atomic_write

__all__ = ["control_file", "load_control", "update_control"]

log = logging.getLogger("gitops_agent.control")


def control_file(root: Path) -> Path:
    return Path(root) / "state" / "control.json"


def load_control(path: Path) -> Control:
    try:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        return Control.from_json(raw)
    except FileNotFoundError:
        return Control()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("control file %s is unreadable (%s): nothing is taken as suspended or quarantined", path, exc)
        return Control()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name("control.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_control(path: Path, change: Callable[[Control], Control]) -> Control:
    """Apply `change` to the current state under the lock and persist it (only if it changed)."""
    path = Path(path)
    with _locked(path):
        before = load_control(path)
        after = change(before)
        if after != before:
            atomic_write(path, json.dumps(after.to_json(), indent=2, sort_keys=True) + "\n", mode=0o600)
        return after
