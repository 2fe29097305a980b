"""The parts of self-upgrade without a daemon: the `agent:` block and its lock, the handover record (a
handover to another version found unconfirmed at start is a failure; one to us is confirmed), a failed
lock not retried, the root lock and the listening socket adopted from an inherited fd."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent import __version__
from agent.core.errors import InvalidState, LockHeld
from agent.core.layout import Layout
from agent.service.selfupgrade import SelfUpgrade, agent_lock
from agent.settings import Settings
from wheelfactory import lock_line, make_http_app_wheel

FLEET = "apiVersion: gitops-agent/v1\nkind: Fleet\nhosts: {h1: {}}\n"


def _state(tmp_path: Path, block: str = "", lock: str | None = None) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "fleet.yaml").write_text(FLEET + block)
    if lock is not None:
        (state / "agent.lock").write_text(lock)
    return state


def _gitops_agent_lock(tmp_path: Path, version: str) -> str:
    wheel = make_http_app_wheel(tmp_path / "wh", "gitops-agent", version)
    return lock_line(wheel) + "\n"


def test_no_agent_block(tmp_path):
    assert agent_lock(_state(tmp_path), tmp_path, "3.11", "pip") is None


def test_agent_block_and_its_lock(tmp_path):
    state = _state(tmp_path, "agent: {lockfile: agent.lock, find_links: [wh], index: false}\n",
                   _gitops_agent_lock(tmp_path, "9.9.9"))
    (state / "wh").mkdir()
    lock = agent_lock(state, tmp_path, "3.11", "pip")
    assert lock.version == "9.9.9" and lock.options == ("--no-index",) and lock.find_links == ((state / "wh").resolve(),)
    assert len(lock.identity) == 16


def _lock_of(tmp_path: Path, name: str) -> str:
    return lock_line(make_http_app_wheel(tmp_path / "wh", name, "1.0")) + "\n"


@pytest.mark.parametrize("block, name, word", [
    ("agent: {lockfile: agent.lock}\n", "demoapp", "must pin gitops-agent"),
    ("agent: {lockfile: ../outside.lock}\n", "gitops-agent", "inside the repo"),
    ("agent: {lockfile: agent.lock, find_links: [nowhere]}\n", "gitops-agent", "inside the repo"),
])
def test_agent_block_refused(tmp_path, block, name, word):
    (tmp_path / "outside.lock").write_text(_lock_of(tmp_path, "gitops-agent"))
    state = _state(tmp_path, block, _lock_of(tmp_path, name))
    with pytest.raises(InvalidState, match=word):
        agent_lock(state, state, "3.11", "pip")


def _upgrade(tmp_path, record: dict | None = None):
    layout = Layout(tmp_path / "root")
    if record is not None:
        layout.state.mkdir(parents=True)
        (layout.state / "agent-upgrade.json").write_text(json.dumps(record))
    registry = CollectorRegistry()
    return SelfUpgrade(Settings(root=layout.root), layout, registry=registry), registry, layout


def test_an_unconfirmed_handover_to_another_version_is_a_failure(tmp_path):
    up, registry, layout = _upgrade(tmp_path, {"phase": "handing-over", "from": __version__, "to": "9.9.9",
                                               "identity": "ab" * 8})
    up.on_start()
    record = json.loads((layout.state / "agent-upgrade.json").read_text())
    assert record["phase"] == "failed" and "did not come up" in record["reason"]
    assert 'gitops_agent_self_upgrade_failed{version="9.9.9"} 1.0' in generate_latest(registry).decode()


def test_a_handover_to_us_is_confirmed(tmp_path):
    up, registry, layout = _upgrade(tmp_path, {"phase": "handing-over", "from": "0.0.1", "to": __version__})
    up.on_start()
    assert json.loads((layout.state / "agent-upgrade.json").read_text())["phase"] == "done"
    assert "self_upgrade_failed{" not in generate_latest(registry).decode()


def test_a_failed_lock_is_not_retried_and_a_new_one_clears_it(tmp_path):
    state = _state(tmp_path, "agent: {lockfile: agent.lock}\n", _gitops_agent_lock(tmp_path, "9.9.9"))
    identity = agent_lock(state, state, "%d.%d" % __import__("sys").version_info[:2], "pip").identity
    up, registry, layout = _upgrade(tmp_path, {"phase": "failed", "to": "9.9.9", "identity": identity})
    up.on_start()
    assert up.after_reconcile(state, state) is None                 # no build attempted
    assert json.loads((layout.state / "agent-upgrade.json").read_text())["phase"] == "failed"
    (state / "fleet.yaml").write_text(FLEET)                        # the block removed: failure cleared
    assert up.after_reconcile(state, state) is None
    assert json.loads((layout.state / "agent-upgrade.json").read_text()) == {}
    assert "self_upgrade_failed{" not in generate_latest(registry).decode()


def test_root_lock_is_adopted_from_an_inherited_fd(tmp_path, monkeypatch):
    from agent.service.rootlock import root_lock

    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)               # the old agent's lock, as if inherited
    monkeypatch.setenv("GITOPS_AGENT_LOCK_FD", str(fd))
    with root_lock(root) as held:
        assert held == fd
        assert "GITOPS_AGENT_LOCK_FD" not in os.environ
        with pytest.raises(LockHeld):                             # still exclusive for anyone else
            with root_lock(root):
                pass


def test_an_inherited_fd_of_another_file_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    from agent.service.rootlock import root_lock

    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
    monkeypatch.setenv("GITOPS_AGENT_LOCK_FD", str(other))
    with root_lock(tmp_path / "root") as held:
        assert held != other
    os.close(other)


def test_http_server_adopts_an_inherited_listener(monkeypatch):
    from agent.service.http import HttpServer, Response

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    monkeypatch.setenv("GITOPS_AGENT_LISTEN_FD", str(os.dup(listener.fileno())))
    listener.close()                    # only the inherited fd keeps the socket
    server = HttpServer({("GET", "/x"): lambda _r: Response(200, b"hi\n")}, f"127.0.0.1:{port}").start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=5) as resp:
            assert resp.read() == b"hi\n"
        dup = server.listener_dup()
        assert socket.socket(fileno=dup).getsockname()[1] == port
    finally:
        server.stop()


def test_an_unusable_agent_block_is_reported_once(tmp_path):
    state = _state(tmp_path, "agent: {lockfile: missing.lock}\n")
    up, registry, layout = _upgrade(tmp_path)
    assert up.after_reconcile(state, state) is None
    record = json.loads((layout.state / "agent-upgrade.json").read_text())
    assert record["phase"] == "failed" and "missing.lock" in record["reason"]
    assert 'gitops_agent_self_upgrade_failed{version="unknown"} 1.0' in generate_latest(registry).decode()
    before = (layout.state / "agent-upgrade.json").stat().st_mtime_ns
    assert up.after_reconcile(state, state) is None
    assert (layout.state / "agent-upgrade.json").stat().st_mtime_ns == before


def test_upgrade_failure_and_recovery_reach_a_real_receiver_once(tmp_path):
    """Through the real Apprise json:// plugin to a real HTTP receiver: an unconfirmed handover found at
    start is sent once (a second agent start, as after a crash loop, sends nothing new); the failed lock
    seen again by later polls sends nothing; the next agent confirming its own handover sends "recovered"."""
    from agent.drivers.notify import Notifier
    from agent.service.notify import Notifications
    from test_notify import Receiver

    receiver = Receiver()
    try:
        def start(record=None):
            up, _registry, layout = _upgrade(tmp_path, record)
            up.notifications = Notifications(Notifier([receiver.url]), layout.root, "h1")
            up.on_start()
            assert up.notifications.flush(60)
            return up

        state = _state(tmp_path, "agent: {lockfile: agent.lock}\n", _gitops_agent_lock(tmp_path, "9.9.9"))
        identity = agent_lock(state, state, "%d.%d" % __import__("sys").version_info[:2], Settings().installer).identity
        up = start({"phase": "handing-over", "from": __version__, "to": "9.9.9", "identity": identity})
        for _ in range(3):
            assert up.after_reconcile(state, state) is None        # polls: the failed lock is not tried again
        start()                                                     # the agent restarted: state read back
        assert [(p["title"], p["type"]) for p in receiver.got] == [("gitops-agent h1: agent upgrade failed", "failure")]
        assert "upgrade to gitops-agent 9.9.9 failed" in receiver.got[0]["message"]
        assert "did not come up" in receiver.got[0]["message"]

        # a later upgrade succeeds: the new agent confirms its handover at start
        (tmp_path / "root" / "state" / "agent-upgrade.json").write_text(
            json.dumps({"phase": "handing-over", "from": "0.0.1", "to": __version__}))
        start()
        start()
        assert [p["title"] for p in receiver.got[1:]] == ["gitops-agent h1: recovered"]
        assert f"agent upgraded from 0.0.1 to {__version__}" in receiver.got[1]["message"]
    finally:
        receiver.stop()


def test_a_handover_stop_answers_what_it_accepted_and_leaves_new_connections_to_the_next_agent(monkeypatch):
    """The old agent's server, stopped for a handover, first answers a request already in a handler (closing
    it would fail that request: seen as RemoteDisconnected in the e2e test) and accepts nothing new; a
    connection made meanwhile waits in the backlog and the next server, adopting the listener, answers it."""
    import threading

    from agent.service.http import HttpServer, Response
    from daemon_helpers import wait_until

    entered, release = threading.Event(), threading.Event()

    def slow(_request):
        entered.set()
        release.wait(60)
        return Response(200, b"slow\n")

    old = HttpServer({("GET", "/slow"): slow}, "127.0.0.1:0").start()
    port = old.address[1]
    answers = {}

    def get(name, path):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answers[name] = b"".join(iter(lambda: s.recv(4096), b""))

    a = threading.Thread(target=get, args=("a", "/slow"))
    a.start()
    assert entered.wait(30)
    dup = old.listener_dup()
    stopper = threading.Thread(target=old.stop, kwargs={"drain_s": 30.0})
    stopper.start()
    wait_until(lambda: old._accept_paused_until == float("inf"), 30, "the old server to stop accepting")
    b = threading.Thread(target=get, args=("b", "/new"))
    b.start()
    time.sleep(0.5)
    assert "b" not in answers                       # nobody accepts it yet: it waits in the backlog
    release.set()
    stopper.join(60)
    a.join(60)
    assert answers["a"].startswith(b"HTTP/1.1 200") and answers["a"].endswith(b"slow\n")
    monkeypatch.setenv("GITOPS_AGENT_LISTEN_FD", str(dup))
    new = HttpServer({("GET", "/new"): lambda _r: Response(200, b"new\n")}, f"127.0.0.1:{port}").start()
    try:
        b.join(60)
        assert answers["b"].startswith(b"HTTP/1.1 200") and answers["b"].endswith(b"new\n")
    finally:
        new.stop()


def test_a_failed_or_waiting_upgrade_is_on_the_status_page_and_in_api_status(tmp_path):
    from agent.service.status_page import status_routes

    layout = Layout(tmp_path / "root")
    layout.state.mkdir(parents=True)
    routes = status_routes(layout)

    def get(path):
        return routes[("GET", path)](None).body.decode()

    assert json.loads(get("/api/status"))["agent_upgrade"] is None and 'id="agent-upgrade"' not in get("/")
    record = {"phase": "failed", "from": __version__, "to": "9.9.9", "identity": "ab", "reason": "<script>x</script> broke"}
    (layout.state / "agent-upgrade.json").write_text(json.dumps(record))
    assert json.loads(get("/api/status"))["agent_upgrade"] == record
    page = get("/")
    assert f"agent upgrade to 9.9.9 failed (running {__version__})" in page and "&lt;script&gt;x&lt;/script&gt; broke" in page
    (layout.state / "agent-upgrade.json").write_text(json.dumps({**record, "phase": "waiting", "reason": "wave 2 starts in 5m"}))
    assert "agent upgrade to 9.9.9 waiting for this host&#39;s wave" in get("/")
    (layout.state / "agent-upgrade.json").write_text(json.dumps({**record, "phase": "done"}))
    assert 'id="agent-upgrade"' not in get("/")
