"""One agent per root: an exclusive, non-blocking flock on <root>/agent.lock (released by the kernel on exit).

A self-upgrade hands the lock to the new agent across exec: the flock belongs to the open file, whose fd
the new process inherits (its number in GITOPS_AGENT_LOCK_FD), so the root is never unlocked in between.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from agent.core.errors import LockHeld

__all__ = ["root_lock"]


def _inherited(path: Path) -> int | None:
    """The lock fd a previous agent handed over by exec, if it is really this root's lock file."""
    value = os.environ.pop("GITOPS_AGENT_LOCK_FD", None)
    if not value or not value.isdigit():
        return None
    fd = int(value)
    try:
        mine, theirs = os.fstat(fd), os.stat(path)
    except OSError:
        return None
    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
        return None
    os.set_inheritable(fd, False)
    return fd


@contextmanager
def root_lock(root: Path) -> Iterator[int]:
    """Hold the root's lock; yields its fd (a self-upgrade passes it on)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = _inherited(root / "agent.lock")
    if fd is None:
        fd = os.open(root / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            raise LockHeld(f"another gitops-agent (pid {holder}) is already working on {root}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield fd
    finally:
        os.close(fd)
