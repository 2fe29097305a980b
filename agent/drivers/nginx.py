"""nginx driver: render, `nginx -t`, swap atomically, graceful reload, then prove the reload went live.

nginx has no runtime weight API (in the open-source build), so every change is a reload (DESIGN §7:
~15 ms, in-flight requests complete, new-connection clients lose nothing, keep-alive clients without
retry lose ~9 requests per reload because old workers close idle keep-alive connections; mitigation:
clients retry idempotent requests on a closed idle connection, or use HAProxy, whose weights change
without a reload).

A reload can "succeed" and keep the old config (a listen port in use: the master logs the error and
keeps its old workers). So after SIGHUP the driver polls the generated `/__gitops_agent_version`
location on the control unix socket (<prefix>/control.sock) until it answers the new version; if it
does not within `live_timeout`, the previous config file is put back (file and live process agree
again) and LBError says why, with the error log's last lines.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.drivers._unixhttp import UnixHTTPConnection
from agent.drivers._procfs import children, master_pid, wait_retired
from agent.drivers.haproxy import Applied, LBError, _read
from agent.drivers.fsutil import atomic_write
from agent.core.render.lb import NGINX_CONTROL_SOCKET, VERSION_PATH, Frontend, nginx_version, render_nginx, validate
from agent.core.render.supervisor import ProgramSpec

__all__ = ["NginxDriver", "PROGRAM_NAME", "parse_weights", "LBError", "Applied"]

PROGRAM_NAME = "gitops-lb-nginx"
_SOCKET_PATH_MAX = 107
_POLL = 0.02
_VERSION_RE = re.compile(r'return 200 "([A-Za-z0-9._-]*)\\n";')
_FRONTEND_RE = re.compile(r"^    # frontend=(\S+)$")
_SERVER_RE = re.compile(r"^        server (\S+) (?:weight=(\d+)(?: max_fails=0)?|down);  # backend=(\S+)$")
_ZERO_RE = re.compile(r"^    # backend=(\S+) weight=0$")


def parse_weights(text: str) -> dict[str, dict[str, int]]:
    """{frontend: {backend: weight}} from a config rendered by `render_nginx` (down -> 0)."""
    out: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in text.splitlines():
        if m := _FRONTEND_RE.match(line):
            current = m.group(1)
            out.setdefault(current, {})
        elif current is not None and (m := _SERVER_RE.match(line)):
            out[current][m.group(3)] = int(m.group(2)) if m.group(2) else 0
        elif current is not None and (m := _ZERO_RE.match(line)):
            out[current][m.group(1)] = 0
    return out


@dataclass
class NginxDriver:
    """The agent's nginx: prefix <root>/lb/nginx, config <prefix>/nginx.conf, control socket under it.

    `reload` (optional) replaces the default reload (SIGHUP to the master whose pid is in
    <prefix>/nginx.pid), e.g. a system nginx's `systemctl reload nginx`.
    """

    root: Path
    nginx_bin: str = "nginx"
    reload: Callable[[], None] | None = None
    live_timeout: float = 5.0
    prefix: Path = field(init=False)
    config_path: Path = field(init=False)
    pid_path: Path = field(init=False)
    control_socket: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        self.prefix = self.root / "lb" / "nginx"
        self.config_path = self.prefix / "nginx.conf"
        self.pid_path = self.prefix / "nginx.pid"
        self.control_socket = self.prefix / NGINX_CONTROL_SOCKET
        if len(os.fsencode(self.control_socket)) > _SOCKET_PATH_MAX:
            raise LBError(f"socket path {self.control_socket} is longer than {_SOCKET_PATH_MAX} bytes; use a shorter root")

    def program_spec(self, nginx_bin: str | None = None) -> ProgramSpec:
        """The supervisord program: `daemon off` is in the config; `-e stderr` for errors before it is read."""
        return ProgramSpec(name=PROGRAM_NAME, command=(nginx_bin or self.nginx_bin, "-p", str(self.prefix), "-c",
                                                       str(self.config_path), "-e", "stderr"),
                           directory=str(self.prefix), startsecs=1, stopwaitsecs=10, autorestart="true")

    def version_of(self, frontends: Iterable[Frontend]) -> str:
        return nginx_version(frontends, prefix=str(self.prefix))

    def render(self, frontends: Iterable[Frontend]) -> tuple[str, str]:
        """(version, text) of the config for `frontends`."""
        version = self.version_of(frontends)
        return version, render_nginx(frontends, prefix=str(self.prefix), version=version)

    # -- apply

    def apply(self, frontends: Iterable[Frontend]) -> Applied:
        """Make nginx serve `frontends`: checked, swapped, reloaded and verified live, or LBError."""
        started = time.monotonic()
        frontends = validate(frontends)
        version, text = self.render(frontends)
        live = self.live_version()
        previous = _read(self.config_path)
        if live == version and previous == text:
            return Applied("none", seconds=time.monotonic() - started)
        self._install_checked(text)
        if live is None:
            return Applied("written", detail="nginx is not running: start it, then wait_live()",
                           seconds=time.monotonic() - started)
        old_workers = children(master_pid(self.pid_path, b"nginx"))
        try:
            self._reload()
            self.wait_live(frontends)
            self._wait_retired(old_workers)
        except LBError as err:
            if previous is not None:
                atomic_write(self.config_path, previous, 0o644)
            raise LBError(f"{err}; the previous config was restored{self._log_hint()}") from err
        old = parse_weights(previous or "")
        changed = tuple((fe, be, old.get(fe, {}).get(be, -1), w)
                        for fe, bes in parse_weights(text).items() for be, w in bes.items()
                        if old.get(fe, {}).get(be) != w)
        return Applied("reload", changed=changed, detail=f"version {live} -> {version}",
                       seconds=time.monotonic() - started)

    def wait_live(self, frontends: Iterable[Frontend], timeout: float | None = None) -> None:
        """Poll the control socket until nginx answers `frontends`' version, or raise LBError."""
        want = self.version_of(frontends)
        limit = self.live_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        seen = None
        while True:
            seen = self.live_version()
            if seen == want:
                return
            if time.monotonic() >= deadline:
                raise LBError(f"nginx did not go live with config version {want} within {limit:g}s "
                              f"(it answers {seen or 'nothing'})")
            time.sleep(_POLL)

    def _wait_retired(self, old_workers: set[int]) -> None:
        """Wait until the workers of the previous config stopped accepting ("is shutting down" or gone).

        The control socket can be answered by a new worker while an old one, not yet told to quit,
        still accepts (and keeps serving keep-alive connections) with the old weights.
        """
        still = wait_retired(old_workers, lambda pids: sorted(p for p in pids if _accepting_worker(p)),
                             timeout=self.live_timeout, poll=_POLL)
        if still:
            raise LBError(f"nginx workers {still} of the previous config still accept after {self.live_timeout:g}s")

    def live_version(self) -> str | None:
        """The version the running nginx answers on its control socket; None if it does not answer."""
        conn = UnixHTTPConnection(str(self.control_socket), timeout=2.0)
        try:
            conn.request("GET", VERSION_PATH)
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace").strip()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        return body if resp.status == 200 else None

    def _install_checked(self, text: str) -> None:
        """Write a temp file next to the config, `nginx -t` it, then os.replace it onto the config."""
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        tmp = self.prefix / f".nginx.conf.{os.getpid()}.tmp"
        try:
            tmp.write_text(text, encoding="utf-8")
            try:
                done = subprocess.run([self.nginx_bin, "-t", "-q", "-p", str(self.prefix), "-c", str(tmp), "-e", "stderr"],
                                      capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise LBError(f"cannot run {self.nginx_bin} -t: {err}") from err
            if done.returncode != 0:
                raise LBError(f"nginx -t refused the rendered config: {(done.stderr or done.stdout).strip()}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.config_path)
        finally:
            tmp.unlink(missing_ok=True)

    def _reload(self) -> None:
        if self.reload is not None:
            self.reload()
            return
        pid = master_pid(self.pid_path, b"nginx")
        if pid is None:
            raise LBError(f"no running nginx master found through {self.pid_path}")
        os.kill(pid, signal.SIGHUP)

    def _log_hint(self) -> str:
        tail = _error_tail(self.prefix / "logs" / "error.log")
        return f"; nginx error log:\n{tail}" if tail else ""

    # -- facts

    def facts(self) -> dict:
        """What nginx actually runs: {driver, running, version, config_version, edited, weights, error}.

        `weights` ({frontend: {backend: weight}}) is parsed from the config file when that file is
        what runs (its version answers on the control socket), else None. `edited` is True when the
        file no longer hashes to the version it carries (a hand edit: drift).
        """
        out: dict = {"driver": "nginx", "running": False, "version": None, "config_version": None,
                     "edited": False, "weights": None, "error": None}
        text = _read(self.config_path)
        live = self.live_version()
        out["running"] = live is not None
        out["version"] = live
        if text is not None:
            versions = set(_VERSION_RE.findall(text))
            carried = versions.pop() if len(versions) == 1 else None
            out["config_version"] = carried
            unversioned = _VERSION_RE.sub('return 200 "\\\\n";', text)
            out["edited"] = carried is None or hashlib.sha256(unversioned.encode()).hexdigest()[:16] != carried
            if live is not None and live == carried:
                out["weights"] = parse_weights(text)
        if live is None:
            out["error"] = f"nginx does not answer on {self.control_socket}"
        elif text is None or live != out["config_version"]:
            out["error"] = f"nginx runs version {live}, the config file holds {out['config_version']}"
        return out


def _accepting_worker(pid: int) -> bool:
    """A live nginx worker that has not begun its graceful shutdown (its title says so when it has)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and b"worker process" in title and b"shutting down" not in title


def _error_tail(path: Path, lines: int = 5) -> str:
    text = _read(path) or ""
    return "\n".join(text.splitlines()[-lines:])
