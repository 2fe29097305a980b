"""The daemon's and `once`'s notifications: one reconcile's Result -> events (agent.core.events) -> the
Notifier's queue.

What was announced and what is still to be delivered are kept together in `<root>/state/notified.json`
(0600, replaced atomically), written before the events are queued:
- `sent` ({topic: fingerprint}): the same failure is not sent again by a restarted agent or the next cron
  `once`, and "recovered" is sent once;
- `pending`: the events queued and not yet attempted. An agent killed (or a `once` that gave up waiting)
  before delivering them sends them when it next starts; an event leaves `pending` once its delivery was
  attempted (a failed one is logged and counted, not retried: DESIGN §4). So a kill loses nothing and
  doubles nothing, except in the milliseconds between a receiver's answer and the file's update (the
  event is then sent again: at least once, never silently dropped).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, fields
from pathlib import Path

from agent.core.events import Event, events_for, upgrade_events
from agent.drivers.fsutil import atomic_write

__all__ = ["Notifications", "notify_urls", "build_notifications"]

log = logging.getLogger("gitops_agent.notify")

_EVENT_FIELDS = tuple(f.name for f in fields(Event))


def notify_urls(value: str | None) -> tuple[str, ...]:
    """--notify URLs as settings hold them (whitespace-separated: an Apprise URL has no raw space)."""
    return tuple((value or "").split())


def build_notifications(settings, count=None) -> "Notifications | None":
    """The --notify pipeline for these settings, or None without --notify."""
    urls = notify_urls(settings.notify)
    if not urls:
        return None
    from agent.drivers.notify import Notifier

    return Notifications(Notifier(urls, count), settings.root, settings.host)


def _read(path: Path) -> tuple[dict[str, str], list[Event]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, []
    if not isinstance(raw, dict):
        return {}, []
    if "sent" not in raw or not isinstance(raw.get("sent"), dict):      # the flat {topic: fingerprint} of before
        return {str(k): str(v) for k, v in raw.items() if isinstance(v, str)}, []
    pending = []
    for item in raw.get("pending") or ():
        if isinstance(item, dict) and all(isinstance(item.get(f), str) for f in _EVENT_FIELDS):
            pending.append(Event(**{f: item[f] for f in _EVENT_FIELDS}))
    return {str(k): str(v) for k, v in raw["sent"].items()}, pending


class Notifications:
    def __init__(self, notifier, root: Path, host: str):
        self.notifier = notifier
        self.host = host
        self.path = Path(root) / "state" / "notified.json"
        self._lock = threading.Lock()
        self.sent, self.pending = _read(self.path)
        notifier.done = self.delivered
        if self.pending:
            log.info("%d notification(s) queued by an earlier run and not delivered: sending them now", len(self.pending))
            notifier.send(list(self.pending))

    def observe(self, result) -> None:
        """Queue what `result` earns; never raises (a notification must not fail a reconcile)."""
        if result is None:
            return
        try:
            self._queue(*events_for(result, self.host, self.sent))
        except Exception:  # noqa: BLE001
            log.exception("notifications for this reconcile failed")

    def observe_upgrade(self, state: dict, running: str) -> None:
        """Queue what the self-upgrade record `state` earns (a failure once, its recovery once); never raises."""
        try:
            self._queue(*upgrade_events(state, self.host, running, self.sent))
        except Exception:  # noqa: BLE001
            log.exception("notifications for the agent's upgrade failed")

    def flush(self, timeout_s: float) -> bool:
        """Deliver what is queued (before the process exits or execs into a new agent)."""
        return self.notifier.flush(timeout_s)

    def _queue(self, events, memory: dict[str, str]) -> None:
        """Remember `memory` and the events as pending (first: a crash re-sends, never drops), then queue them."""
        from agent.logs import scrub

        events = [Event(e.kind, e.host, e.app, e.revision, scrub(e.reason)) for e in events]
        with self._lock:
            if memory != self.sent or events:
                self.pending = [*self.pending, *events]
                self.sent = memory
                self._save()
        self.notifier.send(events)

    def delivered(self, event: Event) -> None:
        """The notifier attempted `event` (sent, or failed and counted): it is no longer pending."""
        with self._lock:
            kept = [e for e in self.pending if e is not event]
            if len(kept) != len(self.pending):
                self.pending = kept
                self._save()

    def _save(self) -> None:
        try:
            data = {"sent": dict(sorted(self.sent.items())), "pending": [asdict(e) for e in self.pending]}
            atomic_write(self.path, json.dumps(data, sort_keys=True) + "\n", mode=0o600)
        except OSError as exc:
            log.error("cannot write %s: %s", self.path, exc)
