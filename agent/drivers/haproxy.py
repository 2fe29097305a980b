"""HAProxy driver: weights through the runtime API (no reload), topology changes through a checked reload.

Why two paths (DESIGN §7): `set weight backend/server N` on the stats socket applies at once and lost
0 requests over 40,000 (keep-alive clients included), while a reload re-executes the master. So a
change of weights only goes through the runtime API, and the same weights are also written to the
config file, because runtime weights are lost on reload or restart. A change of anything else (a
frontend, a backend, a listen address, the A/B split) is written to the config (checked first with
`haproxy -c`), then the master is told to reload (SIGUSR2, sent once /proc says the master catches it:
it drops one that comes while it starts or re-executes after a previous reload) and the driver waits
until the running worker reports the new topology hash (`show env GITOPS_AGENT_TOPOLOGY`, set by the
renderer) and the old workers have closed their listeners (the new worker answers ~1 ms before they
are soft-stopped): a reload that cannot take effect (a port in use) leaves the old worker running,
which we report as LBError, restoring the previous file so that file and live process agree again.

Side effects only; the text comes from `agent.core.render.lb` (pure).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.core._record import record
from agent.drivers._procfs import (children, listening_inodes, listening_pids, master_pid,
                                   wait_catches_signal, wait_master_pid, wait_retired)
from agent.core.errors import AgentError
from agent.drivers.fsutil import atomic_write
from agent.core.render.lb import TOPOLOGY_ENV, Frontend, haproxy_topology, render_haproxy, validate
from agent.core.render.supervisor import ProgramSpec

__all__ = [
    "LBError",
    "Applied",
    "ServerState",
    "HAProxyRuntime",
    "HAProxyDriver",
    "PROGRAM_NAME",
    "weights_of",
]

PROGRAM_NAME = "gitops-lb-haproxy"
_SOCKET_PATH_MAX = 107
_POLL = 0.02
_RETIRE_POLL = 0.001  # the window is ~1.4 ms; a /proc scan costs well under that
_SIGNAL_POLL = 0.005  # the master catches SIGUSR2 20-800 ms after its worker answers
_STATES = {"ready", "drain", "maint"}
# srv_admin_state bits (include/haproxy/server-t.h): FMAINT 0x01, IMAINT 0x02, CMAINT 0x04, FDRAIN 0x08,
# IDRAIN 0x10, RMAINT 0x20, HMAINT 0x40.
_MAINT_BITS, _DRAIN_BITS = 0x01 | 0x02 | 0x04 | 0x20 | 0x40, 0x08 | 0x10
_OP_STATES = {0: "down", 1: "starting", 2: "up", 3: "stopping"}


class LBError(AgentError):
    """The load balancer refused or failed an operation, or a change did not go live."""


@record
class Applied:
    """What an `apply` did. action: "none" | "weights" (runtime API, no reload) | "reload" |
    "written" (config written; the load balancer is not running: start it, then `wait_live`)."""

    action: str
    changed: tuple[tuple[str, str, int, int], ...] = ()   # (frontend, backend, old weight, new weight)
    detail: str = ""
    seconds: float = 0.0


@record
class ServerState:
    weight: int            # current (runtime) user weight
    initial_weight: int    # the weight in the config the worker loaded
    state: str             # "up" | "down" | "starting" | "stopping" | "drain" | "maint"
    addr: str              # "ip:port"


def weights_of(frontends: Iterable[Frontend]) -> dict[str, dict[str, int]]:
    """{frontend: {backend: weight}}: the shape of `facts()["weights"]` for both drivers."""
    return {fe.name: {be.name: be.weight for be in fe.backends} for fe in frontends}


# --- runtime API ----------------------------------------------------------------------------------


class HAProxyRuntime:
    """Commands on HAProxy's stats socket (`level admin`): one connection per command."""

    def __init__(self, socket_path: str | Path, timeout: float = 5.0):
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"HAProxyRuntime({self.socket_path!r})"

    def command(self, line: str) -> str:
        """Send one command, return the whole answer. Raises LBError if the socket does not answer."""
        if "\n" in line or "\r" in line or ";" in line:
            raise LBError(f"refusing a runtime API command with a line break or ';': {line!r}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as err:
            raise LBError(f"HAProxy runtime API at {self.socket_path} does not answer ({line.split()[0:2]}): {err}") from err
        finally:
            sock.close()
        return b"".join(chunks).decode(errors="replace")

    def answers(self) -> bool:
        try:
            return "Pid:" in self.command("show info")
        except LBError:
            return False

    def info(self) -> dict[str, str]:
        out = {}
        for line in self.command("show info").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
        return out

    def show_env(self, name: str) -> str | None:
        """The value of an environment variable of the running worker, None if unset."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LBError(f"bad environment variable name {name!r}")
        answer = self.command(f"show env {name}").strip()
        key, sep, value = answer.partition("=")
        return value if sep and key == name else None

    def show_servers_state(self) -> dict[tuple[str, str], ServerState]:
        """(backend, server) -> ServerState for every server of every backend."""
        text = self.command("show servers state")
        lines = text.splitlines()
        if not lines or not lines[0].strip().isdigit():
            raise LBError(f"unexpected answer to 'show servers state': {text[:200]!r}")
        header: list[str] = []
        out: dict[tuple[str, str], ServerState] = {}
        for line in lines[1:]:
            if line.startswith("# "):
                header = line[2:].split()
                continue
            if not line.strip():
                continue
            row = dict(zip(header, line.split()))
            try:
                admin, op = int(row["srv_admin_state"]), int(row["srv_op_state"])
                state = ("maint" if admin & _MAINT_BITS else "drain" if admin & _DRAIN_BITS
                         else _OP_STATES.get(op, f"op{op}"))
                out[(row["be_name"], row["srv_name"])] = ServerState(
                    weight=int(row["srv_uweight"]), initial_weight=int(row["srv_iweight"]),
                    state=state, addr=f"{row['srv_addr']}:{row['srv_port']}")
            except (KeyError, ValueError) as err:
                raise LBError(f"cannot parse 'show servers state' row {line!r}: {err}") from err
        return out

    def get_weight(self, backend: str, server: str) -> int:
        answer = self.command(f"get weight {_ident(backend)}/{_ident(server)}").strip()
        match = re.match(r"(\d+) \(initial \d+\)", answer)
        if not match:
            raise LBError(f"get weight {backend}/{server}: {answer or 'no answer'}")
        return int(match.group(1))

    def set_weight(self, backend: str, server: str, weight: int) -> None:
        """Applies at once to new requests (keep-alive connections included); no reload."""
        if type(weight) is not int or not 0 <= weight <= 256:
            raise LBError(f"set weight {backend}/{server}: {weight!r} must be an integer 0..256")
        self._expect_silence(f"set weight {_ident(backend)}/{_ident(server)} {weight}")

    def set_state(self, backend: str, server: str, state: str) -> None:
        """"ready" | "drain" (no new sessions, keep existing ones) | "maint" (out of service)."""
        if state not in _STATES:
            raise LBError(f"set server {backend}/{server} state: {state!r} must be one of {sorted(_STATES)}")
        self._expect_silence(f"set server {_ident(backend)}/{_ident(server)} state {state}")

    def set_health_up(self, backend: str, server: str) -> None:
        """Take the server's health as up now (its own checks continue and may still mark it down)."""
        self._expect_silence(f"set server {_ident(backend)}/{_ident(server)} health up")

    def _expect_silence(self, line: str) -> None:
        answer = self.command(line).strip()
        if answer:  # success is an empty answer; errors are sentences ("No such server.")
            raise LBError(f"HAProxy refused '{line}': {answer}")


def _ident(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]+", name):
        raise LBError(f"bad HAProxy backend/server name {name!r}")
    return name


# --- the driver -----------------------------------------------------------------------------------


@dataclass
class HAProxyDriver:
    """The agent's HAProxy: config <root>/lb/haproxy.cfg, stats socket <root>/lb/haproxy.sock.

    `reload` (optional) replaces the default reload (SIGUSR2 to the master whose pid is in
    <root>/lb/haproxy.pid): e.g. supervisord's `signalProcess(PROGRAM_NAME, "USR2")` or a system
    haproxy's reload command.
    """

    root: Path
    haproxy_bin: str = "haproxy"
    reload: Callable[[], None] | None = None
    live_timeout: float = 10.0
    metrics: str | None = None          # HOST:PORT of HAProxy's Prometheus exporter (--lb-metrics), None: off
    lb_dir: Path = field(init=False)
    config_path: Path = field(init=False)
    socket_path: Path = field(init=False)
    pid_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        self.lb_dir = self.root / "lb"
        self.config_path = self.lb_dir / "haproxy.cfg"
        self.socket_path = self.lb_dir / "haproxy.sock"
        self.pid_path = self.lb_dir / "haproxy.pid"
        if len(os.fsencode(self.socket_path)) > _SOCKET_PATH_MAX:
            raise LBError(f"socket path {self.socket_path} is longer than {_SOCKET_PATH_MAX} bytes; use a shorter root")

    @property
    def runtime(self) -> HAProxyRuntime:
        return HAProxyRuntime(self.socket_path)

    def program_spec(self, haproxy_bin: str | None = None) -> ProgramSpec:
        """The supervisord program: master-worker in the foreground (`-W -db`), SIGUSR2 reloads it."""
        return ProgramSpec(name=PROGRAM_NAME, command=(haproxy_bin or self.haproxy_bin, "-W", "-db", "-f", str(self.config_path)),
                           directory=str(self.lb_dir), startsecs=1, stopwaitsecs=10, autorestart="true")

    def render(self, frontends: Iterable[Frontend]) -> str:
        return render_haproxy(frontends, stats_socket=str(self.socket_path), pid_file=str(self.pid_path),
                              metrics=self.metrics)

    def topology(self, frontends: Iterable[Frontend]) -> str:
        return haproxy_topology(frontends, stats_socket=str(self.socket_path), pid_file=str(self.pid_path),
                                metrics=self.metrics)

    # -- apply

    def apply(self, frontends: Iterable[Frontend], up: tuple[str, ...] = ()) -> Applied:
        """Make the load balancer serve `frontends`; weights-only changes never reload.

        `up` ("frontend/backend"): servers the caller has just seen healthy. HAProxy's own check (every 2 s,
        `fall 3 rise 2`) may have marked one DOWN while it was still starting and would keep it out for
        seconds more; `set server ... health up` takes it now, and the checks go on as before.
        """
        started = time.monotonic()
        frontends = validate(frontends)
        text = self.render(frontends)
        want_topology = self.topology(frontends)
        runtime = self.runtime
        try:
            live_topology = runtime.show_env(TOPOLOGY_ENV)
        except LBError:
            live_topology = None
            if runtime.answers():
                raise
        if live_topology is None and not runtime.answers():
            changed = self._write_checked(text)
            return Applied("written", detail=f"config {'written' if changed else 'unchanged'}; HAProxy is not "
                                             "running: start it, then wait_live()",
                           seconds=time.monotonic() - started)
        if live_topology == want_topology:
            changes = self._weight_changes(frontends, runtime.show_servers_state())
            for fe_name, be_name, _old, new in changes:
                runtime.set_weight(fe_name, be_name, new)
            for name in up:
                runtime.set_health_up(*name.split("/", 1))
            # The same weights in the file, so a reload or restart keeps them. No `haproxy -c` here: the
            # running worker loaded this very topology from our renderer, only weight numbers differ.
            if _read(self.config_path) != text:
                atomic_write(self.config_path, text, 0o644)
            self._verify_weights(frontends)
            return Applied("weights" if changes else "none", changed=tuple(changes),
                           seconds=time.monotonic() - started)
        previous = _read(self.config_path)
        self._write_checked(text)
        old_workers = children(master_pid(self.pid_path, b"haproxy"))
        try:
            self._reload()
            self.wait_live(frontends)
            self._wait_retired(old_workers)
        except LBError as err:
            if previous is not None:
                atomic_write(self.config_path, previous, 0o644)
            raise LBError(f"{err}; the previous config was restored{self._log_hint()}") from err
        return Applied("reload", detail=f"topology {live_topology} -> {want_topology}", seconds=time.monotonic() - started)

    def wait_live(self, frontends: Iterable[Frontend], timeout: float | None = None) -> None:
        """Wait until the running worker has `frontends`' topology and weights, or raise LBError."""
        frontends = validate(frontends)
        want = self.topology(frontends)
        deadline = time.monotonic() + (self.live_timeout if timeout is None else timeout)
        seen: str | None = None
        while True:
            try:
                seen = self.runtime.show_env(TOPOLOGY_ENV)
                if seen == want:
                    self._verify_weights(frontends)
                    return
            except LBError:
                pass
            if time.monotonic() >= deadline:
                raise LBError(f"HAProxy did not go live with topology {want} (it runs {seen or 'nothing'}) "
                              f"within {self.live_timeout:g}s")
            time.sleep(_POLL)

    def _wait_retired(self, old_workers: set[int]) -> None:
        """Wait until the workers of the previous config hold no listening socket (soft-stopped or gone).

        The new worker answers the stats socket ~1 ms before the master has soft-stopped the old ones;
        a request in between is served with the old config (an A/B user could flip buckets).
        """
        listening = listening_inodes()   # once: old workers only close listeners, they never open one
        still = wait_retired(old_workers, lambda pids: listening_pids(pids, listening),
                             timeout=self.live_timeout, poll=_RETIRE_POLL)
        if still:
            raise LBError(f"HAProxy workers {still} of the previous config still accept after {self.live_timeout:g}s")

    def _weight_changes(self, frontends, state) -> list[tuple[str, str, int, int]]:
        changes = []
        for fe in frontends:
            for be in fe.backends:
                current = state.get((fe.name, be.name))
                if current is None:
                    raise LBError(f"HAProxy has no server {fe.name}/{be.name} although its topology matches")
                if current.weight != be.weight:
                    changes.append((fe.name, be.name, current.weight, be.weight))
        return changes

    def _verify_weights(self, frontends) -> None:
        left = self._weight_changes(frontends, self.runtime.show_servers_state())
        if left:
            raise LBError(f"HAProxy weights did not take: {left}")

    def _write_checked(self, text: str) -> bool:
        """Check `text` with `haproxy -c` and install it atomically; False when the file already holds it."""
        if _read(self.config_path) == text:
            return False
        self.lb_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.lb_dir / f".haproxy.cfg.{os.getpid()}.tmp"
        try:
            tmp.write_text(text, encoding="utf-8")
            try:
                done = subprocess.run([self.haproxy_bin, "-c", "-q", "-f", str(tmp)], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise LBError(f"cannot run {self.haproxy_bin} -c: {err}") from err
            if done.returncode != 0:
                raise LBError(f"haproxy -c refused the rendered config: {(done.stderr or done.stdout).strip()}")
        finally:
            tmp.unlink(missing_ok=True)
        atomic_write(self.config_path, text, 0o644)
        return True

    def _reload(self) -> None:
        """SIGUSR2 to the master (or the `reload` callable), once the master catches SIGUSR2.

        The master drops a SIGUSR2 that comes while it starts or re-executes after a reload (SIGUSR2
        blocked, then set to SIG_IGN, which discards a pending one), and its new worker answers the
        stats socket 20-600 ms before its loop catches SIGUSR2: sent the moment the worker answered,
        8 of 8 were lost. /proc/<master>/status (SigCgt, SigBlk) says when it is ready.
        """
        pid = (master_pid(self.pid_path, b"haproxy") if self.reload is not None else
               wait_master_pid(self.pid_path, b"haproxy", timeout=self.live_timeout, poll=_SIGNAL_POLL))
        if pid is None and self.reload is None:
            raise LBError(f"no running HAProxy master found through {self.pid_path}")
        if pid is not None and not wait_catches_signal(pid, signal.SIGUSR2, timeout=self.live_timeout,
                                                       poll=_SIGNAL_POLL):
            raise LBError(f"HAProxy master {pid} does not catch SIGUSR2 after {self.live_timeout:g}s (still "
                          "starting or re-executing after a reload); a reload sent now would be lost")
        if self.reload is not None:
            self.reload()
            return
        try:
            os.kill(pid, signal.SIGUSR2)
        except ProcessLookupError as err:
            raise LBError(f"HAProxy master {pid} exited before it could be reloaded") from err

    def _log_hint(self) -> str:
        return f" (see the {PROGRAM_NAME} program's stderr log for HAProxy's reason)"

    # -- facts

    def facts(self) -> dict:
        """What HAProxy actually runs: {driver, running, topology, config_topology, weights, states, error}.

        `weights` is {frontend: {backend: weight}} read from the runtime API, so a `set weight` done by
        hand shows up here (and is drift).
        """
        out: dict = {"driver": "haproxy", "running": False, "topology": None, "config_topology": None,
                     "weights": {}, "states": {}, "error": None}
        text = _read(self.config_path)
        if text is not None:
            match = re.search(rf"^\s*setenv {TOPOLOGY_ENV} (\S+)$", text, re.M)
            out["config_topology"] = match.group(1) if match else None
        runtime = self.runtime
        try:
            out["topology"] = runtime.show_env(TOPOLOGY_ENV)
            state = runtime.show_servers_state()
        except LBError as err:
            out["error"] = str(err)
            return out
        out["running"] = True
        for (backend, server), st in sorted(state.items()):
            out["weights"].setdefault(backend, {})[server] = st.weight
            out["states"].setdefault(backend, {})[server] = st.state
        return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None
