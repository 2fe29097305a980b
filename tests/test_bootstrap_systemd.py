"""`gitops-agent bootstrap --init systemd` against a real systemd: a Debian booted with systemd as PID 1 in
namespaces of its own (tests/systemd_container.py; the test machine runs no systemd), reached over its own
sshd with the real ssh client, the agent installed from a real index (tests/test_bootstrap_index.py's
pypiserver: the target's pip has no way to PyPI's TLS from inside). The unit is written, enabled and
started by systemd, /healthz answers, a rerun changes nothing, and systemd starts the agent again when it
is killed (the unit keeps `gitops-agent run` going).

Slow: the root file system is made once per machine (debootstrap, 2-4 min), then each run boots an overlay
of it (seconds) and builds the agent's venv from the local index (under a minute)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent import __version__
from conftest import REPO_ROOT, free_port
from daemon_helpers import http_get, wait_until
from systemd_container import start_systemd_container
from test_bootstrap_index import open_index  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def timings():
    t: dict[str, float] = {}
    yield t
    print("\nsystemd container timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))


@pytest.fixture
def container(request, timings):
    return start_systemd_container(request, timings)


def _bootstrap(ct, index_url: str, listen: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "bootstrap", f"ssh://root@127.0.0.1:{ct.ssh_port}",
         "--ssh-config", str(ct.ssh_config), "--identity", str(ct.ssh_key), "--init", "systemd",
         "--index-url", index_url, "--repo", "file:///nonexistent", "--host", "h1", "--listen", f"127.0.0.1:{listen}"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=1200)


def _main_pid(ct) -> int:
    out = ct.run("systemctl", "show", "-p", "MainPID", "--value", "gitops-agent.service").stdout.strip()
    return int(out or 0)


def test_bootstrap_init_systemd_in_a_real_systemd(container, open_index, timings):  # noqa: F811
    import time

    url, _log = open_index
    listen = free_port()
    start = time.monotonic()
    first = _bootstrap(container, url, listen)
    timings["bootstrap"] = time.monotonic() - start
    assert first.returncode == 0, first.stdout + first.stderr
    assert "service: systemd" in first.stdout and "gitops-agent.service enabled and started" in first.stdout, first.stdout
    assert http_get(f"http://127.0.0.1:{listen}/healthz")[0] == 200
    assert f'gitops_agent_build_info{{version="{__version__}"}} 1.0' in http_get(f"http://127.0.0.1:{listen}/metrics")[1]
    assert container.run("systemctl", "is-enabled", "gitops-agent.service").stdout.strip() == "enabled"
    assert container.run("systemctl", "is-active", "gitops-agent.service").stdout.strip() == "active"
    unit = container.run("systemctl", "cat", "gitops-agent.service").stdout
    assert "/opt/gitops-agent/venvs/gitops-agent-" in unit and "run" in unit
    pid = _main_pid(container)
    assert pid > 0

    again = _bootstrap(container, url, listen)
    assert again.returncode == 0 and "no change" in again.stdout and "[changed]" not in again.stdout, again.stdout
    assert _main_pid(container) == pid

    # the unit keeps `run` going: killed, systemd starts it again and it answers again
    assert container.run("systemctl", "kill", "--signal=KILL", "gitops-agent.service").returncode == 0
    wait_until(lambda: _main_pid(container) not in (0, pid), 180, "systemd to restart the agent", step=0.5)
    wait_until(lambda: http_get(f"http://127.0.0.1:{listen}/healthz")[0] == 200, 180, "the restarted agent", step=0.5)
