"""A private index through app.yaml (DESIGN §3a): `index_url` plus `index_credentials` whose password is an
age-encrypted secret, against a real pypiserver with htpasswd auth, driven through the real CLI.

A wrong password is a clear failure that switches nothing (the service keeps serving its old version) and
the password is in no output, status or world-readable file.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import free_port, run_agent, served_version
from pypi_server import pypi_server  # noqa: F401  (module-scoped fixture)
from shopfactory import encrypt_dotenv, new_identity
from wheelfactory import lock_line, make_http_app_wheel

pytestmark = pytest.mark.slow


def _write_app(repo, server, port: int, version: str, password: str, identity) -> None:
    repo.write("fleet.yaml", """\
        apiVersion: gitops-agent/v1
        kind: Fleet
        hosts:
          h1: {groups: [web]}
        """)
    wheel = make_http_app_wheel(server.packages, "privapp", version)
    repo.write("apps/priv/main.lock", lock_line(wheel) + "\n")
    encrypt_dotenv({"PASSWORD": password}, repo.path / "apps/priv/pypi.env.age", identity=identity)
    repo.write("apps/priv/app.yaml", f"""\
        apiVersion: gitops-agent/v1
        kind: App
        name: priv
        hosts: {{groups: [web]}}
        environments:
          main:
            lockfile: main.lock
            installer: uv
            index_url: "{server.url}"
            index_credentials: {{username: {server.username}, password: {{secret: pypi/PASSWORD}}}}
        secrets:
          pypi: pypi.env.age
        services:
          priv-web:
            environment: main
            port: {port}
            command: [privapp-server, --port, "{port}"]
            health: {{http: "http://127.0.0.1:{port}/healthz", timeout_s: 1}}
        """)


def _readable_with(root, needle: str) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077 and needle.encode() in open(path, "rb").read():
                hits.append(path)
    return hits


def test_private_index_with_a_secret_password_and_a_wrong_one(tmp_path, state_repo, agent_root, pypi_server):  # noqa: F811
    keys = tmp_path / "keys"
    identity = new_identity(keys)
    port = free_port()
    common = ["--repo", state_repo.url, "--host", "h1", "--root", str(agent_root), "--age-identity", str(identity)]

    _write_app(state_repo, pypi_server, port, "1.0.0", pypi_server.password, identity)
    state_repo.commit("privapp 1.0.0 from the private index")
    first = run_agent("once", *common)
    assert first.returncode == 0, first.stdout + first.stderr
    assert served_version(port) == "1.0.0"

    wrong = pypi_server.password[::-1] + "-wrong"
    _write_app(state_repo, pypi_server, port, "1.1.0", wrong, identity)
    state_repo.commit("privapp 1.1.0, but a wrong index password")
    failed = run_agent("once", *common)
    assert failed.returncode == 1
    out = failed.stdout + failed.stderr
    assert "401" in out or "auth" in out.lower(), out
    assert served_version(port) == "1.0.0"          # nothing switched: the old version keeps serving

    shown = [out, run_agent("status", "--json", "--root", str(agent_root)).stdout,
             run_agent("facts", "--json", "--root", str(agent_root)).stdout,
             run_agent("plan", "--json", *common).stdout]
    status_file = (agent_root / "state" / "status.json").read_text()
    for password in (pypi_server.password, wrong):
        for text in shown + [status_file]:
            assert password not in text
        assert _readable_with(agent_root, password) == []
    status = json.loads(shown[1])
    assert status["last_error"] and "venv" in status["last_error"]
