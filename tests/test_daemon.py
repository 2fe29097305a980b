"""`gitops-agent run` end to end: real git, venv, embedded supervisord, watchdog and HTTP endpoints.

The poll interval is 30 s in every test, so anything seen sooner was event-driven (the watch).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, free_port
from daemon_helpers import http_get, start_daemon, wait_until

pytestmark = pytest.mark.timeout(120)

PROGRAM = "demo-web"


def service_answers(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/", timeout=1)[0] == 200
    except OSError:
        return False


def supervisor(root):
    from agent.drivers.supervisor import EmbeddedSupervisor

    return EmbeddedSupervisor(root).client(timeout=10)


def converge(request, state_repo, agent_root, tmp_path, *extra):
    port = free_port()
    state_repo.app(services={PROGRAM: {"port": port}})
    sha = state_repo.commit("first")
    d = start_daemon(request, state_repo.url, agent_root, tmp_path, *extra)
    d.wait_value("gitops_agent_applied_revision_info", lambda v: v == 1, 60, "first apply", revision=sha)
    assert service_answers(port)
    return d, port, sha


def test_daemon_converges_follows_commits_heals_drift_and_stops_cleanly(request, state_repo, agent_root, tmp_path):
    d, port, sha = converge(request, state_repo, agent_root, tmp_path)
    assert http_get(d.base + "/healthz") == (200, "ok\n")
    d.wait_ready(10)
    assert d.value("gitops_agent_service_up", service=PROGRAM) == 1
    assert d.value("gitops_agent_drift", kind="program", name=PROGRAM) == 0
    assert d.value("gitops_agent_commit_to_converged_seconds_count") == 1

    # a second agent on the same root is refused while this one runs
    second = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--repo", state_repo.url, "--host", "h1",
                             "--root", str(agent_root), "--listen", f"127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
    assert second.returncode == 1, second
    assert "already working on" in second.stderr and str(agent_root) in second.stderr

    # a new commit in the local repo is applied at once (the poll is 30 s away): only the program changes
    new_port = free_port()
    state_repo.app(services={PROGRAM: {"port": new_port}})
    t0 = time.monotonic()
    sha2 = state_repo.commit("move to another port")
    d.wait_value("gitops_agent_applied_revision_info", lambda v: v == 1, 15, "the new commit", revision=sha2)
    commit_to_applied = time.monotonic() - t0
    assert service_answers(new_port)
    assert d.value("gitops_agent_applied_revision_info", revision=sha) is None      # one info series only
    assert d.value("gitops_agent_commit_to_converged_seconds_count") == 2
    assert d.value("gitops_agent_drift_corrected_total", kind="program") is None    # a commit is not drift

    # a hand edit of the program file is healed within about a second
    conf = agent_root / "supervisor" / "programs" / f"{PROGRAM}.conf"
    good = conf.read_text()
    t0 = time.monotonic()
    conf.write_text(good + "\n; hand edit\n")
    d.wait_value("gitops_agent_drift_corrected_total", lambda v: v == 1, 5, "hand edit healed", kind="program")
    edit_to_healed = time.monotonic() - t0
    assert conf.read_text() == good
    assert d.value("gitops_agent_drift", kind="program", name=PROGRAM) == 0
    assert d.value("gitops_agent_drifted_resources") == 0

    # a program stopped by hand is started again (supervisord's log line is the trigger)
    t0 = time.monotonic()
    supervisor(agent_root).stop(PROGRAM)
    d.wait_value("gitops_agent_drift_corrected_total", lambda v: v == 2, 10, "stopped program healed", kind="program")
    stop_to_healed = time.monotonic() - t0
    assert service_answers(new_port)
    assert d.value("gitops_agent_service_up", service=PROGRAM) == 1

    # the agent's own writes settle: no endless reconciles
    def total():
        return sum(v for (n, _), v in d.metrics().items() if n == "gitops_agent_reconcile_total")
    # (a gated start returns before supervisord's startsecs: the RUNNING line supervisord logs then may trigger
    # one more no-op reconcile; wait until the program is RUNNING and that has settled, then demand quiet)
    deadline = time.monotonic() + 30
    while supervisor(agent_root).process_info().get(PROGRAM, {}).get("statename") != "RUNNING":
        assert time.monotonic() < deadline, "the healed program never reached RUNNING"
        time.sleep(0.1)
    time.sleep(1.5)
    before = total()
    time.sleep(1.5)
    assert total() == before

    print(f"\nlatency: commit->applied {commit_to_applied:.2f}s, hand edit->healed {edit_to_healed:.2f}s, "
          f"stop->healed {stop_to_healed:.2f}s (startsecs=1 included), reconciles {before:.0f}")

    # SIGTERM: exit 0 quickly, the service keeps answering, status is consistent
    t0 = time.monotonic()
    assert d.stop(timeout=15) == 0, d.log_text()[-3000:]
    assert time.monotonic() - t0 < 5
    assert service_answers(new_port)
    status = json.loads((agent_root / "state" / "status.json").read_text())
    assert status["applied"]["sha"] == sha2 and status["result"] == "converged"
    assert "stopped after" in d.log_text()


def test_warn_mode_reports_drift_and_heals_nothing_and_an_invalid_commit_keeps_the_service(
        request, state_repo, agent_root, tmp_path):
    d, port, sha = converge(request, state_repo, agent_root, tmp_path, "--mode", "warn", "--apply-commits",
                            "--log-format", "json")
    d.wait_ready(10)

    t0 = time.monotonic()
    supervisor(agent_root).stop(PROGRAM, wait=False)
    d.wait_value("gitops_agent_drift", lambda v: v == 1, 5, "drift reported", kind="program", name=PROGRAM)
    stop_to_drift = time.monotonic() - t0
    since = d.value("gitops_agent_drift_since_timestamp_seconds", kind="program", name=PROGRAM)
    assert since and abs(since - time.time()) < 30
    assert d.value("gitops_agent_drifted_resources") == 1
    assert d.value("gitops_agent_reconcile_total", result="drift") >= 1

    conf = agent_root / "supervisor" / "programs" / f"{PROGRAM}.conf"
    time.sleep(0.3)                                                         # let the stop's log lines settle
    drift_runs = d.value("gitops_agent_reconcile_total", result="drift")
    t0 = time.monotonic()
    conf.write_text(conf.read_text() + "\n; hand edit\n")
    d.wait_value("gitops_agent_reconcile_total", lambda v: v > drift_runs, 5, "edit seen", result="drift")
    edit_to_seen = time.monotonic() - t0
    time.sleep(0.5)
    assert "; hand edit" in conf.read_text()                                # nothing healed
    assert supervisor(agent_root).process_info()[PROGRAM]["statename"] == "STOPPED"
    assert d.value("gitops_agent_drift_corrected_total", kind="program") is None
    assert d.value("gitops_agent_drift_since_timestamp_seconds", kind="program", name=PROGRAM) == since

    # structured logs: one JSON object per line
    lines = [json.loads(l) for l in d.log_text().splitlines() if l.startswith("{")]
    assert any(l.get("result") == "drift" and l["logger"] == "gitops_agent.runtime" for l in lines), lines[-5:]

    print(f"\nlatency (warn): stop->drift metric {stop_to_drift:.2f}s, edit->seen {edit_to_seen:.2f}s")

    # an invalid commit is flagged; the last good revision stays applied, the service is untouched
    supervisor(agent_root).start(PROGRAM)
    assert wait_until(lambda: service_answers(port), 10, "service back")
    state_repo.write("apps/demo/app.yaml", "apiVersion: gitops-agent/v1\nkind: App\nname: demo\nnonsense: 1\n")
    bad = state_repo.commit("broken")
    d.wait_value("gitops_agent_revision_invalid", lambda v: v == 1, 10, "invalid flagged")
    assert d.value("gitops_agent_applied_revision_info", revision=sha) == 1
    assert d.value("gitops_agent_applied_revision_info", revision=bad) is None
    assert service_answers(port)
    assert http_get(d.base + "/healthz")[0] == 200
    assert d.stop() == 0
    assert service_answers(port)


def test_start_without_reachable_repo_backs_off_and_stays_alive(request, agent_root, tmp_path):
    d = start_daemon(request, f"file://{tmp_path}/missing", agent_root, tmp_path)
    d.wait_value("gitops_agent_source_fetch_errors_total", lambda v: v and v >= 2, 15, "two fetch errors")
    code, body = http_get(d.base + "/readyz")
    assert code == 503 and "source" in body
    assert http_get(d.base + "/healthz")[0] == 200
    assert d.proc.poll() is None
    assert d.stop() == 0
