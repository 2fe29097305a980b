"""Notifications (`--notify`, DESIGN §4) through the real Apprise `json://` plugin to a real HTTP receiver on
127.0.0.1: what a receiver sees, sent once per failure and once on recovery, never blocking a reconcile,
never carrying a secret value."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from agent.core.events import Event, events_for
from agent.core.outcome import Outcome, ReconcileResult, Verdict
from agent.core.actions import Action
from agent.drivers.notify import Notifier
from conftest import free_port, run_agent, served_version
from daemon_helpers import wait_until

pytestmark = pytest.mark.timeout(600)


class Receiver:
    """A real HTTP server that records every JSON POST; `hold` makes it wait before answering."""

    def __init__(self):
        self.got: list[dict] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.drop_held = False
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                held = not outer.hold.is_set()
                outer.entered.set()
                outer.hold.wait(60)
                if held and outer.drop_held:        # a delivery that never completed (its sender was killed)
                    return
                outer.got.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook"

    def stop(self):
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def _result(kind, outcomes=(), new_commit=False, sha="a" * 40, error=None, held=(), drift=()):
    return SimpleNamespace(result=kind, outcomes=tuple(outcomes), new_commit=new_commit, error=error, held=held,
                           drift=drift, rollouts={}, owners={"program:web": "shop"},
                           revision=SimpleNamespace(sha=sha, summary="release 2"))


def test_a_failure_is_sent_once_and_its_recovery_once():
    failed = _result(ReconcileResult.FAILED, [Outcome(Action("program:web", "r"), Verdict.ROLLED_BACK, "gate: 503")],
                     new_commit=True, error="x")
    events, memory = events_for(failed, "h1", {})
    assert [(e.kind, e.app) for e in events] == [("rolled back", "shop")]
    assert "host h1, app shop, revision aaaaaaaaaaaa" in events[0].body and "gate: 503" in events[0].body
    again, memory2 = events_for(failed, "h1", memory)
    assert again == [] and memory2 == memory
    # a source error in between says nothing about the app: no recovery, and the error itself once
    err = _result(ReconcileResult.ERROR, error="source: cannot fetch")
    ev, memory3 = events_for(err, "h1", memory)
    assert [e.kind for e in ev] == ["failed"] and events_for(err, "h1", memory3)[0] == []
    ok = _result(ReconcileResult.APPLIED, [Outcome(Action("program:web", "r"), Verdict.APPLIED)], new_commit=True,
                 sha="b" * 40)
    ev, memory4 = events_for(ok, "h1", memory3)
    assert sorted(e.kind for e in ev) == ["applied", "recovered", "recovered"] and memory4 == {}
    assert events_for(_result(ReconcileResult.CONVERGED), "h1", memory4)[0] == []


def test_events_reach_a_real_receiver_through_apprise_json_without_secret_values(receiver):
    from agent.logs import remember_secrets

    remember_secrets(["hunter2-s3cret-value"])
    counts = []
    n = Notifier([receiver.url], counts.append)
    n.send([Event("failed", "h1", "shop", "c" * 40, "job migrate: password hunter2-s3cret-value refused")])
    assert n.flush(60)
    assert counts == ["sent"] and len(receiver.got) == 1
    payload = receiver.got[0]
    assert payload["title"] == "gitops-agent h1: failed (shop)" and payload["type"] == "failure"
    assert payload["message"] == "host h1, app shop, revision cccccccccccc: job migrate: password *** refused"
    assert "hunter2" not in json.dumps(payload)


def test_a_hanging_receiver_never_blocks_the_sender_and_a_dead_one_is_counted(receiver):
    receiver.hold.clear()                         # the receiver takes the request and does not answer
    counts = []
    n = Notifier([receiver.url], counts.append, maxsize=2)
    n.send([Event("applied", "h1", "*", "d" * 40, "one")])
    assert receiver.entered.wait(30)              # delivery is under way and stuck in the receiver ...
    n.send([Event("applied", "h1", "*", "d" * 40, str(i)) for i in range(5)])   # ... send still returns at once
    assert counts.count("failed") >= 3            # the bounded queue dropped what did not fit, counted
    receiver.hold.set()
    assert n.flush(120)

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))                  # a port nothing listens on
    port = dead.getsockname()[1]
    dead.close()
    counts2 = []
    n2 = Notifier([f"json://127.0.0.1:{port}/"], counts2.append)
    n2.send([Event("applied", "h1", "*", "e" * 40, "x")])
    assert n2.flush(120) and counts2 == ["failed"]


def _v1_applied(state_repo, agent_root, receiver) -> tuple[int, list[str]]:
    """demo-web 1.0.0 applied by a real `once` with --notify, its "applied" received and cleared:
    (its port, the once options)."""
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit("v1")
    args = ["--repo", state_repo.url, "--host", "h1", "--root", str(agent_root), "--health-wait", "15",
            "--notify", receiver.url]
    run_agent("once", *args, check=True)
    wait_until(lambda: any(p["title"] == "gitops-agent h1: applied" for p in receiver.got), 30, "applied sent")
    receiver.got.clear()
    return port, args


def test_once_notifies_a_rolled_back_release_once_then_applied_and_recovered(state_repo, agent_root, receiver):
    port, args = _v1_applied(state_repo, agent_root, receiver)

    text = (state_repo.path / "apps/demo/app.yaml").read_text()
    state_repo.write("apps/demo/app.yaml", text.replace("[demoapp-server,", "[demoapp-server, --no-such-flag,"))
    state_repo.commit("broken")
    assert run_agent("once", *args).returncode == 1
    assert run_agent("once", *args).returncode == 1          # quarantined: same failure, not sent again
    titles = [p["title"] for p in receiver.got]
    assert titles == ["gitops-agent h1: rolled back (demo)"], receiver.got
    assert served_version(port) == "1.0.0"

    state_repo.write("apps/demo/app.yaml", text)
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    state_repo.commit("fixed: 2.0.0")
    run_agent("once", *args, check=True)
    titles = sorted(p["title"] for p in receiver.got[1:])
    assert titles == ["gitops-agent h1: applied", "gitops-agent h1: recovered (demo)"], receiver.got
    assert "fixed: 2.0.0" in next(p["message"] for p in receiver.got if p["title"].endswith("applied"))


def test_a_failed_agent_upgrade_is_sent_once_and_its_recovery_once():
    from agent.core.events import UPGRADE_TOPIC, upgrade_events

    failed = {"phase": "failed", "from": "1.0", "to": "2.0", "identity": "abc", "reason": "import raised\nTraceback"}
    events, memory = upgrade_events(failed, "h1", "1.0", {"failed:shop": "x"})
    assert [(e.kind, e.app, e.severity) for e in events] == [("agent upgrade failed", "*", "failure")]
    assert events[0].reason == "upgrade to gitops-agent 2.0 failed, 1.0 keeps running: import raised ... Traceback"
    assert upgrade_events(failed, "h1", "1.0", memory) == ([], memory)          # the next poll: nothing
    # a reconcile's own events neither clear nor repeat it
    ok = _result(ReconcileResult.CONVERGED)
    ev, memory2 = events_for(ok, "h1", memory)
    assert [e.kind for e in ev] == ["recovered"] and memory2 == {UPGRADE_TOPIC: memory[UPGRADE_TOPIC]}
    # another lock failing is news; a handover under way is not; done (or no longer asked for) recovers once
    other = {**failed, "identity": "def", "to": "2.1"}
    assert [e.kind for e in upgrade_events(other, "h1", "1.0", memory2)[0]] == ["agent upgrade failed"]
    assert upgrade_events({**other, "phase": "handing-over"}, "h1", "1.0", memory2) == ([], memory2)
    done = {"phase": "done", "from": "1.0", "to": "2.1"}
    ev, memory3 = upgrade_events(done, "h2", "2.1", memory2)
    assert [(e.kind, e.reason) for e in ev] == [("recovered", "agent upgraded from 1.0 to 2.1")] and memory3 == {}
    assert upgrade_events(done, "h1", "2.1", memory3) == ([], {})
    ev, _ = upgrade_events({}, "h1", "1.0", memory2)
    assert [(e.kind, e.reason) for e in ev] == [("recovered", "agent upgrade no longer asked for; running gitops-agent 1.0")]


def test_a_suspension_is_announced_once_when_it_takes_effect_and_drift_while_suspended_is_reported(
        state_repo, agent_root, receiver):
    """"suspended" once, when the suspension takes effect, even with nothing to apply (not on every poll);
    drift found while suspended is still reported (and not healed)."""
    from agent.drivers.supervisor import EmbeddedSupervisor

    port, args = _v1_applied(state_repo, agent_root, receiver)

    run_agent("suspend", "--root", str(agent_root), "--reason", "incident 7: disk full", check=True)
    assert run_agent("once", *args).returncode == 0          # converged: nothing to apply, nothing held
    assert run_agent("once", *args).returncode == 0          # the next poll: not announced again
    assert [(p["title"], p["type"]) for p in receiver.got] == [("gitops-agent h1: suspended", "warning")], receiver.got
    assert "the host is suspended: incident 7: disk full" in receiver.got[0]["message"]

    EmbeddedSupervisor(agent_root).client().stop("demo-web")     # drift while suspended
    assert run_agent("once", *args).returncode == 2
    assert run_agent("once", *args).returncode == 2
    titles = [p["title"] for p in receiver.got]
    assert titles == ["gitops-agent h1: suspended", "gitops-agent h1: drift found"], receiver.got
    assert "program:demo-web" in receiver.got[1]["message"]
    assert served_version(port) is None                          # reported, never healed

    run_agent("resume", "--root", str(agent_root), check=True)
    run_agent("once", *args, check=True)
    assert served_version(port) == "1.0.0"
    wait_until(lambda: any(p["title"] == "gitops-agent h1: drift corrected" for p in receiver.got), 30, "corrected")
    assert [p["title"] for p in receiver.got].count("gitops-agent h1: suspended") == 1
