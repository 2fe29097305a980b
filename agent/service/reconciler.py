"""One reconcile: source -> load & validate -> facts -> plan -> apply, then record.

Level-triggered: every call re-reads the world. An invalid revision is rejected whole and the
last good revision stays the desired state (drift against it is still healed). Status is always
recorded, whatever failed (a `finally`), and the result says by its type what the daemon does next.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from agent.core._record import record
from agent.core.control import Control, Quarantine, app_of, hold, inputs_digest
from agent.core.errors import AgentError, InvalidState, Permanent
from agent.core.facts import Facts
from agent.core.layout import Layout
from agent.core.materials import NO_MATERIALS, Materials
from agent.core.model import DesiredState
from agent.core.outcome import Outcome, ReconcileResult, Retry, Verdict, resource_states
from agent.core.plan import Plan, PlanOptions, make_plan, render_service
from agent.core.status_view import recorded
from agent.core.window_hold import WindowParts, compose, split, waiting_apps
from agent.core.rollout import CanaryProgress, canary_percent, canary_step, with_canary
from agent.drivers.git import GitSource, Revision, is_ancestor
from agent.drivers.lb import LoadBalancer
from agent.drivers.supervisor import read_program_files
from agent.drivers.supervisor_handle import SupervisorHandle
from agent.drivers.venv import VenvManager
from agent.service.control import control_file, load_control, update_control
from agent.service.desired_cache import DesiredCache
from agent.service.facts import app_file_facts, collect, read_verified
from agent.service.store import RevisionRecord, Status, load_status, save_status
from agent.settings import Settings

if TYPE_CHECKING:
    from agent.service.executor import Drivers

# Imported lazily (a no-op `once` must stay fast): .apply (only when a plan has actions), .load (only
# when a revision is not in the desired-state cache), .drivers.signatures (only with --verify-signatures).

__all__ = ["World", "Result", "Reconciler", "EXIT_OK", "EXIT_ERROR", "EXIT_DRIFT"]

log = logging.getLogger("gitops_agent.reconcile")

EXIT_OK, EXIT_ERROR, EXIT_DRIFT = 0, 1, 2


@dataclass
class Result:
    """One reconcile, as values: what it found, what it did, and what the daemon should do next."""

    result: ReconcileResult
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
    retry: Retry = Retry.POLL           # decided by the failure's error type, never by its text
    source_failed: bool = False         # the state repo could not be fetched or resolved
    finished_at: float = 0.0            # wall time the reconcile ended (set by `reconcile`)
    desired: DesiredState | None = None  # the desired state the plan was made against (the status page's apps)
    held: tuple = ()                    # agent.core.control.Held: planned actions a suspension/quarantine held back
    control: object = None              # agent.core.control.Control read for this reconcile (suspend, quarantine)
    apps: tuple = ()                    # the names of the apps desired on this host
    owners: dict | None = None          # action key -> the app it belongs to (notifications)
    windows: dict | None = None         # app -> its release window is open now (apps with windows only)
    closed: dict | None = None          # app -> why a closed window holds its new commit
    deployed: dict | None = None        # app -> the revision it last fully applied, after this apply

    @cached_property
    def resources(self) -> dict[str, dict]:
        """Each resource's state (ok / drift / failed): the one drift computation, read by status.json and
        the metrics alike. Empty when no plan was made (status then keeps its previous resources)."""
        if not self.plan:
            return {}
        out = resource_states(self.facts, self.plan, self.outcomes, self.finished_at)
        for h in self.held:     # a held change (e.g. waiting for its window) is drift, even where a heal succeeded
            if h.action.key in out and out[h.action.key]["state"] == "ok":
                out[h.action.key] = {**out[h.action.key], "state": "drift", "message": h.why}
        return out

    @property
    def exit_code(self) -> int:
        if self.result in (ReconcileResult.CONVERGED, ReconcileResult.APPLIED):
            return EXIT_OK
        if self.result is ReconcileResult.DRIFT:
            return EXIT_DRIFT
        return EXIT_ERROR


class _Stop(Exception):
    """A step ended the reconcile early with this result (the steps' `return` of a final value)."""

    def __init__(self, result: Result):
        super().__init__(result.result)
        self.result = result


def _retry_after(exc: BaseException) -> Retry:
    return Retry.POLL if isinstance(exc, Permanent) else Retry.BACKOFF


@record
class World:
    """Everything a reconcile touches, each behind a small interface; built by `agent.compose` (tests may
    hand in their own)."""

    layout: Layout
    source: GitSource
    supervisor: SupervisorHandle
    venvs: VenvManager
    lb: LoadBalancer
    desired_cache: DesiredCache
    verifier: object | None = None      # agent.drivers.signatures.SignatureVerifier with --verify-signatures
    scratch: Path | None = None         # read-only worlds: the temp dir that stands in for the root's writes
    clock: Callable[[], float] = time.time

    def close(self) -> None:
        self.source.close()
        if self.scratch is not None:
            import shutil

            shutil.rmtree(self.scratch, ignore_errors=True)


class Reconciler:
    """source -> load -> facts -> plan -> apply, then record (always). Each step either returns its value
    or ends the reconcile with a typed Result (`_Stop`); `reconcile` records whatever came out."""

    def __init__(self, settings: Settings, world: World | None = None, read_only: bool = False):
        if world is None:
            from agent.compose import world as build_world

            world = build_world(settings)
        self.settings = settings
        self.world = world
        self.read_only = read_only              # plan/status/facts: write nothing under the root, probe nothing
        self.layout = world.layout
        self.source = world.source
        self.supervisor = world.supervisor
        self.desired_cache = world.desired_cache
        self.venvs = world.venvs
        self.lb = world.lb
        self.verifier = world.verifier
        self.load_key = (settings.installer, settings.allow_root_services, settings.allow_chaos)   # what LoadOptions the loader gets
        self.plan_opts = PlanOptions(self.layout, retention=settings.retention,
                                     embedded=self.supervisor.embedded is not None, lb=self.lb)
        self._drivers: Drivers | None = None
        self._clean_files: int | None = None     # program files that supervisord had fully applied
        self.stager = None                       # staged waves, created for the first app that has them
        self.last_desired: DesiredState | None = None
        self._secrets: dict[tuple, dict[str, str]] = {}     # decrypted secrets (memory only), see `materials`
        self._key: bytes | None = None
        self._last_digests: tuple | None = None    # (the desired state, its apps' inputs digests)
        self._last_materials: tuple = ()     # ((id of the desired state, identity stamp, its materials, it), ...)
        self._unstaged_memo: dict[str, DesiredState] = {}   # sha -> its desired state (apps a window holds)
        self._window_sources: dict[str, str | None] = {}    # app a window holds -> the revision it keeps
        self._composed: tuple | None = None      # (key, the composed desired state, the desired state it came from)
        self._last_plan: tuple | None = None     # (desired state, materials, facts, the plan make_plan made of them)
        self._materials: Materials = NO_MATERIALS     # the last plan's, handed to the drivers that apply it

    def close(self) -> None:
        self.world.close()

    @property
    def drivers(self) -> "Drivers":
        if self._drivers is None:
            from agent.service.executor import Drivers

            self._drivers = Drivers(self.layout, self.venvs, self.supervisor, lb=self.lb,
                                    health_wait_s=self.settings.health_wait_s, materials=self._materials)
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
                                     self.layout.state / "waves.json", lambda r: self._state_dir(self.source.checkout(r)),
                                     read_only=self.read_only)
            desired = self.stager.stage(rev, desired)
        self.last_desired = desired
        return desired

    def facts(self) -> Facts:
        client = self.supervisor.running_client()
        files = read_program_files(self.layout.programs)
        reload = None
        if client is not None:
            reload = lambda: self._reload_config(client, files)  # noqa: E731
        facts = collect(self.venvs, self.layout.envs, files, client, self.lb, read_verified(self.layout.verified), reload)
        if self.layout.apps.is_dir() or self.layout.jobs.is_dir():
            facts = replace(facts, **app_file_facts(self.layout, self._inputs_key()))
        return facts

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
        """One pass. `apply=False` plans only (the `plan` command and warn mode). Status and metrics input
        are recorded whatever happens, an internal error included (it becomes an `error` result)."""
        started = time.monotonic()
        status = load_status(self.layout.status_file, set_aside=apply and not self.read_only)
        result = Result(ReconcileResult.ERROR, error="the reconcile did not finish")
        try:
            result = self._steps(status, apply)
        except _Stop as stop:
            result = stop.result
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the record of this reconcile
            log.exception("reconcile failed unexpectedly")
            result = Result(ReconcileResult.ERROR, error=f"internal error: {type(exc).__name__}: {exc}",
                            retry=Retry.BACKOFF)
        finally:
            result.seconds = time.monotonic() - started
            result.finished_at = self.world.clock()
            if apply and not self.read_only:
                self._record(status, result)
        return result

    def _steps(self, status: Status, apply: bool) -> Result:
        rev = self._source_step()
        desired, desired_from, invalid = self._load_step(rev, status)
        facts = self._facts_step(rev, desired_from)
        if invalid is None:
            invalid = self._emptying(rev, desired, facts)
            if invalid is not None:
                desired, desired_from = self._last_good(rev, status, invalid)
        new_commit = invalid is None and (status.applied is None or status.applied.sha != rev.sha)
        windows, closed = self._windows(desired, new_commit)
        target, waiting = self._window_target(desired, desired_from, closed, status)
        materials = self._materials_step(rev, target, desired_from, invalid)
        loaded = target
        target, rollouts = self._rollouts(target, facts, status, materials)
        heal = self._plan(target, facts, materials)
        if materials.sealed and heal.actions:
            # actions carry file contents and secret values: decrypt and render for real, plan again (same
            # digests, so the same actions; the rollouts above are not walked a second time)
            materials = self._materials_step(rev, loaded, desired_from, invalid, sealed_ok=False)
            heal = make_plan(target, facts, self.plan_opts, materials)
        parts = WindowParts(heal.actions)
        if waiting:
            # the new revision's plan: its venvs are built ahead, the rest of its changes wait (reported,
            # never run: sealed materials, digests only, will do for them)
            new_plan = make_plan(desired, facts, self.plan_opts, self.materials(desired))
            parts = split(heal.actions, new_plan.actions, desired, target, waiting)
        plan = Plan(parts.heal + parts.ahead + tuple(h.action for h in parts.waiting), heal.notes)
        if not self.read_only:      # for the apply; a no-op `once` never imports the executor
            self._materials = materials
            if self._drivers is not None:
                self._drivers.materials = materials
        control = load_control(control_file(self.settings.root))
        digests = self._inputs_digests(desired)
        base = dict(revision=rev, plan=plan, desired_from=desired_from, facts=facts, new_commit=new_commit,
                    rollouts=rollouts, desired=target, control=control, apps=tuple(a.name for a in desired.apps),
                    owners={a.key: app_of(a.key, target) or app_of(a.key, desired) for a in plan.actions},
                    windows=windows, closed=waiting,
                    frontends=tuple((a.name, a.traffic.listen) for a in target.apps if a.traffic is not None))
        if not apply:
            outcome = (ReconcileResult.INVALID if invalid
                       else ReconcileResult.CONVERGED if plan.converged else ReconcileResult.DRIFT)
            _todo, held = self._hold(parts, parts.heal + parts.ahead, target, desired, control, digests)
            return Result(outcome, error=invalid, drift=plan.actions, held=held, **base)
        return self._apply_step(plan, parts, desired, target, invalid, base, digests, status.deployed)

    def _hold(self, parts: WindowParts, todo: tuple, target: DesiredState, desired: DesiredState,
              control: Control, digests: dict[str, str]) -> tuple[tuple, tuple]:
        """(actions to apply, actions held): suspensions and quarantines hold what heals the deployed state
        by the digests of what is deployed, the builds ahead by those of the new revision (a quarantined
        new revision is not built again on every poll); a closed window holds the rest of a new revision."""
        ahead = [a for a in todo if any(a is b for b in parts.ahead)]
        rest = tuple(a for a in todo if not any(a is b for b in parts.ahead))
        target_digests = {a.name: inputs_digest(a) for a in target.apps} if parts.waiting or parts.ahead else digests
        todo_heal, held_heal = hold(rest, target, control, target_digests)
        todo_ahead, held_ahead = hold(ahead, desired, control, digests)
        return todo_heal + todo_ahead, held_heal + held_ahead + parts.waiting

    def _window_target(self, desired: DesiredState, desired_from: str | None, closed: dict[str, str],
                       status: Status) -> tuple[DesiredState, dict[str, str]]:
        """(the desired state applied now, app -> why its new revision waits for its window). DESIGN §3b:
        outside its window an app keeps the revision it last applied, and drift of that is healed."""
        if not closed:
            return desired, {}
        self._window_sources = {name: self._deployed_sha(name, status) for name in closed}
        deployed = {name: self._deployed_app(name, sha, desired, desired_from)
                    for name, sha in self._window_sources.items()}
        waiting = waiting_apps(desired, deployed, closed)
        memo_key = (id(desired), tuple(sorted((n, self._window_sources[n]) for n in waiting)), tuple(sorted(waiting.items())))
        if self._composed is not None and self._composed[0] == memo_key:
            target = self._composed[1]          # the same object: its materials stay memoized across polls
        else:
            target = compose(desired, deployed, waiting)
            self._composed = (memo_key, target, desired)
        if target is not desired:
            try:
                from agent.service.staging import _check_mixed

                _check_mixed(list(target.apps))
            except InvalidState as exc:
                # the deployed version of a waiting app clashes with the new revision of another: healing it
                # would need the clash resolved; the app's changes are then held whole, as a suspension does
                log.warning("apps held by their windows cannot run beside the new revision (%s): their drift is "
                            "not healed until the window opens", str(exc).splitlines()[0])
                return desired, {}
        return target, waiting

    @staticmethod
    def _deployed_sha(name: str, status: Status) -> str | None:
        """The revision app `name` last fully applied on this host (None: it never ran here). Unrecorded
        (an agent from before the record): the host's last applied revision."""
        return status.deployed.get(name) or (status.applied.sha if status.applied else None)

    def _deployed_app(self, name: str, sha: str | None, desired: DesiredState, desired_from: str | None):
        """App `name` as revision `sha` says (None: no revision, or it cannot be loaded any more)."""
        if sha is None:
            return None
        if sha == desired_from:
            return desired.app_of(name)
        try:
            return self._unstaged(sha).app_of(name)
        except AgentError as exc:
            log.warning("app %s: its deployed revision %s cannot be loaded (%s)", name, sha[:12], str(exc).splitlines()[0])
            return None

    def _unstaged(self, sha: str) -> DesiredState:
        """The validated desired state of commit `sha` as loaded (no staged waves): cached in memory, and in
        the desired-state cache (a checkout only when neither has it)."""
        hit = self._unstaged_memo.get(sha)
        if hit is not None:
            return hit
        key = self.desired_cache.key(sha, self.settings.path, self.settings.host, self.load_key)
        desired = self.desired_cache.get(key)
        if desired is None:
            from agent.core.load import LoadOptions, load_desired

            checkout = self.source.checkout(Revision(sha, sha, 0.0, ""))
            opts = LoadOptions(default_installer=self.settings.installer, allow_root=self.settings.allow_root_services,
                               allow_chaos=self.settings.allow_chaos, boundary=checkout)
            desired = load_desired(self._state_dir(checkout), self.settings.host, opts)
            self.desired_cache.put(key, desired)
        self._unstaged_memo = {**dict(list(self._unstaged_memo.items())[-3:]), sha: desired}
        return desired

    def _source_step(self) -> Revision:
        try:
            return self.source.resolve()
        except AgentError as exc:
            raise _Stop(Result(ReconcileResult.ERROR, error=f"source: {exc}", source_failed=True,
                               retry=_retry_after(exc))) from None

    def _load_step(self, rev: Revision, status: Status) -> tuple[DesiredState, str, str | None]:
        """(desired state, the revision it came from, why `rev` is invalid). An invalid revision keeps the
        last good one desired, so its drift is still healed. A secret this host cannot decrypt, or a template
        that fails with this host's values, makes the revision invalid here like a schema error."""
        try:
            invalid = self._refusal(rev, status)
            if invalid is None:
                desired = self.desired_at(rev)
                self.materials(desired)
                return desired, rev.sha, None
        except InvalidState as exc:
            invalid = f"revision {rev.sha[:12]} is invalid:\n{exc}"
        except AgentError as exc:
            raise _Stop(Result(ReconcileResult.ERROR, rev, error=f"checkout: {exc}", retry=_retry_after(exc))) from None
        return (*self._last_good(rev, status, invalid), invalid)

    def _last_good(self, rev: Revision, status: Status, invalid: str) -> tuple[DesiredState, str]:
        # one line: the whole message is the result's error, which `once`/`plan` print and the daemon logs
        log.warning("%s; keeping the last good revision", invalid.splitlines()[0].rstrip(":"))
        last = status.applied
        if last is None:
            raise _Stop(Result(ReconcileResult.INVALID, rev, error=invalid))
        try:
            desired = self.desired_at(Revision(last.sha, last.ref, last.committed_at, last.summary))
        except AgentError as exc2:
            raise _Stop(Result(ReconcileResult.INVALID, rev,
                               error=f"{invalid}\n(and the last good revision cannot be loaded: {exc2})")) from None
        return desired, last.sha

    def _materials_step(self, rev: Revision, desired: DesiredState, desired_from: str | None,
                        invalid: str | None, sealed_ok: bool = True) -> Materials:
        try:
            return self.materials(desired, sealed_ok)
        except InvalidState as exc:
            why = f"revision {desired_from[:12] if desired_from else rev.sha[:12]} cannot be applied on this host:\n{exc}"
            raise _Stop(Result(ReconcileResult.INVALID, rev, error=f"{invalid}\n{why}" if invalid else why,
                               desired_from=desired_from)) from None

    def _plan(self, desired: DesiredState, facts: Facts, materials: Materials) -> Plan:
        """make_plan (pure), made again only when its inputs changed: the daemon's no-op polls plan the same
        desired state and materials objects against equal facts (planning 10 apps: ~2.7 ms; comparing the
        facts: ~0.05 ms)."""
        memo = self._last_plan
        if memo is not None and memo[0] is desired and memo[1] is materials and memo[2] == facts:
            return memo[3]
        plan = make_plan(desired, facts, self.plan_opts, materials)
        self._last_plan = (desired, materials, facts, plan)
        return plan

    def _inputs_digests(self, desired: DesiredState) -> dict[str, str]:
        """app -> inputs_digest, once per desired state (the daemon's no-op reconciles reuse one: hashing
        every field of 10 apps cost 4.5 ms of a 20 ms no-op)."""
        memo = self._last_digests
        if memo is None or memo[0] is not desired:
            memo = self._last_digests = (desired, {a.name: inputs_digest(a) for a in desired.apps})
        return memo[1]

    def materials(self, desired: DesiredState, sealed_ok: bool = True) -> Materials:
        """Decrypt the apps' secrets with this host's age identities, render their files and resolve env values
        (agent.core.materials). In memory only; decrypted secrets are cached per ciphertext and identity, so a
        no-op reconcile does not run `age` again, and the load step's check and the plan share one rendering of
        the same desired state.

        `sealed_ok`: sealed materials will do (digests only, from <root>/state/materials.memo, when every
        ciphertext, identity file and rendering input is one an earlier run saw): what a plan needs, without
        `age` or Jinja2. `_steps` asks again with False as soon as the plan has an action."""
        from agent.core.materials import materialize
        from agent.logs import remember_secrets

        stamp = self._identity_stamp()
        for memo in self._last_materials:
            if memo[:2] == (id(desired), stamp) and (sealed_ok or not memo[2].sealed):
                return memo[2]
        if not any(a.secrets or a.files or a.jobs or any(not isinstance(v, str) for s in a.services for _, v in s.env)
                   for a in desired.apps):
            return NO_MATERIALS
        materials = self._sealed(desired) if sealed_ok else None
        if materials is None:
            secrets = {app.name: {sf.name: self._decrypted(sf) for sf in app.secrets}
                       for app in desired.apps if app.secrets}
            materials = materialize(desired, self.layout, secrets, self._inputs_key())
            remember_secrets(materials.secret_values)
            self._remember(desired, secrets, materials)
        # desired kept: its id stays its own; two kept: a closed window plans the deployed and the new revision
        self._last_materials = (*self._last_materials[-1:], (id(desired), stamp, materials, desired))
        return materials

    @property
    def _memo_path(self) -> Path:
        return self.layout.state / "materials.memo"

    def _sealed(self, desired: DesiredState) -> Materials | None:
        """Sealed materials from the memo, or None when anything is not in it (then decrypt and render)."""
        from agent.core.materials import Sealed, SealedMiss, materialize, secret_memo_key
        from agent.drivers import materials_memo

        key = self._inputs_key()
        memo = materials_memo.load(self._memo_path, key)
        if memo is None:
            return None
        needs_identity = any(app.secrets for app in desired.apps)
        identities = self._identity_digest(key) if needs_identity else ""
        if identities is None:
            return None
        secrets: dict[str, dict[str, Sealed]] = {}
        for app in desired.apps:
            for sf in app.secrets:
                found = memo.secrets.get(secret_memo_key(key, sf.ciphertext, identities))
                if found is None:
                    return None
                secrets.setdefault(app.name, {})[sf.name] = Sealed(found)
        try:
            return materialize(desired, self.layout, secrets, key, memo=memo.renders)
        except (SealedMiss, InvalidState):       # an invalid one is reported by the real rendering
            return None

    def _remember(self, desired: DesiredState, secrets: dict, materials: Materials) -> None:
        """Save what this decryption and rendering found, for the next process's sealed materials: the
        entries of this desired state only (the file stays the size of one state)."""
        if self.read_only:
            return
        from agent.core.materials import seal, secret_memo_key
        from agent.drivers import materials_memo

        key = self._inputs_key()
        identities = self._identity_digest(key) if secrets else ""
        if identities is None:
            return
        found = {secret_memo_key(key, sf.ciphertext, identities): dict(seal(secrets[app.name][sf.name], key).digests)
                 for app in desired.apps for sf in app.secrets}
        materials_memo.save(self._memo_path, key, materials_memo.Memo(found, dict(materials.memo)))

    def _identity_digest(self, key: bytes) -> str | None:
        """The age identity files' paths and contents as one keyed digest (a changed key file decrypts anew,
        whatever its mtime); None if one cannot be read or there is none."""
        import hmac

        identities = self.settings.age_identities
        if not identities:
            return None
        mac = hmac.new(key, b"age identities", hashlib.sha256)
        try:
            for path in identities:
                data = Path(path).read_bytes()
                mac.update(b"\0%d:%s\0%d:" % (len(str(path)), str(path).encode(), len(data)) + data)
        except OSError:
            return None
        return mac.hexdigest()

    def _identity_stamp(self) -> tuple:
        """The age identity files as they are now (path, mtime): a changed or removed key decrypts anew."""
        return tuple((str(p), p.stat().st_mtime_ns if p.exists() else 0) for p in self.settings.age_identities)

    def _decrypted(self, secret) -> dict[str, str]:
        from agent.core.errors import Problem

        identities = self.settings.age_identities
        key = (hashlib.sha256(secret.ciphertext).hexdigest(), self._identity_stamp())
        if key not in self._secrets:
            from agent.core.dotenv import DotenvProblem, parse_dotenv
            from agent.drivers.age import AgeMissing, SecretUndecryptable, decrypt

            if not identities:
                raise InvalidState([Problem(secret.display, None, "", "cannot be decrypted: this agent has no age "
                                            "identity (start it with --age-identity FILE or GITOPS_AGENT_AGE_IDENTITY)")])
            try:
                self._secrets[key] = parse_dotenv(decrypt(secret.ciphertext, identities, secret.display), secret.display)
            except AgeMissing as exc:
                raise InvalidState([Problem(secret.display, None, "", str(exc))]) from None
            except SecretUndecryptable as exc:
                raise InvalidState([Problem(secret.display, None, "", f"cannot be decrypted on this host: {exc.reason}")]) from None
            except DotenvProblem as exc:
                raise InvalidState([Problem(secret.display, exc.line, "",
                                            f"decrypted, but not a dotenv file: {exc.message}")]) from None
        return self._secrets[key]

    def _inputs_key(self) -> bytes:
        """The host's key for input digests, made once (0600). A read-only world that has none uses a throwaway
        one (every file then reads as changed: plan says so, nothing is written)."""
        if self._key is not None:
            return self._key
        path = self.layout.inputs_key
        try:
            self._key = path.read_bytes()
        except FileNotFoundError:
            import os

            key = os.urandom(32)
            if not self.read_only:
                from agent.drivers.fsutil import atomic_write

                atomic_write(path, key, mode=0o600)
            self._key = key
        return self._key

    def _facts_step(self, rev: Revision, desired_from: str | None) -> Facts:
        try:
            return self.facts()
        except (AgentError, OSError) as exc:
            raise _Stop(Result(ReconcileResult.ERROR, rev, error=f"facts: {exc}", desired_from=desired_from,
                               retry=_retry_after(exc))) from None

    def _emptying(self, rev: Revision, desired: DesiredState, facts: Facts) -> str | None:
        """DESIGN §3d: a revision under which a host that runs services would run none is held, unless
        fleet.yaml says `decommission: true` for the host (a renamed host entry or an emptied apps/ must
        never tear a host down)."""
        if desired.services or getattr(desired, "decommission", False):
            return None
        managed = sorted(n for n, p in facts.programs.items() if p.file_text is not None and n != self.lb.program_name)
        if not managed:
            return None
        return (f"revision {rev.sha[:12]} is invalid for host {self.settings.host!r}: it would remove every "
                f"service this host runs ({', '.join(managed[:5])}{', ...' if len(managed) > 5 else ''}).\n"
                f"If that is intended, set `decommission: true` for {self.settings.host} in fleet.yaml; "
                "otherwise check the host's name and its apps' `hosts:` selectors.")

    def _apply_step(self, plan: Plan, parts: WindowParts, desired: DesiredState, target: DesiredState,
                    invalid: str | None, base: dict, digests: dict[str, str], deployed: dict[str, str]) -> Result:
        applicable = Plan(parts.heal + parts.ahead, plan.notes)
        todo, drift = self._split_by_mode(applicable, target, base["new_commit"])
        todo, held = self._hold(parts, todo, target, desired, base["control"], digests)
        drift += tuple(h.action for h in held)
        base["held"] = held
        outcomes: tuple[Outcome, ...] = ()
        if todo:
            from agent.service.executor import apply_plan

            if self.read_only:
                outcomes = apply_plan(Plan(todo, plan.notes), self.drivers)
            else:       # recorded: an apply the agent does not live to finish is rolled back by the next run
                from agent.service.inflight import apply_recorded

                outcomes = apply_recorded(todo, plan.notes, base["facts"], self.drivers,
                                          self.layout.state / "inflight.json")
        failures = [o for o in outcomes if not o.ok]
        base["deployed"] = self._deployed_after(target, base, outcomes, held, drift, deployed)
        if invalid:
            return Result(ReconcileResult.INVALID, outcomes=outcomes, error=invalid, drift=drift, **base)
        if not self.read_only:
            # a failure of what heals a waiting app's deployed revision is no failure of the new revision
            waiting = base["closed"] or {}
            news = [o for o in failures if app_of(o.action.key, target) not in waiting
                    or any(o.action is a for a in parts.ahead)]
            base["control"] = self._quarantine(base["revision"], desired, news if base["new_commit"] else [],
                                               digests, base["control"])
        quarantined = [h for h in held if h.cause == "quarantined"]
        if quarantined and not failures:
            why = "; ".join(dict.fromkeys(h.why for h in quarantined))
            return Result(ReconcileResult.FAILED, outcomes=outcomes, error=why, drift=drift, retry=Retry.POLL, **base)
        if failures:
            base["rollouts"] = _fail_canaries(desired, base["rollouts"], failures)
            msg = "; ".join(f"{o.action.describe()}: {o.message}" for o in failures if o.failed)
            permanent = all(o.verdict is Verdict.FAILED_PERMANENT for o in failures if o.failed)
            return Result(ReconcileResult.FAILED, outcomes=outcomes, error=msg, drift=drift,
                          retry=Retry.POLL if permanent else Retry.BACKOFF, **base)
        if drift:
            return Result(ReconcileResult.DRIFT, outcomes=outcomes, drift=drift, **base)
        return Result(ReconcileResult.CONVERGED if plan.converged else ReconcileResult.APPLIED, outcomes=outcomes, **base)

    def _deployed_after(self, target: DesiredState, base: dict, outcomes, held, drift,
                        before: dict[str, str]) -> dict[str, str]:
        """app -> the revision it last fully applied, after this apply: an app with nothing failed, held or
        left as drift now runs its version of the target (a waiting app: its deployed revision, unchanged;
        an app its wave keeps back: unchanged too)."""
        waiting = base["closed"] or {}
        due = getattr(self.stager, "due", None) or {}
        window = [h.action for h in held if h.cause == "window"]     # the new revision waiting: not the app's state
        unsettled = ({app_of(o.action.key, target) for o in outcomes if not o.ok}
                     | {h.app for h in held if h.cause != "window"}
                     | {app_of(a.key, target) for a in drift if not any(a is w for w in window)})
        out = {}
        for app in target.apps:
            if app.name in waiting and app.name not in unsettled and self._window_sources.get(app.name):
                out[app.name] = self._window_sources[app.name]
            elif app.name in waiting or due.get(app.name) is False or app.name in unsettled:
                if app.name in before:
                    out[app.name] = before[app.name]
            elif base.get("desired_from"):
                out[app.name] = base["desired_from"]
        return out

    def _windows(self, desired: DesiredState, new_commit: bool) -> tuple[dict[str, bool], dict[str, str]]:
        """({app: window open now} for apps with release windows, {app: why held} for those a new commit
        must wait for). `--ignore-windows` opens them all; the drift of what is deployed is healed any time."""
        if not any(a.windows for a in desired.apps):
            return {}, {}                # (without importing datetime and zoneinfo: a no-op `once` is short)
        from datetime import datetime, timezone

        from agent.core.windows import is_open, next_open

        now = datetime.fromtimestamp(self.world.clock(), timezone.utc)
        opened = {a.name: is_open(a.windows, now) for a in desired.apps if a.windows}
        closed = {}
        if new_commit and not self.settings.ignore_windows:
            for app in desired.apps:
                if app.name in opened and not opened[app.name]:
                    at = next_open(app.windows, now)
                    closed[app.name] = ("waiting for window (opens "
                                        + (at.strftime("%Y-%m-%d %H:%M UTC") if at else "never: check its days") + ")")
        return opened, closed

    def _quarantine(self, rev: Revision, desired: DesiredState, failures, digests: dict[str, str], control: Control):
        """DESIGN §3b: an app whose new revision failed for good (a build, a job, a health gate rolled back)
        is not retried on every poll; a temporary failure (a busy supervisord) backs off as before. A quarantine
        whose app's inputs changed since (a fix was committed) and did not fail again is lifted."""
        failing = {app_of(o.action.key, desired) for o in failures}
        stale = {app for app, q in control.quarantined.items() if digests.get(app) != q.inputs and app not in failing}
        reasons: dict[str, str] = {}
        for o in failures:
            if o.verdict in (Verdict.FAILED_PERMANENT, Verdict.ROLLED_BACK):
                app = app_of(o.action.key, desired)
                if app and app in digests:
                    reasons.setdefault(app, f"{o.action.describe()}: {o.message.splitlines()[0] if o.message else o.verdict.value}")
        if not reasons and not stale:
            return control
        now = self.world.clock()
        for app, why in reasons.items():
            log.error("app %s: revision %s quarantined until a commit changes the app or `gitops-agent retry`: %s",
                      app, rev.sha[:12], why)

        def add(control: Control) -> Control:
            q = {app: entry for app, entry in control.quarantined.items() if app not in stale}
            q.update({app: Quarantine(rev.sha, digests[app], why, now) for app, why in reasons.items()})
            return replace(control, quarantined=q)

        return update_control(control_file(self.settings.root), add)

    def _rollouts(self, desired: DesiredState, facts: Facts, status: Status,
                  materials: Materials = NO_MATERIALS) -> tuple[DesiredState, dict]:
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
            text = render_service(svc, desired.environments[svc.environment], self.layout, materials)
            canary_id = hashlib.sha256(text.encode()).hexdigest()[:16]
            previous = CanaryProgress(**rollouts[app.name]) if app.name in rollouts else None
            fact = facts.programs.get(svc.name)
            probe = None
            if (not self.read_only and previous and previous.id == canary_id and previous.state == "progressing"
                    and svc.health and svc.health.url and fact is not None and fact.file_text == text and fact.state is not None):
                probe = _probe(svc.health.url, svc.health.timeout_s, canary.probes)
            analysis = _analyse(canary.analysis) if probe is not None and canary.analysis is not None else None
            progress = canary_step(canary, previous, canary_id, time.time(), probe, analysis)
            if previous is None or (progress.state, progress.step) != (previous.state, previous.step):
                log.info("canary %s: %s step %d/%d (%d%%) %s", app.name, progress.state, progress.step + 1,
                         len(canary.steps), canary_percent(canary, progress), progress.reason)
            rollouts[app.name] = asdict(progress)
            apps.append(replace(app, traffic=with_canary(app.traffic, canary_percent(canary, progress))))
        if all(a is b for a, b in zip(apps, desired.apps)):
            return desired, rollouts        # the same object: what is memoized per desired state stays valid
        return desired.with_apps(tuple(apps)), rollouts

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
        now = self.world.clock()
        previous = status.view()        # as read: a write that only moves the times need not be durable
        status.host = self.settings.host
        status.result = result.result.value
        status.last_reconcile_at = now
        rev = result.revision
        succeeded = result.result in (ReconcileResult.CONVERGED, ReconcileResult.APPLIED)
        if rev is not None:
            status.attempted = RevisionRecord(rev.sha, rev.ref, rev.committed_at, rev.summary, now)
            if succeeded and (status.applied is None or status.applied.sha != rev.sha):
                status.applied = RevisionRecord(rev.sha, rev.ref, rev.committed_at, rev.summary, now)
        if result.error:
            status.last_error, status.last_error_at = result.error, now
        elif succeeded:
            status.last_error = None
        try:
            view = recorded(status.view(), result, now)     # apps, live split, drift since, events (pure: no copy)
        except Exception:  # noqa: BLE001 - the status page's extras must never cost the record itself
            log.exception("cannot derive the status page's view of this reconcile")
            view = {"resources": result.resources if result.plan is not None else {}, "events": status.events}
        if result.plan is not None:
            status.resources = view["resources"]
        if result.rollouts is not None:
            status.rollouts = result.rollouts
        if result.deployed is not None:
            status.deployed = result.deployed
        status.apps = view.get("apps", status.apps)
        status.traffic = view.get("traffic", status.traffic)
        status.events = view["events"]
        try:
            save_status(self.layout.status_file, status, previous)
        except OSError as exc:
            log.error("cannot write status %s: %s", self.layout.status_file, exc)


def _fail_canaries(desired: DesiredState, rollouts: dict, failures) -> dict:
    """A canary release that fails to start or fails its health gate ends the canary at 0%, for good
    (until a commit changes the canary): it is not retried step by step."""
    failed = {o.action.key for o in failures if o.failed}
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


def _analyse(gate) -> tuple[str, str]:
    """The canary's Prometheus analysis now: (pass|fail|pause, why), by the wave gates' rules."""
    from agent.core.waves import gate_verdict
    from agent.drivers.prometheus import instant_query

    return gate_verdict(gate, instant_query(gate.prometheus, gate.query, gate.timeout_s))


def _mode_of(action, desired: DesiredState, default: str) -> str:
    app = app_of(action.key, desired)
    return next((a.mode for a in desired.apps if a.name == app and a.mode), default)


def _problem(field: str, message: str):
    from agent.core.errors import Problem

    return Problem(field, None, "path", message)
