"""The daemon's and `once`'s notifications: one reconcile's Result -> events (agent.core.events) -> the
Notifier's queue. What was announced is kept in `<root>/state/notified.json` (0600, atomic), so the same
failure is not sent again by a restarted agent or the next cron `once`, and "recovered" is sent once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from agent.core.events import events_for, upgrade_events
from agent.drivers.fsutil import atomic_write

__all__ = ["Notifications", "notify_urls", "build_notifications"]

log = logging.getLogger("gitops_agent.notify")


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


class Notifications:
    def __init__(self, notifier, root: Path, host: str):
        self.notifier = notifier
        self.host = host
        self.path = Path(root) / "state" / "notified.json"
        try:
            raw = json.loads(self.path.read_text())
            self.sent = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        except (OSError, ValueError):
            self.sent = {}

    def observe(self, result) -> None:
        """Queue what `result` earns; never raises (a notification must not fail a reconcile)."""
        if result is None:
            return
        try:
            self._send(*events_for(result, self.host, self.sent))
        except Exception:  # noqa: BLE001
            log.exception("notifications for this reconcile failed")

    def observe_upgrade(self, state: dict, running: str) -> None:
        """Queue what the self-upgrade record `state` earns (a failure once, its recovery once); never raises."""
        try:
            self._send(*upgrade_events(state, self.host, running, self.sent))
        except Exception:  # noqa: BLE001
            log.exception("notifications for the agent's upgrade failed")

    def flush(self, timeout_s: float) -> bool:
        """Deliver what is queued (before the process exits or execs into a new agent)."""
        return self.notifier.flush(timeout_s)

    def _send(self, events, memory: dict[str, str]) -> None:
        if memory != self.sent:                 # remembered first: a crash re-sends nothing
            atomic_write(self.path, json.dumps(memory, sort_keys=True) + "\n", mode=0o600)
            self.sent = memory
        self.notifier.send(events)
