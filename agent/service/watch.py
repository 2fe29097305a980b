"""File-system triggers: watchdog observers on what the agent manages, feeding a debounced trigger.

No work happens in the observer thread: an event only says "look again soon". Events are filtered
(reads are not changes), merged for `debounce_s` and handed to `on_trigger(sources, since, until)` from
one small debouncer thread; `since`/`until` are when the batch's first/last events were seen (monotonic
clock), so the runtime can tell the echo of its own writes (seen before its run ended) from a later hand
edit, and skip events a run that started after them has already seen. The reconcile re-reads
the world; the event's content is never trusted.

What is watched (`managed_paths`):
- host: the program include dir, the envs/ symlinks, each current venv's site-packages (top level:
  installs and removals change the dist-info dirs), and supervisord's own log, which gets a line when a
  program is stopped or exits: the only file-system trace of a hand `supervisorctl stop`;
- repo: a local state repo's HEAD, packed-refs and refs/, so a commit triggers without waiting for the poll.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import unquote, urlparse

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent.core._record import record
from agent.core.layout import Layout

__all__ = ["WatchSpec", "Watcher", "Debouncer", "managed_paths", "local_repo_dir"]

log = logging.getLogger("gitops_agent.watch")

# created, deleted, modified, moved, closed (after writing); not opened / closed_no_write (reads)
CHANGE_EVENTS = frozenset({"created", "deleted", "modified", "moved", "closed"})


@record
class WatchSpec:
    path: Path
    source: str                              # "host" (drift) or "repo" (a new commit)
    recursive: bool = False
    names: frozenset[str] | None = None      # only these entries of `path` (None: any)

    def matches(self, event_path: str) -> bool:
        if self.names is None:
            return True
        p = Path(event_path)
        try:
            rel = p.relative_to(self.path)
        except ValueError:
            return False
        return bool(rel.parts) and (rel.parts[0] in self.names or any(rel.parts[0].startswith(n + ".") for n in self.names))


def local_repo_dir(repo: str | None) -> Path | None:
    """The git dir of a local state repo (a path or file:// URL), or None for remote ones."""
    if not repo:
        return None
    if "://" in repo:
        url = urlparse(repo)
        if url.scheme != "file":
            return None
        path = Path(unquote(url.path))
    elif ":" in repo.split("/", 1)[0]:
        return None                          # scp-like ssh: user@host:path
    else:
        path = Path(repo).expanduser()
    if (path / ".git").is_dir():
        return path / ".git"
    if (path / "HEAD").is_file() and (path / "refs").is_dir():
        return path                          # a bare repository
    return None


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _site_packages(venv: Path) -> list[Path]:
    return sorted(venv.glob("lib/python*/site-packages"))


def managed_paths(layout: Layout, repo: str | None = None, extra: Iterable[WatchSpec] = ()) -> list[WatchSpec]:
    """What to watch now (re-computed after every reconcile: venv switches move site-packages)."""
    specs = [
        WatchSpec(layout.programs, "host"),
        WatchSpec(layout.envs, "host"),
        WatchSpec(layout.logs, "host", names=frozenset({"supervisord.log"})),
    ]
    if layout.envs.is_dir():
        for link in sorted(layout.envs.iterdir()):
            if link.is_symlink() and not link.name.startswith("."):
                specs += [WatchSpec(sp, "host") for sp in _site_packages(link.resolve())]
    gitdir = local_repo_dir(repo)
    if gitdir is not None:
        specs += [
            WatchSpec(gitdir, "repo", names=frozenset({"HEAD", "packed-refs"})),
            WatchSpec(gitdir / "refs", "repo", recursive=True),
        ]
    specs += list(extra)
    return [s for s in specs if s.path.is_dir()]


class Debouncer:
    """Merge pokes: call `fire(sources, since, until)` once no poke came for `quiet_s` (at most `max_wait_s` after the first)."""

    def __init__(self, fire: Callable[[frozenset[str], float, float], None], quiet_s: float = 0.03, max_wait_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        self._fire, self.quiet_s, self.max_wait_s, self._clock = fire, quiet_s, max_wait_s, clock
        self._cond = threading.Condition()
        self._sources: set[str] = set()
        self._first: float | None = None
        self._last = 0.0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="watch-debounce", daemon=True)

    def start(self) -> "Debouncer":
        self._thread.start()
        return self

    def poke(self, source: str) -> None:
        with self._cond:
            now = self._clock()
            if self._first is None:
                self._first = now
            self._last = now
            self._sources.add(source)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    if self._first is not None:
                        due = min(self._last + self.quiet_s, self._first + self.max_wait_s)
                        wait = due - self._clock()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._stopping:
                    return
                sources, since, until = frozenset(self._sources), self._first, self._last
                self._sources.clear()
                self._first = None
            try:
                self._fire(sources, since, until)
            except Exception:  # noqa: BLE001 (the trigger must not kill the debouncer)
                log.exception("trigger failed")


class _Handler(FileSystemEventHandler):
    def __init__(self, spec: WatchSpec, poke: Callable[[str], None], gone: Callable[[WatchSpec], None]):
        self.spec, self.poke, self.gone = spec, poke, gone

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in CHANGE_EVENTS:
            return
        if event.event_type in ("deleted", "moved") and event.src_path == str(self.spec.path):
            self.gone(self.spec)             # the watched dir itself: its watch is dead, re-arm on next watch()
            self.poke(self.spec.source)
            return
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        if any(p and self.spec.matches(p) for p in paths):
            log.debug("%s event: %s %s", self.spec.source, event.event_type, event.src_path)
            self.poke(self.spec.source)


class Watcher:
    """One watchdog observer; `watch(specs)` (re)arms exactly the given directories."""

    def __init__(self, on_trigger: Callable[[frozenset[str], float, float], None], debounce_s: float = 0.03):
        self._debouncer = Debouncer(on_trigger, quiet_s=debounce_s)
        self._observer = Observer()
        self._observer.daemon = True
        self._watches: dict[WatchSpec, tuple[object, tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self._gone: set[WatchSpec] = set()

    def start(self) -> "Watcher":
        self._debouncer.start()
        self._observer.start()
        return self

    @property
    def specs(self) -> tuple[WatchSpec, ...]:
        return tuple(self._watches)

    def watch(self, specs: Iterable[WatchSpec]) -> None:
        """Watch exactly `specs`; a directory replaced since it was scheduled (a venv rebuilt in place,
        a dir removed and made again) is scheduled anew: inotify watched the old inode."""
        wanted = {s: _inode(s.path) for s in dict.fromkeys(specs)}
        with self._lock:
            gone, self._gone = self._gone, set()
            stale = [s for s, (_, ino) in self._watches.items() if s not in wanted or s in gone or wanted[s] != ino]
            for spec in stale:
                watch, _ = self._watches.pop(spec)
                try:
                    self._observer.unschedule(watch)
                except (KeyError, OSError):
                    pass
            for spec, ino in wanted.items():
                if spec in self._watches or ino is None:
                    continue
                try:
                    watch = self._observer.schedule(_Handler(spec, self._debouncer.poke, self._gone.add),
                                                    str(spec.path), recursive=spec.recursive)
                except OSError as exc:      # vanished since managed_paths() looked, or out of inotify watches
                    log.warning("cannot watch %s: %s", spec.path, exc)
                    continue
                self._watches[spec] = (watch, ino)

    def stop(self) -> None:
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout=5)
        self._debouncer.stop()
