"""Push webhooks (`run --webhook-secret-file`, DESIGN §4): the signature schemes, and a real daemon polling
every 5 minutes against a repo served by a real `git daemon` that a signed POST makes fetch at once."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import threading
import time
from email.message import Message

import pytest

from agent.service.runtime import Schedule
from agent.service.webhook import verify
from conftest import free_port, served_version, start_git_daemon
from daemon_helpers import Daemon, wait_until

pytestmark = pytest.mark.timeout(600)

SECRET = b"s3cr3t-webhook-key"


def _headers(**items) -> Message:
    m = Message()
    for k, v in items.items():
        m[k.replace("_", "-")] = v
    return m


def test_each_forges_signature_is_checked_over_the_raw_body():
    body = b'{"ref": "refs/heads/main"}'
    sig = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert verify(_headers(X_Hub_Signature_256=f"sha256={sig}"), body, SECRET) == "hmac-sha256"
    assert verify(_headers(X_Gitea_Signature=sig), body, SECRET) == "hmac-sha256"
    assert verify(_headers(X_Forgejo_Signature=sig), body, SECRET) == "hmac-sha256"
    assert verify(_headers(X_Gitlab_Token=SECRET.decode()), body, SECRET) == "gitlab-token"
    assert verify(_headers(), body, SECRET) is None
    assert verify(_headers(X_Hub_Signature_256=f"sha256={sig}"), body + b" ", SECRET) is None   # re-serialized body
    assert verify(_headers(X_Hub_Signature_256=f"sha1={sig}"), body, SECRET) is None
    assert verify(_headers(X_Gitea_Signature="0" * 64), body, SECRET) is None
    assert verify(_headers(X_Gitlab_Token="wrong"), body, SECRET) is None


def test_webhooks_during_a_run_merge_into_one_follow_up_and_are_never_echoes():
    s = Schedule(poll_s=300, now=0.0)
    s.start(0.0)
    s.finish(1.0, ok=True, applied=True)
    assert s.trigger(1.01, "webhook")          # right after a run: not taken for the run's own echo
    assert s.due_in(1.01) <= 0
    s.start(1.02)
    for i in range(50):
        s.trigger(1.03 + i / 1000, "webhook")
    s.finish(2.0, ok=True, applied=True)
    assert s.pending == {"webhook"} and s.due_in(2.0) <= 0   # one follow-up for the fifty


def _post_oversized(port: int, headers: dict) -> int:
    """A POST announcing a body over 1 MiB: the server answers from the headers and closes at once (it must not
    read the body), so send only the headers and read the status line (sending the body raced the close)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        lines = ["POST /hooks/git HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {(1 << 20) + 1}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def _post(port: int, body: bytes, headers: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/hooks/git", body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def _signed(body: bytes) -> dict:
    return {"X-Hub-Signature-256": "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest(),
            "X-GitHub-Event": "push", "Content-Type": "application/json"}


def test_a_signed_push_deploys_at_once_a_bad_one_triggers_nothing(request, state_repo, agent_root, tmp_path):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit("v1")
    daemon_port = start_git_daemon(request, state_repo.path.parent)
    secret_file = tmp_path / "hook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    d = Daemon(f"git://127.0.0.1:{daemon_port}/state", agent_root, tmp_path / "agent.log",
               "--webhook-secret-file", str(secret_file), poll=300)
    request.addfinalizer(d.stop)
    wait_until(lambda: served_version(port) == "1.0.0", 300, "v1 served", d.log, step=0.2)
    d.wait_value("gitops_agent_reconcile_total", lambda v: v and v >= 1, 60, result="applied")

    def runs() -> float:
        m = d.metrics()
        return sum(v for (name, _), v in m.items() if name == "gitops_agent_reconcile_total")

    def quiet() -> bool:
        """No reconcile for a second: the runs that v1's apply earns (its own writes echo back, supervisord's
        log line when demo-web turns RUNNING) are over, so none resolves the ref after v2 is committed below
        (one that did deployed v2 with no webhook at all)."""
        n = runs()
        time.sleep(1.0)
        return runs() == n

    from reliability._support import settled_programs

    settled_programs(agent_root)    # its RUNNING line in supervisord.log (startsecs after the gate) is a host trigger
    wait_until(quiet, 60, "the daemon to be idle", d.log)
    state_repo.app(services={"demo-web": {"port": port}}, version="2.0.0")
    state_repo.commit("v2")
    before = runs()
    body = b'{"ref": "refs/heads/main"}'
    assert _post(d.port, body, {}) == 401
    assert _post(d.port, body, {"X-Hub-Signature-256": "sha256=" + "0" * 64}) == 401
    assert _post(d.port, body, {"X-Gitlab-Token": "guess"}) == 401
    assert _post_oversized(d.port, _signed(b"x")) == 413
    time.sleep(2)
    assert runs() == before and served_version(port) == "1.0.0"     # refused requests triggered nothing
    assert d.value("gitops_agent_webhook_requests_total", result="rejected") == 3
    assert d.value("gitops_agent_webhook_requests_total", result="too_large") == 1    # refused before the handler
    assert _post_oversized(d.port, {}) == 413                 # unsigned and oversized: still too large, counted once
    wait_until(lambda: d.value("gitops_agent_webhook_requests_total", result="too_large") == 2, 30, "too_large")
    assert d.value("gitops_agent_webhook_requests_total", result="rejected") == 3

    # a flood of valid webhooks: merged, one fetch at a time
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(_post(d.port, body, _signed(body)))) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [202] * 30
    wait_until(lambda: served_version(port) == "2.0.0", 300, "v2 served after the webhook", d.log, step=0.1)
    wait_until(lambda: d.value("gitops_agent_webhook_requests_total", result="accepted") == 30, 30, "counted")
    time.sleep(3)
    assert runs() - before <= 3, runs() - before         # not 30 reconciles: at most one running, one follow-up
    assert SECRET.decode() not in d.log.read_text()
