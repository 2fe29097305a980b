"""Suspend / resume and quarantine (DESIGN §3b) with the real agent: real git, venvs and supervisord, the CLI
run as a user runs it (each `once` a new process: the state survives restarts)."""

from __future__ import annotations

import json

import pytest

from agent.core.control import HOST, Control, Quarantine, Suspension, hold, inputs_digest
from agent.core.actions import Action
from agent.service.control import control_file, load_control, update_control
from agent.service.metrics import Recorder
from conftest import free_port, run_agent, served_version

pytestmark = pytest.mark.timeout(600)


def common(repo, root) -> list[str]:
    return ["--repo", repo.url, "--host", "h1", "--root", str(root), "--health-wait", "15"]


def _two_apps(repo, version_a="1.0.0", version_b="1.0.0", ports=None):
    """Apps a and b, each one service, on their own ports."""
    ports = ports or (free_port(), free_port())
    repo.app(name="a", env="a", services={"a-web": {"port": ports[0]}}, version=version_a)
    app_a = (repo.path / "apps/a/app.yaml").read_text()
    repo.app(name="b", env="b", services={"b-web": {"port": ports[1]}}, version=version_b)
    repo.write("apps/a/app.yaml", app_a)
    return ports


def _broken(repo, app: str) -> None:
    path = repo.path / f"apps/{app}/app.yaml"
    path.write_text(path.read_text().replace("[demoapp-server,", "[demoapp-server, --no-such-flag,"))


def test_a_suspended_host_reports_drift_heals_nothing_and_resumes_after_a_restart(state_repo, agent_root):
    pa, pb = _two_apps(state_repo)
    state_repo.commit("v1")
    args = common(state_repo, agent_root)
    run_agent("once", *args, check=True)
    assert served_version(pa) == served_version(pb) == "1.0.0"

    out = run_agent("suspend", "--root", str(agent_root), "--reason", "incident 42: db failover")
    assert out.returncode == 0 and "suspended the whole host" in out.stdout
    assert (control_file(agent_root).stat().st_mode & 0o777) == 0o600
    _two_apps(state_repo, "2.0.0", "2.0.0", (pa, pb))
    state_repo.commit("v2")
    conf = agent_root / "supervisor" / "programs" / "b-web.conf"
    conf.unlink()                                          # a hand change: drift

    once = run_agent("once", *args)                        # a new process: the suspension was read from disk
    assert once.returncode == 2, once.stdout + once.stderr
    assert "suspended: the whole host: incident 42: db failover" in once.stdout
    assert "[held: suspended]" in once.stdout
    assert served_version(pa) == served_version(pb) == "1.0.0" and not conf.exists()

    plan = run_agent("plan", *args, "--json")
    assert plan.returncode == 2
    data = json.loads(plan.stdout)
    assert data["suspended"]["*"]["reason"] == "incident 42: db failover"
    assert {h["cause"] for h in data["held"]} == {"suspended"} and any(h["key"] == "program:b-web" for h in data["held"])
    status = run_agent("status", "--root", str(agent_root))
    assert "suspended: the whole host: incident 42: db failover" in status.stdout

    out = run_agent("resume", "--root", str(agent_root))
    assert out.returncode == 0 and "resumed the whole host" in out.stdout
    once = run_agent("once", *args)
    assert once.returncode == 0, once.stdout + once.stderr
    assert served_version(pa) == served_version(pb) == "2.0.0" and conf.exists()
    assert "suspended" not in run_agent("status", "--root", str(agent_root)).stdout


def test_suspending_one_app_leaves_the_others_applying(state_repo, agent_root):
    pa, pb = _two_apps(state_repo)
    state_repo.commit("v1")
    args = common(state_repo, agent_root)
    run_agent("once", *args, check=True)
    run_agent("suspend", "--root", str(agent_root), "--app", "a", "--reason", "freeze a", check=True)
    _two_apps(state_repo, "2.0.0", "2.0.0", (pa, pb))
    state_repo.commit("v2")
    once = run_agent("once", *args)
    assert once.returncode == 2, once.stdout + once.stderr
    assert "held: app a is suspended: freeze a" in once.stdout
    assert served_version(pa) == "1.0.0" and served_version(pb) == "2.0.0"
    run_agent("resume", "--root", str(agent_root), "--app", "a", check=True)
    run_agent("once", *args, check=True)
    assert served_version(pa) == "2.0.0"


