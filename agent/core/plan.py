"""plan(desired, facts) -> Plan: the pure diff of what a host should run against what it runs.

Every action carries the reason (the drift it fixes), the resource it changes (`key`) and the
resources it needs (`needs`): the executor skips an action whose needs failed, so one service's
failure never stops an independent one. An empty plan means converged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator

from agent.core.facts import Facts, ProcessState, ProgramFact, text_digest
from agent.core.layout import Layout
from agent.core.model import DesiredState, Environment, Service
from agent.core.rollout import frontends_of
from agent.core.render.supervisor import ProgramSpec, render_program

__all__ = [
    "Action", "EnsureSupervisor", "BuildVenv", "SwitchVenv", "RepairVenv", "WriteProgram", "UpdateProgram",
    "StartProgram", "RestartProgram", "AwaitRunning", "CheckHealth", "RemoveProgram", "RemoveEnvironment", "PruneVenvs",
    "ConfigureTraffic", "VerifyTraffic", "Plan", "PlanOptions", "make_plan", "render_service",
]

HEALTHY_STATES = frozenset({ProcessState.RUNNING, ProcessState.STARTING})


@dataclass(frozen=True)
class Action:
    key: str
    reason: str
    needs: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return _snake(type(self).__name__)

    def describe(self) -> str:
        return f"{self.kind} {self.key.partition(':')[2] or self.key}"

    def to_json(self) -> dict:
        data = {k: _jsonable(v) for k, v in asdict(self).items() if k not in ("text", "previous")}
        if isinstance(data.get("env"), dict):   # the environment: what identifies it, not all of it
            data["env"] = {k: data["env"][k] for k in ("name", "identity", "python", "installer", "lockfile")}
        return {"action": self.kind, **data}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


@dataclass(frozen=True)
class EnsureSupervisor(Action):
    pass


@dataclass(frozen=True)
class BuildVenv(Action):
    env: Environment | None = None


@dataclass(frozen=True)
class RepairVenv(Action):
    """The current venv no longer matches its lock (hand change): rebuild it in place."""
    env: Environment | None = None


@dataclass(frozen=True)
class SwitchVenv(Action):
    name: str = ""
    identity: str = ""
    previous: str | None = None


@dataclass(frozen=True)
class WriteProgram(Action):
    """Write a program file. `previous` is the config supervisord ran before (the rollback target);
    `existed` with no `previous` means it is unknown (hand-edited, not applied), so a failure keeps
    the new file and reports instead of restoring a config nobody can vouch for."""
    name: str = ""
    text: str = ""
    previous: str | None = None
    existed: bool = False


@dataclass(frozen=True)
class UpdateProgram(Action):
    """supervisorctl-update semantics for one program: add, replace (restart) or remove."""
    name: str = ""
    startsecs: int = 1
    gated: bool = False     # a health check follows: it, not startsecs, decides when traffic may come


@dataclass(frozen=True)
class StartProgram(Action):
    name: str = ""
    startsecs: int = 1
    gated: bool = False


@dataclass(frozen=True)
class RestartProgram(Action):
    name: str = ""
    startsecs: int = 1
    gated: bool = False


@dataclass(frozen=True)
class AwaitRunning(Action):
    """After a gated (re)start: wait until supervisord calls the program RUNNING (up `startsecs`).

    Planned after every health gate, so the startsecs windows of all services overlap instead of
    adding up; before a traffic change for a backend that gains weight, after it for the others. A
    program that dies inside its window still fails here and is rolled back.
    """
    name: str = ""
    startsecs: int = 1


@dataclass(frozen=True)
class CheckHealth(Action):
    name: str = ""
    url: str = ""
    timeout_s: float = 2.0


@dataclass(frozen=True)
class RemoveProgram(Action):
    name: str = ""


@dataclass(frozen=True)
class RemoveEnvironment(Action):
    name: str = ""


@dataclass(frozen=True)
class PruneVenvs(Action):
    name: str = ""
    identities: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigureTraffic(Action):
    """Make the load balancer serve `frontends`: runtime weights when only they changed, else a checked reload."""
    frontends: tuple = ()


@dataclass(frozen=True)
class VerifyTraffic(Action):
    frontends: tuple = ()


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class PlanOptions:
    layout: Layout
    retention: int = 3
    embedded: bool = True
    lb: object | None = None            # agent.drivers.lb.LoadBalancer: only its pure methods are used here


def render_service(svc: Service, env: Environment, layout: Layout) -> str:
    """The program file for a service, pointing at its venv's content-addressed path.

    Naming the concrete venv (not the envs/<name> symlink) makes a venv change a config change,
    so supervisord's own update semantics restart exactly the services whose venv moved.
    """
    venv = layout.venv(env.name, env.identity)
    spec = ProgramSpec(
        name=svc.name,
        command=(str(venv / "bin" / svc.command[0]), *svc.command[1:]),
        directory=str(venv),
        environment=svc.env,
        user=svc.user,
        stdout_logfile=str(layout.logs / f"{svc.name}.out.log"),
        stderr_logfile=str(layout.logs / f"{svc.name}.err.log"),
        startsecs=svc.startsecs,
        stopwaitsecs=svc.stopwaitsecs,
    )
    return f"; managed by gitops-agent: app {svc.app}, environment {env.name}\n" + render_program(spec)


def _venv_actions(env: Environment, facts: Facts) -> Iterator[Action]:
    fact = facts.venvs.get(env.name)
    key = f"venv:{env.name}"
    current = fact.current if fact else None
    if fact is None or env.identity not in fact.complete:
        why = "no venv yet" if current is None else f"lockfile or installer changed (current venv {current})"
        if fact and env.identity in fact.incomplete:
            why += "; an interrupted build is discarded"
        yield BuildVenv(key, f"{why}: build {env.name}-{env.identity} from {env.lockfile.name}", env=env)
    elif current == env.identity:
        drift = _installed_drift(env, fact.installed or ())
        if drift:
            yield RepairVenv(key, f"installed packages differ from {env.lockfile.name}: {drift}", env=env)
        return
    if current != env.identity:
        how = "kept venv, no rebuild" if fact and env.identity in fact.complete else "new venv"
        yield SwitchVenv(key, f"envs/{env.name} -> {env.identity} ({how}; was {current})",
                         name=env.name, identity=env.identity, previous=current)


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
        if venv_hint and old is not None and venv_hint[0] in old and venv_hint[1] not in old:
            why = f"venv changed to {venv_hint[1]}"
        ran_old = fact is not None and fact.state is not None and fact.pending is None
        yield WriteProgram(key, why, needs, name=name, text=text, previous=old if ran_old else None,
                           existed=fact is not None and (fact.state is not None or old is not None))
        changed = True
    loaded = fact is not None and fact.state is not None
    if changed or not loaded or (fact and fact.pending):
        why = "apply the new program config" if changed else (
            "supervisord has not loaded this program" if not loaded else f"supervisord has unapplied changes ({fact.pending})")
        yield UpdateProgram(key, why, needs, name=name, startsecs=startsecs, gated=gated)
    elif fact.state not in HEALTHY_STATES:
        yield StartProgram(key, fact.daemonized or f"program is {fact.state}" + (f" ({fact.spawnerr})" if fact.spawnerr else ""),
                           needs, name=name, startsecs=startsecs, gated=gated)
    elif restart_reason:
        yield RestartProgram(key, restart_reason, needs, name=name, startsecs=startsecs, gated=gated)


def _service_actions(svc: Service, env: Environment, fact: ProgramFact | None, venv_repaired: bool,
                     opts: PlanOptions, settle: list[Action]) -> Iterator[Action]:
    """The service's program actions and health gate; its AwaitRunning goes to `settle` (end of plan)."""
    key = f"program:{svc.name}"
    needs = (f"venv:{env.name}", "supervisor")
    text = render_service(svc, env, opts.layout)
    actions = list(_program_actions(
        svc.name, text, fact, needs, svc.startsecs,
        venv_hint=(str(opts.layout.venvs), f"{env.name}-{env.identity}"),
        restart_reason=f"its venv {env.name} is rebuilt in place" if venv_repaired else "",
        gated=svc.health is not None))
    yield from actions
    started = any(isinstance(a, (UpdateProgram, StartProgram, RestartProgram)) for a in actions)
    if svc.health is not None:
        if actions:
            reason = f"gate the (re)start on {svc.health.url}"
        elif fact is not None and fact.verified != text_digest(text):
            reason = f"this config never passed its health gate (an interrupted apply?): check {svc.health.url}"
        elif fact is not None and fact.gated_pid and fact.pid and fact.pid != fact.gated_pid:
            reason = (f"it exited after its health gate (pid {fact.gated_pid}, now {fact.pid}: a crash or a crash "
                      f"loop): check {svc.health.url} again")
        else:
            reason = ""
        if reason:
            yield CheckHealth(key, reason, needs, name=svc.name, url=svc.health.url, timeout_s=svc.health.timeout_s)
    if started:
        # Every (re)start is confirmed here, at the end, not where it was started: the startsecs windows of
        # all services overlap (150 ungated services took 174 s one after the other), and a gated one gets
        # traffic as soon as its health check passes.
        why = "after its health gate: confirm" if svc.health is not None else "confirm"
        settle.append(AwaitRunning(key, f"{why} it stays up startsecs={svc.startsecs}", needs,
                                   name=svc.name, startsecs=svc.startsecs))


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
    why = lb.drift(frontends, facts.traffic)
    if why:
        yield ConfigureTraffic("traffic:lb", why, backends + ("supervisor",), frontends=frontends)
    if not lb.managed:      # a system load balancer: its own service manager runs it
        return
    key = f"program:{lb.program_name}"
    started = list(_program_actions(lb.program_name, lb.program_text(), facts.programs.get(lb.program_name),
                                    ("traffic:lb", "supervisor"), startsecs=1))
    yield from started
    if started:
        yield VerifyTraffic(key, "the load balancer (re)started: check it serves the desired frontends",
                            ("traffic:lb", "supervisor"), frontends=frontends)


