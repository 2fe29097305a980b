"""The pure parts of two issue-14 fixes: an interrupted apply's rollback targets (agent.core.interrupted) and a
closed window's composition of what is deployed with what waits (agent.core.window_hold)."""

from __future__ import annotations

from types import SimpleNamespace

from agent.core.facts import Facts, ProgramFact, VenvFact, text_digest
from agent.core.interrupted import Pending, from_json, recorded, resumed, settled, still_pending, to_json
from agent.core.outcome import Outcome, Verdict
from agent.core.actions import CheckHealth, SwitchVenv, WriteProgram

NEW, OLD = "[program:web]\ncommand=new\n", "[program:web]\ncommand=old\n"


def _facts(text=NEW, verified=None, current="n2"):
    return Facts("running", venvs={"env": VenvFact("env", current, ("n2", "o1"))},
                 programs={"web": ProgramFact("web", text, "RUNNING", 10, verified=verified)})


def test_a_program_left_unverified_is_resumed_with_the_config_from_before_as_its_rollback_target():
    journal = {"web": Pending(text_digest(NEW), OLD, True, ("env", "o1"))}
    assert still_pending(journal, _facts()) == journal
    assert still_pending(journal, _facts(verified=text_digest(NEW))) == {}      # its gate passed since
    assert still_pending(journal, _facts(text=OLD)) == {}                       # rewritten since
    gate = CheckHealth("program:web", "never passed its gate", ("venv:env", "supervisor"), name="web", url="http://x")
    todo = resumed((gate,), journal, _facts())
    switch, write, again = todo
    assert isinstance(switch, SwitchVenv) and (switch.identity, switch.previous) == ("n2", "o1")
    assert isinstance(write, WriteProgram) and write.text == NEW and write.previous == OLD and write.needs == gate.needs
    assert again is gate
    # a planned rewrite (a fix committed meanwhile) rolls back to the config from before, not the unverified one
    fix = WriteProgram("program:web", "differs", ("venv:env",), name="web", text="fixed", previous=NEW, existed=True)
    assert resumed((fix,), journal, _facts())[0].previous == OLD


def test_the_record_follows_the_apply_and_survives_json():
    switch = SwitchVenv("venv:env", "r", name="env", identity="n2", previous="o1")
    write = WriteProgram("program:web", "r", ("venv:env", "supervisor"), name="web", text=NEW, previous=OLD, existed=True)
    journal = recorded((switch, write), {})
    assert journal == {"web": Pending(text_digest(NEW), OLD, True, ("env", "o1"))}
    assert from_json(to_json(journal)) == journal
    blocked = Outcome(write, Verdict.SKIPPED_BLOCKED)
    assert settled(journal, (blocked,)) == journal                  # never ran: still recorded
    assert settled(journal, (Outcome(write, Verdict.APPLIED),)) == {}


def test_only_apps_whose_new_version_differs_wait_for_their_window():
    from agent.core.model import App, DesiredState
    from agent.core.window_hold import compose, waiting_apps

    a1, b1 = App("a", None, (), ()), App("b", None, (), ())
    a2 = App("a", "enforce", (), ())
    new = DesiredState.of("h1", (a2, b1))
    closed = {"a": "waiting for window (opens x)", "b": "waiting for window (opens y)"}
    waiting = waiting_apps(new, {"a": a1, "b": b1}, closed)
    assert waiting == {"a": closed["a"]}                            # b is unchanged: nothing to wait for
    target = compose(new, {"a": a1, "b": b1}, waiting)
    assert target.app_of("a") is a1 and target.app_of("b") is b1
    assert any(n.startswith("app a: its new revision waiting for window") for n in target.notes)
    # an app that never ran here waits whole: it is left out until its window opens
    assert compose(new, {"a": None}, {"a": "w"}).app_of("a") is None


def test_a_suspension_is_announced_once_even_with_nothing_to_do():
    from agent.core.control import Control, Suspension
    from agent.core.events import events_for
    from agent.core.outcome import ReconcileResult

    result = SimpleNamespace(result=ReconcileResult.CONVERGED, outcomes=(), new_commit=False, error=None, held=(),
                             drift=(), rollouts={}, owners={}, apps=("shop",),
                             control=Control({"*": Suspension("incident 9", 5.0)}),
                             revision=SimpleNamespace(sha="a" * 40, summary="s"))
    events, memory = events_for(result, "h1", {})
    assert [(e.kind, e.app) for e in events] == [("suspended", "*")] and "incident 9" in events[0].body
    assert events_for(result, "h1", memory)[0] == []                # not on every poll
    lifted = SimpleNamespace(**{**vars(result), "control": Control()})
    assert events_for(lifted, "h1", memory) == ([], {})             # resumed: forgotten, nothing sent


def test_a_host_wide_action_only_the_new_revision_needs_waits_with_the_app():
    from agent.core.model import App, DesiredState
    from agent.core.actions import ConfigureTraffic, EnsureSupervisor
    from agent.core.window_hold import split

    a = App("a", None, (), ())
    new = DesiredState.of("h1", (a,))
    both = EnsureSupervisor("supervisor", "stopped")
    heal_lb = ConfigureTraffic("traffic:lb", "old weights", frontends=("old",))
    new_lb = ConfigureTraffic("traffic:lb", "new weights", frontends=("new",))
    parts = split((both, heal_lb), (both, new_lb), new, new, {"a": "waiting for window (opens x)"})
    assert parts.heal == (both, heal_lb) and parts.ahead == ()
    assert [(h.action, h.app, h.cause) for h in parts.waiting] == [(new_lb, "a", "window")]


def test_drift_healed_outside_a_window_is_announced_as_corrected():
    from agent.core.control import Held
    from agent.core.events import events_for
    from agent.core.outcome import ReconcileResult
    from agent.core.actions import Action

    start = Action("program:a-web", "stopped")
    build = type("BuildVenv", (Action,), {})("venv:a", "ahead")
    waiting = Held(Action("program:a-web", "new config"), "a", "window", "app a: waiting for window (opens x)")
    result = SimpleNamespace(result=ReconcileResult.DRIFT, outcomes=(Outcome(start, Verdict.APPLIED),
                                                                     Outcome(build, Verdict.APPLIED)),
                             new_commit=True, error=None, held=(waiting,), drift=(waiting.action,), rollouts={},
                             owners={}, apps=("a",), control=None, revision=SimpleNamespace(sha="b" * 40, summary="s"))
    events, _memory = events_for(result, "h1", {})
    assert sorted(e.kind for e in events) == ["drift corrected", "window waiting"]
    assert next(e for e in events if e.kind == "drift corrected").reason == "healed program:a-web"
