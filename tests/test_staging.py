"""Stager (agent/service/staging.py) in read-only mode, for `plan`: it reads the recorded wave decisions,
never writes `waves.json` and never asks Prometheus (DESIGN §6). A real state repo and GitSource."""

from __future__ import annotations

import json

import pytest

from agent.drivers.git import GitSource
from agent.core.load import LoadOptions, load_desired
from agent.core.waves import bucket
from agent.service.staging import Stager
from conftest import git

HOST = next(f"h{i}" for i in range(100) if bucket(f"h{i}") >= 50)     # in the second wave below
GATED = ('rollout:\n  waves:\n    - {percent: 50, after: 1m}\n'
         '    - {percent: 100, after: 10m, gate: {prometheus: "http://127.0.0.1:1", query: "up", expect: "== 1"}}\n')


def _fleet(repo) -> None:
    repo.write("fleet.yaml", f"apiVersion: gitops-agent/v1\nkind: Fleet\nhosts:\n  {HOST}: {{groups: [web]}}\n")


@pytest.fixture
def staged_change(state_repo, tmp_path):
    """demo 1.0.0, then a change to demo 2.0.0 rolled out in gated waves; yields (source, rev, desired, changed_at)."""
    state_repo.app(services={"demo-web": {"port": 18101}}, version="1.0.0", extra=GATED)
    _fleet(state_repo)
    state_repo.commit("demo 1.0.0")
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    state_repo.commit("demo 2.0.0")
    changed_at = float(git(state_repo.path, "log", "-1", "--format=%ct"))
    source = GitSource(state_repo.url, "main", tmp_path / "src")
    rev = source.resolve()
    desired = load_desired(source.checkout(rev), HOST)
    assert desired.environments["demo"].requirements == (("demoapp", "2.0.0"),)
    yield source, rev, desired, changed_at
    source.close()


def _stager(source, state_file, now, queries, read_only):
    def query(url, q, timeout):
        queries.append((url, q))
        return [1.0]

    return Stager(source, "", HOST, LoadOptions(), state_file, lambda r: source.checkout(r),
                  clock=lambda: now, query=query, read_only=read_only)


def test_read_only_never_queries_a_gate_nor_writes_the_state_file(staged_change, tmp_path):
    source, rev, desired, changed_at = staged_change
    state_file = tmp_path / "root" / "state" / "waves.json"
    queries: list = []
    staged = _stager(source, state_file, changed_at + 3600, queries, read_only=True).stage(rev, desired)
    assert queries == []
    assert not state_file.exists() and not state_file.parent.exists()
    assert staged.environments["demo"].requirements == (("demoapp", "1.0.0"),)    # what the host keeps meanwhile
    assert "not evaluated in plan" in staged.notes[-1]

    # the writing stager (once / run) asks the gate, decides and records
    writer = _stager(source, state_file, changed_at + 3600, queries, read_only=False)
    assert writer.stage(rev, desired).environments["demo"].requirements == (("demoapp", "2.0.0"),)
    assert queries == [("http://127.0.0.1:1", "up")]
    assert json.loads(state_file.read_text())["demo"]["state"] == "due"


def test_read_only_uses_the_recorded_decision_and_leaves_it_untouched(staged_change, tmp_path):
    source, rev, desired, changed_at = staged_change
    state_file = tmp_path / "waves.json"
    queries: list = []
    _stager(source, state_file, changed_at + 3600, queries, read_only=False).stage(rev, desired)
    before = (state_file.read_bytes(), state_file.stat().st_mtime_ns)
    queries.clear()
    staged = _stager(source, state_file, changed_at + 3600, queries, read_only=True).stage(rev, desired)
    assert staged.environments["demo"].requirements == (("demoapp", "2.0.0"),)    # due, as the agent decided
    assert queries == []
    assert (state_file.read_bytes(), state_file.stat().st_mtime_ns) == before


def test_read_only_timing_without_gates_is_decided_but_not_recorded(staged_change, tmp_path):
    source, rev, desired, changed_at = staged_change
    state_file = tmp_path / "waves.json"
    queries: list = []
    staged = _stager(source, state_file, changed_at + 10, queries, read_only=True).stage(rev, desired)
    assert staged.environments["demo"].requirements == (("demoapp", "1.0.0"),)
    assert "starts in" in staged.notes[-1] and "not evaluated" not in staged.notes[-1]
    assert queries == [] and not state_file.exists()
