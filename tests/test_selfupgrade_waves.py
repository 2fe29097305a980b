"""The agent's own upgrade takes part in staged waves like an app's change (fleet.yaml `agent.rollout.waves`):
the schema and the loader check the block as they check an app's waves; with a real state repo and
GitSource, a host in a later wave keeps the agent it runs (no venv built, `phase: waiting` with the reason)
while a first-wave host goes ahead, and the late host goes ahead once its wave has started. The daemon test
with two real agents is tests/test_selfupgrade.py::test_agent_upgrade_follows_the_waves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.core.errors import InvalidState
from agent.core.layout import Layout
from agent.core.load import load_desired, validate_tree
from agent.drivers.git import GitSource
from agent.service.selfupgrade import WAVE_KEY, SelfUpgrade, agent_lock
from agent.service.staging import Stager
from agent.settings import Settings
from conftest import git
from wheelfactory import lock_line, make_http_app_wheel

WAVES = ("  rollout:\n    waves:\n      - hosts: {groups: [canary]}\n      - {percent: 100, after: 1h}\n")
FLEET = ("apiVersion: gitops-agent/v1\nkind: Fleet\nhosts:\n  early: {groups: [canary]}\n  late: {}\n"
         "agent:\n  lockfile: agent.lock\n  find_links: [wheelhouse]\n  index: false\n")


def test_the_fleet_schema_copies_the_app_schemas_wave_definitions():
    app = json.loads(Path("schemas/app.schema.json").read_text())
    fleet = json.loads(Path("schemas/fleet.schema.json").read_text())
    for name in ("wave", "gate", "duration", "selector", "labelExpression", "identifier", "hostname"):
        assert fleet["$defs"][name] == app["$defs"][name], name


def _tree(tmp_path: Path, waves: str) -> Path:
    state = tmp_path / "state"
    state.mkdir(parents=True)
    (state / "fleet.yaml").write_text(FLEET + waves)
    (state / "agent.lock").write_text(lock_line(make_http_app_wheel(state / "wheelhouse", "gitops-agent", "9.9.9")) + "\n")
    return state


def test_agent_waves_are_validated_like_an_apps(tmp_path):
    assert validate_tree(_tree(tmp_path / "ok", WAVES)) == []
    bad = _tree(tmp_path / "bad", WAVES.replace("percent: 100", "percent: 50"))
    problems = validate_tree(bad)
    assert [(p.file, p.field) for p in problems] == [("fleet.yaml", "agent.rollout.waves.1")], problems
    assert problems[0].line == 13
    assert "the last wave must have percent: 100" in problems[0].message
    with pytest.raises(InvalidState, match="percent: 100"):
        load_desired(bad, "late")
    unknown = _tree(tmp_path / "unknown", WAVES.replace("after: 1h", "after: 1h, wait: 3"))
    assert "unknown field 'wait'" in str(validate_tree(unknown))


def test_each_host_finds_its_own_wave_of_the_agent_lock(tmp_path):
    state = _tree(tmp_path, WAVES)
    early = agent_lock(state, state, "3.11", "pip", "early")
    late = agent_lock(state, state, "3.11", "pip", "late")
    assert early.path == "agent.lock" and early.identity == late.identity
    assert [w.selected for w in early.rollout.waves] == [True, False]
    assert [w.selected for w in late.rollout.waves] == [False, False] and late.rollout.waves[1].after_s == 3600
    assert agent_lock(_tree(tmp_path / "plain", ""), tmp_path / "plain", "3.11", "pip", "late").rollout is None


@pytest.fixture
def repo_with_agent_lock(state_repo, tmp_path):
    """A real state repo whose newest commit changes agent.lock (a gitops-agent 9.9.9 that is not an agent:
    its build or check fails, which is how a host that went ahead shows it)."""
    state_repo.write("fleet.yaml", FLEET + WAVES)
    make_http_app_wheel(state_repo.path / "wheelhouse", "gitops-agent", "9.9.9")
    state_repo.commit("fleet")
    state_repo.write("agent.lock", lock_line(make_http_app_wheel(state_repo.path / "wheelhouse", "gitops-agent",
                                                                  "9.9.9")) + "\n")
    sha = state_repo.commit("agent 9.9.9")
    changed_at = float(git(state_repo.path, "log", "-1", "--format=%ct"))
    source = GitSource(state_repo.url, "main", tmp_path / "src")
    rev = source.resolve()
    assert rev.sha == sha
    yield source, rev, changed_at
    source.close()


def _upgrade(tmp_path: Path, host: str, source, now: float) -> SelfUpgrade:
    layout = Layout(tmp_path / host)
    stager = Stager(source, "", host, None, layout.state / "waves.json", None, clock=lambda: now)
    return SelfUpgrade(Settings(root=layout.root, host=host), layout, waves=stager)


def test_a_late_wave_host_keeps_its_agent_until_its_wave_starts(repo_with_agent_lock, tmp_path):
    source, rev, changed_at = repo_with_agent_lock
    checkout = source.checkout(rev)

    late = _upgrade(tmp_path, "late", source, changed_at + 600)
    assert late.after_reconcile(checkout, checkout, rev.sha) is None
    record = json.loads((tmp_path / "late" / "state" / "agent-upgrade.json").read_text())
    assert record["phase"] == "waiting" and record["to"] == "9.9.9" and record["wave"] == 2
    assert "wave 2 (bucket" in record["reason"] and "starts in 50m00s" in record["reason"]
    assert not (tmp_path / "late" / "self").exists()                # nothing built
    waves = json.loads((tmp_path / "late" / "state" / "waves.json").read_text())
    assert WAVE_KEY not in waves                                    # "waiting" is not recorded, as for apps

    early = _upgrade(tmp_path, "early", source, changed_at + 600)
    assert early.after_reconcile(checkout, checkout, rev.sha) is None
    record = json.loads((tmp_path / "early" / "state" / "agent-upgrade.json").read_text())
    assert record["phase"] == "failed" and record["to"] == "9.9.9"  # it went ahead (and this lock is no agent)
    assert json.loads((tmp_path / "early" / "state" / "waves.json").read_text())[WAVE_KEY]["state"] == "due"

    late = _upgrade(tmp_path, "late", source, changed_at + 3601)     # its turn
    assert late.after_reconcile(checkout, checkout, rev.sha) is None
    record = json.loads((tmp_path / "late" / "state" / "agent-upgrade.json").read_text())
    assert record["phase"] == "failed" and record["to"] == "9.9.9"
    assert json.loads((tmp_path / "late" / "state" / "waves.json").read_text())[WAVE_KEY]["state"] == "due"
