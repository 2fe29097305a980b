"""Write what an app needs on disk besides venvs and program files (DESIGN §3a): its data dir, rendered
file versions with their files/<name> links, the secret env launcher, secret env files; and delete what
nothing uses any more. Every write is atomic (a crash leaves the old or the new file, never a torn one)."""

from __future__ import annotations

import os
from pathlib import Path

from agent.drivers.fsutil import atomic_write, chown_to, fsync_dir

__all__ = ["ensure_dir", "write_version", "write_private", "prune"]


def ensure_dir(path: Path, owner: str | None = None, mode: int = 0o750) -> None:
    """A private dir (the app's data dir), given to `owner` when the agent may."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    os.chmod(path, mode)
    if owner is not None:
        chown_to(path, owner)


def write_version(path: Path, link: Path, data: bytes, mode: int, owner: str | None = None) -> None:
    """Write a content-addressed file version, then switch `link` (files/<name>) to it atomically."""
    path, link = Path(path), Path(link)
    for parent in (path.parent.parent.parent, path.parent.parent, path.parent):   # files/, files/.v/, files/.v/<d>/
        parent.mkdir(mode=0o750, exist_ok=True, parents=True)
    atomic_write(path, data, mode=mode, owner=owner)
    target = os.path.relpath(path, link.parent)
    tmp = link.parent / f".{link.name}.link"
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def write_private(path: Path, data: bytes, owner: str | None = None, mode: int = 0o600) -> None:
    """A file only its owner reads (a secret env file): its dir is 0700 too."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, data, mode=mode, owner=owner)


def prune(paths: list[str] | tuple[str, ...], apps_dir: Path) -> list[str]:
    """Delete files and links under `apps_dir` (nothing outside it, and never a data dir), then the version
    dirs they leave empty. Returns what was deleted."""
    base = Path(apps_dir).resolve()
    done = []
    for raw in paths:
        path = Path(raw)
        parts = path.relative_to(apps_dir).parts if path.is_relative_to(apps_dir) else ()
        if len(parts) < 3 or parts[1] not in ("files", "env") or not path.parent.resolve().is_relative_to(base):
            continue
        try:
            path.unlink()
            done.append(raw)
        except FileNotFoundError:
            continue
        version_dir = path.parent
        if version_dir.parent.name == ".v" and not any(version_dir.iterdir()):
            version_dir.rmdir()
    return done
