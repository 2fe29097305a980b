"""One reconcile: source -> load & validate -> facts -> plan -> apply -> record.

Level-triggered: every call re-reads the world. An invalid revision is rejected whole and the
last good revision stays the desired state (drift against it is still healed). Status is always
recorded, whatever failed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from typing import TYPE_CHECKING

from agent.drivers.git import GitSource, Revision, is_ancestor
from agent.drivers.supervisor import EmbeddedSupervisor, SupervisorClient, connect, read_program_files
from agent.drivers.venv import VenvManager
from agent.service.desired_cache import DesiredCache
from agent.core.errors import AgentError, ConfigError, InvalidState, SupervisorError
from agent.core.facts import Facts
from agent.service.facts import collect, read_verified
from agent.core.layout import Layout
from agent.core.model import DesiredState
from agent.core.plan import Plan, PlanOptions, make_plan, render_service
from agent.core.rollout import CanaryProgress, canary_percent, canary_step, with_canary
from agent.settings import Settings
from agent.drivers.lb import LoadBalancer
from agent.service.store import RevisionRecord, Status, load_status, save_status

if TYPE_CHECKING:
    from agent.service.executor import Drivers, Outcome

# Imported lazily (a no-op `once` must stay fast): .apply (only when a plan has actions), .load (only
# when a revision is not in the desired-state cache), .drivers.signatures (only with --verify-signatures).

__all__ = ["SupervisorHandle", "Result", "Reconciler", "EXIT_OK", "EXIT_ERROR", "EXIT_DRIFT"]

log = logging.getLogger("gitops_agent.reconcile")

EXIT_OK, EXIT_ERROR, EXIT_DRIFT = 0, 1, 2


class SupervisorHandle:
    """The agent's supervisord: its own embedded one under the root, or an existing one by socket."""

    def __init__(self, spec: str, layout: Layout):
        self.embedded = EmbeddedSupervisor(layout.root) if spec == "embedded" else None
        self.url = spec
        self._client: SupervisorClient | None = None

    def running_client(self) -> SupervisorClient | None:
        """A client if supervisord answers now; never starts anything (facts and plan must not)."""
        if self.embedded is not None:
            return self.embedded_client() if self.embedded.is_running() else None
        client = connect(self.url)
        try:
            client.state()
        except SupervisorError:
            return None
        return client

    def embedded_client(self) -> SupervisorClient:
        if self._client is None:
            self._client = SupervisorClient(self.embedded.socket_path)
        return self._client

    def ensure(self) -> SupervisorClient:
        if self.embedded is not None:
            self._client = self.embedded.ensure_running()
            return self._client
        client = connect(self.url)
        client.state()
        return client


@dataclass
class Result:
    result: str                         # converged | applied | failed | invalid | error | drift
    revision: Revision | None = None
    plan: Plan | None = None
    outcomes: tuple[Outcome, ...] = ()
    error: str | None = None
    desired_from: str | None = None     # the revision the plan was made against
    facts: Facts | None = None
    seconds: float = 0.0
    drift: tuple = ()                   # planned actions left unapplied (warn mode, or plan only)
    rollouts: dict | None = None        # canary progress per app after this reconcile
    frontends: tuple = ()               # (app, listen address) of every traffic frontend
    new_commit: bool = False            # the revision differs from the last applied one

    @property
    def exit_code(self) -> int:
        if self.result in ("converged", "applied"):
            return EXIT_OK
        if self.result == "drift":
            return EXIT_DRIFT
        return EXIT_ERROR


