"""Execute a plan through the drivers. Never raises: every action becomes an `Outcome` (agent.core.outcome),
whatever the driver raised; the error's type decides its verdict (Permanent or Temporary).

An action runs only if nothing it needs failed; a failed program change is rolled back to the
program's previous config, so a host is never left half-way between two revisions of a service.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agent.core._record import record
from agent.drivers import appfiles

from agent.drivers.supervisor import daemonized, remove_program_file, write_program_file
from agent.drivers.venv import VenvManager, VenvSpec
from agent.core.errors import AgentError, HealthCheckFailed, SupervisorError
from agent.core.facts import DOWN_STATES, STARTABLE_STATES, ProcessState, text_digest
from agent.core.outcome import Outcome, Verdict, verdict_for
from agent.core.redact import whole_lines_tail
from agent.drivers._procfs import holds_url_listener
from agent.drivers.fsutil import atomic_write
from agent.core.layout import Layout
from agent.core.materials import NO_MATERIALS, Materials
from agent.core.actions import (
    Action, AwaitRunning, BuildVenv, CheckHealth, ConfigureTraffic, EnsureDataDir, EnsureSupervisor, VerifyTraffic,
    PruneFiles, PruneVenvs, RemoveEnvironment, RemoveProgram, RepairVenv, RestartProgram, RunJob, StartProgram,
    SwitchVenv, UpdateProgram, WriteFile, WriteLauncher, WriteProgram, WriteSecretEnv,
)
from agent.core.plan import Plan
from agent.service.prewarm import APPLY, prewarm

__all__ = ["Outcome", "Drivers", "apply_plan", "http_healthy"]

log = logging.getLogger("gitops_agent.apply")

_LOG_TAIL_BYTES = 2000
_STATE_EVERY_S = 0.05       # a health gate asks supervisord for the program's state at most this often
# A gate probes every 10 ms for its first second (a Python service answers 0.05-0.5 s after its spawn: a
# coarser step is added whole to every release), every 50 ms to 10 s, then every 0.2 s. A refused connect
# costs the agent a fraction of a millisecond; a health command is a process, run at most every 50 ms.
_PROBE_STEPS = ((1.0, 0.01), (10.0, 0.05), (float("inf"), 0.2))
_COMMAND_STEP_S = 0.05


@dataclass
class Drivers:
    """The side effects the executor may cause, behind small interfaces."""

    layout: Layout
    venvs: VenvManager
    supervisor: object                      # has .ensure() -> SupervisorClient
    lb: object | None = None                # agent.drivers.lb.LoadBalancer
    health_wait_s: float = 30.0
    start_wait_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    materials: Materials = NO_MATERIALS     # this apply's rendered files and resolved secrets (in memory only)

    def client(self):
        return self.supervisor.ensure()


def http_healthy(url: str, timeout_s: float) -> tuple[bool, str]:
    """One probe: (healthy, what was seen)."""
    import urllib.error
    import urllib.request   # lazy: ~20 ms of import that a no-op reconcile does not need

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (loopback only, schema-enforced)
            return 200 <= resp.status < 300, f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))


def _wait_running(drivers: Drivers, name: str, startsecs: int) -> None:
    """After a (re)start, wait until supervisord calls the program RUNNING (it has lived `startsecs`):
    a program that dies at once fails here, with its stderr, not later at the health gate."""
    client = drivers.client()
    deadline = drivers.clock() + max(drivers.start_wait_s, startsecs * 4 + 5)
    while True:
        info = client.process_info().get(name)
        state = info.get("statename") if info else None
        if state == ProcessState.RUNNING:
            return
        _raise_if_dead(client, name, info)
        if drivers.clock() > deadline:
            raise SupervisorError(f"program {name} did not reach RUNNING (state {state}) in time")
        drivers.sleep(0.05)


def _started(drivers: Drivers, action: UpdateProgram | StartProgram | RestartProgram) -> str:
    """Nothing waits here: a gated start's health check decides when it gets traffic (and stands in for
    RUNNING), and an ungated start's AwaitRunning (planned last) confirms startsecs, so the windows of many
    services overlap instead of adding up (a program that dies at once fails there, with its stderr)."""
    return ", starting (health gate next)" if action.gated else ", starting"


def _raise_if_dead(client, name: str, info: dict | None) -> None:
    state = info.get("statename") if info else None
    if state in DOWN_STATES and info is not None:
        # whole lines only (the driver drops a line its tail cut): a cut line could begin inside a secret value
        tail = whole_lines_tail(client.read_log_tail(name, _LOG_TAIL_BYTES), 500, capped=False)
        why = daemonized(client, name, info) or f"program {name} is {state}: {info.get('spawnerr') or info.get('description', '')}"
        raise SupervisorError(why + (f"; stderr: {tail}" if tail else ""))


def tcp_healthy(address: str, timeout_s: float) -> tuple[bool, str]:
    """One probe: does HOST:PORT accept a connection."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
        return True, "accepts connections"
    except OSError as exc:
        return False, str(exc.strerror or exc)


