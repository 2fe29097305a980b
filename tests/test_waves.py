"""Staged waves: the pure decisions (agent/waves.py) as tables, and the Git-history side (agent/staging.py)
against a real repo: the previous revision of an app is what a host keeps until its wave is due."""

from __future__ import annotations

import collections

import pytest

from agent.drivers.git import GitSource
from agent.core.load import LoadOptions, load_desired
from agent.core.model import Gate, Rollout, Wave
from agent.service.staging import Stager
from agent.core.waves import bucket, decide, gate_verdict, timing, wave_of

GATE = Gate("http://p", "q", "<", 0.05, "pause")
ROLL = Rollout((Wave(selected=False), Wave(percent=25, after_s=600, gate=GATE), Wave(percent=100, after_s=1800)))


def test_bucket_is_stable_and_spread():
    assert (bucket("web-1"), bucket("web-2")) == (23, 33)          # pinned: a release must never reshuffle hosts
    counts = collections.Counter(bucket(f"h{i}") // 10 for i in range(5000))
    assert all(400 <= c <= 600 for c in counts.values()), counts      # ~uniform over 10 deciles
    assert sum(1 for i in range(5000) if bucket(f"h{i}") < 25) in range(1100, 1400)


def test_wave_of_first_match_wins():
    canary = Rollout((Wave(selected=True),) + ROLL.waves[1:])
    host = next(h for h in (f"h{i}" for i in range(100)) if bucket(h) < 25)
    late = next(h for h in (f"h{i}" for i in range(100)) if bucket(h) >= 25)
    assert wave_of(canary, late) == 0 and wave_of(ROLL, host) == 1 and wave_of(ROLL, late) == 2


@pytest.mark.parametrize("age,verdicts,want", [
    (0, {}, ("waiting", False)),                              # wave 2 starts at 10m
    (599, {}, ("waiting", False)),
    (600, {1: ("pass", "")}, ("due", True)),
    (600, {1: ("fail", "bad")}, ("failed", False)),
    (600, {1: ("pause", "no data")}, ("paused", False)),
    (600, {}, ("paused", False)),                             # gate not checked yet
])
def test_decide_for_a_wave_two_host(age, verdicts, want):
    host = next(h for h in (f"h{i}" for i in range(100)) if bucket(h) < 25)
    d = decide(ROLL, host, 1000.0, 1000.0 + age, verdicts)
    assert (d.state, d.due) == want and d.wave == 1


def test_a_later_wave_needs_the_earlier_gates():
    late = next(h for h in (f"h{i}" for i in range(100)) if bucket(h) >= 25)
    assert timing(ROLL, late, 0, 1799).state == "waiting"
    t = timing(ROLL, late, 0, 1800)
    assert (t.state, t.gates) == ("gating", (1,))
    assert decide(ROLL, late, 0, 1800, {1: ("fail", "x")}).state == "failed"
    assert decide(ROLL, late, 0, 1800, {1: ("pass", "x")}).due


@pytest.mark.parametrize("samples,policy,want", [
    ([0.01, 0.02], "pause", "pass"), ([0.01, 0.2], "pause", "fail"), ([], "pause", "pause"), ([], "fail", "fail"),
    ([], "pass", "pass"), (None, "pass", "pause"),             # Prometheus down is never a pass
])
def test_gate_verdicts(samples, policy, want):
    gate = Gate("http://p", "q", "<", 0.05, policy)
    assert gate_verdict(gate, samples)[0] == want


def test_stager_keeps_the_previous_revision_until_due(state_repo, tmp_path):
    from conftest import git

    state_repo.app(services={"demo-web": {"port": 18001}}, version="1.0.0",
                   extra="rollout:\n  waves:\n    - {percent: 100, after: 1h}\n")
    first = state_repo.commit("demo 1.0.0")
    state_repo.write("other.txt", "unrelated\n")
    state_repo.commit("unrelated")
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    change = state_repo.commit("demo 2.0.0")
    changed_at = float(git(state_repo.path, "log", "-1", "--format=%ct"))
    source = GitSource(state_repo.url, "main", tmp_path / "src")
    rev = source.resolve()
    now = [changed_at + 10]
    stager = Stager(source, "", "h1", LoadOptions(), tmp_path / "waves.json",
                    lambda r: source.checkout(r), clock=lambda: now[0], query=lambda *a: [0.0])
    desired = load_desired(source.checkout(rev), "h1")
    assert desired.environments["demo"].requirements == (("demoapp", "2.0.0"),)
    staged = stager.stage(rev, desired)
    assert staged.environments["demo"].requirements == (("demoapp", "1.0.0"),)      # the previous revision
    assert f"change {change[:12]} not due" in staged.notes[-1] and first[:12] in staged.notes[-1]
    assert stager.due == {"demo": False}
    now[0] = changed_at + 3600
    assert stager.stage(rev, desired).environments["demo"].requirements == (("demoapp", "2.0.0"),)
    now[0] = changed_at                                       # once due, stays due (recorded)
    assert stager.stage(rev, desired).environments["demo"].requirements == (("demoapp", "2.0.0"),)
    source.close()


def test_a_new_app_is_absent_until_due(state_repo, tmp_path):
    state_repo.app(services={"demo-web": {"port": 18002}}, extra="rollout:\n  waves:\n    - {percent: 100, after: 1h}\n")
    state_repo.commit("new app")
    source = GitSource(state_repo.url, "main", tmp_path / "src")
    rev = source.resolve()
    stager = Stager(source, "", "h1", LoadOptions(), tmp_path / "waves.json", lambda r: source.checkout(r))
    staged = stager.stage(rev, load_desired(source.checkout(rev), "h1"))
    assert staged.apps == () and "not deployed until then" in staged.notes[-1]
    source.close()


def test_apps_at_mixed_wave_revisions_may_not_share_a_port():
    from agent.core.errors import InvalidState
    from agent.core.model import App, Service
    from agent.service.staging import _check_mixed

    def app(name, port):
        return App(name, None, (), (Service(name, f"{name}-web", "e", ("x",), port=port),))

    _check_mixed([app("a", 8001), app("b", 8002)])
    with pytest.raises(InvalidState, match="port 8001 is also held by app 'a'"):
        _check_mixed([app("a", 8001), app("b", 8001)])
