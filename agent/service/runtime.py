"""The daemon: a jittered poll timer and a trigger queue feeding one reconcile at a time.

`Schedule` is the pure part (time is passed in): when the next run is due, how triggers coalesce,
how failures back off. `Runtime` runs it on a thread-safe condition; `run_daemon` wires the
reconciler, metrics server, watcher and signals together.

Rules:
- single flight: one reconcile at a time; triggers arriving during a run coalesce into ONE follow-up;
- a run's own writes echo back as file events (seen before the run ended): they earn one follow-up run,
  but a follow-up that itself applied something earns none (no endless apply -> event -> apply loop);
- the failure's type decides the retry (`Result.retry`): a Temporary one (a fetch, a busy supervisord,
  an exception) backs off along `Backoff.delays` with jitter; a Permanent one (an invalid revision, a
  refused commit) waits for the next poll or trigger, since retrying cannot help before the input
  changes; any success resets; while backing off a host event waits at least `failure_trigger_floor_s` after the last
  run, a new commit in a local repo runs at once (it may be the fix);
- SIGTERM/SIGINT: stop taking triggers, let the current reconcile finish, stop; the services keep running;
- SIGHUP (a closed terminal, or a habit of "reload"): logged and ignored, since settings are read once at
  start (re-reading them would mean rebuilding the reconciler, server and watcher): restart to apply.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent.core._record import record
from agent.core.outcome import ReconcileResult, Retry

__all__ = ["Backoff", "jittered", "Schedule", "Runtime", "run_daemon", "SUCCESS"]

log = logging.getLogger("gitops_agent.runtime")

SIGHUP_MESSAGE = "SIGHUP: settings are read at start; restart the agent to apply changes"

SUCCESS = tuple(r for r in ReconcileResult if r.success)   # drift: warn mode reported it; the reconcile did its job
FRESH = frozenset({"repo", "webhook"})    # triggers that may carry a fix: they end a backoff at once


def jittered(base: float, fraction: float, rng: random.Random) -> float:
    """`base` ± `fraction` (uniform), never negative."""
    return max(0.0, base * (1.0 + rng.uniform(-fraction, fraction)))


@record
class Backoff:
    """Delays after 1, 2, 3, ... consecutive failures (the last one repeats), jittered."""

    delays: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 300)
    jitter: float = 0.1

    def delay(self, failures: int, rng: random.Random) -> float:
        if failures <= 0:
            return 0.0
        return jittered(self.delays[min(failures, len(self.delays)) - 1], self.jitter, rng)


@dataclass
class Schedule:
    """When to reconcile next. Pure: no threads, no clock of its own."""

    poll_s: float
    now: float = 0.0                             # construction time: the first run is due at once
    backoff: Backoff = field(default_factory=Backoff)
    jitter: float = 0.1
    rng: random.Random = field(default_factory=random.Random)
    echo_window_s: float = 0.05                  # events first seen up to this long after a run ended are its echo
    recheck_s: float = 1.0                       # a dropped echo still earns one timed run this soon: a real
                                                 # hand change hidden in an echo is seen within ~1 s, not a poll
    failure_trigger_floor_s: float = 1.0

    def __post_init__(self) -> None:
        self.next_at = self.now
        self.pending: set[str] = set()           # sources of triggers waiting for the next run
        self.pending_fresh = False               # some pending trigger is not an echo of a run
        self.during: set[str] = set()            # triggers that arrived during the running run
        self.running = False
        self.failures = 0
        self.last_start: float | None = None
        self.last_end: float | None = None
        self.last_applied = False
        self.current_followup = False
        self.last_followup = False
        self.dropped = 0                         # echoes not followed up (loop guard)

    def trigger(self, now: float, source: str, since: float | None = None, until: float | None = None) -> bool:
        """A trigger whose events were first seen at `since` and last at `until` (default: now).

        False when dropped: covered by a run that started after its last event (that run re-read the
        world), or the echo of a follow-up run that applied something (the loop guard)."""
        until = now if until is None else until
        since = until if since is None else since
        if self.last_start is not None and until < self.last_start:
            return False
        if self.running:
            self.during.add(source)
            return True
        if source == "webhook":                  # never an echo of our own writes: a forge asked
            self.pending.add(source)
            self.pending_fresh = True
            return True
        if self.last_end is not None and since <= self.last_end + self.echo_window_s:
            if self.last_followup and self.last_applied:
                self.dropped += 1
                if not self.failures:        # while failing, the backoff decides when to look again
                    self.next_at = min(self.next_at, now + self.recheck_s)
                return False
            self.pending.add(source)
            return True
        self.pending.add(source)
        self.pending_fresh = True
        return True

    def due_in(self, now: float) -> float:
        """Seconds until the next run should start (<= 0: now)."""
        if self.running:
            return float("inf")
        if self.pending:
            if self.failures and not self.pending & FRESH and self.last_end is not None:
                return min(self.next_at, self.last_end + self.failure_trigger_floor_s) - now
            return 0.0
        return self.next_at - now

    def start(self, now: float) -> str:
        """A run starts now; returns why (the trigger sources, or poll / retry)."""
        reason = "+".join(sorted(self.pending)) or ("retry" if self.failures else "poll")
        self.current_followup = bool(self.pending) and not self.pending_fresh
        if self.current_followup:
            reason += " (follow-up)"
        self.pending.clear()
        self.pending_fresh = False
        self.during.clear()
        self.running = True
        self.last_start = now
        return reason

    def finish(self, now: float, ok: bool, applied: bool, backoff: bool | None = None) -> float:
        """The run ended; returns the delay until the next timed run. `backoff` (default: not ok) says
        whether the failure may pass on its own (Temporary: retry soon) or needs a new input (poll)."""
        self.running = False
        self.last_end, self.last_applied, self.last_followup = now, applied, self.current_followup
        backoff = (not ok) if backoff is None else backoff
        self.failures = self.failures + 1 if backoff else 0
        delay = self.backoff.delay(self.failures, self.rng) if backoff else jittered(self.poll_s, self.jitter, self.rng)
        self.next_at = now + delay
        if "webhook" in self.during:             # a push during the run: it may be newer than what the run fetched
            self.pending.add("webhook")
            self.pending_fresh = True
        if self.during:
            if self.current_followup and applied:
                self.dropped += 1
                if ok:
                    self.next_at = min(self.next_at, now + self.recheck_s)
            else:
                self.pending |= self.during
            self.during.clear()
        return delay


class Runtime:
    """Runs `reconcile()` per the schedule, single flight, until `stop()`. Never dies on an exception."""

    def __init__(self, reconcile: Callable[[], object], schedule: Schedule, recorder=None,
                 after_run: Callable[[object], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self._reconcile, self.schedule, self.recorder = reconcile, schedule, recorder
        self._after_run = after_run
        self._clock = clock
        self._cond = threading.Condition()
        self._stopping = False
        self.runs = 0
        self.running = False

    def trigger(self, source: str, since: float | None = None, until: float | None = None) -> None:
        with self._cond:
            if self._stopping:
                return
            if not self.schedule.trigger(self._clock(), source, since, until):
                log.debug("%s trigger dropped: already seen by a later run, or the echo of a follow-up apply "
                          "(a recheck may still be scheduled)", source)
            self._cond.notify()   # wake the loop either way: a dropped echo may have moved the next run closer

    def on_watch(self, sources: frozenset[str], since: float, until: float) -> None:
        """The watcher's callback: one trigger per batch (repo wins: it may end a backoff)."""
        self.trigger("repo" if "repo" in sources else next(iter(sorted(sources)), "host"), since, until)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    delay = self.schedule.due_in(self._clock())
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                if self._stopping:
                    return
                reason = self.schedule.start(self._clock())
                self.running = True
            result, ok, applied, backoff = self._run_once(reason)
            with self._cond:
                self.running = False
                delay = self.schedule.finish(self._clock(), ok, applied, backoff)
                self.runs += 1
            if not ok:
                log.warning("next attempt in %.1fs (failure %d in a row)", delay, self.schedule.failures)
            if self._after_run is not None:
                try:
                    self._after_run(result)
                except Exception:  # noqa: BLE001
                    log.exception("after-run hook failed")

    def _run_once(self, reason: str) -> tuple[object, bool, bool, bool]:
        """(result, ok, applied something, back off: the failure may pass on its own)."""
        started = time.monotonic()
        try:
            result = self._reconcile()
        except Exception as exc:  # noqa: BLE001 (one bad reconcile never kills the loop)
            log.exception("reconcile raised (trigger: %s)", reason)
            if self.recorder is not None:
                self.recorder.observe_exception(time.monotonic() - started, f"{type(exc).__name__}: {exc}")
            return None, False, True, True
        outcome = getattr(result, "result", "error")
        rev = getattr(result, "revision", None)
        log.log(logging.INFO if outcome in SUCCESS else logging.ERROR,
                "reconcile %s in %.2fs (trigger: %s)%s", outcome, getattr(result, "seconds", 0.0), reason,
                f": {result.error}" if getattr(result, "error", None) else "",
                extra={"result": outcome, "revision": rev.sha if rev else ""})
        if self.recorder is not None:
            try:
                self.recorder.observe(result)
            except Exception:  # noqa: BLE001 (metrics must never stop reconciling)
                log.exception("recording metrics failed")
        ok = outcome in SUCCESS
        backoff = not ok and getattr(result, "retry", Retry.BACKOFF) is Retry.BACKOFF
        return result, ok, bool(getattr(result, "outcomes", ())), backoff


