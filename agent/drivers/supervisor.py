"""supervisord driver: XML-RPC over a unix socket, the agent's embedded supervisord, program files.

Side effects only; what to write comes from `agent.core.render.supervisor` (pure). Why XML-RPC and not
`supervisorctl`: faults come back as numbers we can map to sentences instead of text we would parse.
Why `update()` is done by hand: `supervisorctl update` is `reloadConfig` plus stop/remove/add per
group, and doing those calls ourselves lets us restrict them to named programs and report exactly
what changed. Untouched programs keep their pid.

Daemonizing services: a program that forks into a new session escapes supervisord's process-group
kill. Every rendered program carries `GITOPS_AGENT_PROGRAM=<name>` in its environment, which all its
descendants inherit, and supervisord adds `SUPERVISOR_SERVER_URL` (its own socket); the two together
name a program's processes on this host exactly, so stopping, replacing or removing a program also
ends those (`stop_leftovers`), and `daemonized` says why such a program cannot be supervised. Why not
cgroups: the agent usually cannot write them (systemd's `ProtectControlGroups=`, containers, no
delegation), and with a shared supervisord it does not spawn the processes itself. A process that
clears its environment escapes this; a cgroup would not.

Multi-process programs (`numprocs` > 1): supervisord names their processes `NAME:NAME-0`...; the group
keeps the program's name, and every call here that takes a program name takes it too: `process_info`
adds one aggregated entry under `NAME`, `start`/`stop`/`read_log_tail` act on every process of the
group, and leftovers are found by the program's marker (the whole group) or, for one process, also by
the `SUPERVISOR_PROCESS_NAME` supervisord sets. So the planner keeps talking about the program by name.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

from agent.drivers import _xmlrpc
from agent.core.errors import ConfigError, SupervisorError
from agent.drivers.fsutil import atomic_write, fsync_dir
from agent.core.render.supervisor import MARKER_KEY, MINFDS, PROGRAM_NAME_RE, UnsafeValue, WebServer, render_supervisord

__all__ = [
    "SupervisorClient",
    "EmbeddedSupervisor",
    "connect",
    "write_program_file",
    "remove_program_file",
    "read_program_files",
    "leftover_pids",
    "stop_leftovers",
    "daemonized",
    "aggregate_info",
    "FAULTS",
]

# supervisor.xmlrpc.Faults: code -> (name, the sentence we show a person).
FAULTS: dict[int, tuple[str, str]] = {
    1: ("UNKNOWN_METHOD", "supervisord does not know this XML-RPC method"),
    2: ("INCORRECT_PARAMETERS", "incorrect parameters"),
    3: ("BAD_ARGUMENTS", "bad arguments"),
    6: ("SHUTDOWN_STATE", "supervisord is shutting down"),
    10: ("BAD_NAME", "no such program or group"),
    11: ("BAD_SIGNAL", "bad signal"),
    20: ("NO_FILE", "the command's file does not exist"),
    21: ("NOT_EXECUTABLE", "the command's file is not executable"),
    30: ("FAILED", "the operation failed"),
    40: ("ABNORMAL_TERMINATION", "the program exited before it was up"),
    50: ("SPAWN_ERROR", "the program could not be started or exited too quickly"),
    60: ("ALREADY_STARTED", "the program is already started"),
    70: ("NOT_RUNNING", "the program is not running"),
    90: ("ALREADY_ADDED", "the program group is already added"),
    91: ("STILL_RUNNING", "the program group still has running processes"),
    92: ("CANT_REREAD", "an include file is unparsable"),
}
_BAD_NAME, _ALREADY_STARTED, _NOT_RUNNING, _NO_FILE, _FAILED, _SUCCESS = 10, 60, 70, 20, 30, 80
_SPAWN_FAULTS = (40, 50)
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the NUL on Linux
_POLL = 0.02
_STOP_POLL = 0.01
_STOPPED_STATES = ("STOPPED", "EXITED", "FATAL", "UNKNOWN")   # supervisor.states.STOPPED_STATES
# A group's state is RUNNING when all its processes are, else the worst of theirs, worst first.
_WORST_FIRST = ("UNKNOWN", "FATAL", "BACKOFF", "EXITED", "STOPPED", "STOPPING", "STARTING")
_DIED_STATES = ("EXITED", "BACKOFF", "FATAL")                  # its command is gone, not by our stop
_MAX_NUMPROCS_SWEEP = 64        # process numbers whose logs are removed with a program (DESIGN: 1..64)
_LOG_DIR_MODE = 0o750
_LOG_MODE = 0o600               # a service's output can hold secrets
_LEFTOVER_WAIT = 10.0           # seconds between SIGTERM and SIGKILL for a program's leftovers

log = logging.getLogger("gitops_agent.supervisor")


class SupervisorClient:
    """Typed calls to one supervisord. Faults become SupervisorError with a sentence and the code.

    `timeout` bounds every call, including `startProcess`/`stopProcess` with wait, which block up to
    `startsecs`/`stopwaitsecs`: keep it above the largest of those among managed programs.
    """

    def __init__(self, socket_path: str | Path, timeout: float = 60.0):
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"SupervisorClient({self.socket_path!r}, timeout={self.timeout})"

    # -- queries

    def state(self) -> str:
        """supervisord's state name (RUNNING, RESTARTING, SHUTDOWN...); raises if unreachable."""
        return str(self._call("supervisor.getState")["statename"])

    def pid(self) -> int:
        """supervisord's own pid."""
        return int(self._call("supervisor.getPID"))

    def process_info(self) -> dict[str, dict]:
        """name -> getAllProcessInfo entry (statename, pid, exitstatus, spawnerr, description...).

        A multi-process program's processes are there by namespec (`NAME:NAME-0`...), and the program
        itself by `NAME` with one aggregated entry (`aggregate_info`), so a caller that knows the
        program's name reads its state as for any other program.
        """
        return _with_groups(self._call("supervisor.getAllProcessInfo"))

    def process_info_later(self) -> "Later":
        """`process_info` in two halves: the request goes now, `.result()` reads the answer. The agent's
        facts gather the venvs' meanwhile (supervisord takes ~1.5 ms to answer for 10 programs, on the
        other core). Raises SupervisorError now if supervisord cannot be reached."""
        method = "supervisor.getAllProcessInfo"
        return Later(lambda pending: _with_groups(self._answer(pending, method)), self._send(method))

    def read_log_tail(self, name: str, nbytes: int = 2000) -> str:
        """The last `nbytes` of `name`'s stderr log, or "" when it has none; for error messages.

        For a multi-process program: the tail of each process that has output, each under a
        `[NAME:NAME-N]` line, the processes that are down last (callers keep the end of the text).
        """
        try:
            return self._stderr_tail(name, nbytes)
        except SupervisorError as err:
            members = self._members(name, err)
        alive = [m for m in members if m.get("statename") not in _DIED_STATES]
        down = [m for m in members if m.get("statename") in _DIED_STATES]
        parts = []
        for member in alive + down:
            spec = _namespec(member)
            text = self._stderr_tail(spec, nbytes).strip("\n")
            if text:
                parts.append(f"[{spec}]\n{text}\n")
        return "".join(parts)

    def _stderr_tail(self, name: str, nbytes: int) -> str:
        try:
            text, _offset, overflow = self._call("supervisor.tailProcessStderrLog", name, 0, nbytes)
        except SupervisorError as err:
            if err.code == _NO_FILE:
                return ""
            raise
        text = str(text)
        if overflow:    # the log is longer: its first line here is cut, and could begin inside a secret value
            text = text.partition("\n")[2]
        return text

    def _members(self, name: str, err: SupervisorError) -> list[dict]:
        """The processes of multi-process program `name`, in process order, when `err` (from a call
        that named it as a process) says supervisord has no process of that name; else raise `err`."""
        if err.code != _BAD_NAME or ":" in name:
            raise err
        members = [i for i in self._call("supervisor.getAllProcessInfo") if i.get("group") == name]
        if not members:
            raise err
        return sorted(members, key=lambda i: _natural(str(i.get("name"))))

    # -- config

    def reload_config(self) -> tuple[list[str], list[str], list[str]]:
        """Re-read the config; return (added, changed, removed) group names. Applies nothing."""
        [[added, changed, removed]] = self._call("supervisor.reloadConfig")
        return list(added), list(changed), list(removed)

    def update(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """`supervisorctl update [names]`: apply what reloadConfig reports, only for `names`.

        Names that reloadConfig does not report are left alone (nothing to do for them). Every
        selected group is tried even when one fails; the failures are raised together at the end.
        """
        added, changed, removed = self.reload_config()
        wanted = None if names is None else set(names)
        done: dict[str, str] = {}
        failures: list[SupervisorError] = []
        plan = [(g, "removed") for g in removed] + [(g, "changed") for g in changed]
        plan += [(g, "added") for g in added]
        for group, change in plan:
            if wanted is not None and group not in wanted:
                continue
            try:
                self._apply(group, change)
            except SupervisorError as err:
                failures.append(err)
            else:
                done[group] = change
        if failures:
            message = "; ".join(str(f) for f in failures)
            raise SupervisorError(f"update failed: {message} (done: {done})", failures[0].code)
        return done

    def _apply(self, group: str, change: str) -> None:
        if change in ("removed", "changed"):
            results = self._call("supervisor.stopProcessGroup", group, False)
            failed = [r for r in results if r.get("status") == _FAILED]
            if failed and change == "removed":
                why = "; ".join(str(r.get("description")) for r in failed)
                raise SupervisorError(f"{group}: could not be stopped, not removing: {why}", _FAILED)
            unstoppable = {r.get("name") for r in failed}   # removeProcessGroup will say STILL_RUNNING
            self._wait_stopped(lambda info: info.get("group") == group and info.get("name") not in unstoppable, group)
            if not unstoppable:
                stop_leftovers(self.socket_path, group)   # what it daemonized would outlive it
            self._call("supervisor.removeProcessGroup", group)
        if change in ("changed", "added"):
            self._call("supervisor.addProcessGroup", group)

    # -- processes

    def start(self, name: str, wait: bool = True) -> None:
        """Start `name`; with wait, block until it has been up `startsecs`. Already started is fine.

        A multi-process program is started as a group (`startProcessGroup`: each process not yet
        running); any process that fails to start makes this raise, as for a single process."""
        try:
            self._call("supervisor.startProcess", name, wait)
        except SupervisorError as err:
            if err.code == _ALREADY_STARTED:
                return
            if err.code in _SPAWN_FAULTS:
                raise self._spawn_error(name, err) from None
            if err.code != _BAD_NAME or ":" in name:
                raise
            self._members(name, err)
            results = self._call("supervisor.startProcessGroup", name, wait)
            failed = [r for r in results if r.get("status") not in (_SUCCESS, _ALREADY_STARTED)]
            if failed:
                raise self._group_error(name, "startProcessGroup", failed) from None

    def stop(self, name: str, wait: bool = True) -> None:
        """Stop `name`; with wait, block until it is gone (up to `stopwaitsecs`), and also stop what it
        daemonized (`stop_leftovers`; also when supervisord says it was not running: a program that
        daemonized shows as EXITED or FATAL). Not running is fine. A multi-process program is stopped
        as a group (`stopProcessGroup`); a process that could not be stopped makes this raise."""
        try:
            self._call("supervisor.stopProcess", name, False)
        except SupervisorError as err:
            if err.code != _NOT_RUNNING:
                self._members(name, err)         # raises `err` unless `name` is a multi-process program
                self._stop_group(name, wait)
                return
        else:
            if wait:
                self._wait_stopped(lambda info: _namespec(info) == name, name)
        if wait:
            stop_leftovers(self.socket_path, name)

    def _stop_group(self, name: str, wait: bool) -> None:
        results = self._call("supervisor.stopProcessGroup", name, False)
        failed = [r for r in results if r.get("status") not in (_SUCCESS, _NOT_RUNNING)]
        stuck = {r.get("name") for r in failed}
        if wait:
            self._wait_stopped(lambda info: info.get("group") == name and info.get("name") not in stuck, name)
        if failed:
            raise self._group_error(name, "stopProcessGroup", failed)
        if wait:
            stop_leftovers(self.socket_path, name)

    def _group_error(self, name: str, method: str, failed: list[dict]) -> SupervisorError:
        """A group call's per-process failures as one error: the spawn error (reason, stderr tail) when
        a process could not be started, else each process's fault."""
        code = int(failed[0].get("status") or _FAILED)
        if code in _SPAWN_FAULTS:
            return self._spawn_error(name, SupervisorError("", code), call=method)
        why = "; ".join(f"{name}:{r.get('name')}: {FAULTS.get(int(r.get('status') or 0), ('', 'failed'))[1]}"
                        f" ({r.get('description')})" for r in failed)
        fault_name = FAULTS.get(code, ("UNKNOWN", ""))[0]
        return SupervisorError(f"{why} [{method}: fault {code} {fault_name}]", code)

    def _wait_stopped(self, selects, what: str) -> None:
        """Poll until the selected processes have stopped.

        Not supervisord's own `wait=True`: its deferred reply is only re-checked when its main loop
        wakes, which costs up to a second (its select timeout) after the process is long gone. Our
        polls wake that loop; a stop takes as long as the program needs (~20 ms for a Python server).
        """
        deadline = time.monotonic() + self.timeout
        while True:
            busy = [info for info in self._call("supervisor.getAllProcessInfo")
                    if selects(info) and info.get("statename") not in _STOPPED_STATES]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise SupervisorError(f"{what}: still {busy[0].get('statename')} after {self.timeout:g}s", _FAILED)
            time.sleep(_STOP_POLL)

    def restart(self, name: str) -> None:
        """Stop then start `name`, waiting for each."""
        self.stop(name, wait=True)
        self.start(name, wait=True)

    def shutdown(self) -> None:
        """Ask supervisord to stop every program and exit (returns at once)."""
        self._call("supervisor.shutdown")

    def _spawn_error(self, name: str, err: SupervisorError, call: str = "startProcess") -> SupervisorError:
        """A start failure with what a person needs: supervisord's reason and the stderr tail."""
        try:
            info = self.process_info().get(name, {})
            tail = self.read_log_tail(name).strip()
        except SupervisorError:
            info, tail = {}, ""
        reason = str(info.get("spawnerr") or "exited too quickly").rstrip(".")
        why = daemonized(self, name, info) if info else None
        if why:
            reason = f"{reason}; {why}"
        fault_name = FAULTS.get(err.code or 0, ("UNKNOWN", ""))[0]
        message = f"{name} could not be started: {reason} [{call}: fault {err.code} {fault_name}]"
        if tail:
            message += f"\nstderr tail:\n{tail}"
        return SupervisorError(message, err.code)

    # -- transport

    def _call(self, method: str, *args: Any) -> Any:
        return self._answer(self._send(method, *args), method, *args)

    def _send(self, method: str, *args: Any) -> _xmlrpc.Pending:
        try:
            return _xmlrpc.send(self.socket_path, method, args, self.timeout)
        except OSError as exc:
            raise self._unreachable(method, exc) from exc

    def _answer(self, pending: _xmlrpc.Pending, method: str, *args: Any) -> Any:
        try:
            return pending.result()
        except _xmlrpc.Fault as fault:
            raise _fault_error(method, args, fault) from None
        except (OSError, _xmlrpc.ProtocolError) as exc:
            raise self._unreachable(method, exc) from exc

    def _unreachable(self, method: str, exc: Exception) -> SupervisorError:
        return SupervisorError(f"supervisord at unix://{self.socket_path} is unreachable ({method}): {exc}", None)


class Later:
    """A query sent to supervisord whose answer is read by `result()` (once; SupervisorError as the call
    would raise); `close()` drops it unread."""

    def __init__(self, read: Callable[[_xmlrpc.Pending], Any], pending: _xmlrpc.Pending):
        self._read = read
        self._pending = pending

    def result(self) -> Any:
        return self._read(self._pending)

    def close(self) -> None:
        self._pending.close()


def _fault_error(method: str, args: tuple, fault: _xmlrpc.Fault) -> SupervisorError:
    """`<sentence>: <supervisord's detail> [<call>: fault <code> <NAME>]`."""
    code = fault.faultCode
    name, sentence = FAULTS.get(code, ("UNKNOWN", f"unknown fault {code}"))
    detail = str(fault.faultString).removeprefix(f"{name}: ").removeprefix(name)
    call = f"{method.removeprefix('supervisor.')}({', '.join(repr(a) for a in args)})"
    text = f"{sentence}: {detail}" if detail else sentence
    return SupervisorError(f"{text} [{call}: fault {code} {name}]", code)


def _namespec(info: dict) -> str:
    group, name = info.get("group"), info.get("name")
    return str(name) if group == name else f"{group}:{name}"


def _natural(name: str) -> list:
    """Sort key: `web-2` before `web-10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _with_groups(infos: list[dict]) -> dict[str, dict]:
    """getAllProcessInfo by namespec, plus one `aggregate_info` entry per multi-process group."""
    out = {_namespec(info): info for info in infos}
    groups: dict[str, list[dict]] = {}
    for info in infos:
        if info.get("group") != info.get("name"):
            groups.setdefault(str(info.get("group")), []).append(info)
    for group, members in groups.items():
        out.setdefault(group, aggregate_info(group, members))
    return out


def aggregate_info(group: str, members: list[dict]) -> dict:
    """One process-info entry for a multi-process program, shaped like a single process's.

    statename: RUNNING only if every process is RUNNING, else the worst of theirs (FATAL > BACKOFF >
    EXITED > STOPPED > STOPPING > STARTING), with that process's `state` and `exitstatus`; pid: the
    first process's, 0 if any process has none (is down); spawnerr and description: each process's,
    joined and labelled; the log file fields of the first process; `members`: the namespecs, in
    process order.
    """
    members = sorted(members, key=lambda i: _natural(str(i.get("name"))))
    states = [str(m.get("statename")) for m in members]
    if all(s == "RUNNING" for s in states):
        worst = members[0]
    else:
        rank = {s: i for i, s in enumerate(_WORST_FIRST)}
        worst = min((m for m in members if m.get("statename") != "RUNNING"),
                    key=lambda m: rank.get(str(m.get("statename")), -1))
    first = members[0]

    def joined(key: str) -> str:
        return "; ".join(f"{m.get('name')}: {m.get(key)}" for m in members if m.get(key))

    info = dict(first)
    info.update(
        name=group,
        group=group,
        statename=worst.get("statename"),
        state=worst.get("state"),
        exitstatus=worst.get("exitstatus"),
        pid=first.get("pid") if all(m.get("pid") for m in members) else 0,
        spawnerr=joined("spawnerr"),
        description=joined("description"),
        members=[_namespec(m) for m in members],
    )
    return info


def connect(url: str) -> SupervisorClient:
    """A client for `unix:///path/to.sock` (the only transport the agent supports)."""
    prefix = "unix://"
    if not url.startswith(prefix) or not url[len(prefix):].startswith("/"):
        raise ConfigError(f"supervisord URL {url!r} must look like unix:///path/to/supervisor.sock")
    return SupervisorClient(url[len(prefix):])


# --- the agent's own supervisord ------------------------------------------------------------------


class EmbeddedSupervisor:
    """The agent's own supervisord: config, unix socket, pid file and logs under <root>/supervisor.

    It daemonizes, so it outlives the agent process that started it: programs keep running while the
    agent restarts, and the next agent finds it by its socket.
    """

    WEB_USER = "gitops-agent"

    def __init__(self, root: Path, web: str | None = None):
        """`web` ("HOST:PORT"): also serve supervisord's own web UI there (--supervisor-web), with the user
        `gitops-agent` and a generated password kept in `web_password_path` (0600)."""
        self.root = Path(root).absolute()
        self.web = web
        base = self.root / "supervisor"
        self.base_dir = base
        self.conf_path = base / "supervisord.conf"
        self.socket_path = base / "supervisor.sock"
        self.pid_path = base / "supervisord.pid"
        self.include_dir = base / "programs"
        self.log_dir = self.root / "logs"
        self.supervisord_log = self.log_dir / "supervisord.log"
        self.web_password_path = base / "web-password"

    def __repr__(self) -> str:
        return f"EmbeddedSupervisor({str(self.root)!r})"

    def client(self, timeout: float = 60.0) -> SupervisorClient:
        return SupervisorClient(self.socket_path, timeout)

    def is_running(self) -> bool:
        """True when our supervisord process is alive (by its pid file) or its socket answers."""
        return self._live_pid() is not None or self._answers()

    def ensure_running(self, timeout: float = 15.0) -> SupervisorClient:
        """Write the config, start supervisord unless it runs, wait until it answers; return a client."""
        deadline = time.monotonic() + timeout
        self._prepare_dirs()
        self._write_conf()
        client = self.client()
        if self._answers(want_running=True):
            return client
        launched = False
        while True:
            if self._answers(want_running=True):
                return client
            if not launched and self._live_pid() is None:
                self._clean_stale()
                self._stop_orphans()
                self._launch(deadline)
                launched = True
            if time.monotonic() >= deadline:
                raise SupervisorError(
                    f"supervisord ({self.conf_path}) did not answer on {self.socket_path} within "
                    f"{timeout:g}s; log tail:\n{_tail(self.supervisord_log)}",
                    None,
                )
            time.sleep(_POLL)

    def stop(self, timeout: float = 30.0) -> bool:
        """Shut supervisord down (it stops every program first); False if it was not running."""
        deadline = time.monotonic() + timeout
        pid = self._live_pid()
        client = self.client(timeout=5.0)
        try:
            pid = client.pid()
            client.shutdown()
        except SupervisorError as err:
            if pid is None:
                return False
            if err.code != 6:  # not already shutting down: it is hung or still starting
                _signal(pid, signal.SIGTERM)
        if pid is None:
            return False
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                raise SupervisorError(f"supervisord pid {pid} still running after {timeout:g}s", None)
            time.sleep(_POLL)
        self._stop_orphans("programs daemonized out of their process groups")
        return True

    # -- helpers

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o700)
        self.include_dir.mkdir(exist_ok=True)
        self.log_dir.mkdir(mode=_LOG_DIR_MODE, parents=True, exist_ok=True)
        if len(os.fsencode(self.socket_path)) > _SOCKET_PATH_MAX:
            raise SupervisorError(
                f"socket path {self.socket_path} is longer than {_SOCKET_PATH_MAX} bytes; "
                "choose a shorter agent root",
                None,
            )

    def web_password(self) -> str:
        """The web UI's password: generated once (secrets.token_urlsafe), kept in a 0600 file, reused."""
        import secrets

        try:
            password = self.web_password_path.read_text().strip()
            if len(password) >= 16:
                os.chmod(self.web_password_path, 0o600)
                return password
        except FileNotFoundError:
            pass
        password = secrets.token_urlsafe(24)
        atomic_write(self.web_password_path, password + "\n", 0o600)
        return password

    def _web_server(self) -> WebServer | None:
        if self.web is None:
            return None
        import hashlib

        host, _, port = self.web.rpartition(":")
        sha1 = hashlib.sha1(self.web_password().encode()).hexdigest()   # noqa: S324 (supervisord's {SHA} format)
        return WebServer(host.strip("[]") or "127.0.0.1", int(port), self.WEB_USER, sha1)

    def _write_conf(self) -> None:
        try:
            text = render_supervisord(
                socket_path=str(self.socket_path),
                pid_path=str(self.pid_path),
                log_dir=str(self.log_dir),
                include_glob=f"{self.include_dir.name}/*.conf",
                minfds=_minfds(),
                web=self._web_server(),
            )
        except UnsafeValue as err:
            raise ConfigError(f"agent root {self.root} cannot be used with supervisord: {err}") from err
        old = _read_text(self.conf_path)
        if old != text:
            atomic_write(self.conf_path, text, 0o600)
            if old is not None and _web_section(old) != _web_section(text) and self._live_pid() is not None:
                # supervisord reads [inet_http_server] only at start, and restarting it restarts every service
                log.warning("the embedded supervisord's web UI (--supervisor-web) changes when it next starts "
                            "(gitops-agent down, then once or run): it is not restarted under running services")

    def _answers(self, want_running: bool = False) -> bool:
        try:
            state = self.client(timeout=2.0).state()
        except SupervisorError as err:
            return not want_running and err.code == 6
        return state == "RUNNING" or not want_running

    def _live_pid(self) -> int | None:
        """The pid from our pid file if that process is alive and is a supervisord for our config."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return pid  # no /proc: trust the pid file
        return pid if os.fsencode(self.conf_path) in cmdline else None

    def _clean_stale(self) -> None:
        """Remove a pid file and socket left by a supervisord that is gone (crash, reboot, kill -9)."""
        for path in (self.pid_path, self.socket_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def _stop_orphans(self, why: str = "supervisord of this root is gone but left programs running",
                      timeout: float = 10.0) -> list[int]:
        """Stop the programs a dead supervisord of this root left running; return their process groups.

        A supervisord killed with SIGKILL (or by the OOM killer) cannot stop its children: each runs in
        its own process group and is simply reparented, keeps serving unmanaged, and keeps its port, so
        the same program started by the next supervisord fails to bind. Every child carries
        `SUPERVISOR_SERVER_URL=unix://<this root's socket>` in its environment, which names them exactly.
        Their groups get SIGTERM (as `stopasgroup` would), then SIGKILL after `timeout` seconds.
        """
        if self._live_pid() is not None:
            return []                    # our supervisord runs: its children are not orphans
        groups = _orphan_groups(b"SUPERVISOR_SERVER_URL=unix://" + os.fsencode(self.socket_path))
        if not groups:
            return []
        log.warning("%s: %s (process groups %s): stopping them", self.root, why, ", ".join(map(str, groups)))
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_group_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pgid in groups:
            if _group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
        return groups

    def _launch(self, deadline: float) -> None:
        """Run supervisord; its first process forks the daemon and exits once the socket is bound.

        `-X utf8` makes supervisord read config files as UTF-8 whatever the locale, without an
        environment variable that its programs would inherit. A new session and no inherited file
        descriptors keep it independent of the calling process.
        """
        argv = [sys.executable, "-X", "utf8", "-m", "agent.drivers.supervisord_main", "-c", str(self.conf_path)]
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                close_fds=True,
                start_new_session=True,
                timeout=max(deadline - time.monotonic(), 1.0),
            )
        except subprocess.TimeoutExpired as err:
            raise SupervisorError(f"supervisord did not daemonize in time: {err}", None) from err
        if done.returncode != 0:
            output = done.stdout.decode(errors="replace").strip()
            raise SupervisorError(
                f"supervisord -c {self.conf_path} failed to start (exit {done.returncode}): {output}",
                None,
            )


def _minfds() -> int:
    """MINFDS, capped by our hard RLIMIT_NOFILE: supervisord cannot go above it and would refuse to start."""
    import resource     # only when supervisord's config is written

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return MINFDS if hard == resource.RLIM_INFINITY else min(MINFDS, hard)


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie (our daemon is reparented to a pid 1 that may not reap it at once)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _orphan_groups(marker: bytes) -> list[int]:
    """Process groups of the processes whose environment holds `marker` (never our own group)."""
    own = os.getpgrp()
    groups: set[int] = set()
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                if marker not in fh.read().split(b"\0"):
                    continue
            pgid = os.getpgid(int(name))
        except (OSError, ValueError):
            continue
        if pgid != own and _pid_alive(int(name)):
            groups.add(pgid)
    return sorted(groups)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_pid_alive(int(e.name)) for e in os.scandir("/proc") if e.name.isdigit() and _pgid_of(e.name) == pgid)


def _pgid_of(pid: str) -> int | None:
    try:
        return os.getpgid(int(pid))
    except (OSError, ValueError):
        return None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, nbytes: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - nbytes, 0))
            return f.read().decode(errors="replace")
    except OSError:
        return "(no log)"


# --- processes a program left behind -----------------------------------------------------------


def leftover_pids(socket_path: str | Path, name: str) -> list[int]:
    """Live processes of program `name` of the supervisord at `socket_path`, found by their environment.

    A process belongs to the program when its environment holds `GITOPS_AGENT_PROGRAM=<name>` (from the
    rendered config) and `SUPERVISOR_SERVER_URL=unix://<that socket>` (supervisord sets it; compared
    with symlinks resolved, so /var/run and /run agree). Processes we may not read are not ours to
    judge. Our own process is never listed. `name` may also name one process of a multi-process
    program (`NAME:NAME-1`): then only those that also hold `SUPERVISOR_PROCESS_NAME=NAME-1`.
    """
    program, _, process = name.partition(":")
    marker = f"{MARKER_KEY}={program}".encode()
    process_marker = f"SUPERVISOR_PROCESS_NAME={process}".encode() if process else None
    want = os.path.realpath(socket_path)
    found = []
    for pid, env in _environments():
        if marker not in env or pid == os.getpid():
            continue
        if process_marker is not None and process_marker not in env:
            continue
        urls = [e[len(b"SUPERVISOR_SERVER_URL=unix://"):] for e in env if e.startswith(b"SUPERVISOR_SERVER_URL=unix://")]
        if any(os.path.realpath(os.fsdecode(u)) == want for u in urls) and _pid_alive(pid):
            found.append(pid)
    return sorted(found)


def stop_leftovers(socket_path: str | Path, name: str, timeout: float = _LEFTOVER_WAIT) -> list[int]:
    """SIGTERM every leftover process of `name` (and the process group it leads), SIGKILL what is still
    there after `timeout` seconds; return the pids found. Call it once supervisord has stopped the program:
    anything of the program still alive then has left its process group (a daemonizing service)."""
    pids = leftover_pids(socket_path, name)
    if not pids:
        return []
    log.warning("program %s left processes running outside its process group (%s): stopping them",
                name, ", ".join(map(str, pids)))
    for pid in pids:
        _signal_tree(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(_STOP_POLL * 5)
    for pid in pids:
        if _pid_alive(pid):
            _signal_tree(pid, signal.SIGKILL)
    for pid in leftover_pids(socket_path, name):     # started by the ones we stopped, in the meantime
        _signal_tree(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout            # SIGKILL cannot be refused; the kernel takes a moment
    while leftover_pids(socket_path, name) and time.monotonic() < deadline:
        time.sleep(_STOP_POLL * 5)
    return pids


def daemonized(client: "SupervisorClient", name: str, info: dict | None = None) -> str | None:
    """Why `name` cannot be supervised, if it daemonized: supervisord sees it exited (or failing to start)
    while processes it started still run outside its process group. None when that is not the case.

    For plan and outcome messages: without this, such a service looks like one that crashed, and a
    restart starts a second copy next to the first.

    For a multi-process program: the leftovers of its processes that are down (the running ones'
    processes carry the same program marker and are not leftovers).
    """
    if info is None:
        info = client.process_info().get(name) or {}
    if info.get("statename") not in _DIED_STATES:
        return None
    if info.get("members"):
        every = client.process_info()
        down = [m for m in info["members"] if (every.get(m) or {}).get("statename") in _DIED_STATES]
        pids = sorted({p for m in down for p in leftover_pids(client.socket_path, m)})
    else:
        pids = leftover_pids(client.socket_path, name)
    if not pids:
        return None
    return (f"{name} daemonized: its command exited (status {info.get('exitstatus')}) but left process(es) "
            f"{', '.join(map(str, pids))} running outside supervisord's control; it cannot be supervised: "
            "run it in the foreground (its 'no daemon' / foreground option)")


def _environments():
    """(pid, environment entries) of every process whose environment we may read."""
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return
    for name in entries:
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                yield int(name), fh.read().split(b"\0")
        except OSError:
            continue


def _signal_tree(pid: int, sig: int) -> None:
    """Signal `pid`, and its whole process group when it leads one (its children that cleared their
    environment are still in it). Never our own group."""
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return
    if pgid == pid and pgid != os.getpgrp():
        _signal_group(pgid, sig)
    else:
        _signal(pid, sig)


# --- program files --------------------------------------------------------------------------------


def write_program_file(include_dir: Path, name: str, text: str) -> None:
    """Validate `text` as supervisord would, then atomically install it as <name>.conf.

    Mode 0600: a program's environment values may be secrets (supervisord runs as the agent's user).

    Why validate here: one unparsable include file makes every later `reloadConfig` fail (fault 92)
    for every program. The temp file is a dotfile ending in `.tmp`, outside the `*.conf` glob, so a
    concurrent reload never sees a half-written file.

    Its log files' directory is created (0750) first: supervisord refuses a program whose log
    directory is missing (a fresh root with a shared supervisord has none). The log files (one per
    process of a multi-process program) are created 0600 before supervisord first opens them: it appends and keeps the mode, so a shared
    supervisord with a permissive umask does not make a service's output readable to others.
    """
    _check_name(name)
    logs = _log_paths(text)
    for path in logs:
        path.parent.mkdir(mode=_LOG_DIR_MODE, parents=True, exist_ok=True)
    _validate_program_text(include_dir, name, text)
    for path in logs:
        _private_log(path)
    Path(include_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(include_dir) / f"{name}.conf", text, 0o600)


def remove_program_file(include_dir: Path, name: str, keep_logs: bool = False) -> None:
    """Remove <name>.conf and (unless `keep_logs`) the log files it names, rotated ones included.
    A missing file is fine (the wish is already met)."""
    _check_name(name)
    path = Path(include_dir) / f"{name}.conf"
    try:
        text = path.read_text(encoding="utf-8")
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(Path(include_dir))
    if not keep_logs:
        for log_path in _log_paths(text, every_process_num=True):
            _remove_log(log_path)


def _log_paths(text: str, every_process_num: bool = False) -> list[Path]:
    """The absolute stdout/stderr log files a program file names (not AUTO/NONE/syslog), one per process.

    Expanded as supervisord does (twice, with `program_name`, `group_name`, `process_num`,
    `numprocs`, `host_node_name`): a multi-process program logs to one file per process, and a
    literal `%` is written `%%%%`. A value using other names (`here`, `ENV_*`) is skipped: we cannot
    be sure which file it means. `every_process_num`: the files of process numbers up to 64 too (to
    remove a program's logs, including those of processes a smaller `numprocs` no longer runs).
    """
    from supervisor.options import UnhosedConfigParser

    parser = UnhosedConfigParser()
    try:
        parser.read_string(text)
    except Exception:  # noqa: BLE001 - an unparsable text names no files; validation says why
        return []
    paths: list[Path] = []
    for section in parser.sections():
        program = section.partition(":")[2]
        try:
            numprocs = int(parser.get(section, "numprocs", fallback="1"))
            start = int(parser.get(section, "numprocs_start", fallback="0"))
        except ValueError:
            continue
        count = max(numprocs, _MAX_NUMPROCS_SWEEP) if every_process_num and numprocs > 1 else numprocs
        for key in ("stdout_logfile", "stderr_logfile"):
            value = parser.get(section, key, fallback="").strip()
            for num in range(start, start + count):
                names = {"program_name": program, "group_name": program, "process_num": num,
                         "numprocs": numprocs, "host_node_name": os.uname().nodename}
                try:
                    path = value % names % names
                except (KeyError, ValueError, TypeError):
                    break
                if path.startswith("/") and Path(path) not in paths:
                    paths.append(Path(path))
    return paths


def _private_log(path: Path) -> None:
    """Create `path` 0600 if missing; make an existing one of ours 0600 (earlier versions left it 0644)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, _LOG_MODE)
    except FileExistsError:
        st = path.lstat()
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.chmod(path, _LOG_MODE, follow_symlinks=False)
        return
    os.close(fd)