def _prune(desired: str, complete: tuple[str, ...], incomplete: tuple[str, ...], retention: int,
           current: str | None) -> tuple[str, ...]:
    """Venvs to delete: all but the desired one and the newest others up to `retention`; never the current one."""
    keep = set(list(dict.fromkeys([desired, *complete]))[:max(retention, 1)])
    keep.add(current or desired)
    drop = [i for i in complete if i not in keep] + [i for i in incomplete if i != desired]
    return tuple(dict.fromkeys(drop))


def make_plan(desired: DesiredState, facts: Facts, opts: PlanOptions) -> Plan:
    """The ordered actions that take `facts` to `desired`: venvs, programs, health, removals, pruning."""
    actions: list[Action] = []
    notes = list(desired.notes)
    if not desired.known_host:
        notes.append(f"host {desired.host!r} is not listed in fleet.yaml; only apps without a host selector apply")
    supervisor_up = facts.supervisor == "running"
    if not supervisor_up:
        if opts.embedded:
            actions.append(EnsureSupervisor("supervisor", f"embedded supervisord is {facts.supervisor}"))
        else:
            notes.append(f"supervisord is {facts.supervisor}")

    repaired: set[str] = set()
    for env in desired.environments.values():
        for action in _venv_actions(env, facts):
            actions.append(action)
            if isinstance(action, RepairVenv):
                repaired.add(env.name)
    settle: list[Action] = []
    for svc in desired.services.values():
        env = desired.environments[svc.environment]
        actions.extend(_service_actions(svc, env, facts.programs.get(svc.name), env.name in repaired, opts, settle))
    traffic = list(_traffic_actions(desired, facts, opts))
    # A backend that gains traffic must have held its startsecs first: if it died right after its
    # health gate, the switch would send users to a program about to be rolled back. The others'
    # windows are confirmed after the traffic change, and before removals and pruning.
    gaining = {k for a in traffic if isinstance(a, ConfigureTraffic) for k in a.needs}
    actions.extend(a for a in settle if a.key in gaining)
    actions.extend(traffic)
    actions.extend(a for a in settle if a.key not in gaining)

    keep = set(desired.services)
    if opts.lb is not None and opts.lb.managed and frontends_of(desired):
        keep.add(opts.lb.program_name)
    for name in sorted(set(facts.programs) - keep):
        actions.append(RemoveProgram(f"program:{name}", "no longer in the desired state", ("supervisor",), name=name))
    removed_programs = tuple(f"program:{n}" for n in sorted(set(facts.programs) - keep))
    for name in sorted(set(facts.venvs) - set(desired.environments)):
        actions.append(RemoveEnvironment(f"venv:{name}", "environment no longer in the desired state", removed_programs, name=name))
    for env in desired.environments.values():
        fact = facts.venvs.get(env.name)
        if fact is None:
            continue
        drop = _prune(env.identity, fact.complete, fact.incomplete, opts.retention, fact.current)
        if drop:
            users = tuple(f"program:{s.name}" for s in desired.services.values() if s.environment == env.name)
            actions.append(PruneVenvs(f"venv:{env.name}", f"keep the newest {opts.retention} venvs",
                                      (f"venv:{env.name}",) + users, name=env.name, identities=drop))
    return Plan(tuple(actions), tuple(notes))