def command_healthy(command: tuple[str, ...], env: dict[str, str], timeout_s: float) -> tuple[bool, str]:
    """One probe: the health command (in the service's venv, with its env) exits 0."""
    import os
    import subprocess

    try:
        done = subprocess.run(list(command), env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout_s, start_new_session=True)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:g}s"
    except OSError as exc:
        return False, f"cannot run {command[0]}: {exc.strerror or exc}"
    if done.returncode == 0:
        return True, "exit 0"
    tail = (done.stderr or done.stdout).decode("utf-8", "replace").strip()[-300:]
    return False, f"exit {done.returncode}" + (f": {tail}" if tail else "")


def _probe(action: CheckHealth) -> tuple[bool, str]:
    if action.tcp:
        return tcp_healthy(action.tcp, action.timeout_s)
    if action.command:
        return command_healthy(action.command, {**dict(action.env), **dict(action.secret_env)}, action.timeout_s)
    return http_healthy(action.url, action.timeout_s)


def _own_listener(pid: int, action: CheckHealth) -> bool | None:
    """Whether the service's process holds the probed listener (None: cannot tell; a command probe has none)."""
    if action.tcp:
        return holds_url_listener(pid, f"http://{action.tcp}")
    if action.command:
        return None
    return holds_url_listener(pid, action.url)


def _check_health(drivers: Drivers, action: CheckHealth) -> str:
    """Healthy means the URL answers 2xx (or the TCP address accepts) **from the service's own process** (or a
    descendant): another process that already answers on that port must not pass the gate of a service that
    has not bound yet (it would fail to bind and crash later, after being reported healthy). A health command
    must exit 0 while the service runs."""
    started = drivers.clock()
    deadline = started + drivers.health_wait_s
    seen = ""
    asked = float("-inf")
    target = action.url or action.tcp or " ".join(action.command[:1])
    client = drivers.client()     # once: a probe every 10 ms need not re-check supervisord's config and state
    while (now := drivers.clock()) < deadline:
        ok, seen = _probe(action)
        # supervisord is asked when a probe passes (is it the service's process that answers?) and otherwise
        # every 50 ms (has it died?), not at every 10 ms probe: each answer costs supervisord and the agent
        # CPU that the starting services need
        if ok or now - asked >= _STATE_EVERY_S:
            asked = now
            info = client.process_info().get(action.name)
            if ok:
                pid = (info or {}).get("pid") or 0
                if pid and _own_listener(pid, action) is not False:     # None: no /proc to tell
                    return seen
                seen = f"{seen}, but not from {action.name} (pid {pid}): another process answers there"
            try:
                _raise_if_dead(client, action.name, info)     # a crashed program will not turn healthy: say why
            except SupervisorError as exc:     # it died on a port another process holds: say both
                if not ok or "another process answers there" not in seen:
                    raise
                raise SupervisorError(f"{exc} (the gate's last probe: {seen})", exc.code) from None
        step = next(step for until, step in _PROBE_STEPS if now - started < until)
        drivers.sleep(max(step, _COMMAND_STEP_S) if action.command else step)
    raise HealthCheckFailed(f"{action.name}: {target} not healthy after {drivers.health_wait_s:g}s (last: {seen})")


