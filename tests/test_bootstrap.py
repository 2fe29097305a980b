"""`gitops-agent bootstrap` against a real sshd (tests/sshd.py: Debian's OpenSSH server on 127.0.0.1 with
its own host key, config and port) with the real ssh client, installing the wheel built from this
checkout under --init supervisord (no systemd here): a root from scratch, again (no change), a change
that fails (the running agent is put back and keeps running), no Python on the target's PATH, a bad
key and an unknown host key (clear errors, nothing on the host)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path

import pytest

from agent import __version__
from agent_wheel import build_dists
from conftest import REPO_ROOT, free_port, run_agent
from daemon_helpers import http_get, wait_until
from sshd import start_sshd

pytestmark = pytest.mark.slow

TARGET_PATH = "/usr/bin:/bin"


@pytest.fixture(scope="module")
def wheel():
    return build_dists()[1]


@pytest.fixture
def sshd(tmp_path):
    server = start_sshd(tmp_path / "sshd", TARGET_PATH)
    yield server
    server.stop()


@pytest.fixture
def target():
    """Where the agent goes on the 'target' (this machine): prefix and root, both absent (under a short
    /tmp dir: supervisord's socket path must stay under 108 bytes). Stops whatever a bootstrap started
    there: its supervisord (and so the agent), then the agent's embedded supervisord."""
    base = Path(tempfile.mkdtemp(prefix="boot-", dir="/tmp"))
    prefix, root = base / "host" / "opt" / "gitops-agent", base / "host" / "var" / "agent"
    yield prefix, root
    pidfile = prefix / "supervisor" / "supervisord.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    from agent.drivers.supervisor import EmbeddedSupervisor

    EmbeddedSupervisor(root).stop()
    shutil.rmtree(base, ignore_errors=True)


def bootstrap(sshd, target, *extra: str, listen: int, repo: str = "file:///nonexistent",
              identity: Path | None = None) -> subprocess.CompletedProcess:
    prefix, root = target
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "bootstrap", sshd.url, "--ssh-config", str(sshd.ssh_config),
         "--identity", str(identity or sshd.client_key),
         "--init", "supervisord", "--prefix", str(prefix), "--root", str(root), "--repo", repo, "--host", "h1",
         "--listen", f"127.0.0.1:{listen}", *extra],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=1200)


def program(prefix: Path) -> dict:
    from supervisor.xmlrpc import SupervisorTransport

    sock = prefix / "supervisor" / "supervisor.sock"
    proxy = xmlrpc.client.ServerProxy("http://localhost", transport=SupervisorTransport(None, None, f"unix://{sock}"))
    return proxy.supervisor.getProcessInfo("gitops-agent")


def test_bootstrap_from_scratch_again_and_a_failed_change(sshd, target, wheel, state_repo, tmp_path):
    prefix, root = target
    service_port, listen = free_port(), free_port()
    state_repo.app(services={"demo-web": {"port": service_port}})
    sha = state_repo.commit("one service")
    signers = tmp_path / "allowed_signers"
    signers.write_text("ops@example.invalid ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample\n")
    signers.chmod(0o644)
    args = ("--wheel", str(wheel), "--allowed-signers", str(signers), "--poll-interval", "2")

    first = bootstrap(sshd, target, *args, listen=listen, repo=state_repo.url)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "done: gitops-agent" in first.stdout and "[changed] agent venv: built" in first.stdout
    # Settings and the copied file: 0600, the file's setting points at the copy.
    settings = prefix / "etc" / "agent.yaml"
    copy = prefix / "etc" / "allowed-signers"
    assert settings.stat().st_mode & 0o777 == 0o600 and copy.stat().st_mode & 0o777 == 0o600
    assert copy.read_bytes() == signers.read_bytes()
    assert f"allowed_signers: {copy}" in settings.read_text() and f"root: {root}" in settings.read_text()
    # The agent runs as the one program of a supervisord from its venv, answers, and converges the host.
    info = program(prefix)
    assert info["statename"] == "RUNNING"
    assert http_get(f"http://127.0.0.1:{listen}/healthz")[0] == 200
    assert f'gitops_agent_build_info{{version="{__version__}"}} 1.0' in http_get(f"http://127.0.0.1:{listen}/metrics")[1]
    wait_until(lambda: json.loads(run_agent("status", "--json", "--root", str(root)).stdout)["applied"],
               240, "the bootstrapped agent to apply the state", log=prefix / "logs" / "agent.log", step=0.5)
    assert json.loads(run_agent("status", "--json", "--root", str(root)).stdout)["applied"]["sha"] == sha
    assert http_get(f"http://127.0.0.1:{service_port}/")[0] == 200
    state = json.loads((prefix / "bootstrap.json").read_text())
    assert state["init"] == "supervisord" and state["version"] == __version__

    # Again: nothing changes, and it says so; the agent keeps its pid.
    again = bootstrap(sshd, target, *args, listen=listen, repo=state_repo.url)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "no change: gitops-agent" in again.stdout and "[changed]" not in again.stdout
    assert program(prefix)["pid"] == info["pid"]

    # A change that fails (the new --listen is taken, so the restarted agent never answers): the step is
    # named, the old settings are back, and the old agent runs with them again; the service was not touched.
    service_pid = json.loads(run_agent("facts", "--json", "--root", str(root)).stdout)["programs"]["demo-web"]["pid"]
    before = settings.read_bytes()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        failed = bootstrap(sshd, target, *args, "--wait", "15", listen=taken, repo=state_repo.url)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    # supervisorctl sees the agent exit at once ('service'), or it lives a little and never answers ('health')
    assert re.search(r"bootstrap failed at step '(service|health)'", failed.stderr), failed.stderr
    assert "Address already in use" in failed.stderr and "put back as it was" in failed.stderr
    assert settings.read_bytes() == before and settings.stat().st_mode & 0o777 == 0o600
    assert not list((prefix / "etc").glob("*.bootstrap-prev"))
    wait_until(lambda: http_get(f"http://127.0.0.1:{listen}/healthz")[0] == 200, 120, "the old agent back",
               log=prefix / "logs" / "agent.log", step=0.2)
    assert program(prefix)["statename"] == "RUNNING"
    assert json.loads(run_agent("facts", "--json", "--root", str(root)).stdout)["programs"]["demo-web"]["pid"] == service_pid

    final = bootstrap(sshd, target, *args, listen=listen, repo=state_repo.url)
    assert final.returncode == 0 and "no change" in final.stdout, final.stdout + final.stderr