class Reconciler:
    def __init__(self, settings: Settings):
        if not settings.repo:
            raise ConfigError("no state repo given: use --repo URL (or GITOPS_AGENT_REPO)")
        self.settings = settings
        self.layout = Layout(settings.root)
        self.source = GitSource(settings.repo, settings.ref, self.layout.source)
        self.supervisor = SupervisorHandle(settings.supervisor, self.layout)
        self.desired_cache = DesiredCache(self.layout.state / "desired")
        self.venvs = VenvManager(self.layout.root, retention=settings.retention)
        self.load_key = (settings.installer, settings.allow_root_services, settings.allow_chaos)   # what LoadOptions the loader gets
        self.lb = LoadBalancer(settings.lb, self.layout.root, config=settings.lb_config, reload=settings.lb_reload)
        self.plan_opts = PlanOptions(self.layout, retention=settings.retention,
                                     embedded=self.supervisor.embedded is not None, lb=self.lb)
        self.verifier = None
        if settings.verify_signatures:
            from agent.drivers.signatures import SignatureVerifier

            self.verifier = SignatureVerifier(self.layout.root, settings.trusted_keys, settings.allowed_signers)
        self._drivers: Drivers | None = None
        self._clean_files: int | None = None     # program files that supervisord had fully applied
        self.stager = None                       # staged waves, created for the first app that has them
        self.last_desired: DesiredState | None = None

    @property
    def drivers(self) -> "Drivers":
        if self._drivers is None:
            from agent.service.executor import Drivers

            self._drivers = Drivers(self.layout, self.venvs, self.supervisor, lb=self.lb,
                                    health_wait_s=self.settings.health_wait_s)
        return self._drivers

    # -- steps ---------------------------------------------------------------------------------

    def _state_dir(self, checkout: Path) -> Path:
        state = checkout / self.settings.path if self.settings.path else checkout
        if not state.is_dir():
            raise InvalidState([_problem(self.settings.path or ".", "the state path does not exist in this revision")])
        return state

    def desired_at(self, rev: Revision) -> DesiredState:
        """The validated desired state of `rev` for this host (cached: a commit never changes)."""
        checkout = self.source.checkout(rev)
        key = self.desired_cache.key(rev.sha, self.settings.path, self.settings.host, self.load_key)
        desired = self.desired_cache.get(key)
        if desired is None:
            from agent.core.load import LoadOptions, load_desired

            opts = LoadOptions(default_installer=self.settings.installer, allow_root=self.settings.allow_root_services,
                               allow_chaos=self.settings.allow_chaos, boundary=checkout)
            desired = load_desired(self._state_dir(checkout), self.settings.host, opts)
            self.desired_cache.put(key, desired)
        return self._staged(rev, desired)

    def _staged(self, rev: Revision, desired: DesiredState) -> DesiredState:
        """Staged waves (agent/waves.py, agent/staging.py): apps whose newest change is not due on this host
        yet keep their previous revision. Also remembered for the daemon's chaos timer and metrics."""
        if any(a.rollout for a in desired.apps) or self.stager is not None:
            if self.stager is None:
                from agent.core.load import LoadOptions
                from agent.service.staging import Stager

                opts = LoadOptions(default_installer=self.settings.installer,
                                   allow_root=self.settings.allow_root_services, allow_chaos=self.settings.allow_chaos)
                self.stager = Stager(self.source, self.settings.path, self.settings.host, opts,
                                     self.layout.state / "waves.json", lambda r: self._state_dir(self.source.checkout(r)))
            desired = self.stager.stage(rev, desired)
        self.last_desired = desired
        return desired

    def facts(self) -> Facts:
        client = self.supervisor.running_client()
        files = read_program_files(self.layout.programs)
        reload = None
        if client is not None:
            reload = lambda: self._reload_config(client, files)  # noqa: E731
        return collect(self.venvs, self.layout.envs, files, client, self.lb, read_verified(self.layout.verified), reload)

    def _reload_config(self, client, files: dict[str, str]):
        """supervisord's view of pending changes; skipped when the program files are exactly those of the
        last call that found nothing pending (supervisord re-parses every include on each call)."""
        key = hash(tuple(sorted(files.items())))
        if key == self._clean_files:
            return [], [], []
        pending = client.reload_config()
        self._clean_files = key if not any(pending) else None
        return pending

    # -- the reconcile ---------------------------------------------------------------------------

    def reconcile(self, apply: bool = True) -> Result:
        """One pass. `apply=False` plans only (the `plan` command and warn mode)."""
        started = time.monotonic()
        status = load_status(self.layout.status_file)
        result = self._reconcile(status, apply)
        result.seconds = time.monotonic() - started
        if apply:
            self._record(status, result)
        return result

    def _reconcile(self, status: Status, apply: bool) -> Result:
        try:
            rev = self.source.resolve()
        except AgentError as exc:
            return Result("error", error=f"source: {exc}")
        invalid: str | None = None
        try:
            invalid = self._refusal(rev, status)
            if invalid is None:
                desired = self.desired_at(rev)
                desired_from = rev.sha
        except InvalidState as exc:
            invalid = f"revision {rev.sha[:12]} is invalid:\n{exc}"
        except AgentError as exc:
            return Result("error", rev, error=f"checkout: {exc}")
        if invalid is not None:
            log.error("%s\nkeeping the last good revision", invalid)
            if status.applied is None:
                return Result("invalid", rev, error=invalid)
            last = status.applied
            try:
                desired = self.desired_at(Revision(last.sha, last.ref, last.committed_at, last.summary))
            except AgentError as exc2:
                return Result("invalid", rev, error=f"{invalid}\n(and the last good revision cannot be loaded: {exc2})")
            desired_from = last.sha

        try:
            facts = self.facts()
        except (AgentError, OSError) as exc:
            return Result("error", rev, error=f"facts: {exc}", desired_from=desired_from)
        desired, rollouts = self._rollouts(desired, facts, status)
        plan = make_plan(desired, facts, self.plan_opts)
        new_commit = invalid is None and (status.applied is None or status.applied.sha != rev.sha)
        base = dict(revision=rev, plan=plan, desired_from=desired_from, facts=facts, new_commit=new_commit,
                    rollouts=rollouts,
                    frontends=tuple((a.name, a.traffic.listen) for a in desired.apps if a.traffic is not None))
        if not apply:
            outcome = "invalid" if invalid else ("converged" if plan.converged else "drift")
            return Result(outcome, error=invalid, drift=plan.actions, **base)
        todo, drift = self._split_by_mode(plan, desired, new_commit)
        outcomes = ()
        if todo:
            from agent.service.executor import apply_plan

            outcomes = apply_plan(Plan(todo, plan.notes), self.drivers)
        failures = [o for o in outcomes if o.result != "ok"]
        if invalid:
            return Result("invalid", outcomes=outcomes, error=invalid, drift=drift, **base)
        if failures:
            rollouts = _fail_canaries(desired, rollouts, failures)
            base["rollouts"] = rollouts
            msg = "; ".join(f"{o.action.describe()}: {o.message}" for o in failures if o.result == "failed")
            return Result("failed", outcomes=outcomes, error=msg, drift=drift, **base)
        if drift:
            return Result("drift", outcomes=outcomes, drift=drift, **base)
        return Result("converged" if plan.converged else "applied", outcomes=outcomes, **base)

    def _rollouts(self, desired: DesiredState, facts: Facts, status: Status) -> tuple[DesiredState, dict]:
        """Walk each automatic canary one step (pure decision in rollout.py) on fresh probe evidence, and
        return the desired state with the weights the canary may have now."""
        rollouts = dict(status.rollouts)
        apps = []
        for app in desired.apps:
            canary = app.traffic.canary if app.traffic else None
            if canary is None:
                apps.append(app)
                rollouts.pop(app.name, None)
                continue
            svc = desired.services[canary.service]
            text = render_service(svc, desired.environments[svc.environment], self.layout)
            canary_id = hashlib.sha256(text.encode()).hexdigest()[:16]
            previous = CanaryProgress(**rollouts[app.name]) if app.name in rollouts else None
            fact = facts.programs.get(svc.name)
            probe = None
            if (previous and previous.id == canary_id and previous.state == "progressing" and svc.health
                    and fact is not None and fact.file_text == text and fact.state is not None):
                probe = _probe(svc.health.url, svc.health.timeout_s, canary.probes)
            progress = canary_step(canary, previous, canary_id, time.time(), probe)
            if previous is None or (progress.state, progress.step) != (previous.state, previous.step):
                log.info("canary %s: %s step %d/%d (%d%%) %s", app.name, progress.state, progress.step + 1,
                         len(canary.steps), canary_percent(canary, progress), progress.reason)
            rollouts[app.name] = asdict(progress)
            apps.append(replace(app, traffic=with_canary(app.traffic, canary_percent(canary, progress))))
        return DesiredState.of(desired.host, tuple(apps), desired.known_host, desired.notes), rollouts

    def _refusal(self, rev: Revision, status: Status) -> str | None:
        """Why this revision must not be applied even before reading it: signature, history rewrite."""
        if self.verifier is not None:
            try:
                signer = self.verifier.verify(self.source.mirror, rev.sha)
                log.info("commit %s signed by %s", rev.sha[:12], signer)
            except AgentError as exc:   # SignatureRefused
                return str(exc)
        applied = status.applied
        if self.settings.require_fast_forward and applied is not None and applied.sha != rev.sha:
            if not is_ancestor(self.source.cache_dir, applied.sha, rev.sha):
                return (f"revision {rev.sha[:12]} refused: not a fast-forward of the applied {applied.sha[:12]} "
                        "(history rewritten; --require-fast-forward is on)")
        return None

    def _split_by_mode(self, plan: Plan, desired: DesiredState, new_commit: bool) -> tuple[tuple, tuple]:
        """(actions to apply, drift to report only). An app's `mode` overrides the agent's; in warn mode
        drift is only reported, but a new commit is still applied when the agent runs with --apply-commits."""
        apply_warn = new_commit and self.settings.apply_commits
        todo, drift = [], []
        for action in plan.actions:
            mode = _mode_of(action, desired, self.settings.mode)
            (todo if mode == "enforce" or apply_warn else drift).append(action)
        return tuple(todo), tuple(drift)

    def _record(self, status: Status, result: Result) -> None:
        now = time.time()
        status.host = self.settings.host
        status.result = result.result
        status.last_reconcile_at = now
        rev = result.revision
        if rev is not None:
            status.attempted = RevisionRecord(rev.sha, rev.ref, rev.committed_at, rev.summary, now)
            if result.result in ("converged", "applied") and (status.applied is None or status.applied.sha != rev.sha):
                status.applied = RevisionRecord(rev.sha, rev.ref, rev.committed_at, rev.summary, now)
        if result.error:
            status.last_error, status.last_error_at = result.error, now
        elif result.result in ("converged", "applied"):
            status.last_error = None
        status.resources = _resources(status.resources, result, now)
        if result.rollouts is not None:
            status.rollouts = result.rollouts
        try:
            save_status(self.layout.status_file, status)
        except OSError as exc:
            log.error("cannot write status %s: %s", self.layout.status_file, exc)


