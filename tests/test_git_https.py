"""The state repo over real smart HTTPS (git http-backend behind a TLS server on 127.0.0.1, basic auth).

The token in the URL must authenticate the fetch and never appear in output, status or logs.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import free_port, run_agent
from git_http import BACKEND, GitCGIHandler

TOKEN = "s3cr3t-t0ken-value"


class _GitHTTP(GitCGIHandler):
    """Smart HTTP that requires basic auth user:TOKEN."""

    remote_user = "agent"

    def authorized(self) -> bool:
        return self.headers.get("Authorization", "") == "Basic " + base64.b64encode(f"agent:{TOKEN}".encode()).decode()


@pytest.fixture
def https_repo(tmp_path, state_repo):
    if not Path(BACKEND).exists():
        pytest.skip("git http-backend is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    _GitHTTP.project_root = str(state_repo.path.parent)
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _GitHTTP)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    os.environ["GIT_SSL_CAINFO"] = str(cert)
    try:
        yield state_repo, f"https://agent:{TOKEN}@127.0.0.1:{server.server_address[1]}/{state_repo.path.name}"
    finally:
        os.environ.pop("GIT_SSL_CAINFO", None)
        server.shutdown()
        server.server_close()


def test_once_over_https_with_token_never_leaks_it(https_repo, agent_root):
    repo, url = https_repo
    port = free_port()
    repo.app(services={"demo-web": {"port": port, "health": False}})
    sha = repo.commit("over https")
    common = ["--repo", url, "--host", "h1", "--root", str(agent_root)]
    proc = run_agent("once", *common, "--log-format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = run_agent("status", "--json", "--root", str(agent_root)).stdout
    assert json.loads(status)["applied"]["sha"] == sha
    plan = run_agent("plan", *common)
    assert plan.returncode == 0

    # a wrong token: a clear, redacted error
    bad = run_agent("once", "--repo", url.replace(TOKEN, "wrong-" + TOKEN), "--host", "h1", "--root", str(agent_root))
    assert bad.returncode == 1
    everything = proc.stdout + proc.stderr + status + plan.stdout + plan.stderr + bad.stdout + bad.stderr
    for path in agent_root.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".log", ".conf"):
            everything += path.read_text(errors="replace")
    assert TOKEN not in everything
    assert "***@127.0.0.1" in bad.stderr
