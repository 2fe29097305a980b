"""Import in the background what a new revision will need, while the agent waits on git.

A fetch means a commit the agent has not seen is likely: loading it imports PyYAML, jsonschema and
packaging (together ~0.2-0.3 s on a small host), and applying it supervisord's own config parser. A `once` (a fresh host, a release run by
cron) would pay both on its critical path; started when the fetch starts, the imports overlap the fetch
and checkout, which are spent waiting on git processes. A daemon pays them once either way.
"""

from __future__ import annotations

import importlib
import logging
import threading

__all__ = ["LOADER_AND_APPLY", "prewarm"]

log = logging.getLogger(__name__)

LOADER_AND_APPLY = ("yaml", "jsonschema", "packaging.requirements", "supervisor.options")   # in order of need
_started: set[str] = set()
_lock = threading.Lock()


def prewarm(modules: tuple[str, ...] = LOADER_AND_APPLY) -> None:
    """Import `modules` in a daemon thread, once per process (Python's per-module import locks make a
    later import in another thread wait for this one, never run it twice)."""
    with _lock:
        todo = tuple(m for m in modules if m not in _started)
        _started.update(todo)
    if todo:
        threading.Thread(target=_import_all, args=(todo,), name="prewarm", daemon=True).start()


def _import_all(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a warm-up only: the real import reports the error
            log.debug("prewarm of %s failed: %s", name, exc)
