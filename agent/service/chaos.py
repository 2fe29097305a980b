"""Induced failure, opt-in twice: an app's `chaos:` block, and an agent run with --allow-chaos.

The daemon ticks `ChaosMonkey.tick()` about once a second. Events are Poisson: each tick an app's kill
fires with probability 1 - exp(-rate_per_hour * dt / 3600). Kinds:

- kill: SIGKILL one random RUNNING program of the app (supervisord's `signalProcess`); supervisord's
  autorestart (and the agent's drift healing behind it) must bring it back. One at a time per app, as
  Chaos Monkey does per group: no kill while an earlier one of the app is not back, so chaos tests
  recovery without ever taking a whole app down (two backends killed 0.3 s apart on a busy host left
  nginx with no upstream: 502s). The time until the program
  is RUNNING again with a new pid is logged and observed (`gitops_agent_chaos_recovery_seconds`).
- disable_backend: weight 0 for one random backend of the app's frontend through HAProxy's runtime API,
  for `duration`; restored by the monkey afterwards (and healed as drift by the next reconcile anyway).

Every event is logged and counted: `gitops_agent_chaos_events_total{app,kind}`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

from agent.core.facts import ProcessState

__all__ = ["ChaosMonkey", "fires"]

log = logging.getLogger("gitops_agent.chaos")


def fires(rate_per_hour: float, dt: float, rng: random.Random) -> bool:
    """Whether a Poisson process of `rate_per_hour` has an event in the next `dt` seconds."""
    return rate_per_hour > 0 and rng.random() < 1.0 - math.exp(-rate_per_hour * dt / 3600.0)


@dataclass
class _Kill:
    app: str
    program: str
    pid: int
    at: float


class ChaosMonkey:
    def __init__(self, desired: Callable[[], object], supervisor: Callable[[], object], lb=None, recorder=None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self._desired, self._supervisor, self.lb, self.recorder = desired, supervisor, lb, recorder
        self.rng = rng or random.Random()
        self.clock = clock
        self._last: float | None = None
        self.pending: list[_Kill] = []                  # killed, not yet seen back
        self._restore: list[tuple[float, str, str, int]] = []   # (at, backend, server, weight)
        self.events: list[dict] = []                    # every event (kill, back, disable, restore), for tests/status

    def tick(self) -> None:
        now = self.clock()
        dt, self._last = (0.0 if self._last is None else now - self._last), now
        self._check_back(now)
        self._restore_due(now)
        desired = self._desired()
        for app in getattr(desired, "apps", ()):
            chaos = app.chaos
            if chaos is None:
                continue
            if fires(chaos.kill_per_hour, dt, self.rng):
                self._kill(app, now)
            if fires(chaos.disable_per_hour, dt, self.rng):
                self._disable(app, chaos.disable_s, now)

    # -- kinds ---------------------------------------------------------------------------------------

    def _kill(self, app, now: float) -> None:
        if any(k.app == app.name for k in self.pending):
            return                   # the last kill of this app is not back yet: one failure at a time
        client = self._supervisor()
        if client is None:
            return
        try:
            info = client.process_info()
        except Exception as exc:  # noqa: BLE001 (chaos must never break the daemon)
            log.warning("chaos: cannot read supervisord: %s", exc)
            return
        names = sorted(s.name for s in app.services if info.get(s.name, {}).get("statename") == ProcessState.RUNNING)
        if not names:
            return
        name = self.rng.choice(names)
        members = info[name].get("members")
        if members:                  # a multi-process service (processes: N): kill one of its processes
            name = self.rng.choice(sorted(members))
        pid = int(info.get(name, {}).get("pid") or 0)
        try:
            client._call("supervisor.signalProcess", name, "KILL")
        except Exception as exc:  # noqa: BLE001
            log.warning("chaos: kill %s failed: %s", name, exc)
            return
        self.pending.append(_Kill(app.name, name, pid, now))
        self._event(app.name, "kill", f"killed {name} (pid {pid}) with SIGKILL")

    def _check_back(self, now: float) -> None:
        if not self.pending:
            return
        client = self._supervisor()
        try:
            info = client.process_info() if client is not None else {}
        except Exception:  # noqa: BLE001
            return
        for k in list(self.pending):
            p = info.get(k.program, {})
            if p.get("statename") == ProcessState.RUNNING and int(p.get("pid") or 0) not in (0, k.pid):
                self.pending.remove(k)
                seconds = now - k.at
                log.warning("chaos: %s back (pid %s) after %.2fs", k.program, p.get("pid"), seconds)
                self.events.append({"app": k.app, "kind": "back", "program": k.program, "seconds": seconds})
                if self.recorder is not None:
                    self.recorder.chaos_recovery.observe(seconds)

    def _disable(self, app, seconds: float, now: float) -> None:
        if self.lb is None or getattr(self.lb, "kind", None) != "haproxy" or app.traffic is None:
            return
        backends = sorted(n for n, w in app.traffic.weights if w > 0)
        if len(backends) < 2:
            return      # never take the only live backend away: that is an outage, not a drill
        from agent.drivers.haproxy import HAProxyRuntime

        runtime = HAProxyRuntime(self.lb.driver.socket_path)
        try:
            # what HAProxy serves now, not what the commit says: while the agent starts HAProxy every weight
            # is 0, and a weight "restored" from then would undo the agent's own.
            live = {n: runtime.get_weight(app.name, n) for n in backends}
            serving = sorted(n for n, w in live.items() if w > 0)
            if len(serving) < 2:
                return
            name = self.rng.choice(serving)
            runtime.set_weight(app.name, name, 0)
        except Exception as exc:  # noqa: BLE001
            log.warning("chaos: disable a backend of %s failed: %s", app.name, exc)
            return
        weight = live[name]
        self._restore.append((now + seconds, app.name, name, weight))
        self._event(app.name, "disable_backend", f"backend {name} weight {weight} -> 0 for {seconds:g}s")

    def _restore_due(self, now: float) -> None:
        for item in [r for r in self._restore if r[0] <= now]:
            self._restore.remove(item)
            _, backend, server, weight = item
            from agent.drivers.haproxy import HAProxyRuntime

            runtime = HAProxyRuntime(self.lb.driver.socket_path)
            try:
                if runtime.get_weight(backend, server) != 0:
                    continue      # the agent set it meanwhile (healed as drift, or a new split): keep that
                runtime.set_weight(backend, server, weight)
                log.warning("chaos: backend %s/%s weight back to %d", backend, server, weight)
            except Exception as exc:  # noqa: BLE001 (the next reconcile heals it as drift)
                log.warning("chaos: restoring %s/%s failed (%s): the next reconcile heals it", backend, server, exc)

    def _event(self, app: str, kind: str, message: str) -> None:
        log.warning("chaos: app %s: %s", app, message)
        self.events.append({"app": app, "kind": kind, "message": message})
        if self.recorder is not None:
            self.recorder.chaos_events.labels(app, kind).inc()
