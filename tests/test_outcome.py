"""agent.core.outcome: verdicts decided by error type, and the one drift computation, as tables."""

from __future__ import annotations

import json

import pytest

from agent.core.errors import BuildError, ConfigError, HealthCheckFailed, InvalidState, SourceError
from agent.core.facts import Facts, ProgramFact, VenvFact
from agent.core.outcome import Outcome, ReconcileResult, ResourceState, Verdict, resource_states, verdict_for
from agent.core.actions import BuildVenv, RemoveProgram, StartProgram, WriteProgram
from agent.core.plan import Plan


@pytest.mark.parametrize("verdict, word, ok, failed", [
    (Verdict.APPLIED, "ok", True, False),
    (Verdict.UNCHANGED, "ok", True, False),
    (Verdict.FAILED_PERMANENT, "failed", False, True),
    (Verdict.FAILED_TEMPORARY, "failed", False, True),
    (Verdict.ROLLED_BACK, "failed", False, True),
    (Verdict.SKIPPED_BLOCKED, "skipped", False, False),
])
def test_verdicts_keep_the_three_word_json_result(verdict, word, ok, failed):
    assert (verdict.word, verdict.ok, verdict.failed) == (word, ok, failed)


@pytest.mark.parametrize("exc, rolled_back, expected", [
    (InvalidState([]), False, Verdict.FAILED_PERMANENT),
    (ConfigError("x"), False, Verdict.FAILED_PERMANENT),
    (SourceError("x"), False, Verdict.FAILED_TEMPORARY),
    (BuildError("x"), False, Verdict.FAILED_TEMPORARY),
    (OSError("x"), False, Verdict.FAILED_TEMPORARY),
    (ValueError("a bug"), False, Verdict.FAILED_TEMPORARY),
    (HealthCheckFailed("x"), True, Verdict.ROLLED_BACK),
])
def test_the_error_type_decides_the_verdict(exc, rolled_back, expected):
    assert verdict_for(exc, rolled_back) is expected


def test_enum_values_read_as_plain_words_in_json_and_text():
    assert json.dumps({"r": ReconcileResult.CONVERGED}) == '{"r": "converged"}'
    assert f"{ReconcileResult.DRIFT}" == "drift" and str(Verdict.ROLLED_BACK) == "rolled_back"
    assert ReconcileResult.DRIFT.success and not ReconcileResult.INVALID.success


def _write(name: str) -> WriteProgram:
    return WriteProgram(key=f"program:{name}", reason="config differs", name=name, text="[program:x]\n")


def test_resource_states_ok_drift_failed_and_removed():
    facts = Facts("running", venvs={"blue": VenvFact("blue", "abc")},
                  programs={"web": ProgramFact("web", "x", "RUNNING"), "old": ProgramFact("old", "y", "RUNNING"),
                            "api": ProgramFact("api", "z", "RUNNING")})
    write_web, write_api = _write("web"), _write("api")
    start_api = StartProgram(key="program:api", reason="new", name="api")
    remove_old = RemoveProgram(key="program:old", reason="gone from the desired state", name="old")
    drifted = _write("worker")
    plan = Plan((write_web, write_api, start_api, remove_old, drifted))
    outcomes = (Outcome(write_web, Verdict.APPLIED, "written"), Outcome(write_api, Verdict.APPLIED, "written"),
                Outcome(start_api, Verdict.ROLLED_BACK, "spawn error (rolled back api)"),
                Outcome(remove_old, Verdict.APPLIED, "removed"))
    states = resource_states(facts, plan, outcomes, now=5.0)
    assert {k: v["state"] for k, v in states.items()} == {
        "venv:blue": "ok", "program:web": "ok", "program:api": "failed", "program:worker": "drift"}
    assert states["program:api"]["message"] == "spawn error (rolled back api)"
    assert states["program:worker"]["message"] == "config differs" and states["venv:blue"]["at"] == 5.0
    assert {k for k, v in states.items() if ResourceState(v["state"]).drifted} == {"program:api", "program:worker"}


def test_the_first_failure_of_a_resource_says_why():
    build = BuildVenv(key="venv:blue", reason="new lock", env=None)
    first = Outcome(build, Verdict.FAILED_TEMPORARY, "pip failed")
    second = Outcome(build, Verdict.SKIPPED_BLOCKED, "venv:blue failed")
    states = resource_states(Facts("running"), Plan((build,)), (first, second), now=1.0)
    assert states["venv:blue"] == {"state": "failed", "message": "pip failed", "at": 1.0}
