"""Metrics (DESIGN.md §5); agent.service.http serves them on /metrics, /healthz and /readyz.

A `Recorder` owns its collectors on its own `CollectorRegistry` (nothing is registered globally) and
turns one reconcile `Result` into metric updates (`observe`). Label sets stay bounded: resources,
services, action kinds and result names only; the one commit SHA lives in `applied_revision_info`.
Series of resources that no longer exist are removed, not left at their last value.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from agent import __version__
from agent.core._record import record
from agent.core.facts import ProcessState
from agent.core.outcome import ReconcileResult, ResourceState, Verdict
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Recorder", "resource_of", "RESULTS"]

log = logging.getLogger("gitops_agent.metrics")

RESULTS = tuple(r.value for r in ReconcileResult)
_UP_ACTIONS = ("start_program", "restart_program", "update_program", "check_health")

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
C2C_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 86400)


def resource_of(key: str) -> tuple[str, str]:
    """An action key as (kind, name): "program:web" -> ("program", "web"); "supervisor" -> ("supervisor", "supervisor")."""
    kind, sep, name = key.partition(":")
    return (kind, name) if sep else (key, key)


@record
class Readiness:
    ready: bool
    reason: str


class Recorder:
    """Every collector of the agent, and the little memory needed between reconciles (drift start times)."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.clock = clock
        r = self.registry
        p = "gitops_agent_"
        self.drift = Gauge(p + "drift", "1 while the resource differs from the desired state", ["kind", "name"], registry=r)
        self.drifted_resources = Gauge(p + "drifted_resources", "Resources currently drifted", registry=r)
        self.drift_since = Gauge(p + "drift_since_timestamp_seconds", "When the resource's current drift began",
                                 ["kind", "name"], registry=r)
        self.drift_corrected = Counter(p + "drift_corrected", "Drifted resources the agent healed", ["kind"], registry=r)
        self.reconcile = Counter(p + "reconcile", "Reconciles by result", ["result"], registry=r)
        self.duration = Histogram(p + "reconcile_duration_seconds", "Duration of one reconcile",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.revision_info = Gauge(p + "applied_revision_info", "The revision fully applied (value 1)", ["revision"],
                                   registry=r)
        self.revision_invalid = Gauge(p + "revision_invalid", "1 while the tracked revision is rejected as invalid",
                                      registry=r)
        self.fetch_errors = Counter(p + "source_fetch_errors", "Failures to fetch or resolve the state repo", registry=r)
        self.last_success = Gauge(p + "last_success_timestamp_seconds", "End of the last successful reconcile",
                                  registry=r)
        self.commit_to_converged = Histogram(p + "commit_to_converged_seconds",
                                             "From commit time to the revision fully applied on this host",
                                             buckets=C2C_BUCKETS, registry=r)
        self.actions = Counter(p + "actions", "Executed plan actions by kind and result", ["action", "result"], registry=r)
        self.rollbacks = Counter(p + "rollbacks", "Failed service changes rolled back", ["service"], registry=r)
        self.job_runs = Counter(p + "job_runs", "Release jobs run, by app, job and result (succeeded / failed)",
                                ["app", "job", "result"], registry=r)
        self.service_up = Gauge(p + "service_up", "1 while the service's program is RUNNING", ["service"], registry=r)
        self.traffic_weight = Gauge(p + "traffic_weight", "Load-balancer weight of a backend", ["frontend", "backend"],
                                    registry=r)
        self.wave_gate = Gauge(p + "wave_gate", "1 for the last result of a staged wave's gate on this host",
                               ["app", "wave", "result"], registry=r)
        self.wave_due = Gauge(p + "wave_due", "1 when this host runs the newest change of an app with waves",
                              ["app"], registry=r)
        self.chaos_events = Counter(p + "chaos_events", "Induced failures by app and kind", ["app", "kind"], registry=r)
        self.chaos_recovery = Histogram(p + "chaos_recovery_seconds", "From a chaos kill to the program RUNNING again",
                                        buckets=DURATION_BUCKETS, registry=r)
        self.build_info = Gauge(p + "build_info", "The running agent's version (value 1)", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.suspended = Gauge(p + "suspended", "1 while applying is suspended for the app (* = the whole host)",
                               ["app"], registry=r)
        self.quarantined = Gauge(p + "quarantined", "1 while a failed revision of the app is quarantined", ["app"],
                                 registry=r)
        self.webhooks = Counter(p + "webhook_requests", "Push webhooks by result (accepted / rejected / too_large: "
                                "a body over 1 MiB, 413)", ["result"], registry=r)
        for result in ("accepted", "rejected", "too_large"):
            self.webhooks.labels(result)
        self.notifications = Counter(p + "notifications", "Notifications by result (sent / failed)", ["result"],
                                     registry=r)
        for result in ("sent", "failed"):
            self.notifications.labels(result)
        self.window_open = Gauge(p + "window_open", "1 while the app's release window is open (apps with windows)",
                                 ["app"], registry=r)
        self._windows: set[str] = set()
        self._control: dict[str, set[str]] = {"suspended": set(), "quarantined": set()}
        self._gates: set[tuple[str, str, str]] = set()
        self._due: set[str] = set()
        for result in RESULTS:
            self.reconcile.labels(result)
        self._drift_began: dict[str, float] = {}        # key -> wall time the drift was first seen
        self._resources: set[str] = set()               # keys with a drift series
        self._services: set[str] = set()
        self._applied: str | None = None
        self._traffic: set[tuple[str, str]] = set()
        self._lock = threading.RLock()  # re-entrant: observe() sets traffic weights under it
        self.last_result: str | None = None
        self.last_error: str | None = None
        self.last_end: float | None = None              # wall time the last reconcile ended
        self.last_seconds: float = 0.0

    # -- inputs --------------------------------------------------------------------------------

    def restore(self, applied_sha: str | None) -> None:
        """At start: the revision a previous agent applied (from the status file)."""
        with self._lock:
            self._set_applied(applied_sha)

    def observe(self, result) -> None:
        """Update every metric from one reconcile `Result` (agent.service.reconciler.Result)."""
        with self._lock:
            self._observe(result)

    def observe_exception(self, seconds: float, message: str) -> None:
        """A reconcile that raised instead of returning a Result (a bug or an unexpected OSError)."""
        with self._lock:
            self.reconcile.labels("error").inc()
            self.duration.observe(seconds)
            self._finish("error", message, seconds)

    def set_waves(self, gates: dict[tuple[str, int], str], due: dict[str, bool]) -> None:
        """Staged waves after a reconcile: each gate's last result, and which apps run their newest change."""
        with self._lock:
            series = {(app, str(wave), result) for (app, wave), result in gates.items()}
            for key in self._gates - series:
                self.wave_gate.remove(*key)
            for key in series:
                self.wave_gate.labels(*key).set(1)
            self._gates = series
            for app in self._due - set(due):
                self.wave_due.remove(app)
            for app, is_due in due.items():
                self.wave_due.labels(app).set(1 if is_due else 0)
            self._due = set(due)

    def set_traffic(self, weights: dict[tuple[str, str], float]) -> None:
        """Replace the traffic weights: {(frontend, backend): weight}; backends gone lose their series."""
        with self._lock:
            for fe, be in self._traffic - set(weights):
                self.traffic_weight.remove(fe, be)
            for (fe, be), w in weights.items():
                self.traffic_weight.labels(fe, be).set(w)
            self._traffic = set(weights)

    def _observe(self, result) -> None:
        now = self.clock()
        self.reconcile.labels(result.result).inc()
        self.duration.observe(result.seconds)
        if result.source_failed:
            self.fetch_errors.inc()
        if result.result is ReconcileResult.INVALID:
            self.revision_invalid.set(1)
        elif result.revision is not None and result.result is not ReconcileResult.ERROR:
            self.revision_invalid.set(0)
        for o in result.outcomes:
            self.actions.labels(o.action.kind, o.result).inc()
            if o.verdict is Verdict.ROLLED_BACK:
                self.rollbacks.labels(resource_of(o.action.key)[1]).inc()
            if o.action.kind == "run_job" and o.verdict is not Verdict.SKIPPED_BLOCKED:
                app, _, job = resource_of(o.action.key)[1].partition("/")
                self.job_runs.labels(app, job, "succeeded" if o.ok else "failed").inc()
        if result.result in (ReconcileResult.CONVERGED, ReconcileResult.APPLIED) and result.revision is not None:
            sha = result.revision.sha
            if result.new_commit and sha != self._applied and result.revision.committed_at:
                self.commit_to_converged.observe(max(0.0, now - result.revision.committed_at))
            self._set_applied(sha)
        if result.plan is not None:
            self._observe_resources(result, now)
        if result.facts is not None:
            self._observe_services(result)
            self._observe_traffic(result)
        if getattr(result, "windows", None) is not None:
            for app in self._windows - set(result.windows):
                self.window_open.remove(app)
            for app, is_open in result.windows.items():
                self.window_open.labels(app).set(1 if is_open else 0)
            self._windows = set(result.windows)
        if getattr(result, "control", None) is not None:
            self._observe_control(result.control, getattr(result, "apps", ()))
        if result.result.success:
            self.last_success.set(now)
        self._finish(result.result, result.error, result.seconds)

    def _observe_control(self, control, apps) -> None:
        """Suspensions and quarantines: a series per desired app (0 or 1), `*` for the host, and any app
        still suspended or quarantined though no longer desired here."""
        from agent.core.control import HOST

        for gauge, name, marked in ((self.suspended, "suspended", set(control.suspended)),
                                    (self.quarantined, "quarantined", set(control.quarantined))):
            series = set(apps) | marked | ({HOST} if name == "suspended" else set())
            for app in self._control[name] - series:
                gauge.remove(app)
            for app in sorted(series):
                gauge.labels(app).set(1 if app in marked else 0)
            self._control[name] = series

    def _observe_traffic(self, result) -> None:
        """Weights the load balancer serves now: what this apply set, else what the facts saw."""
        weights = {}
        live = (result.facts.traffic or {}).get("weights") or {}
        for fe, backends in live.items():
            for be, w in backends.items():
                weights[(fe, be)] = float(w)
        for o in result.outcomes:
            if o.ok and o.action.kind == "configure_traffic":
                weights = {(fe.name, be.name): float(be.weight) for fe in o.action.frontends for be in fe.backends}
        self.set_traffic(weights)

    def _finish(self, result: str, error: str | None, seconds: float) -> None:
        self.last_result, self.last_error = result, error
        self.last_end, self.last_seconds = self.clock(), seconds

    def _set_applied(self, sha: str | None) -> None:
        if sha == self._applied:
            return
        if self._applied is not None:
            self.revision_info.remove(self._applied)
        if sha is not None:
            self.revision_info.labels(sha).set(1)
        self._applied = sha

    def _observe_resources(self, result, now: float) -> None:
        """Drift series from the reconcile's resource states (agent.core.outcome.resource_states: the same
        computation status.json holds), plus the drift this apply corrected."""
        known = set(result.resources)
        drifted = {k for k, r in result.resources.items() if ResourceState(r["state"]).drifted}
        ok = {o.action.key for o in result.outcomes if o.ok}
        # drift healed by this apply: what an earlier reconcile saw drifted, plus (unless the plan is a
        # new commit's intended change) what this plan found drifted, now applied without failure
        planned = set() if result.new_commit else {a.key for a in result.plan.actions}
        for key in sorted(((set(self._drift_began) | planned) & ok) - drifted):
            self.drift_corrected.labels(resource_of(key)[0]).inc()
        for key in sorted(self._resources - known):
            self.drift.remove(*resource_of(key))
        for key in sorted(known):
            self.drift.labels(*resource_of(key)).set(1 if key in drifted else 0)
        self._resources = known
        for key in sorted(set(self._drift_began) - drifted):
            del self._drift_began[key]
            self.drift_since.remove(*resource_of(key))
        for key in sorted(drifted - set(self._drift_began)):
            self._drift_began[key] = now
            self.drift_since.labels(*resource_of(key)).set(now)
        self.drifted_resources.set(len(drifted))

    def _observe_services(self, result) -> None:
        """service_up from the facts (read before apply), corrected by what this apply did to each program."""
        # A gated program that passed its gate is up while supervisord still says STARTING (its startsecs).
        up = {name: (p.state == ProcessState.RUNNING and not (p.gated_pid and p.pid and p.pid != p.gated_pid))
              or (p.state == ProcessState.STARTING and bool(p.gated_pid) and p.pid == p.gated_pid)
              for name, p in result.facts.programs.items()}
        for o in result.outcomes:
            kind, name = resource_of(o.action.key)
            if kind == "program" and o.ok:
                if o.action.kind in _UP_ACTIONS:
                    up[name] = True
                elif o.action.kind == "remove_program":
                    up.pop(name, None)
        for o in result.outcomes:    # a failure on a program wins over its earlier successes
            kind, name = resource_of(o.action.key)
            if kind == "program" and o.failed and o.action.kind in _UP_ACTIONS:
                up[name] = False
        for name in sorted(self._services - set(up)):
            self.service_up.remove(name)
        for name, is_up in sorted(up.items()):
            self.service_up.labels(name).set(1 if is_up else 0)
        self._services = set(up)

    # -- outputs -------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def readiness(self, poll_interval_s: float, now: float | None = None) -> Readiness:
        """Ready when the last reconcile ended within 3 poll intervals (+ its own duration) and was not an error."""
        now = self.clock() if now is None else now
        with self._lock:
            if self.last_end is None:
                return Readiness(False, "no reconcile finished yet")
            age = now - self.last_end
            limit = 3 * poll_interval_s + self.last_seconds
            if age > limit:
                return Readiness(False, f"stale: the last reconcile ended {age:.0f}s ago (limit {limit:.0f}s)")
            if self.last_result == "error":
                return Readiness(False, f"the last reconcile failed: {self.last_error or 'error'}")
            return Readiness(True, f"last reconcile {self.last_result} {age:.1f}s ago")
