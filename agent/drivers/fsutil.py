"""Atomic file writes: temp file in the same dir, fsync, rename. A crash leaves the old or the new file."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "chown_to"]


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600, owner: str | None = None) -> None:
    """`owner`: a user name that gets the file (when the agent runs as root; else the agent owns it), set
    before the rename, so the file is never readable by anyone but its final owner."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    import tempfile     # not at import: a no-op writes nothing this way

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if owner is not None:
            chown_to(tmp, owner)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename, symlink swap or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chown_to(path: Path | str, user: str) -> None:
    """Give `path` to `user` (and its primary group) when running as root; otherwise a no-op, since only root
    may give files away (and then supervisord cannot switch users either)."""
    if os.geteuid() != 0:
        return
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
