"""The agent driving a SHARED supervisord (`--supervisor unix://...`), laid out as deploy/supervisor/ shows:
the supervisord's own programs (the agent itself among them) live in conf.d, the agent's in its root.

A real supervisord in tmp_path, real git state repo, the real CLI. The supervisord (and everything it
runs) is shut down by the fixture, even when a test fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.drivers.supervisor import SupervisorClient
from conftest import free_port, run_agent, served_version, stop_process

pytestmark = pytest.mark.timeout(300)

SLEEPER = f"{sys.executable} -c 'import time; time.sleep(3600)'"


class SharedSupervisord:
    """A supervisord like a distribution's: its own conf.d plus the agent root's program dir."""

    def __init__(self, base: Path, agent_root: Path):
        self.base = base
        self.conf_d = base / "conf.d"
        self.conf_d.mkdir(parents=True)
        self.socket = base / "supervisor.sock"
        self.conf = base / "supervisord.conf"
        self.conf.write_text(textwrap.dedent(f"""\
            [unix_http_server]
            file={self.socket}
            chmod=0700

            [supervisord]
            logfile={base}/supervisord.log
            pidfile={base}/supervisord.pid
            childlogdir={base}
            nodaemon=true

            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

            [include]
            files = {self.conf_d}/*.conf {agent_root}/supervisor/programs/*.conf
            """))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def program(self, name: str, command: str) -> Path:
        path = self.conf_d / f"{name}.conf"
        path.write_text(f"[program:{name}]\ncommand={command}\nstopasgroup=true\nkillasgroup=true\nstartsecs=0\n")
        return path

    def start(self) -> SupervisorClient:
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        client = SupervisorClient(self.socket, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.state() == "RUNNING":
                    return client
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"shared supervisord did not start:\n{(self.base / 'supervisord.log').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)   # SIGTERM: supervisord stops its programs, then exits


@pytest.fixture
def shared(tmp_path, agent_root):
    sup = SharedSupervisord(tmp_path / "shared", agent_root)
    try:
        yield sup
    finally:
        sup.stop()


def wait_running(client: SupervisorClient, *names: str) -> dict:
    deadline = time.monotonic() + 30
    while True:
        info = client.process_info()
        if all(info.get(n, {}).get("statename") == "RUNNING" for n in names):
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def agent(cmd: str, state_repo, root: Path, shared: SharedSupervisord, *extra: str) -> subprocess.CompletedProcess:
    return run_agent(cmd, "--repo", state_repo.url, "--host", "h1", "--root", str(root),
                     "--supervisor", shared.url, "--health-wait", "15", *extra)


def test_once_leaves_programs_it_did_not_write_alone(state_repo, agent_root, shared):
    """Programs of the shared supervisord that the agent did not write -- the agent's own among them --
    are neither planned nor touched, even with edits on disk that supervisord has not applied (they
    show up in reloadConfig's "changed")."""
    shared.program("unrelated", SLEEPER)
    own = shared.program("gitops-agent", SLEEPER)
    client = shared.start()
    before = wait_running(client, "unrelated", "gitops-agent")

    # edited on disk, not applied: supervisord reports both as changed
    shared.program("unrelated", SLEEPER + " --edited")
    own.write_text(own.read_text().replace("startsecs=0", "startsecs=1"))
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit("first")
    assert not agent_root.exists()

    plan = agent("plan", state_repo, agent_root, shared, "--json")
    actions = json.loads(plan.stdout)["plan"]["actions"]
    assert not [a for a in actions if a["key"] in ("program:unrelated", "program:gitops-agent")], actions

    done = agent("once", state_repo, agent_root, shared)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert served_version(port) == "1.0.0"
    after = wait_running(client, "unrelated", "gitops-agent", "demo-web")
    for name in ("unrelated", "gitops-agent"):
        assert after[name]["pid"] == before[name]["pid"], name
    # still pending in supervisord: the agent did not apply someone else's edit
    assert set(client.reload_config()[1]) == {"unrelated", "gitops-agent"}

    again = agent("once", state_repo, agent_root, shared)
    assert again.returncode == 0 and "result: converged" in again.stdout, again.stdout

    # Files gone but groups still loaded (supervisord: "removed"): ours is a fact (the agent removed its
    # file and stopped before updating), the unrelated one is not.
    (shared.conf_d / "unrelated.conf").unlink()
    (agent_root / "supervisor" / "programs" / "demo-web.conf").unlink()
    facts = json.loads(run_agent("facts", "--json", "--root", str(agent_root), "--supervisor", shared.url).stdout)
    assert facts["programs"]["demo-web"]["pending"] == "removed"
    assert "unrelated" not in facts["programs"] and "gitops-agent" not in facts["programs"]


def test_a_fresh_root_gets_its_logs_dir_and_private_log_files(state_repo, agent_root, shared):
    """Nothing under the root yet and nobody else creates <root>/logs (no embedded supervisord): the
    program files name log files there, and supervisord refuses a program whose log dir is missing."""
    client = shared.start()
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit("first")

    done = agent("once", state_repo, agent_root, shared)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    wait_running(client, "demo-web")
    assert served_version(port) == "1.0.0"
    logs = agent_root / "logs"
    assert logs.stat().st_mode & 0o777 in (0o750, 0o700)
    for stream in ("out", "err"):
        assert (logs / f"demo-web.{stream}.log").stat().st_mode & 0o777 == 0o600