def _record_verified(drivers: Drivers, name: str) -> None:
    """Remember which config passed its gate, so a crash between start and gate never skips the gate,
    and which process passed it, so one that exits afterwards (supervisord restarts it) is drift."""
    text = (drivers.layout.programs / f"{name}.conf").read_text()
    pid = (drivers.client().process_info().get(name) or {}).get("pid") or 0
    atomic_write(drivers.layout.verified / name, f"{text_digest(text)} {pid}\n", mode=0o644)


def _spec(env, materials: Materials = NO_MATERIALS, compile_bytecode: bool = False) -> VenvSpec:
    index = {}
    if env.index_url:
        index = {"index_url": env.index_url}
        if env.index_credentials is not None:
            index.update(index_username=env.index_credentials.username,
                         index_password=materials.index_passwords.get(env.name))
    return VenvSpec(name=env.name, python=env.python, lockfile=env.lockfile, find_links=env.find_links,
                    installer=env.installer, options=env.options, identity=env.identity,
                    compile_bytecode=compile_bytecode, **index)


def _run_job(drivers: Drivers, action: RunJob) -> str:
    from agent.drivers.jobs import run_job

    env = {**dict(action.env), **dict(action.secret_env), "VIRTUAL_ENV": action.venv}
    done = run_job(f"{action.app}/{action.name}", action.command, cwd=Path(action.cwd), env=env,
                   logs=drivers.layout.logs, timeout_s=action.timeout_s, user=action.user)
    atomic_write(drivers.layout.jobs / action.app / action.name, action.inputs + "\n", mode=0o644)
    return f"job {action.name} succeeded in {done.seconds:.1f}s"


@record
class _Done:
    message: str
    verdict: Verdict = Verdict.APPLIED


def _run(action: Action, drivers: Drivers) -> _Done:
    layout, venvs = drivers.layout, drivers.venvs
    if isinstance(action, EnsureSupervisor):
        drivers.supervisor.ensure()
        return _Done("supervisord running")
    if isinstance(action, BuildVenv):
        return _Done(f"built {venvs.build(_spec(action.env, drivers.materials, action.eager_bytecode))}")
    if isinstance(action, RepairVenv):
        return _Done(f"rebuilt {venvs.repair(_spec(action.env, drivers.materials, action.eager_bytecode))}")
    if isinstance(action, EnsureDataDir):
        appfiles.ensure_dir(Path(action.path), action.owner)
        return _Done(f"created {action.path}")
    if isinstance(action, WriteFile):
        appfiles.write_version(Path(action.path), Path(action.link), action.data, action.mode, action.owner)
        return _Done(f"wrote {action.name} ({action.digest}, mode {action.mode:04o})")
    if isinstance(action, WriteLauncher):
        atomic_write(Path(action.path), action.text, mode=0o755)
        return _Done("written")
    if isinstance(action, WriteSecretEnv):
        appfiles.write_private(Path(action.path), action.data, action.owner)
        return _Done("written (mode 0600)")
    if isinstance(action, RunJob):
        return _Done(_run_job(drivers, action))
    if isinstance(action, PruneFiles):
        gone = appfiles.prune(action.paths, layout.apps)
        return _Done(f"deleted {len(gone)} file(s)")
    if isinstance(action, SwitchVenv):
        venvs.switch(action.name, layout.venv(action.name, action.identity))
        return _Done(f"envs/{action.name} -> {action.identity}")
    if isinstance(action, WriteProgram):
        write_program_file(layout.programs, action.name, action.text)
        return _Done("written")
    if isinstance(action, UpdateProgram):
        done = drivers.client().update([action.name])
        restarted = _start_if_stopped(drivers, action.name)   # unchanged config but a stopped program: start it
        changed = action.name in done or restarted
        return _Done(done.get(action.name, "unchanged") + _started(drivers, action),
                     Verdict.APPLIED if changed else Verdict.UNCHANGED)
    if isinstance(action, StartProgram):
        drivers.client().start(action.name, wait=False)
        return _Done("started" + _started(drivers, action))
    if isinstance(action, RestartProgram):
        drivers.client().stop(action.name)
        drivers.client().start(action.name, wait=False)
        return _Done("restarted" + _started(drivers, action))
    if isinstance(action, CheckHealth):
        seen = _check_health(drivers, action)
        _record_verified(drivers, action.name)
        return _Done(seen)
    if isinstance(action, AwaitRunning):
        _wait_running(drivers, action.name, action.startsecs)
        return _Done(f"running (up {action.startsecs}s)")
    if isinstance(action, RemoveProgram):
        remove_program_file(layout.programs, action.name)
        drivers.client().update([action.name])
        return _Done("removed")
    if isinstance(action, RemoveEnvironment):
        removed = venvs.remove_all(action.name)
        return _Done(f"removed {len(removed)} venv(s)")
    if isinstance(action, ConfigureTraffic):
        return _Done(drivers.lb.apply(action.frontends, up=action.up))
    if isinstance(action, VerifyTraffic):
        return _Done(drivers.lb.wait_live(action.frontends))
    if isinstance(action, PruneVenvs):
        for identity in action.identities:
            venvs.remove(action.name, identity)
        return _Done(f"pruned {', '.join(action.identities)}")
    raise AgentError(f"no driver for action {action.kind}")


