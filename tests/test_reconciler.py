"""The reconciler's steps with the real drivers on temp dirs (real git, venv, supervisord), and faults
handed in through `World` where they cannot otherwise be caused (named as such)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from agent.compose import world as build_world
from agent.core.outcome import ReconcileResult, Retry, Verdict
from agent.drivers.venv import VenvManager
from agent.service.reconciler import Reconciler
from agent.settings import Settings
from conftest import free_port, run_agent, served_version

pytestmark = pytest.mark.timeout(300)


def settings(repo, root, **kw) -> Settings:
    return Settings(repo=repo.url, host="h1", root=root, health_wait_s=15, **kw)


class _ExplodingSource:
    """FAKE, for a fault no real input causes: a bug inside a step (an exception no step expects)."""

    def __init__(self, real):
        self.real = real

    def resolve(self):
        raise RuntimeError("boom in a step")

    def __getattr__(self, name):
        return getattr(self.real, name)


class _BuggyVenvs(VenvManager):
    """FAKE, for a fault no real input causes: a driver raising a bare exception type (a bug)."""

    def build(self, spec):
        raise KeyError("a driver bug")


def cli_args(repo, root) -> list[str]:
    """The agent options every CLI call of these tests passes."""
    return ["--repo", repo.url, "--host", "h1", "--root", str(root), "--health-wait", "15"]


def _converged(repo, root) -> tuple[int, list[str]]:
    """One demo service on a free port, applied by a real `once`: (its port, the CLI options)."""
    port = free_port()
    repo.app(services={"demo-web": {"port": port}})
    repo.commit()
    common = cli_args(repo, root)
    assert run_agent("once", *common).returncode == 0
    return port, common


def _status(root) -> dict:
    return json.loads((root / "state" / "status.json").read_text())


def test_status_is_recorded_even_when_a_step_raises(state_repo, agent_root):
    state_repo.app()
    state_repo.commit()
    s = settings(state_repo, agent_root)
    w = build_world(s)
    result = Reconciler(s, dataclasses.replace(w, source=_ExplodingSource(w.source))).reconcile()
    assert result.result is ReconcileResult.ERROR and result.retry is Retry.BACKOFF
    assert "internal error: RuntimeError: boom in a step" in result.error
    recorded = _status(agent_root)
    assert recorded["result"] == "error" and "boom in a step" in recorded["last_error"]


def test_the_executor_turns_a_driver_bug_into_a_failed_outcome(state_repo, agent_root):
    state_repo.app()
    state_repo.commit()
    s = settings(state_repo, agent_root)
    w = build_world(s)
    result = Reconciler(s, dataclasses.replace(w, venvs=_BuggyVenvs(w.layout.root))).reconcile()
    assert result.result is ReconcileResult.FAILED
    build = next(o for o in result.outcomes if o.action.kind == "build_venv")
    assert build.verdict is Verdict.FAILED_TEMPORARY and "KeyError" in build.message
    assert all(o.verdict is Verdict.SKIPPED_BLOCKED for o in result.outcomes
               if o.action.key == "program:demo-web")
    assert _status(agent_root)["resources"]["venv:demo"]["state"] == "failed"


def test_an_invalid_revision_waits_for_a_new_input_and_a_source_error_backs_off(state_repo, agent_root, tmp_path):
    state_repo.write("fleet.yaml", "apiVersion: gitops-agent/v1\nkind: Fleet\nhosts: {h1: {groups: [web]}}\nbogus: 1\n")
    state_repo.commit()
    result = Reconciler(settings(state_repo, agent_root)).reconcile()
    assert result.result is ReconcileResult.INVALID and result.retry is Retry.POLL

    s = Settings(repo=f"file://{tmp_path / 'nowhere'}", host="h1", root=tmp_path / "root2")
    result = Reconciler(s).reconcile()
    assert result.result is ReconcileResult.ERROR and result.source_failed
    assert result.retry is Retry.BACKOFF


def test_a_failed_health_gate_is_rolled_back_and_says_so(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit()
    assert Reconciler(settings(state_repo, agent_root)).reconcile().result is ReconcileResult.APPLIED
    # a new version whose command cannot start: the program change is rolled back to the running one
    text = (state_repo.path / "apps/demo/app.yaml").read_text()
    state_repo.write("apps/demo/app.yaml", text.replace("[demoapp-server,", "[demoapp-server, --no-such-flag,"))
    state_repo.commit("broken")
    result = Reconciler(settings(state_repo, agent_root)).reconcile()
    assert result.result is ReconcileResult.FAILED
    assert any(o.verdict is Verdict.ROLLED_BACK for o in result.outcomes), [o.to_json() for o in result.outcomes]
    assert served_version(port) == "1.0.0"


def test_a_corrupt_status_and_cache_never_wedge_once_plan_or_status(state_repo, agent_root):
    port, common = _converged(state_repo, agent_root)
    status_file = agent_root / "state" / "status.json"
    for pickle in (agent_root / "state" / "desired").glob("*.pickle"):
        pickle.write_bytes(b"\x80\x04garbage")
    status_file.write_bytes(b"[]")

    assert run_agent("status", "--root", str(agent_root)).returncode == 0
    plan = run_agent("plan", *common)
    assert plan.returncode in (0, 2) and "Traceback" not in plan.stderr, plan.stderr
    assert status_file.read_bytes() == b"[]"                  # plan and status only read

    once = run_agent("once", *common)
    assert once.returncode == 0 and "Traceback" not in once.stderr, once.stdout + once.stderr
    assert "unreadable" in once.stderr
    assert list((agent_root / "state").glob("status.json.corrupt-*"))
    assert json.loads(status_file.read_text())["result"] in ("converged", "applied")
    assert served_version(port) == "1.0.0"


def test_a_revision_that_would_empty_the_host_is_held_unless_decommissioned(state_repo, agent_root):
    port, common = _converged(state_repo, agent_root)

    # the app's selector no longer matches h1 (a typo): nothing would run here
    text = (state_repo.path / "apps/demo/app.yaml").read_text()
    state_repo.write("apps/demo/app.yaml", text.replace("hosts: {groups: [web]}", "hosts: {groups: [wbe]}"))
    state_repo.commit("typo")
    once = run_agent("once", *common)
    assert once.returncode == 1 and "decommission: true" in once.stderr, once.stdout + once.stderr
    assert served_version(port) == "1.0.0"
    assert _status(agent_root)["result"] == "invalid"

    fleet = (state_repo.path / "fleet.yaml").read_text()
    state_repo.write("fleet.yaml", fleet.replace("h1: {groups: [web]}", "h1: {groups: [web], decommission: true}"))
    state_repo.commit("decommission h1")
    once = run_agent("once", *common)
    assert once.returncode == 0, once.stdout + once.stderr
    assert served_version(port) is None
    assert not os.path.exists(agent_root / "supervisor" / "programs" / "demo-web.conf")


def _snapshot(root) -> dict:
    """Every path under the root with its type, mode, size, mtime and content digest."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path) and not name.endswith(".sock"):
                with open(path, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def test_plan_status_and_facts_leave_the_root_byte_for_byte_unchanged(state_repo, agent_root, tmp_path):
    port, common = _converged(state_repo, agent_root)
    # a new commit the root has not fetched, and another repo: plan must fetch aside, never into the root
    state_repo.lock("apps/demo/demo.lock", "1.1.0")
    state_repo.commit("1.1.0")
    other = type(state_repo)(tmp_path / "other")
    other.app(services={"demo-web": {"port": port}}, version="2.0.0")
    other.commit("other")
    (agent_root / "state" / "desired").mkdir(exist_ok=True)
    (agent_root / "state" / "desired" / "garbage.pickle").write_bytes(b"\x80\x04junk")
    from reliability._support import settled_programs

    settled_programs(agent_root)     # supervisord logs demo-web's RUNNING startsecs after `once` returned
    before = _snapshot(agent_root)

    plan = run_agent("plan", "--json", *common)
    assert plan.returncode == 2 and "build_venv" in plan.stdout, plan.stdout + plan.stderr
    plan_other = run_agent("plan", *["--repo", other.url] + common[2:])
    assert plan_other.returncode == 2, plan_other.stdout + plan_other.stderr
    assert run_agent("status", "--json", "--root", str(agent_root)).returncode == 0
    assert run_agent("facts", "--json", *common).returncode == 0
    assert _snapshot(agent_root) == before

    # the root still follows its own repo: the other repo's commit never reaches it
    assert run_agent("once", *common).returncode == 0
    assert served_version(port) == "1.1.0"


def test_a_service_that_dies_after_its_gate_is_drift_until_its_new_process_passes(state_repo, agent_root):
    import signal

    port, common = _converged(state_repo, agent_root)
    assert run_agent("plan", *common).returncode == 0
    facts = json.loads(run_agent("facts", "--json", *common).stdout)["programs"]["demo-web"]
    assert facts["gated_pid"] == facts["pid"]

    os.kill(facts["pid"], signal.SIGKILL)          # supervisord restarts it: RUNNING again, another process
    from daemon_helpers import wait_until

    def restarted():
        p = json.loads(run_agent("facts", "--json", *common).stdout)["programs"]["demo-web"]
        return p["state"] == "RUNNING" and p["pid"] not in (None, facts["pid"]) and served_version(port)

    wait_until(restarted, 60, "supervisord restarting demo-web")
    plan = run_agent("plan", *common)
    assert plan.returncode == 2 and "exited after its health gate" in plan.stdout, plan.stdout + plan.stderr
    once = run_agent("once", *common)
    assert once.returncode == 0 and "check_health" in once.stdout, once.stdout + once.stderr
    assert run_agent("plan", *common).returncode == 0


def test_the_health_gate_needs_the_services_own_listener(state_repo, agent_root, tmp_path):
    """Issue 12 item 4: another process already answers the service's port, and the service binds only
    after 2.5 s (past startsecs). The old gate passed on the other process's answer, then the service
    crash-looped behind a 'converged' report. Now the gate waits for the service's own listener, which
    never comes (it dies on the taken port, and supervisord restarts it), and fails saying why."""
    import subprocess
    import sys

    from conftest import stop_process
    from daemon_helpers import wait_until

    port = free_port()
    foreign = subprocess.Popen([sys.executable, "-c", (
        "import http.server as h\n"
        "class H(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'impostor 9.9.9\\n')\n"
        "    def log_message(self, *a): pass\n"
        f"h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")])
    try:
        wait_until(lambda: served_version(port) == "9.9.9", 30, "the foreign server")
        state_repo.app(services={"demo-web": {"port": port}})
        text = (state_repo.path / "apps/demo/app.yaml").read_text()
        state_repo.write("apps/demo/app.yaml", text.replace(f'"{port}"]', f'"{port}", --bind-delay, "2.5"]'))
        state_repo.commit()
        result = Reconciler(settings(state_repo, agent_root)).reconcile()
        assert result.result is ReconcileResult.FAILED, [o.to_json() for o in result.outcomes]
        gate = next(o for o in result.outcomes if o.action.kind == "check_health")
        assert gate.failed and "another process answers there" in gate.message, gate.message
        assert _status(agent_root)["resources"]["program:demo-web"]["state"] == "failed"
    finally:
        stop_process(foreign)


def test_an_invalid_revision_is_printed_once_with_file_line_and_the_fix(state_repo, agent_root):
    state_repo.app()
    text = (state_repo.path / "apps/demo/app.yaml").read_text()
    state_repo.write("apps/demo/app.yaml", text.replace("environment: demo", "environment: dmeo"))
    state_repo.commit("typo")
    for command in ("once", "plan"):
        proc = run_agent(command, *cli_args(state_repo, agent_root))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        problem = [line for line in proc.stderr.splitlines() if "apps/demo/app.yaml:" in line]
        assert len(problem) == 1, proc.stderr                   # was printed by the log and by the CLI
        assert "did you mean 'demo'" in problem[0], problem
