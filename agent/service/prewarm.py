"""Import in the background what the next steps will need, while the agent waits on something else.

A fetch means a commit the agent has not seen is likely: loading it imports PyYAML, jsonschema and
packaging (together ~0.2-0.3 s on a small host). A `once` (a fresh host, a release run by cron) would pay
them on its critical path; started when the fetch starts, the imports overlap the fetch and checkout.
supervisord's own config parser (~0.1 s), which checks each program file before it is written, is
imported when an apply starts: then the agent waits on venv builds and on supervisord starting, while
before that it would compete for the interpreter with the revision's loading and planning. A daemon pays
each once either way.
"""

from __future__ import annotations

import importlib
import logging
import threading

__all__ = ["LOADER", "APPLY", "prewarm"]

log = logging.getLogger(__name__)

LOADER = ("yaml", "jsonschema", "packaging.requirements")    # in order of need
APPLY = ("supervisor.options",)
_started: set[str] = set()
_lock = threading.Lock()


def prewarm(modules: tuple[str, ...] = LOADER) -> None:
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
