"""Send notifications through Apprise (`--notify URL`, DESIGN §4), off the reconcile path.

`Notifier.send` only puts the event on a bounded queue and returns; one background thread delivers it to
every URL with Apprise (its own socket timeouts bound each attempt). A receiver that hangs or fails
delays nothing but that thread; a full queue drops the event (logged, counted as failed), so a dead
receiver cannot grow memory. Every text goes through `agent.logs.scrub` first: no secret value the agent
knows of (decrypted secrets, the webhook secret, URL credentials) ever leaves in a notification.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Iterable

from agent.core.events import Event
from agent.core.errors import ConfigError

__all__ = ["Notifier"]

log = logging.getLogger("gitops_agent.notify")

_STOP = object()


class Notifier:
    """Deliver events to Apprise URLs from one daemon thread. `count(result)` is called with sent / failed."""

    def __init__(self, urls: Iterable[str], count: Callable[[str], None] | None = None, maxsize: int = 100,
                 timeout_s: float = 10.0, done: Callable[[Event], None] | None = None):
        import apprise

        self.urls = tuple(urls)
        self._apprise = apprise.Apprise()
        for url in self.urls:
            if not self._apprise.add(url):
                from agent.logs import scrub

                raise ConfigError(f"--notify: {scrub(url)!r} is not an Apprise URL this agent can use")
        self._types = {"success": apprise.NotifyType.SUCCESS, "failure": apprise.NotifyType.FAILURE,
                       "warning": apprise.NotifyType.WARNING}
        self._count = count
        self.done = done            # called once per event after its delivery was attempted (sent or not)
        self._timeout_s = timeout_s
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name="notify", daemon=True)
        self._thread.start()

    def send(self, events: Iterable[Event]) -> None:
        for event in events:
            try:
                self._idle.clear()
                self._queue.put_nowait(event)
            except queue.Full:
                log.error("notification dropped (queue full: the receiver is slow or down): %s", event.title)
                self._counted("failed")
                self._finished(event)

    def flush(self, timeout_s: float) -> bool:
        """Wait until the queue is empty (for `once`, before exiting): False if it is not by `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.wait(0.05):
                return True
        return False

    def close(self) -> None:
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass

    def _counted(self, result: str) -> None:
        if self._count is not None:
            try:
                self._count(result)
            except Exception:  # noqa: BLE001
                log.exception("counting a notification failed")

    def _finished(self, event: Event) -> None:
        if self.done is not None:
            try:
                self.done(event)
            except Exception:  # noqa: BLE001
                log.exception("recording a delivered notification failed")

    def _loop(self) -> None:
        from agent.logs import scrub

        while True:
            event = self._queue.get()
            if event is _STOP:
                return
            try:
                ok = self._apprise.notify(body=scrub(event.body), title=scrub(event.title),
                                          notify_type=self._types.get(event.severity))
            except Exception as exc:  # noqa: BLE001 (a notifier bug must not kill delivery)
                log.error("notification %r failed: %s", event.title, scrub(str(exc)))
                ok = False
            if ok:
                log.info("notification sent: %s", scrub(event.title))
            else:
                log.error("notification could not be sent to every --notify URL: %s", scrub(event.title))
            self._counted("sent" if ok else "failed")
            self._finished(event)
            if self._queue.empty():
                self._idle.set()