def _rollback(key: str, done: list[Action], drivers: Drivers) -> tuple[bool, str]:
    """Put a service back as it was before this apply: its previous program file, then supervisord update.
    (rolled back, what was done)."""
    writes = [a for a in done if isinstance(a, WriteProgram) and a.key == key]
    if not writes:
        return False, ""
    first = writes[0]
    if first.previous is not None:
        write_program_file(drivers.layout.programs, first.name, first.previous)
        what = "its previous config"
    elif not first.existed:
        remove_program_file(drivers.layout.programs, first.name)
        what = "not installed (it is new)"
    else:
        return False, "no known-good config to roll back to"
    drivers.client().update([first.name])
    if first.previous is not None:
        _start_if_stopped(drivers, first.name)
    for switch in (a for a in done if isinstance(a, SwitchVenv) and a.key in first.needs and a.previous):
        drivers.venvs.switch(switch.name, drivers.layout.venv(switch.name, switch.previous))
        what += f"; envs/{switch.name} back to {switch.previous}"
    if first.previous is not None:
        # supervisord starts the restored program in its own loop: a rollback is done when it runs again,
        # not when it was asked for (else `once` could exit 1 "rolled back" with nothing listening yet).
        started = (a for a in done if a.key == key and isinstance(a, (UpdateProgram, StartProgram, RestartProgram)))
        _wait_running(drivers, first.name, max((a.startsecs for a in started), default=1))
        what += ", running"
    return True, f"rolled back {first.name}: {what}"


def _start_if_stopped(drivers: Drivers, name: str) -> bool:
    info = drivers.client().process_info().get(name) or {}
    if info.get("statename") in STARTABLE_STATES:
        drivers.client().start(name, wait=False)
        return True
    return False


def _fields(action: Action, result: str) -> dict:
    """Structured fields of an action's log line (JSON logs carry them as keys)."""
    return {"action": action.kind, "resource": action.key, "reason": action.reason, "result": result}


