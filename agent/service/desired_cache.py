"""Validated desired states, cached per (commit, path, host, load options, loader code).

A checkout of a commit is immutable, so loading it twice gives the same DesiredState: a no-op poll
(and a `once` whose revision did not move) skips YAML, JSON Schema and lockfile parsing entirely.
Kept in memory for the daemon and pickled under <root>/state/desired (0700, written only by the agent)
for short-lived `once` runs. The key includes a digest of every module of the pure core (the loader
and everything it imports: model, lockfile rules, renderers that decide acceptance) and of the schemas,
so an upgraded agent never trusts a state validated by older rules. A cache file that cannot be read
back is set aside and the revision loaded again: a cache is only ever a cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from functools import lru_cache
from pathlib import Path

from agent.drivers.fsutil import atomic_write
from agent.core.model import DesiredState

__all__ = ["DesiredCache"]

log = logging.getLogger("gitops_agent.cache")

_CORE = Path(__file__).resolve().parent.parent / "core"


def _schema_dir() -> Path:
    repo = _CORE.parent.parent / "schemas"          # a checkout (editable install)
    return repo if repo.is_dir() else _CORE.parent / "schemas"   # installed: agent/schemas


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """Every file of the pure core (the loader imports nothing else of ours) and every schema: no list
    to keep by hand, so a rule added anywhere the loader reaches changes the key."""
    h = hashlib.sha256()
    for path in sorted(_CORE.rglob("*.py")) + sorted(_schema_dir().glob("*.json")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


class DesiredCache:
    def __init__(self, directory: Path, keep: int = 4, read_only: bool = False):
        self.directory = Path(directory)
        self.keep = keep
        self.read_only = read_only          # plan: read the cache, never write, prune or set aside
        self._memory: dict[str, DesiredState] = {}

    def key(self, sha: str, path: str, host: str, options: object) -> str:
        raw = repr((sha, path, host, options, _code_digest()))
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def get(self, key: str) -> DesiredState | None:
        hit = self._memory.get(key)
        if hit is not None:
            return hit
        path = self.directory / f"{key}.pickle"
        try:
            with open(path, "rb") as fh:
                hit = pickle.load(fh)                      # noqa: S301 (our own 0700 state dir)
        except FileNotFoundError:
            return None
        except Exception as exc:                            # noqa: BLE001 - any garbage: unpickling runs arbitrary constructors
            self._set_aside(path, f"{type(exc).__name__}: {exc}")
            return None
        if not isinstance(hit, DesiredState):
            self._set_aside(path, f"holds a {type(hit).__name__}, not a DesiredState")
            return None
        self._memory = {key: hit}
        return hit

    def _set_aside(self, path: Path, why: str) -> None:
        bad = path
        if not self.read_only:
            try:
                os.replace(path, path.with_suffix(".bad"))
                bad = path.with_suffix(".bad")
            except OSError:
                pass
        log.warning("desired-state cache %s is unreadable (%s)%s; loading the revision again", path.name, why[:200],
                    f": set aside as {bad.name}" if bad != path else "")

    def put(self, key: str, desired: DesiredState) -> None:
        self._memory = {key: desired}
        if self.read_only:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            atomic_write(self.directory / f"{key}.pickle", pickle.dumps(desired, protocol=pickle.HIGHEST_PROTOCOL))
            entries = sorted(self.directory.glob("*.pickle"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in entries[self.keep:]:
                old.unlink(missing_ok=True)
        except OSError:
            pass                                            # a cache: losing it costs time, never correctness