def _no_python_bin(tmp_path: Path) -> Path:
    """A bin dir holding every command of /usr/bin except Python, pip and uv."""
    bindir = tmp_path / "nopython-bin"
    bindir.mkdir()
    for entry in Path("/usr/bin").iterdir():
        if not entry.name.startswith(("python", "pip", "uv", "pydoc", "2to3")):
            (bindir / entry.name).symlink_to(entry)
    return bindir


def _absent(target) -> bool:
    prefix, root = target
    return not prefix.parent.parent.exists() and not root.exists()


def test_no_python_on_the_target_path(sshd, target, wheel, tmp_path):
    sshd.set_path(str(_no_python_bin(tmp_path)))
    proc = bootstrap(sshd, target, "--wheel", str(wheel), listen=free_port())
    assert proc.returncode == 1
    assert "bootstrap failed at step 'check target'" in proc.stderr
    assert "no Python >= 3.10 with venv and no uv" in proc.stderr and "apt install python3 python3-venv" in proc.stderr
    assert "nothing was changed on the host" in proc.stderr
    assert _absent(target)


def test_a_key_the_host_does_not_accept(sshd, target, wheel, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    proc = bootstrap(sshd, target, "--wheel", str(wheel), identity=other, listen=free_port())
    assert proc.returncode == 1
    assert "bootstrap failed at step 'connect'" in proc.stderr and "could not log in" in proc.stderr
    assert "Permission denied" in proc.stderr and "nothing was changed" in proc.stderr
    assert _absent(target)


def test_unknown_host_key_is_refused_unless_accepted(sshd, target, wheel, tmp_path):
    sshd.known_hosts.write_text("")
    proc = bootstrap(sshd, target, "--wheel", str(wheel), listen=free_port())
    assert proc.returncode == 1
    assert "bootstrap failed at step 'connect'" in proc.stderr and "host key" in proc.stderr
    assert "--accept-new-host-key" in proc.stderr and _absent(target)
    # Accepted: ssh records it (and then the run goes on; here it stops at the missing Python).
    sshd.set_path(str(_no_python_bin(tmp_path)))
    proc = bootstrap(sshd, target, "--wheel", str(wheel), "--accept-new-host-key", listen=free_port())
    assert "bootstrap failed at step 'check target'" in proc.stderr
    assert f"[127.0.0.1]:{sshd.port}" in sshd.known_hosts.read_text()
    # A different key for a known host is refused even with --accept-new-host-key.
    sshd.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} " + (tmp_path / "sshd" / "client_key.pub").read_text())
    proc = bootstrap(sshd, target, "--wheel", str(wheel), "--accept-new-host-key", listen=free_port())
    assert "bootstrap failed at step 'connect'" in proc.stderr and "host key" in proc.stderr
    assert _absent(target)


def test_bad_options_are_refused_before_connecting(tmp_path):
    proc = run_agent("bootstrap", "ssh://root@127.0.0.1:1", "--wheel", str(tmp_path / "missing.whl"))
    assert proc.returncode == 1 and "--wheel" in proc.stderr and "no such file" in proc.stderr
    proc = run_agent("bootstrap", "https://example.invalid/", "--root", "/x")
    assert proc.returncode == 1 and "ssh://USER@HOST[:PORT]" in proc.stderr
    proc = run_agent("bootstrap", "ssh://root@127.0.0.1:1", "--root", "relative/root")
    assert proc.returncode == 1 and "--root" in proc.stderr



def test_a_target_with_uv_and_a_python_without_venv(sshd, target, wheel, tmp_path):
    """Debian without python3-venv, but uv: the venv is made by uv. The target's python3 is a FAKE (named as
    such): a wrapper of this machine's Python 3 whose `import ensurepip` fails, as python3-venv's absence does."""
    from agent.drivers.venv import find_uv

    uv = find_uv()
    if uv is None:
        pytest.skip("no uv binary here")
    bindir = _no_python_bin(tmp_path)
    broken = tmp_path / "no-ensurepip"
    (broken / "ensurepip").mkdir(parents=True)
    (broken / "ensurepip" / "__init__.py").write_text('raise ImportError("python3-venv is not installed")\n')
    (bindir / "python3").write_text(f'#!/bin/sh\n# FAKE python3 without ensurepip\nPYTHONPATH={broken} exec /usr/bin/python3 "$@"\n')
    (bindir / "python3").chmod(0o755)
    (bindir / "uv").symlink_to(Path(uv).resolve())
    sshd.set_path(str(bindir))
    listen = free_port()
    proc = bootstrap(sshd, target, "--wheel", str(wheel), listen=listen)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(uv); service: supervisord" in proc.stdout
    assert http_get(f"http://127.0.0.1:{listen}/healthz")[0] == 200
    prefix, _root = target
    (venv,) = (prefix / "venvs").iterdir()
    assert "uv" in (venv / "pyvenv.cfg").read_text()
