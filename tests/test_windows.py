"""Release windows (DESIGN §3b): the pure decision (IANA zones, DST, midnight), and the real agent building a
new venv ahead outside its window, restarting nothing, and switching without a build when allowed."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from agent.core.windows import Window, is_open, next_open
from conftest import free_port, run_agent, served_version

pytestmark = pytest.mark.timeout(600)
UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


BERLIN = (Window(("mon", "tue", "wed", "thu"), "02:00", "04:00", "Europe/Berlin"),)


def test_a_berlin_window_follows_the_wall_clock_across_dst():
    # winter (CET, UTC+1): 02:00-04:00 local is 01:00-03:00 UTC
    assert is_open(BERLIN, at("2026-01-12T01:30"))          # a Monday
    assert not is_open(BERLIN, at("2026-01-12T03:30"))
    # summer (CEST, UTC+2): 00:00-02:00 UTC
    assert is_open(BERLIN, at("2026-07-13T00:30")) and not is_open(BERLIN, at("2026-07-13T02:30"))
    # Friday: closed; the next opening is Monday 02:00 local
    assert not is_open(BERLIN, at("2026-07-17T00:30"))
    assert next_open(BERLIN, at("2026-07-17T00:30")) == at("2026-07-20T00:00")
    # the week DST starts (Sun 29 Mar 2026): Thursday before is winter, Monday after is summer
    assert next_open(BERLIN, at("2026-03-27T12:00")) == at("2026-03-30T00:00")


def test_midnight_crossing_and_a_start_in_the_spring_forward_gap():
    late = (Window(("fri",), "22:00", "02:00", "UTC"),)
    assert is_open(late, at("2026-07-18T01:00"))            # Saturday 01:00 belongs to Friday's window
    assert not is_open(late, at("2026-07-18T02:00"))
    gap = (Window(("sun",), "02:30", "03:30", "Europe/Berlin"),)   # 29 Mar 2026: 02:00-03:00 does not exist
    opens = next_open(gap, at("2026-03-28T12:00"))
    assert opens == at("2026-03-29T01:00")                  # 03:00 CEST, the first instant after the gap
    assert is_open((), at("2026-01-01T00:00")) and next_open((), at("2026-01-01T00:00")) is None


def test_outside_its_window_a_new_release_is_built_ahead_and_switched_without_a_build(state_repo, agent_root):
    port = free_port()
    now = datetime.now(UTC)
    start = (now + timedelta(hours=12)).strftime("%H:%M")
    end = (now + timedelta(hours=12, minutes=5)).strftime("%H:%M")
    window = ("rollout:\n  windows:\n    - {days: [mon, tue, wed, thu, fri, sat, sun], "
              f'start: "{start}", end: "{end}", timezone: Asia/Tokyo}}\n')
    state_repo.app(services={"demo-web": {"port": port}}, extra=window)
    state_repo.commit("v1")
    args = ["--repo", state_repo.url, "--host", "h1", "--root", str(agent_root), "--health-wait", "15"]
    run_agent("once", *args, "--ignore-windows", check=True)          # the first deploy, by hand
    assert served_version(port) == "1.0.0"

    state_repo.app(services={"demo-web": {"port": port}}, version="2.0.0", extra=window)
    state_repo.commit("v2")
    once = run_agent("once", *args, "--json")
    assert once.returncode == 2, once.stdout + once.stderr
    data = json.loads(once.stdout)
    kinds = {o["action"]: o["result"] for o in data["outcomes"]}
    assert kinds == {"build_venv": "ok"}, data["outcomes"]            # built ahead, nothing else
    assert {h["cause"] for h in data["held"]} == {"window"}
    assert served_version(port) == "1.0.0"
    plan = run_agent("plan", *args)
    assert plan.returncode == 2 and "waiting for window (opens " in plan.stdout, plan.stdout

    once = run_agent("once", *args, "--ignore-windows", "--json")     # the window "opens": a switch
    assert once.returncode == 0, once.stdout + once.stderr
    actions = [o["action"] for o in json.loads(once.stdout)["outcomes"]]
    assert "build_venv" not in actions and "switch_venv" in actions, actions
    assert served_version(port) == "2.0.0"


def test_a_bad_zone_is_reported_with_file_and_line(state_repo, tmp_path):
    state_repo.app(extra='rollout:\n  windows:\n    - {days: [mon], start: "02:00", end: "04:00", timezone: Mars/Olympus}\n')
    out = run_agent("validate", str(state_repo.path))
    assert out.returncode == 1 and "apps/demo/app.yaml:" in out.stdout and "IANA" in out.stdout, out.stdout


def test_window_metric():
    from types import SimpleNamespace

    from agent.core.outcome import ReconcileResult
    from agent.service.metrics import Recorder

    rec = Recorder()
    rec.observe(SimpleNamespace(result=ReconcileResult.DRIFT, seconds=0.1, source_failed=False, revision=None,
                                outcomes=(), plan=None, facts=None, error=None, new_commit=False,
                                windows={"shop": False, "web": True}))
    text = rec.exposition().decode()
    assert 'gitops_agent_window_open{app="shop"} 0.0' in text and 'gitops_agent_window_open{app="web"} 1.0' in text


def _closed_window() -> str:
    """A window that opened 12 hours ago for 5 minutes: closed now, whatever the time of day."""
    now = datetime.now(UTC)
    start = (now + timedelta(hours=12)).strftime("%H:%M")
    end = (now + timedelta(hours=12, minutes=5)).strftime("%H:%M")
    return ("rollout:\n  windows:\n    - {days: [mon, tue, wed, thu, fri, sat, sun], "
            f'start: "{start}", end: "{end}", timezone: UTC}}\n')


def _apps(repo, ports, version_a: str, version_b: str, window: str) -> None:
    """App a (with the window) and app b (without), one service each."""
    repo.app(name="a", env="a", services={"a-web": {"port": ports[0]}}, version=version_a, extra=window)
    app_a = (repo.path / "apps/a/app.yaml").read_text()
    repo.app(name="b", env="b", services={"b-web": {"port": ports[1]}}, version=version_b)
    repo.write("apps/a/app.yaml", app_a)


def test_outside_its_window_the_deployed_revision_is_healed_while_the_new_one_waits(state_repo, agent_root):
    """DESIGN §3b: "drift of what is already deployed is still healed". A service stopped by hand and its
    program file edited by hand come back on the revision the app last applied (its old venv and config),
    while the new revision's venv is built ahead and the rest of it waits; an app without a window moves on."""
    from agent.drivers.supervisor import EmbeddedSupervisor

    ports = (free_port(), free_port())
    window = _closed_window()
    _apps(state_repo, ports, "1.0.0", "1.0.0", window)
    v1 = state_repo.commit("v1")
    args = ["--repo", state_repo.url, "--host", "h1", "--root", str(agent_root), "--health-wait", "15"]
    run_agent("once", *args, "--ignore-windows", check=True)
    conf = agent_root / "supervisor" / "programs" / "a-web.conf"
    deployed_conf = conf.read_text()
    assert served_version(ports[0]) == served_version(ports[1]) == "1.0.0"

    _apps(state_repo, ports, "2.0.0", "2.0.0", window)
    v2 = state_repo.commit("v2")
    once = run_agent("once", *args, "--json")               # a's new venv built ahead; b moves on
    assert once.returncode == 2, once.stdout + once.stderr
    data = json.loads(once.stdout)
    assert {h["cause"] for h in data["held"]} == {"window"} and {h["app"] for h in data["held"]} == {"a"}
    assert served_version(ports[0]) == "1.0.0" and served_version(ports[1]) == "2.0.0"
    assert conf.read_text() == deployed_conf

    # drift of what a runs, by hand: stopped, and its program file edited
    EmbeddedSupervisor(agent_root).client().stop("a-web")
    conf.write_text(deployed_conf.replace("startsecs=1", "startsecs=3"))
    assert served_version(ports[0]) is None
    once = run_agent("once", *args, "--json")
    assert once.returncode == 2, once.stdout + once.stderr
    data = json.loads(once.stdout)
    done = {(o["action"], o["key"]): o["result"] for o in data["outcomes"]}
    assert done.get(("write_program", "program:a-web")) == "ok", data["outcomes"]
    assert "build_venv" not in {a for a, _ in done}, data["outcomes"]       # built once, ahead, not again
    assert served_version(ports[0]) == "1.0.0"                                # healed onto the deployed revision
    assert conf.read_text() == deployed_conf
    assert {h["cause"] for h in data["held"]} == {"window"}                   # the new revision still waits
    deployed = json.loads((agent_root / "state" / "status.json").read_text())["deployed"]
    assert deployed == {"a": v1, "b": v2}, deployed                         # what each app runs, per app
    plan = run_agent("plan", *args)
    assert plan.returncode == 2 and "waiting for window (opens " in plan.stdout, plan.stdout
    assert "a-web" in plan.stdout

    # nothing to heal: the next poll applies nothing and still waits
    once = run_agent("once", *args, "--json")
    assert once.returncode == 2 and json.loads(once.stdout)["outcomes"] == [], once.stdout

    once = run_agent("once", *args, "--ignore-windows", "--json")     # the window opens: a switch, no build
    assert once.returncode == 0, once.stdout + once.stderr
    actions = [o["action"] for o in json.loads(once.stdout)["outcomes"]]
    assert "build_venv" not in actions and "switch_venv" in actions, actions
    assert served_version(ports[0]) == "2.0.0"