def run_daemon(settings, lock_fd: int | None = None) -> int:
    """`gitops-agent run`: the caller holds the root lock for our whole life (`lock_fd`: its fd, which a
    self-upgrade hands to the new agent)."""
    from agent.core.layout import Layout
    from agent.service.http import MetricsServer
    from agent.service.metrics import Recorder
    from agent.compose import reconciler as build_reconciler
    from agent.service.store import load_status
    from agent.service.watch import Watcher, managed_paths

    from agent.core.errors import ConfigError

    if settings.poll_interval_s <= 0:
        raise ConfigError(f"poll interval must be positive, not {settings.poll_interval_s:g}")
    layout = Layout(settings.root)
    reconciler = build_reconciler(settings)
    recorder = Recorder()
    applied = load_status(layout.status_file, set_aside=True).applied
    recorder.restore(applied.sha if applied else None)
    runtime: Runtime | None = None
    hooks = None
    if settings.webhook_secret_file:
        from agent.logs import remember_secrets
        from agent.service.webhook import read_secret, webhook_routes

        secret = read_secret(settings.webhook_secret_file)
        remember_secrets([secret.decode("utf-8", "replace")])
        def pushed() -> None:
            reconciler.source.expect_push()     # the next resolve fetches at once (no ls-remote first)
            if runtime is not None:
                runtime.trigger("webhook")

        hooks = webhook_routes(secret, pushed,
                               lambda result: recorder.webhooks.labels(result).inc())
    try:
        from agent.service.status_page import status_routes

        refused = None
        if hooks:
            from agent.service.webhook import PATH as HOOK_PATH

            def refused(status: int, _method: str, path: str) -> None:
                if status == 413 and path == HOOK_PATH:     # answered before the handler: counted here
                    recorder.webhooks.labels("too_large").inc()

        server = MetricsServer(recorder, settings.listen, settings.poll_interval_s,
                               extra={**status_routes(layout), **(hooks or {})}, on_refused=refused)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {settings.listen}: {exc}") from None
    splay = random.uniform(0.0, settings.splay) if settings.splay > 0 else 0.0
    if splay:
        log.info("splay: first poll in %.1fs", splay)
    schedule = Schedule(settings.poll_interval_s, now=time.monotonic() + splay)
    watcher: Watcher | None = None
    from agent.service.selfupgrade import SelfUpgrade

    notifications = None
    if settings.notify:
        from agent.service.notify import build_notifications

        notifications = build_notifications(settings, lambda r: recorder.notifications.labels(r).inc())
    upgrade = SelfUpgrade(settings, layout, registry=recorder.registry, notifications=notifications,
                          waves=_agent_waves(reconciler, settings, layout))
    upgrade.on_start()
    handover = None

    def rewatch(result) -> None:
        nonlocal handover
        if notifications is not None:
            notifications.observe(result)
        stager = getattr(reconciler, "stager", None)
        if stager is not None:
            recorder.set_waves(stager.gates, stager.due)
        if lock_fd is not None and handover is None and not runtime.stopping:
            handover = upgrade.after_reconcile(*_applied_state(reconciler, settings, result))
            if handover is not None:
                runtime.stop()          # between two reconciles: the loop ends, then we exec below
                return
        if watcher is not None:
            watcher.watch(managed_paths(layout, settings.repo))

    runtime = Runtime(reconciler.reconcile, schedule, recorder, after_run=rewatch)
    watcher = Watcher(runtime.on_watch)

    signalled: list[str] = []

    def stop(name: str) -> None:
        signalled.append(name)          # a stop asked for wins over a handover prepared meanwhile
        if not runtime.stopping:
            log.info("%s: stopping after the current reconcile (services keep running)", name)
        runtime.stop()

    # the handlers only start a thread: they run in the main thread between two bytecodes, which may hold the
    # runtime's condition or be inside a write to the log stream (a log call right here can then raise
    # "RuntimeError: reentrant call")
    def on_stop(signum, _frame) -> None:
        threading.Thread(target=stop, args=(signal.Signals(signum).name,), name="stop", daemon=True).start()

    def on_hup(_signum, _frame) -> None:
        threading.Thread(target=log.warning, args=(SIGHUP_MESSAGE,), name="sighup", daemon=True).start()

    old = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    server.start()
    try:
        watcher.start()
        watcher.watch(managed_paths(layout, settings.repo))
    except OSError as exc:          # e.g. no inotify instances left: the poll still converges
        log.error("file watching unavailable (%s): drift is found by the %gs poll only", exc, settings.poll_interval_s)
    host, port = server.address
    log.info("gitops-agent running: root %s, mode %s, poll %gs, status page and metrics on http://%s:%d/, watching %d dirs",
             settings.root, settings.mode, settings.poll_interval_s, host, port, len(watcher.specs))
    listen_fd = None
    try:
        if settings.allow_chaos:
            _start_chaos(reconciler, recorder, runtime)
        runtime.run()
    finally:
        watcher.stop()
        if handover is not None:
            listen_fd = server.listener_dup()   # before stop closes it: the new agent serves on it
        server.stop(drain_s=10.0 if handover is not None else 0.0)   # a handover answers what it accepted
        for s, handler in old.items():
            signal.signal(s, handler)
    if handover is not None and lock_fd is not None and not signalled:
        log.info("handing over to gitops-agent %s after %d reconciles", handover.lock.version, runtime.runs)
        if notifications is not None and not notifications.flush(30.0):    # the exec would drop the queue
            log.error("notifications still queued are dropped by the handover")
        handover.exec(lock_fd, listen_fd)
    log.info("stopped after %d reconciles; managed services left running", runtime.runs)
    return 0


