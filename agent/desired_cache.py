"""Validated desired states, cached per (commit, path, host, load options, loader code).

A checkout of a commit is immutable, so loading it twice gives the same DesiredState: a no-op poll
(and a `once` whose revision did not move) skips YAML, JSON Schema and lockfile parsing entirely.
Kept in memory for the daemon and pickled under <root>/state/desired (0700, written only by the agent)
for short-lived `once` runs. The key includes a digest of the loader's code and schemas, so an upgraded
agent never trusts a state validated by older rules.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from functools import lru_cache
from pathlib import Path

from .fsutil import atomic_write
from .model import DesiredState

__all__ = ["DesiredCache"]

_CODE = ("load.py", "_yaml.py", "lockfile.py", "model.py", "__init__.py")


@lru_cache(maxsize=1)
def _code_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _CODE:
        h.update((here / name).read_bytes())
    schemas = here.parent / "schemas"
    if not schemas.is_dir():                       # installed (non-editable): schemas live in agent/schemas
        schemas = here / "schemas"
    for path in sorted(schemas.glob("*.json")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class DesiredCache:
    def __init__(self, directory: Path, keep: int = 4):
        self.directory = Path(directory)
        self.keep = keep
        self._memory: dict[str, DesiredState] = {}

    def key(self, sha: str, path: str, host: str, options: object) -> str:
        raw = repr((sha, path, host, options, _code_digest()))
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def get(self, key: str) -> DesiredState | None:
        hit = self._memory.get(key)
        if hit is not None:
            return hit
        try:
            with open(self.directory / f"{key}.pickle", "rb") as fh:
                hit = pickle.load(fh)                      # noqa: S301 (our own 0700 state dir)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError):
            return None
        if not isinstance(hit, DesiredState):
            return None
        self._memory = {key: hit}
        return hit

    def put(self, key: str, desired: DesiredState) -> None:
        self._memory = {key: desired}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            atomic_write(self.directory / f"{key}.pickle", pickle.dumps(desired, protocol=pickle.HIGHEST_PROTOCOL))
            entries = sorted(self.directory.glob("*.pickle"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in entries[self.keep:]:
                old.unlink(missing_ok=True)
        except OSError:
            pass                                            # a cache: losing it costs time, never correctness