def _fail_canaries(desired: DesiredState, rollouts: dict, failures) -> dict:
    """A canary release that fails to start or fails its health gate ends the canary at 0%, for good
    (until a commit changes the canary): it is not retried step by step."""
    failed = {o.action.key for o in failures if o.result == "failed"}
    out = dict(rollouts)
    for app in desired.apps:
        canary = app.traffic.canary if app.traffic else None
        progress = out.get(app.name)
        if canary and progress and progress["state"] == "progressing" and f"program:{canary.service}" in failed:
            out[app.name] = {**progress, "state": "failed",
                             "reason": "the canary release failed to start or failed its health gate; aborted to 0%"}
    return out


def _probe(url: str, timeout_s: float, count: int) -> tuple[int, int]:
    """(probes, errors) of `count` requests to a service's health URL: the canary gate's evidence."""
    from agent.service.executor import http_healthy

    errors = sum(0 if http_healthy(url, timeout_s)[0] else 1 for _ in range(count))
    return count, errors


def _mode_of(action, desired: DesiredState, default: str) -> str:
    kind, _, name = action.key.partition(":")
    owner = desired.services.get(name) if kind == "program" else desired.environments.get(name) if kind == "venv" else None
    if owner is None:
        return default
    return next((a.mode for a in desired.apps if a.name == owner.app and a.mode), default)


