"""Helpers shared by the reliability suite: run the real CLI, read status, run the real daemon."""

from __future__ import annotations

import json
from pathlib import Path

import daemon_helpers
from conftest import run_agent
from daemon_helpers import http_get, wait_until  # noqa: F401 (re-exported for the reliability tests)

__all__ = ["http_get", "get_text", "agent_args", "once", "status", "programs", "settled_programs", "wait_until",
           "Daemon", "metric"]


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


def settled_programs(root: Path, timeout: float = 60) -> dict[str, dict]:
    """`programs` once none is STARTING: a gated service is left STARTING by `once` (its passed health gate
    stands in for RUNNING), and supervisord calls it RUNNING `startsecs` later with the same pid. Before/after
    comparisons read the settled state, so that transition is not mistaken for a change."""
    def settled() -> tuple[dict[str, dict]] | None:
        info = programs(root)
        return None if any(p["statename"] == "STARTING" for p in info.values()) else (info,)

    return wait_until(settled, timeout, "supervisord's programs to leave STARTING")[0]


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` (exact sample name) whose labels include `labels`; 0 if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


class Daemon(daemon_helpers.Daemon):
    """The shared daemon with this suite's defaults: a poll every second, and /healthz up before use."""

    def __init__(self, repo_url: str, root: Path, log: Path, *extra: str, poll: float = 1.0):
        super().__init__(repo_url, root, log, *extra, poll=poll)
        self.wait_healthy()