def _remove_log(path: Path) -> None:
    """Remove a log file and its rotated backups (<file>.1, <file>.2, ...)."""
    try:
        backups = [p for p in path.parent.glob(f"{_glob_escape(path.name)}.*") if p.suffix[1:].isdigit()]
    except OSError:
        backups = []
    for p in (path, *backups):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def read_program_files(include_dir: Path) -> dict[str, str]:
    """name -> text of every <name>.conf in `include_dir` (none if the directory is missing)."""
    try:    # os.scandir: its entries know a regular file without a stat; pathlib's glob made an object per file
        with os.scandir(include_dir) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(".conf") and e.is_file())
    except OSError:
        return {}
    out = {}
    for name in names:
        with open(os.path.join(include_dir, name), encoding="utf-8") as fh:
            out[name[: -len(".conf")]] = fh.read()
    return out


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not PROGRAM_NAME_RE.fullmatch(name):
        raise UnsafeValue("name", f"{name!r} must match {PROGRAM_NAME_RE.pattern}")


def _validate_program_text(include_dir: Path, name: str, text: str) -> None:
    """Parse `text` with supervisord's own parser: exactly one [program:name], and it must load."""
    from supervisor.options import ServerOptions, UnhosedConfigParser  # ~30 ms, only when writing

    parser = UnhosedConfigParser()
    try:
        parser.read_string(text)
    except Exception as err:  # configparser raises several unrelated types
        raise UnsafeValue(f"{name}.conf", f"not a valid ini file: {err}") from err
    section = f"program:{name}"
    if parser.sections() != [section]:
        raise UnsafeValue(f"{name}.conf", f"must hold exactly [{section}], found {parser.sections()}")
    options = ServerOptions()
    options.here = str(Path(include_dir).absolute())
    parser.expand_here(options.here)
    try:
        options.processes_from_section(parser, section, name)
    except ValueError as err:
        raise UnsafeValue(f"{name}.conf", f"supervisord would refuse it: {err}") from err


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _web_section(conf: str) -> str:
    """The [inet_http_server] section of a supervisord config ('' when there is none)."""
    start = conf.find("[inet_http_server]")
    if start < 0:
        return ""
    end = conf.find("\n[", start + 1)
    return conf[start:end if end >= 0 else len(conf)]
