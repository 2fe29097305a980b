"""plan(desired, facts) -> Plan: the pure diff of what a host should run against what it runs.

Every action carries the reason (the drift it fixes), the resource it changes (`key`) and the
resources it needs (`needs`): the executor skips an action whose needs failed, so one service's
failure never stops an independent one. An empty plan means converged.
"""

from __future__ import annotations

import os
import re
from dataclasses import field, replace
from typing import TYPE_CHECKING, Iterator

from agent.core._record import record
from agent.core.facts import Facts, ProcessState, ProgramFact, text_digest
from agent.core.layout import Layout
from agent.core.materials import INPUTS_PREFIX, NO_MATERIALS, Materials, inputs_line, service_env
from agent.core.model import App, DataDir, DesiredState, Environment, JobRun, Service
from agent.core.rollout import frontends_of
from agent.core.render.supervisor import ProgramSpec, render_program

if TYPE_CHECKING:
    from agent.core.actions import Action, CheckHealth, RunJob

__all__ = ["ACTIONS", "Plan", "PlanOptions", "make_plan", "render_service"]


class _Actions:
    """agent.core.actions, imported at the first attribute asked for (then kept as this object's own
    attribute). A no-op's plan makes no action, so a `once` that finds nothing to do never creates their
    dataclasses; the import system's lock makes the first use safe from any thread."""

    def __getattr__(self, name: str):
        from agent.core import actions

        value = getattr(actions, name)
        setattr(self, name, value)
        return value


ACTIONS = _Actions()

HEALTHY_STATES = frozenset({ProcessState.RUNNING, ProcessState.STARTING})