def _problem(field: str, message: str):
    from agent.core.errors import Problem

    return Problem(field, None, "path", message)


def _resources(previous: dict[str, dict], result: Result, now: float) -> dict[str, dict]:
    """Per-resource state after a reconcile: ok, failed (with the cause), or drift (planned, not applied)."""
    if result.plan is None:
        return previous
    resources: dict[str, dict] = {}
    facts = result.facts
    if facts is not None:
        for name in facts.venvs:
            resources[f"venv:{name}"] = {"state": "ok", "message": "", "at": now}
        for name in facts.programs:
            resources[f"program:{name}"] = {"state": "ok", "message": facts.programs[name].state or "", "at": now}
    for action in result.plan.actions:
        resources[action.key] = {"state": "drift", "message": action.reason, "at": now}
    failed = {}
    for o in result.outcomes:
        if o.result == "ok":
            resources[o.action.key] = {"state": "ok", "message": o.message, "at": now}
    for o in result.outcomes:
        if o.result != "ok" and o.action.key not in failed:
            failed[o.action.key] = o
            resources[o.action.key] = {"state": "failed", "message": o.message, "at": now}
    for o in result.outcomes:
        if o.result == "ok" and o.action.kind in ("remove_program", "remove_environment"):
            resources.pop(o.action.key, None)
    return dict(sorted(resources.items()))
