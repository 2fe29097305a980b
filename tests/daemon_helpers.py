"""Start `gitops-agent run` as a real subprocess and read its endpoints (shared by the daemon tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT, free_port, stop_process


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_until(pred: Callable[[], object], timeout: float, what: str, log: Path | None = None, step: float = 0.02):
    """Poll `pred` until truthy (returned) or fail after `timeout` s with the daemon's log tail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = pred()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n--- agent log ---\n{tail}")
        time.sleep(step)


class Daemon:
    """A `gitops-agent run` subprocess; `stop()` sends SIGTERM (then SIGKILL) and is safe to call twice.

    `command` runs the agent (default: this interpreter, `-m agent.cli` from the checkout); the bench passes
    the console script of the agent's own venv."""

    def __init__(self, repo_url: str, root: Path, log: Path, *extra: str, poll: float = 30.0, port: int | None = None,
                 command: list[str] | None = None):
        self.port = port or free_port()
        self.root = root
        self.log = log
        self.args = ["run", "--repo", repo_url, "--host", "h1", "--root", str(root), "--health-wait", "15",
                     "--listen", f"127.0.0.1:{self.port}", "--poll-interval", str(poll), *extra]
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen([*(command or [sys.executable, "-m", "agent.cli"]), *self.args], cwd=REPO_ROOT,
                                     stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        code, text = http_get(self.base + "/metrics", timeout=5)
        assert code == 200, code
        return text

    def metrics(self) -> dict[tuple, float]:
        out = {}
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, metric: str, **labels) -> float | None:
        try:
            return self.metrics().get((metric, tuple(sorted(labels.items()))))
        except OSError:
            return None

    def wait_value(self, metric: str, want: Callable[[float | None], bool], timeout: float, what: str = "", **labels):
        return wait_until(lambda: want(self.value(metric, **labels)), timeout, what or f"{metric}{labels}", self.log)

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until(lambda: http_get(self.base + "/readyz")[0] == 200, timeout, "/readyz 200", self.log)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until /healthz answers; fails at once, with the log, if the daemon exited instead."""
        wait_until(lambda: self.proc.poll() is not None or http_get(self.base + "/healthz")[0] == 200,
                   timeout, "the daemon's /healthz", self.log)
        assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}\n{self.log_text()}"

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._fh.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_daemon(request, repo_url: str, root: Path, tmp_path: Path, *extra: str, poll: float = 30.0,
                 port: int | None = None, command: list[str] | None = None) -> Daemon:
    """Start a daemon stopped by a finalizer (which runs before the agent_root fixture stops supervisord)."""
    n = len(list(tmp_path.glob("agent*.log")))
    d = Daemon(repo_url, root, tmp_path / f"agent{n}.log", *extra, poll=poll, port=port, command=command)
    request.addfinalizer(d.stop)
    return d



def start_prometheus(request, tmp_path: Path, config: str) -> str:
    """A real Prometheus (Debian's package) on a free 127.0.0.1 port with `config`, stopped by a finalizer;
    returns its base URL. Skips the test when the binary is not installed."""
    import shutil

    import pytest

    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("the prometheus binary is not installed (Debian package `prometheus`)")
    web = free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(config)
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([exe, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)

    def stop():
        stop_process(proc, 15)
        log.close()

    request.addfinalizer(stop)
    base = f"http://127.0.0.1:{web}"
    wait_until(lambda: http_get(base + "/-/ready")[0] == 200, 30, "prometheus ready", tmp_path / "prometheus.log")
    return base