def _applied_state(reconciler, settings, result) -> tuple[Path | None, Path | None, str | None]:
    """(state dir, repo checkout, commit) of the revision a successful reconcile applied, else Nones."""
    rev = getattr(result, "revision", None)
    if rev is None or getattr(result, "result", None) not in SUCCESS or result.desired_from not in (None, rev.sha):
        return None, None, None
    checkout = reconciler.source.checkout(rev)
    return (checkout / settings.path if settings.path else checkout), checkout, rev.sha


def _agent_waves(reconciler, settings, layout):
    """The Stager that times fleet.yaml's agent.rollout.waves: the apps' own machinery and record file
    (<root>/state/waves.json, under the key "@agent"), reading the lockfile's history from the same mirror."""
    from agent.service.staging import Stager

    source = getattr(reconciler, "source", None)
    if source is None:
        return None
    return Stager(source, settings.path, settings.host, None, layout.state / "waves.json", None)


def _start_chaos(reconciler, recorder, runtime: Runtime, tick_s: float = 1.0) -> threading.Thread:
    """The chaos timer (--allow-chaos): acts on the `chaos:` blocks of the last loaded desired state."""
    from agent.service.chaos import ChaosMonkey

    monkey = ChaosMonkey(lambda: getattr(reconciler, "last_desired", None), reconciler.supervisor.running_client,
                         lb=reconciler.lb, recorder=recorder)

    def loop() -> None:
        while not runtime.stopping:
            try:
                monkey.tick()
            except Exception:  # noqa: BLE001 (chaos never takes the daemon down)
                log.exception("chaos tick failed")
            time.sleep(tick_s)

    thread = threading.Thread(target=loop, name="chaos", daemon=True)
    thread.start()
    log.warning("chaos allowed: apps with a chaos: block get induced failures")
    return thread
