"""A service whose command daemonizes (double fork, new session, exit 0), through the real CLI.

supervisord sees it exit at once and gives up; its process group is empty, but the daemon it forked
keeps running from the venv. The agent rolls the service back; the rollback must not leave that
daemon behind (it would keep its port and its venv busy). Everything the service forked is killed in
the finalizer too, even when the test fails.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import run_agent

pytestmark = pytest.mark.timeout(300)

# One line (commands are argv words); every forked daemon appends its pid to the file in argv[1].
DAEMONIZE = (
    "import os, sys, time; os.fork() and sys.exit(0); os.setsid(); os.fork() and os._exit(0); "
    "f = open(sys.argv[1], 'a'); f.write(str(os.getpid()) + chr(10)); f.close(); time.sleep(3600)"
)


def _pids(path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def pidfile(tmp_path):
    path = tmp_path / "daemons.pids"
    yield path
    for pid in _pids(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_daemonizing_service_is_rolled_back_with_the_daemon_it_forked(state_repo, agent_root, pidfile):
    state_repo.app(services={})
    state_repo.write("apps/demo/app.yaml", f"""\
        apiVersion: gitops-agent/v1
        kind: App
        name: demo
        hosts: {{groups: [web]}}
        environments:
          demo: {{lockfile: demo.lock, find_links: [../../wheelhouse], index: false}}
        services:
          forker:
            environment: demo
            command: [python, -c, "{DAEMONIZE}", "{pidfile}"]
        """)
    state_repo.commit("a service that daemonizes")

    proc = run_agent("once", "--repo", state_repo.url, "--host", "h1", "--root", str(agent_root))
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    assert "rolled back forker" in proc.stdout + proc.stderr
    assert "daemonized" in proc.stdout and "cannot be supervised" in proc.stdout, proc.stdout
    forked = _pids(pidfile)
    assert forked, "the service never daemonized"
    deadline = time.monotonic() + 30
    while [p for p in forked if _alive(p)]:
        assert time.monotonic() < deadline, f"daemons left running after the rollback: {[p for p in forked if _alive(p)]}"
        time.sleep(0.05)
    assert not (agent_root / "supervisor" / "programs" / "forker.conf").exists()