def test_outside_its_window_a_weight_change_waits_and_a_hand_changed_weight_is_healed_to_the_deployed_one(
        state_repo, agent_root):
    """The load balancer: a commit that re-weights an app outside its window waits (plan says so, exit 2), and a
    weight changed by hand meanwhile comes back to the deployed split, not to the new one."""
    import shutil

    from agent.drivers.haproxy import HAProxyRuntime
    from test_traffic_e2e import args as lb_args
    from test_traffic_e2e import split, two_colour_app

    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    listen = free_port()
    two_colour_app(state_repo, listen, "  strategy: canary\n  weights: {web-blue: 100, web-green: 0}\n")
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text() + _closed_window())
    state_repo.commit("all blue")
    args = lb_args(state_repo, agent_root, "haproxy")
    run_agent("once", *args, "--ignore-windows", check=True)
    assert split(listen, 20) == {"1.0.0": 20}

    app.write_text(app.read_text().replace("web-blue: 100, web-green: 0", "web-blue: 0, web-green: 100"))
    state_repo.commit("all green")
    once = run_agent("once", *args, "--json")
    assert once.returncode == 2, once.stdout + once.stderr
    data = json.loads(once.stdout)
    assert data["outcomes"] == [] and {(h["key"], h["cause"]) for h in data["held"]} == {("traffic:lb", "window")}
    assert split(listen, 20) == {"1.0.0": 20}                     # not re-weighted outside the window

    HAProxyRuntime(agent_root / "lb" / "haproxy.sock").set_weight("demo", "web-green", 100)   # by hand: half green
    assert split(listen, 60)["2.0.0"] > 0
    once = run_agent("once", *args, "--json")
    assert once.returncode == 2, once.stdout + once.stderr
    assert "configure_traffic" in [o["action"] for o in json.loads(once.stdout)["outcomes"]]
    assert split(listen, 20) == {"1.0.0": 20}                     # healed to the deployed split
    plan = run_agent("plan", *args)
    assert plan.returncode == 2 and "waiting for window (opens " in plan.stdout, plan.stdout

    run_agent("once", *args, "--ignore-windows", check=True)      # the window opens
    assert split(listen, 20) == {"2.0.0": 20}
