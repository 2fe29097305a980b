"""Shared fixtures: real git state repos in temp dirs, tiny real wheels, agent roots that clean up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import http.client
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from wheelfactory import lock_line, make_http_app_wheel  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

# HAProxy's exporter (--lb-metrics) defaults to the fixed 127.0.0.1:8405: one agent per host is fine, but a
# test with several agents (a fleet) would have their HAProxys fight for it. Off for the suite; the tests of
# the exporter pass a free port.
os.environ.setdefault("GITOPS_AGENT_LB_METRICS", "off")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free 127.0.0.1 port never handed out before in this process. Ports are written into app.yaml before
    their services bind them, so the kernel could give the same free port to two calls in a row (two
    services of one app once got one port, and the revision was rightly rejected)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` s (for test finalizers)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def start_git_daemon(request, base: Path) -> int:
    """A real `git daemon` exporting every repo under `base` on 127.0.0.1, stopped by a finalizer.
    Returns its port once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", "--informative-errors",
                             f"--base-path={base}", "--listen=127.0.0.1", f"--port={port}", str(base)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    request.addfinalizer(lambda: stop_process(proc))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"git daemon on port {port} did not start (exit {proc.poll()})") from None
            time.sleep(0.02)


def served_version(port: int) -> str | None:
    """The version a demoapp on `port` answers with ("demoapp 1.0.0" -> "1.0.0"), None if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
            return resp.read().decode().split()[1]
    except (OSError, http.client.HTTPException):   # a process stopped mid-answer: IncompleteRead
        return None


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


class StateRepo:
    """A real git repository holding a state tree, with a wheelhouse of tiny HTTP app wheels."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True)
        git(path, "init", "-q", "-b", "main")
        git(path, "config", "user.email", "test@example.invalid")
        git(path, "config", "user.name", "test")
        git(path, "config", "commit.gpgsign", "false")
        self.wheels: dict[str, Path] = {}

    @property
    def url(self) -> str:
        return f"file://{self.path}"

    def write(self, rel: str, text: str) -> Path:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))
        return target

    def wheel(self, version: str, name: str = "demoapp") -> Path:
        key = f"{name}-{version}"
        if key not in self.wheels:
            self.wheels[key] = make_http_app_wheel(self.path / "wheelhouse", name, version)
        return self.wheels[key]

    def lock(self, rel: str, *versions: str, name: str = "demoapp") -> None:
        self.write(rel, "".join(lock_line(self.wheel(v, name)) + "\n" for v in versions))

    def commit(self, message: str = "change") -> str:
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "--allow-empty", "-m", message)
        return git(self.path, "rev-parse", "HEAD")

    def app(self, *, name: str = "demo", services: dict[str, dict] | None = None, version: str = "1.0.0",
            env: str = "demo", extra: str = "", lock_versions: tuple[str, ...] | None = None) -> None:
        """Write fleet.yaml (host h1) and one app with one environment and the given services."""
        self.write("fleet.yaml", """\
            apiVersion: gitops-agent/v1
            kind: Fleet
            hosts:
              h1: {groups: [web]}
              h2: {groups: [db]}
            """)
        self.lock(f"apps/{name}/{env}.lock", *(lock_versions or (version,)))
        services = services if services is not None else {f"{name}-web": {"port": free_port()}}
        lines = [
            "apiVersion: gitops-agent/v1", "kind: App", f"name: {name}", "hosts: {groups: [web]}",
            "environments:", f"  {env}: {{lockfile: {env}.lock, find_links: [../../wheelhouse], index: false}}",
            "services:",
        ]
        for svc, spec in services.items():
            port = spec["port"]
            lines += [f"  {svc}:", f"    environment: {spec.get('environment', env)}",
                      f"    port: {port}", f'    command: [demoapp-server, --port, "{port}"]']
            if spec.get("health", True):
                lines.append(f'    health: {{http: "http://127.0.0.1:{port}/healthz", timeout_s: 1}}')
        self.write(f"apps/{name}/app.yaml", "\n".join(lines) + "\n" + extra)


@pytest.fixture
def state_repo(tmp_path) -> StateRepo:
    return StateRepo(tmp_path / "state")


@pytest.fixture
def agent_root(tmp_path):
    """An agent root whose embedded supervisord (and everything it runs) is stopped after the test."""
    root = tmp_path / "root"
    yield root
    from agent.drivers.supervisor import EmbeddedSupervisor

    EmbeddedSupervisor(root).stop()


def run_agent(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"gitops-agent {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc
