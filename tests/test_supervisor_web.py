"""--supervisor-web: the embedded supervisord's own web UI (the seed's port 9001), opt-in, loopback by
default, basic auth with a generated password kept in a 0600 file (real supervisord)."""

from __future__ import annotations

import base64
import stat
import urllib.error
import urllib.request

import pytest

from agent.core.render.supervisor import UnsafeValue, WebServer, render_supervisord
from agent.settings import build_settings
from conftest import free_port, run_agent

pytestmark = pytest.mark.timeout(300)


def get(url: str, password: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if password is not None:
        token = base64.b64encode(f"gitops-agent:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_render_writes_only_the_password_hash():
    text = render_supervisord(socket_path="/r/s.sock", pid_path="/r/s.pid", log_dir="/r/logs",
                              web=WebServer("127.0.0.1", 9001, "gitops-agent", "a" * 40))
    assert "[inet_http_server]\nport=127.0.0.1:9001\nusername=gitops-agent\npassword={SHA}" + "a" * 40 in text
    assert "inet_http_server" not in render_supervisord(socket_path="/r/s.sock", pid_path="/r/s.pid", log_dir="/r/l")
    with pytest.raises(UnsafeValue):
        render_supervisord(socket_path="/r/s.sock", pid_path="/r/s.pid", log_dir="/r/logs",
                           web=WebServer("127.0.0.1\n[x]", 9001, "u", "a" * 40))


def test_settings_default_to_loopback_and_refuse_an_external_supervisord():
    assert build_settings({"supervisor_web": "9001"}, {}).supervisor_web_address == "127.0.0.1:9001"
    assert build_settings({"supervisor_web": "0.0.0.0:9001"}, {}).supervisor_web_address == "0.0.0.0:9001"
    assert build_settings({}, {}).supervisor_web_address is None
    from agent.core.errors import ConfigError

    with pytest.raises(ConfigError, match="supervisor-web"):
        build_settings({"supervisor_web": "x"}, {})
    with pytest.raises(ConfigError, match="embedded"):
        build_settings({"supervisor_web": "9001", "supervisor": "unix:///tmp/s.sock"}, {})


def test_web_ui_with_a_generated_password(state_repo, agent_root):
    state_repo.app()
    state_repo.commit("demo")
    port = free_port()
    common = ["--repo", state_repo.url, "--host", "h1", "--root", str(agent_root), "--supervisor-web", str(port)]
    proc = run_agent("once", *common)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    secret = agent_root / "supervisor" / "web-password"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = secret.read_text().strip()
    assert len(password) >= 24
    conf = (agent_root / "supervisor" / "supervisord.conf").read_text()
    assert f"port=127.0.0.1:{port}\n" in conf and password not in conf          # loopback; only the hash
    assert password not in proc.stdout + proc.stderr

    base = f"http://127.0.0.1:{port}"
    assert get(base + "/")[0] == 401
    assert get(base + "/", "wrong")[0] == 401
    from reliability._support import settled_programs

    settled_programs(agent_root)         # a gated service is STARTING when once returns, RUNNING after startsecs
    code, page = get(base + "/", password)
    assert code == 200 and "demo-web" in page and "RUNNING" in page.upper()

    # the next run reuses the password (no churn of the config, no restart of supervisord)
    assert run_agent("once", *common).returncode == 0
    assert secret.read_text().strip() == password
    assert (agent_root / "supervisor" / "supervisord.conf").read_text() == conf