def test_a_failed_revision_is_quarantined_for_its_app_until_a_change_or_retry(state_repo, agent_root):
    pa, pb = _two_apps(state_repo)
    state_repo.commit("v1")
    args = common(state_repo, agent_root)
    run_agent("once", *args, check=True)

    _broken(state_repo, "a")
    bad = state_repo.commit("a broken")
    once = run_agent("once", *args, "--json")
    assert once.returncode == 1
    assert any(o["outcome"] == "rolled_back" for o in json.loads(once.stdout)["outcomes"])
    q = load_control(control_file(agent_root)).quarantined
    assert set(q) == {"a"} and q["a"].sha == bad and "program" in q["a"].reason
    assert served_version(pa) == "1.0.0"

    # the next poll does not try it again; status names the revision and why
    once = run_agent("once", *args, "--json")
    data = json.loads(once.stdout)
    assert once.returncode == 1 and data["outcomes"] == [] and "quarantined" in data["error"]
    status = run_agent("status", "--root", str(agent_root)).stdout
    assert f"quarantined: app a: revision {bad}" in status

    # a later commit that changes only app b applies b; a stays quarantined
    b = state_repo.path / "apps/b/app.yaml"
    state_repo.lock("apps/b/b.lock", "2.0.0")
    state_repo.commit("b 2.0.0")
    once = run_agent("once", *args, "--json")
    data = json.loads(once.stdout)
    assert served_version(pb) == "2.0.0" and served_version(pa) == "1.0.0"
    assert not any(o["key"].endswith("a-web") for o in data["outcomes"]), data["outcomes"]
    assert b.exists()

    # retry: tried once more (fails again, quarantined again)
    out = run_agent("retry", "--root", str(agent_root), "--app", "a")
    assert "quarantine lifted: a" in out.stdout
    once = run_agent("once", *args, "--json")
    assert any(o["outcome"] == "rolled_back" for o in json.loads(once.stdout)["outcomes"])
    assert "a" in load_control(control_file(agent_root)).quarantined

    # a commit that changes the app (the fix) lifts it
    _two_apps(state_repo, "1.0.0", "2.0.0", (pa, pb))
    state_repo.lock("apps/a/a.lock", "2.0.0")
    state_repo.commit("a fixed")
    once = run_agent("once", *args)
    assert once.returncode == 0, once.stdout + once.stderr
    assert served_version(pa) == "2.0.0"
    assert run_agent("retry", "--root", str(agent_root)).stdout.startswith("nothing was quarantined")


# -- the pure part and the metrics ---------------------------------------------------------------

def test_inputs_digest_ignores_where_the_commit_was_checked_out(state_repo, tmp_path):
    from agent.core.load import LoadOptions, load_desired

    state_repo.app()
    state_repo.commit()
    import shutil

    copy = tmp_path / "elsewhere"
    shutil.copytree(state_repo.path, copy)
    one = load_desired(state_repo.path, "h1", LoadOptions(boundary=state_repo.path)).apps[0]
    two = load_desired(copy, "h1", LoadOptions(boundary=copy)).apps[0]
    assert inputs_digest(one) == inputs_digest(two)
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    three = load_desired(state_repo.path, "h1", LoadOptions(boundary=state_repo.path)).apps[0]
    assert inputs_digest(three) != inputs_digest(one)


def test_control_file_survives_concurrent_writers_and_corruption(tmp_path):
    from dataclasses import replace
    from concurrent.futures import ThreadPoolExecutor

    path = control_file(tmp_path)

    def add(i):
        update_control(path, lambda c: replace(c, suspended={**c.suspended, f"app{i}": Suspension(f"r{i}", i)}))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(40)))
    assert len(load_control(path).suspended) == 40
    path.write_text("{torn")
    assert load_control(path) == Control()


def test_metrics_show_who_is_suspended_and_quarantined():
    from types import SimpleNamespace

    from agent.core.outcome import ReconcileResult

    rec = Recorder()
    control = Control({"a": Suspension("x")}, {"b": Quarantine("f" * 40, "d", "gate")})
    result = SimpleNamespace(result=ReconcileResult.DRIFT, seconds=0.1, source_failed=False, revision=None,
                             outcomes=(), plan=None, facts=None, error=None, new_commit=False, control=control,
                             apps=("a", "b", "c"))
    rec.observe(result)
    text = rec.exposition().decode()
    assert 'gitops_agent_suspended{app="a"} 1.0' in text and 'gitops_agent_suspended{app="*"} 0.0' in text
    assert 'gitops_agent_suspended{app="c"} 0.0' in text
    assert 'gitops_agent_quarantined{app="b"} 1.0' in text and 'gitops_agent_quarantined{app="a"} 0.0' in text
    rec.observe(SimpleNamespace(**{**vars(result), "control": Control({HOST: Suspension("all")}), "apps": ("a",)}))
    text = rec.exposition().decode()
    assert 'gitops_agent_suspended{app="*"} 1.0' in text and 'app="b"' not in text


def test_hold_keeps_the_host_actions_unless_the_whole_host_is_suspended(state_repo):
    from agent.core.load import LoadOptions, load_desired

    state_repo.app()
    state_repo.commit()
    desired = load_desired(state_repo.path, "h1", LoadOptions(boundary=state_repo.path))
    acts = (Action("program:demo-web", "x"), Action("supervisor", "y"))
    todo, held = hold(acts, desired, Control({"demo": Suspension("r")}), {})
    assert [a.key for a in todo] == ["supervisor"] and held[0].app == "demo"
    todo, held = hold(acts, desired, Control({HOST: Suspension("r")}), {})
    assert todo == () and len(held) == 2
    digest = inputs_digest(desired.apps[0])
    q = Control(quarantined={"demo": Quarantine("a" * 40, digest, "gate")})
    assert len(hold(acts, desired, q, {"demo": digest})[1]) == 1
    assert hold(acts, desired, q, {"demo": "changed"})[1] == ()