@record
class Plan:
    actions: tuple[Action, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def converged(self) -> bool:
        return not self.actions

    def to_json(self) -> dict:
        return {"converged": self.converged, "actions": [a.to_json() for a in self.actions], "notes": list(self.notes)}

    def render(self) -> str:
        if self.converged:
            lines = ["No changes: the host matches the desired state."]
        else:
            lines = [f"Plan: {len(self.actions)} action(s)"]
            lines += [f"  {i:>2}. {a.describe():<40} # {a.reason}" for i, a in enumerate(self.actions, 1)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@record
class PlanOptions:
    layout: Layout
    retention: int = 3
    embedded: bool = True
    lb: object | None = None            # agent.drivers.lb.LoadBalancer: only its pure methods are used here


def render_service(svc: Service, env: Environment, layout: Layout, materials: Materials = NO_MATERIALS) -> str:
    """The program file for a service, pointing at its venv's content-addressed path.

    Naming the concrete venv (not the envs/<name> symlink) makes a venv change a config change,
    so supervisord's own update semantics restart exactly the services whose venv moved. Files and the
    secret env file are named by their content-addressed paths for the same reason: a changed file or
    secret changes exactly the configs of the services that use it, and a rollback to the previous config
    gets the previous file. Secret values never enter this text (the launcher reads them from a 0600 file).
    """
    resolved = service_env(svc, materials)
    venv = layout.venv(env.name, env.identity)
    command = (str(venv / "bin" / svc.command[0]), *svc.command[1:])
    if resolved.secret_file is not None:
        from agent.core.render.launcher import launched_command

        command = launched_command(str(venv / "bin" / "python"), str(layout.launcher), str(resolved.secret_file),
                                   command)
    extra = {}
    if svc.processes != 1:
        extra["numprocs"] = svc.processes
    if svc.priority is not None:
        extra["priority"] = svc.priority
    spec = ProgramSpec(
        name=svc.name,
        command=command,
        directory=str(venv),
        environment=resolved.plain,
        user=svc.user,
        stdout_logfile=str(layout.logs / f"{svc.name}.out.log"),
        stderr_logfile=str(layout.logs / f"{svc.name}.err.log"),
        startsecs=svc.startsecs,
        stopwaitsecs=svc.stopwaitsecs,
        **extra,
    )
    return (f"; managed by gitops-agent: app {svc.app}, environment {env.name}\n" + inputs_line(resolved.inputs)
            + render_program(spec))


def _inputs_of(text: str | None) -> dict[str, str]:
    """"kind name" -> digest, from a program file's inputs comment."""
    for line in (text or "").splitlines():
        if line.startswith(INPUTS_PREFIX):
            items = (i.rpartition("=") for i in line[len(INPUTS_PREFIX):].split(", "))
            return {name: d for name, _, d in items if name}
    return {}


def _changed_inputs(old: str | None, new: str) -> str:
    """Why a service restarts when what changed is a file or secret it uses: "file settings.toml changed,
    secret django/SECRET_KEY changed" (names only: never a value)."""
    before, after = _inputs_of(old), _inputs_of(new)
    parts = [f"{n} {'changed' if n in before else 'added'}" for n in sorted(after) if before.get(n) != after[n]]
    parts += [f"{n} no longer used" for n in sorted(set(before) - set(after))]
    return ", ".join(parts)


def _venv_actions(env: Environment, facts: Facts, eager: bool) -> Iterator[Action]:
    fact = facts.venvs.get(env.name)
    key = f"venv:{env.name}"
    current = fact.current if fact else None
    if fact is None or env.identity not in fact.complete:
        why = "no venv yet" if current is None else f"lockfile or installer changed (current venv {current})"
        if fact and env.identity in fact.incomplete:
            why += "; an interrupted build is discarded"
        yield ACTIONS.BuildVenv(key, f"{why}: build {env.name}-{env.identity} from {env.lockfile.name}", env=env,
                                eager_bytecode=eager)
    elif current == env.identity:
        drift = _installed_drift(env, fact.installed or ())
        if drift:
            yield ACTIONS.RepairVenv(key, f"installed packages differ from {env.lockfile.name}: {drift}", env=env,
                                     eager_bytecode=eager)
        return
    if current != env.identity:
        how = "kept venv, no rebuild" if fact and env.identity in fact.complete else "new venv"
        yield ACTIONS.SwitchVenv(key, f"envs/{env.name} -> {env.identity} ({how}; was {current})",
                                 name=env.name, identity=env.identity, previous=current)


def _envs_run_as_other_users(desired: DesiredState) -> frozenset[str]:
    """The environments a service or job runs from as a `user:` of its own."""
    runs = [*desired.services.values(), *(job for app in desired.apps for job in app.jobs)]
    return frozenset(r.environment for r in runs if r.user)


def _installed_drift(env: Environment, installed: tuple[tuple[str, str], ...]) -> str:
    want, have = dict(env.requirements), dict(installed)
    parts = [f"+{n}=={have[n]}" for n in sorted(set(have) - set(want))]
    parts += [f"-{n}=={want[n]}" for n in sorted(set(want) - set(have))]
    parts += [f"{n} {want[n]}->{have[n]}" for n in sorted(set(want) & set(have)) if want[n] != have[n]]
    return ", ".join(parts)


def _program_actions(name: str, text: str, fact: ProgramFact | None, needs: tuple[str, ...], startsecs: int,
                     venv_hint: tuple[str, str] | None = None, restart_reason: str = "",
                     gated: bool = False) -> Iterator[Action]:
    """Write/update/start/restart one supervisord program so it runs `text`; nothing when it already does."""
    key = f"program:{name}"
    old = fact.file_text if fact else None
    changed = False
    if old != text:
        why = "program file missing" if old is None else "program file differs from the desired config"
        inputs = _changed_inputs(old, text) if old is not None else ""
        if venv_hint and old is not None and venv_hint[0] in old and venv_hint[1] not in old:
            why = f"venv changed to {venv_hint[1]}" + (f"; {inputs}" if inputs else "")
        elif inputs:
            why = inputs
        ran_old = fact is not None and fact.state is not None and fact.pending is None
        yield ACTIONS.WriteProgram(key, why, needs, name=name, text=text, previous=old if ran_old else None,
                                   existed=fact is not None and (fact.state is not None or old is not None))
        changed = True
    loaded = fact is not None and fact.state is not None
    if changed or not loaded or (fact and fact.pending):
        why = "apply the new program config" if changed else (
            "supervisord has not loaded this program" if not loaded else f"supervisord has unapplied changes ({fact.pending})")
        yield ACTIONS.UpdateProgram(key, why, needs, name=name, startsecs=startsecs, gated=gated)
    elif fact.state not in HEALTHY_STATES:
        why = fact.daemonized or f"program is {fact.state}" + (f" ({fact.spawnerr})" if fact.spawnerr else "")
        yield ACTIONS.StartProgram(key, why, needs, name=name, startsecs=startsecs, gated=gated)
    elif restart_reason:
        yield ACTIONS.RestartProgram(key, restart_reason, needs, name=name, startsecs=startsecs, gated=gated)


def _service_actions(svc: Service, env: Environment, fact: ProgramFact | None, venv_repaired: bool,
                     opts: PlanOptions, settle: list[Action], materials: Materials = NO_MATERIALS,
                     extra_needs: tuple[str, ...] = ()) -> Iterator[Action]:
    """The service's program actions and health gate; its AwaitRunning goes to `settle` (end of plan).
    `extra_needs`: what else must not have failed first (its files, secret env, jobs, depends_on)."""
    key = f"program:{svc.name}"
    needs = (f"venv:{env.name}", "supervisor", *extra_needs)
    text = render_service(svc, env, opts.layout, materials)
    actions = list(_program_actions(
        svc.name, text, fact, needs, svc.startsecs,
        venv_hint=(str(opts.layout.venvs), f"{env.name}-{env.identity}"),
        restart_reason=f"its venv {env.name} is rebuilt in place" if venv_repaired else "",
        gated=svc.health is not None))
    yield from actions
    started = any(isinstance(a, (ACTIONS.UpdateProgram, ACTIONS.StartProgram, ACTIONS.RestartProgram)) for a in actions)
    if svc.health is not None:
        target = svc.health.target
        if actions:
            reason = f"gate the (re)start on {target}"
        elif fact is not None and fact.verified != text_digest(text):
            reason = f"this config never passed its health gate (an interrupted apply?): check {target}"
        elif fact is not None and fact.gated_pid and fact.pid and fact.pid != fact.gated_pid:
            reason = (f"it exited after its health gate (pid {fact.gated_pid}, now {fact.pid}: a crash or a crash "
                      f"loop): check {target} again")
        else:
            reason = ""
        if reason:
            yield _health_action(svc, env, key, reason, needs, opts, materials)
    if started and svc.health is None:
        # An ungated (re)start is confirmed here, at the end, not where it was started: the startsecs windows
        # of all services overlap (150 ungated services took 174 s one after the other). A gated one waits
        # for nothing after its gate: the gate is the evidence, and a later death is drift (gated_pid).
        settle.append(ACTIONS.AwaitRunning(key, f"confirm it stays up startsecs={svc.startsecs}", needs,
                                           name=svc.name, startsecs=svc.startsecs))


def _health_action(svc: Service, env: Environment, key: str, reason: str, needs: tuple[str, ...], opts: PlanOptions,
                   materials: Materials) -> CheckHealth:
    health = svc.health
    command: tuple[str, ...] = ()
    plain: tuple[tuple[str, str], ...] = ()
    secret: tuple[tuple[str, str], ...] = ()
    if health.command:
        venv = opts.layout.venv(env.name, env.identity)
        command = (str(venv / "bin" / health.command[0]), *health.command[1:])
        resolved = service_env(svc, materials)
        plain, secret = resolved.plain, resolved.secret
    return ACTIONS.CheckHealth(key, reason, needs, name=svc.name, url=health.url, timeout_s=health.timeout_s,
                               tcp=health.tcp, command=command, env=plain, secret_env=secret)


def _uses_data_dir(app: App) -> bool:
    return bool(app.jobs) or any(isinstance(v, DataDir) for s in app.services for _, v in s.env)


def _owner(app: App) -> str | None:
    """Who owns the app's data dir and files: the one `user:` its services and jobs run as, if they agree."""
    users = {s.user for s in app.services} | {j.user for j in app.jobs}
    return users.pop() if len(users) == 1 else None


def _file_reason(name: str, link: str, on_disk: str | None, linked: str | None, want: str, want_link: str) -> str:
    if on_disk is not None and on_disk != want:
        return f"file {name} differs on disk (edited by hand?): rewrite it"
    if on_disk is None and linked == want_link:
        return f"file {name} missing on disk (deleted by hand?): write it again"
    if on_disk is None:
        return f"file {name} changed" if linked is not None else f"file {name} missing"
    return f"{link} points elsewhere: re-point it"


def _material_actions(app: App, facts: Facts, opts: PlanOptions, materials: Materials) -> Iterator[Action]:
    """The app's data dir, rendered files, launcher and secret env files, where they differ from the facts."""
    layout, owner = opts.layout, _owner(app)
    data = str(layout.data(app.name))
    if _uses_data_dir(app) and data not in facts.data_dirs:
        yield ACTIONS.EnsureDataDir(f"data:{app.name}", "the app's data dir does not exist yet", app=app.name,
                                    path=data, owner=owner)
    for spec in app.files:
        rendered = materials.files.get((app.name, spec.name))
        if rendered is None:
            continue
        want_link = os.path.relpath(rendered.path, rendered.link.parent)
        on_disk, linked = facts.files.get(str(rendered.path)), facts.links.get(str(rendered.link))
        if on_disk != rendered.digest or linked != want_link:
            why = _file_reason(spec.name, f"files/{spec.name}", on_disk, linked, rendered.digest, want_link)
            yield ACTIONS.WriteFile(f"file:{app.name}/{spec.name}", why,
                                    app=app.name, name=spec.name, path=str(rendered.path), link=str(rendered.link),
                                    digest=rendered.digest, mode=rendered.mode, owner=owner, data=rendered.data)
    secret_services = [(s, materials.services[s.name]) for s in app.services
                       if s.name in materials.services and materials.services[s.name].secret_file is not None]
    if not secret_services:
        return
    from agent.core.render.launcher import LAUNCHER_SOURCE, encode_env

    if facts.files.get(str(layout.launcher)) != materials.digest(LAUNCHER_SOURCE.encode()):
        yield ACTIONS.WriteLauncher("launcher", "the secret env launcher is missing or differs",
                                    path=str(layout.launcher), text=LAUNCHER_SOURCE)
    for svc, resolved in secret_services:
        path = str(resolved.secret_file)
        if facts.files.get(path) != resolved.secret_digest:
            why = "secret env missing" if path not in facts.files else "secret env differs on disk: rewrite it"
            yield ACTIONS.WriteSecretEnv(f"secretenv:{svc.name}", f"{why} for {svc.name}", name=svc.name, path=path,
                                         owner=svc.user, data=encode_env(dict(resolved.secret)))


def _job_action(job, app: App, desired: DesiredState, facts: Facts, opts: PlanOptions, materials: Materials,
                rollback: tuple[str, ...] = ()) -> RunJob | None:
    inputs = materials.job_inputs.get((app.name, job.name))
    if inputs is None or facts.jobs.get(f"{app.name}/{job.name}") == inputs:
        return None
    env = desired.environments[job.environment]
    resolved = materials.jobs[(app.name, job.name)]
    venv = opts.layout.venv(env.name, env.identity)
    last = facts.jobs.get(f"{app.name}/{job.name}")
    why = "never ran on this host" if last is None else "its inputs changed (venv, command, env, files or secrets)"
    needs = (f"venv:{env.name}", f"data:{app.name}", *resolved.needs)
    return ACTIONS.RunJob(f"job:{app.name}/{job.name}", f"{why}: run {job.run} the services of {env.name}",
                          tuple(dict.fromkeys(needs)), app=app.name, name=job.name, run=str(job.run),
                          command=(str(venv / "bin" / job.command[0]), *job.command[1:]),
                          cwd=str(opts.layout.data(app.name)), user=job.user, timeout_s=job.timeout_s, inputs=inputs,
                          env=resolved.plain, secret_env=resolved.secret, venv=str(venv), rollback=rollback)


def _prune_files(desired: DesiredState, facts: Facts, opts: PlanOptions, materials: Materials) -> Iterator[Action]:
    """File versions and secret env files that neither the desired state nor any program file on disk uses
    (a program still running an older config keeps its files until it is replaced), and files/<name> links
    of files no longer declared. Data dirs are never touched."""
    apps_dir = str(opts.layout.apps) + os.sep
    wanted = {str(r.path) for r in materials.files.values()}
    wanted |= {str(e.secret_file) for e in materials.services.values() if e.secret_file is not None}
    links = {str(r.link) for r in materials.files.values()}
    # What the desired program files name is kept. What a kept program's current file names is pruned in the
    # same apply: the prune needs every program of the app, so when one fails (and is rolled back to its
    # current file) nothing is pruned. A program that leaves the host protects nothing.
    unwanted = [p for p in sorted(facts.files) if p.startswith(apps_dir) and p not in wanted]
    texts = "\n".join(render_service(s, desired.environments[s.environment], opts.layout, materials)
                      for s in desired.services.values()) if unwanted else ""
    by_app: dict[str, list[str]] = {}
    for path in unwanted:
        if path not in texts:
            by_app.setdefault(path[len(apps_dir):].split(os.sep, 1)[0], []).append(path)
    for path in sorted(facts.links):
        if path.startswith(apps_dir) and path not in links:
            by_app.setdefault(path[len(apps_dir):].split(os.sep, 1)[0], []).append(path)
    for app, paths in sorted(by_app.items()):
        users = tuple(f"program:{s.name}" for s in desired.services.values() if s.app == app)
        gone = desired.app_of(app) is None
        why = ("the app is no longer on this host: delete its files and secrets (its data dir is kept)" if gone
               else "no longer used by any program or job")
        yield ACTIONS.PruneFiles(f"files:{app}", why, users, app=app, paths=tuple(paths))


def _boots_lb(desired: DesiredState, frontends: tuple, facts: Facts, opts: PlanOptions) -> bool:
    """Start the load balancer alongside the services instead of after them.

    Only the agent's own HAProxy that is not running (a fresh host, or a stopped one), whose weights its
    runtime API sets once the backends passed their gates; not with an A/B split (its bucket routes to
    the variant whatever the weights), nor an automatic canary, nor nginx (no weights without a reload).
    """
    lb = opts.lb
    if lb is None or not lb.managed or lb.kind != "haproxy" or not frontends or any(fe.ab for fe in frontends):
        return False
    if any(app.traffic is not None and app.traffic.canary is not None for app in desired.apps):
        return False    # an automatic canary walks its steps from the weights HAProxy serves: not from a boot's 0s
    # Both must say it is down: a stats socket that did not answer once (a busy host) while supervisord
    # runs the program would otherwise zero the weights of a load balancer that serves.
    program = facts.programs.get(lb.program_name)
    return not (facts.traffic or {}).get("running") and (program is None or program.state not in HEALTHY_STATES)


def _lb_boot_actions(desired: DesiredState, facts: Facts, opts: PlanOptions) -> Iterator[Action]:
    """The load balancer's config with every backend at weight 0, and its program started: planned before
    the services, so HAProxy's own start overlaps theirs (it took ~0.3-0.7 s after the last gate)."""
    frontends = frontends_of(desired)
    if not _boots_lb(desired, frontends, facts, opts):
        return
    lb = opts.lb
    why = f"{lb.drift(frontends, facts.traffic)}: start it with every backend at weight 0 while the services start"
    yield ACTIONS.ConfigureTraffic("traffic:lb", why, ("supervisor",), frontends=_unweighted(frontends))
    yield from _program_actions(lb.program_name, lb.program_text(), facts.programs.get(lb.program_name),
                                ("traffic:lb", "supervisor"), startsecs=1)


def _unweighted(frontends: tuple) -> tuple:
    return tuple(replace(fe, backends=tuple(replace(be, weight=0) for be in fe.backends)) for fe in frontends)


def _traffic_actions(desired: DesiredState, facts: Facts, opts: PlanOptions) -> Iterator[Action]:
    """Re-weight / reconfigure the load balancer after the backends it sends traffic to are in place."""
    frontends = frontends_of(desired)
    lb = opts.lb
    if not frontends or lb is None:
        return
    # Traffic may only move TO a backend whose program is in place and healthy: a backend whose weight
    # grows (or that is new to the load balancer) is needed; one whose weight shrinks is not, so taking
    # traffic away from a failing service is never blocked by its failure.
    live = (facts.traffic or {}).get("weights") or {}
    backends = tuple(f"program:{be.name}" for fe in frontends for be in fe.backends
                     if be.weight > 0 and be.weight > live.get(fe.name, {}).get(be.name, -1))
    key = f"program:{lb.program_name}"
    if _boots_lb(desired, frontends, facts, opts):
        # Started before the services with no weight (_lb_boot_actions): live by now, or waited for here;
        # then the weights go in over the runtime API, which checks they took.
        yield ACTIONS.VerifyTraffic(key, "the load balancer started alongside the services: wait until it serves",
                                    ("traffic:lb", "supervisor"), frontends=_unweighted(frontends))
        # HAProxy checked the backends while they were still starting, and may call them DOWN for `rise`
        # checks more: the gates just passed (these backends are needed below), so they are up.
        yield ACTIONS.ConfigureTraffic("traffic:lb", "set the desired weights: their backends passed their gates",
                                       backends + ("supervisor", key), frontends=frontends,
                                       up=tuple(f"{fe.name}/{be.name}" for fe in frontends for be in fe.backends
                                                if f"program:{be.name}" in backends))
        return
    why = lb.drift(frontends, facts.traffic)
    if why:
        yield ACTIONS.ConfigureTraffic("traffic:lb", why, backends + ("supervisor",), frontends=frontends)
    if not lb.managed:      # a system load balancer: its own service manager runs it
        return
    started = list(_program_actions(lb.program_name, lb.program_text(), facts.programs.get(lb.program_name),
                                    ("traffic:lb", "supervisor"), startsecs=1))
    yield from started
    if started:
        yield ACTIONS.VerifyTraffic(key, "the load balancer (re)started: check it serves the desired frontends",
                                    ("traffic:lb", "supervisor"), frontends=frontends)


def _prune(desired: str, complete: tuple[str, ...], incomplete: tuple[str, ...], retention: int,
           current: str | None) -> tuple[str, ...]:
    """Venvs to delete: all but the desired one and the newest others up to `retention`; never the current one."""
    keep = set(list(dict.fromkeys([desired, *complete]))[:max(retention, 1)])
    keep.add(current or desired)
    drop = [i for i in complete if i not in keep] + [i for i in incomplete if i != desired]
    return tuple(dict.fromkeys(drop))


def make_plan(desired: DesiredState, facts: Facts, opts: PlanOptions, materials: Materials = NO_MATERIALS) -> Plan:
    """The ordered actions that take `facts` to `desired`: venvs, files and secrets, `before` jobs, programs in
    dependency order, health, traffic, `after` jobs, removals, pruning. `materials`: the apps' rendered files
    and resolved env on this host (`agent.core.materials`), needed by apps that use secrets, files or jobs."""
    actions: list[Action] = []
    notes = list(desired.notes)
    if not desired.known_host:
        notes.append(f"host {desired.host!r} is not listed in fleet.yaml; only apps without a host selector apply")
    supervisor_up = facts.supervisor == "running"
    if not supervisor_up:
        if opts.embedded:
            actions.append(ACTIONS.EnsureSupervisor("supervisor", f"embedded supervisord is {facts.supervisor}"))
        else:
            notes.append(f"supervisord is {facts.supervisor}")

    actions.extend(_lb_boot_actions(desired, facts, opts))
    repaired: set[str] = set()
    switches: list[Action] = []
    other_users = _envs_run_as_other_users(desired)
    for env in desired.environments.values():
        for action in _venv_actions(env, facts, env.name in other_users):
            (switches if isinstance(action, ACTIONS.SwitchVenv) else actions).append(action)
            if isinstance(action, ACTIONS.RepairVenv):
                repaired.add(env.name)
    for app in desired.apps:
        actions.extend(a for a in _material_actions(app, facts, opts, materials)
                       if not (isinstance(a, ACTIONS.WriteLauncher)
                               and any(isinstance(b, ACTIONS.WriteLauncher) for b in actions)))
    # `before` jobs run in the new venv after it is built and before anything of their environment switches:
    # a failed migration leaves the environment's services on their old venv and config, still serving.
    before: dict[str, list[str]] = {}
    for app in desired.apps:
        for job in app.jobs:
            if job.run is JobRun.BEFORE:
                action = _job_action(job, app, desired, facts, opts, materials)
                if action is not None:
                    actions.append(action)
                    before.setdefault(job.environment, []).append(action.key)
    actions.extend(replace(a, needs=a.needs + tuple(before.get(a.key.partition(":")[2], ()))) for a in switches)
    settle: list[Action] = []
    planned = {a.key for a in actions}
    # Services start a depth of depends_on at a time: every (re)start of one depth, then their health gates,
    # so independent services start together and their start-up times overlap instead of adding up (a gate
    # found its service already answering); a service still starts only once those it depends on passed.
    gates: dict[int, list[Action]] = {}
    starts: dict[int, list[Action]] = {}
    for svc in desired.services.values():
        env = desired.environments[svc.environment]
        resolved = service_env(svc, materials)
        extra = [*resolved.needs, *before.get(env.name, ()), *(f"program:{d}" for d in svc.depends_on)]
        if resolved.secret_file is not None:
            extra += [f"secretenv:{svc.name}", "launcher"]
        extra = [k for k in dict.fromkeys(extra) if k in planned or k.startswith("program:")]
        depth = _depth(svc)
        for action in _service_actions(svc, env, facts.programs.get(svc.name), env.name in repaired, opts,
                                       settle, materials, tuple(extra)):
            (gates if isinstance(action, ACTIONS.CheckHealth) else starts).setdefault(depth, []).append(action)
    for depth in sorted(starts.keys() | gates.keys()):
        actions.extend(starts.get(depth, ()))
        actions.extend(gates.get(depth, ()))
    planned.update(a.key for a in actions)
    traffic = list(_traffic_actions(desired, facts, opts))
    # A backend that gains traffic must have held its startsecs first: if it died right after its
    # health gate, the switch would send users to a program about to be rolled back. The others'
    # windows are confirmed after the traffic change, and before removals and pruning.
    gaining = {k for a in traffic if isinstance(a, ACTIONS.ConfigureTraffic) for k in a.needs}
    actions.extend(a for a in settle if a.key in gaining)
    actions.extend(traffic)
    actions.extend(a for a in settle if a.key not in gaining)
    # `after` jobs: once the changed services are healthy and traffic has moved; a failure puts those back.
    started = {a.key for a in actions
               if isinstance(a, (ACTIONS.UpdateProgram, ACTIONS.StartProgram, ACTIONS.RestartProgram))}
    for app in desired.apps:
        for job in app.jobs:
            if job.run is JobRun.AFTER:
                users = tuple(f"program:{s.name}" for s in app.services if s.environment == job.environment)
                action = _job_action(job, app, desired, facts, opts, materials,
                                     rollback=tuple(k for k in users if k in started))
                if action is not None:
                    actions.append(replace(action, needs=action.needs + tuple(k for k in users if k in planned)))

    keep = set(desired.services)
    if opts.lb is not None and opts.lb.managed and frontends_of(desired):
        keep.add(opts.lb.program_name)
    # Stopped in reverse start order: a service before those it depends on (supervisord priority, highest first).
    for name in sorted(set(facts.programs) - keep, key=lambda n: (-_priority(facts.programs[n].file_text), n)):
        actions.append(ACTIONS.RemoveProgram(f"program:{name}", "no longer in the desired state", ("supervisor",),
                                             name=name))
    removed_programs = tuple(f"program:{n}" for n in sorted(set(facts.programs) - keep))
    for name in sorted(set(facts.venvs) - set(desired.environments)):
        actions.append(ACTIONS.RemoveEnvironment(f"venv:{name}", "environment no longer in the desired state",
                                                 removed_programs, name=name))
    for env in desired.environments.values():
        fact = facts.venvs.get(env.name)
        if fact is None:
            continue
        drop = _prune(env.identity, fact.complete, fact.incomplete, opts.retention, fact.current)
        if drop:
            users = tuple(f"program:{s.name}" for s in desired.services.values() if s.environment == env.name)
            actions.append(ACTIONS.PruneVenvs(f"venv:{env.name}", f"keep the newest {opts.retention} venvs",
                                              (f"venv:{env.name}",) + users, name=env.name, identities=drop))
    actions.extend(_prune_files(desired, facts, opts, materials))
    return Plan(tuple(actions), tuple(notes))


def _depth(svc: Service) -> int:
    """How many depends_on links lie under `svc` (the loader encodes it in its supervisord priority)."""
    return 0 if svc.priority is None else (svc.priority - 100) // 10


_PRIORITY_RE = re.compile(r"^priority=([0-9]+)$", re.M)


def _priority(text: str | None) -> int:
    found = _PRIORITY_RE.search(text or "")
    return int(found.group(1)) if found else 999
