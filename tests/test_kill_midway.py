"""The agent SIGKILLed mid-way (docs/operations.md, "When the agent is killed mid-way"): a real daemon killed
at a chosen point, then the next run checked. Nothing is lost, nothing is done or sent twice."""

from __future__ import annotations

import json
import os
import signal

import pytest

from agent.service.control import control_file, load_control
from conftest import free_port, run_agent, served_version
from daemon_helpers import start_daemon, wait_until
from test_notify import Receiver

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def _kill(daemon) -> None:
    """SIGKILL the agent process alone (as the OOM killer would): its supervisord and services live on."""
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(30)


def _notified(root) -> dict:
    return json.loads((root / "state" / "notified.json").read_text())


def test_a_notification_pending_when_the_agent_is_killed_is_sent_once_by_the_next_run(
        request, state_repo, agent_root, tmp_path, receiver):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit("v1")
    receiver.hold.clear()                  # the receiver takes the first POST and never answers it
    receiver.drop_held = True              # ... nor records it: the delivery never completed
    d = start_daemon(request, state_repo.url, agent_root, tmp_path, "--notify", receiver.url, poll=300)
    wait_until(lambda: served_version(port) == "1.0.0", 300, "v1 served", d.log, step=0.1)
    wait_until(receiver.entered.is_set, 120, "the applied notification under way", d.log)
    pending = _notified(agent_root)["pending"]
    assert [e["kind"] for e in pending] == ["applied"], pending
    _kill(d)
    receiver.hold.set()

    d2 = start_daemon(request, state_repo.url, agent_root, tmp_path, "--notify", receiver.url, poll=300)
    wait_until(lambda: receiver.got, 120, "the pending notification sent by the next agent", d2.log)
    d2.wait_value("gitops_agent_reconcile_total", lambda v: v and v >= 1, 120, result="converged")
    wait_until(lambda: _notified(agent_root)["pending"] == [], 60, "nothing pending", d2.log)
    d2.stop()
    assert [p["title"] for p in receiver.got] == ["gitops-agent h1: applied"], receiver.got   # once
    assert _notified(agent_root)["sent"] == {}


def test_a_release_killed_in_its_health_gate_is_tried_once_more_then_quarantined_and_announced_once(
        request, state_repo, agent_root, tmp_path, receiver):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit("v1")
    args = ["--repo", state_repo.url, "--host", "h1", "--root", str(agent_root), "--health-wait", "20",
            "--notify", receiver.url]
    run_agent("once", *args, check=True)
    receiver.got.clear()

    text = (state_repo.path / "apps/demo/app.yaml").read_text()
    state_repo.write("apps/demo/app.yaml", text.replace(f'"{port}"]', f'"{port}", --healthz-status, "503"]'))
    bad = state_repo.commit("a release that never gets healthy")
    d = start_daemon(request, state_repo.url, agent_root, tmp_path, "--notify", receiver.url, "--health-wait", "60",
                     poll=300)
    wait_until(lambda: "update_program demo-web" in d.log_text(), 300, "the release in its health gate", d.log, step=0.05)
    _kill(d)                               # mid-way: the new program runs, its gate never finished
    assert load_control(control_file(agent_root)).quarantined == {}
    inflight = json.loads((agent_root / "state" / "inflight.json").read_text())      # the rollback target
    assert "healthz-status" not in inflight["demo-web"]["previous"]
    assert ((agent_root / "state" / "inflight.json").stat().st_mode & 0o777) == 0o600

    once = run_agent("once", *args, "--json")          # the next run
    data = json.loads(once.stdout)
    assert once.returncode == 1, once.stdout + once.stderr
    q = load_control(control_file(agent_root)).quarantined
    assert set(q) == {"demo"} and q["demo"].sha == bad, (q, data["outcomes"])
    once = run_agent("once", *args, "--json")          # and the one after: held, not tried again
    data = json.loads(once.stdout)
    assert once.returncode == 1 and data["outcomes"] == [] and "quarantined" in data["error"]
    assert [p["title"] for p in receiver.got] == ["gitops-agent h1: rolled back (demo)"], receiver.got    # once
    assert "its previous config" in receiver.got[0]["message"]
    assert served_version(port) == "1.0.0"             # back on the config from before the interrupted apply
    assert not (agent_root / "state" / "inflight.json").exists()
