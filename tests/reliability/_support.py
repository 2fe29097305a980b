"""Helpers shared by the reliability suite: run the real CLI, read status, run the real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from conftest import REPO_ROOT, free_port, run_agent
from daemon_helpers import wait_until  # noqa: F401 (re-exported for the reliability tests)

__all__ = ["http_get", "get_text", "agent_args", "once", "status", "programs", "wait_until", "Daemon", "metric"]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def get_text(url: str, timeout: float = 2.0) -> str | None:
    """The body of a 2xx answer, or None if nothing answers."""
    try:
        code, body = http_get(url, timeout)
    except OSError:
        return None
    return body if 200 <= code < 300 else None


def agent_args(repo_url: str, root: Path, *extra: str) -> list[str]:
    return ["--repo", repo_url, "--host", "h1", "--root", str(root), "--health-wait", "15", *extra]


def once(repo_url: str, root: Path, *extra: str, expect: int | None = 0, timeout: float = 180):
    proc = run_agent("once", *agent_args(repo_url, root, *extra), timeout=timeout)
    if expect is not None:
        assert proc.returncode == expect, f"once exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def status(root: Path) -> dict:
    """status.json read directly (it must always parse)."""
    return json.loads((root / "state" / "status.json").read_text())


def programs(root: Path) -> dict[str, dict]:
    """What the embedded supervisord runs: name -> getAllProcessInfo entry."""
    from agent.drivers.supervisor import EmbeddedSupervisor

    return EmbeddedSupervisor(root).client(timeout=10).process_info()


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` (exact sample name) whose labels include `labels`; 0 if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


class Daemon:
    """A real `gitops-agent run` subprocess (own process group); `stop()` = SIGTERM, wait, then SIGKILL."""

    def __init__(self, repo_url: str, root: Path, log: Path, *extra: str, poll: float = 1.0):
        self.port = free_port()
        self.log = log
        argv = [sys.executable, "-m", "agent.cli", "run", *agent_args(repo_url, root, *extra),
                "--listen", f"127.0.0.1:{self.port}", "--poll-interval", str(poll)]
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_until(lambda: get_text(self.base + "/healthz") is not None or self.proc.poll() is not None,
                   30, "the daemon's /healthz", log)
        assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}\n{self.log_text()}"

    def metrics(self) -> str:
        code, text = http_get(self.base + "/metrics", timeout=5)
        assert code == 200, code
        return text

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._fh.close()