def apply_plan(plan: Plan, drivers: Drivers) -> tuple[Outcome, ...]:
    """One outcome per action, in plan order. Never raises: an unexpected exception (a bug in a driver)
    is logged with its traceback and becomes a failed outcome, so the rest of the host goes on and
    the reconcile is still recorded."""
    prewarm(APPLY)      # program files are checked with supervisord's parser: imported while builds run
    builds = _independent_builds(plan)
    if len(builds) < 2:
        return _apply(plan, drivers, {})
    with ThreadPoolExecutor(max_workers=min(len(builds), os.cpu_count() or 1),
                            thread_name_prefix="venv-build") as pool:
        return _apply(plan, drivers, {i: pool.submit(_timed_run, plan.actions[i], drivers) for i in builds})


def _independent_builds(plan: Plan) -> list[int]:
    """Positions of the venv builds that need nothing: they start together, at the beginning of the apply
    (bounded by the cores), while supervisord starts and files are written. One per venv path: a plan
    names each environment once, and a second build of one path would run in turn, not alongside."""
    seen: set[tuple[str, str]] = set()
    found = []
    for i, action in enumerate(plan.actions):
        if isinstance(action, (BuildVenv, RepairVenv)) and not action.needs:
            path = (action.env.name, action.env.identity)
            if path not in seen:
                seen.add(path)
                found.append(i)
    return found


def _timed_run(action: Action, drivers: Drivers) -> tuple[_Done, float]:
    start = drivers.clock()
    return _run(action, drivers), drivers.clock() - start


def _apply(plan: Plan, drivers: Drivers, started: dict[int, Future]) -> tuple[Outcome, ...]:
    """The actions in plan order; those in `started` already run in the background: their result is awaited."""
    failed: set[str] = set()
    done: list[Action] = []
    outcomes: list[Outcome] = []
    for i, action in enumerate(plan.actions):
        blocked = [k for k in (action.key, *action.needs) if k in failed]
        if blocked:
            failed.add(action.key)
            outcomes.append(Outcome(action, Verdict.SKIPPED_BLOCKED, f"{blocked[0]} failed"))
            log.info("skip %s: %s failed", action.describe(), blocked[0], extra=_fields(action, "skipped"))
            continue
        start = drivers.clock()
        try:
            if i in started:
                done_, seconds = started[i].result()
                start = drivers.clock() - seconds
            else:
                done_ = _run(action, drivers)
        except Exception as exc:  # noqa: BLE001 - the executor's promise: every action becomes an Outcome
            failed.add(action.key)
            outcomes.append(_failure(action, exc, done, drivers, drivers.clock() - start))
            continue
        done.append(action)
        message = drivers.materials.redact(done_.message)
        outcomes.append(Outcome(action, done_.verdict, message, drivers.clock() - start))
        log.info("%s: %s (reason: %s)", action.describe(), message, action.reason, extra=_fields(action, "ok"))
    return tuple(outcomes)


def _failure(action: Action, exc: Exception, done: list[Action], drivers: Drivers, seconds: float) -> Outcome:
    """The failed action's outcome, after rolling back what it leaves half-done: a program's previous config,
    or, for a failed `after` job, every program of its environment this apply restarted. Secret values in
    the message (a job's or a program's stderr) are replaced by ***."""
    if not isinstance(exc, (AgentError, OSError)):
        log.error("%s raised an unexpected %s (a bug: please report it)", action.describe(), type(exc).__name__,
                  exc_info=exc)
    message = f"{type(exc).__name__}: {exc}"
    rolled = False
    keys = action.rollback if isinstance(action, RunJob) else (action.key,) if action.key.startswith("program:") else ()
    undone = []
    for key in keys:
        try:
            back, undo = _rollback(key, done, drivers)
            rolled = rolled or back
        except Exception as rb_exc:  # noqa: BLE001 - reported in the outcome; the apply goes on
            undo = f"rollback failed too: {type(rb_exc).__name__}: {rb_exc}"
        if undo:
            undone.append(undo)
    if undone:
        message += f" ({'; '.join(undone)})"
    message = drivers.materials.redact(message)
    log.error("%s failed: %s (reason: %s)", action.describe(), message, action.reason,
              extra=_fields(action, "failed"))
    return Outcome(action, verdict_for(exc, rolled), message, seconds)
