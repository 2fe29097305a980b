"""The status report and what the status file keeps for it (agent.core.status_view): pure, no host needed."""

from __future__ import annotations

from types import SimpleNamespace as NS

from agent.core.outcome import Outcome, ReconcileResult, Verdict
from agent.core.status_view import events_of, human_age, report, with_since, MAX_EVENTS


def test_human_age():
    assert [human_age(s) for s in (None, 0, 59, 60, 3599, 3600, 90061)] == ["-", "0s", "59s", "1m", "59m", "1h00m", "1d1h"]


def test_drift_since_is_kept_while_drifted_and_dropped_when_ok():
    first = with_since({"program:a": {"state": "drift", "at": 10}}, {}, 10)
    assert first["program:a"]["since"] == 10
    later = with_since({"program:a": {"state": "failed", "at": 20}}, first, 20)
    assert later["program:a"]["since"] == 10
    healed = with_since({"program:a": {"state": "ok", "at": 30}}, later, 30)
    assert "since" not in healed["program:a"]


def _result(**kw):
    base = dict(result=ReconcileResult.CONVERGED, outcomes=(), plan=NS(actions=()), revision=None, error=None,
                new_commit=False)
    return NS(**{**base, **kw})


def test_events_drift_found_then_corrected_and_a_repeated_failure_once():
    prev = {"apps": {"web": {"services": {"a": {}}, "environments": ["e"]}}, "resources": {}}
    action = NS(key="program:a", reason="program file edited by hand", kind="write_program", describe=lambda: "write a")
    drift = events_of(prev, _result(result=ReconcileResult.DRIFT, plan=NS(actions=(action,))),
                      {"program:a": {"state": "drift"}}, None, 1.0)
    assert [(e["kind"], e["app"]) for e in drift] == [("drift", "web")]
    prev2 = {**prev, "resources": {"program:a": {"state": "drift"}}, "events": drift}
    fixed = events_of(prev2, _result(result=ReconcileResult.APPLIED, plan=NS(actions=(action,)),
                                     outcomes=(Outcome(action, Verdict.APPLIED),)),
                      {"program:a": {"state": "ok"}}, None, 2.0)
    assert [e["kind"] for e in fixed] == ["drift", "corrected"]
    err = _result(result=ReconcileResult.ERROR, error="source: cannot fetch\nmore")
    once = events_of({"events": fixed}, err, {}, None, 3.0)
    twice = events_of({"events": once}, err, {}, None, 4.0)
    assert once == twice and once[-1]["message"] == "source: cannot fetch"


def test_events_are_capped():
    events = [{"at": i, "kind": "error", "app": "", "message": str(i)} for i in range(MAX_EVENTS)]
    out = events_of({"events": events}, _result(result=ReconcileResult.ERROR, error="new"), {}, None, 99.0)
    assert len(out) == MAX_EVENTS and out[-1]["message"] == "new"


def test_report_groups_resources_by_app_with_split_and_canary():
    status = {
        "host": "h1", "result": "converged", "last_reconcile_at": 100.0,
        "applied": {"sha": "a" * 40, "ref": "main", "committed_at": 40.0, "summary": "release 2\n\nbody", "at": 90.0},
        "resources": {"program:blue": {"state": "ok", "message": "RUNNING", "at": 100.0},
                      "program:green": {"state": "drift", "message": "program is STOPPED", "at": 100.0, "since": 70.0},
                      "venv:blue": {"state": "ok", "message": "", "at": 100.0},
                      "program:gitops-lb-haproxy": {"state": "ok", "message": "RUNNING", "at": 100.0}},
        "apps": {"web": {"services": {"blue": {"environment": "blue", "port": 1}, "green": {"environment": "blue", "port": 2}},
                         "environments": ["blue"],
                         "traffic": {"listen": "127.0.0.1:8100", "strategy": "canary", "weights": {"blue": 95, "green": 5},
                                     "ab": None, "canary": {"service": "green", "steps": [5, 50, 100], "pause_s": 1}}}},
        "traffic": {"web": {"blue": 50, "green": 50}},
        "rollouts": {"web": {"id": "x", "step": 1, "since": 80.0, "probes": 10, "errors": 0, "state": "progressing",
                             "reason": ""}},
        "events": [{"at": 1, "kind": "applied", "app": "", "message": "old"}, {"at": 2, "kind": "drift", "app": "web", "message": "new"}],
    }
    r = report(status, 100.0, {"web": {"change": "b" * 40, "state": "due", "wave": 0, "reason": "started"}}, "9")
    assert r["applied"]["short"] == "a" * 12 and r["applied"]["subject"] == "release 2" and r["applied"]["age_s"] == 60
    assert r["drifted"] == 1 and r["last_reconcile_age_s"] == 0
    (app,) = r["apps"]
    assert [s["name"] for s in app["services"]] == ["blue", "green"]
    green = app["services"][1]
    assert green["state"] == "drift" and green["drift_age_s"] == 30
    assert app["frontend"]["url"] == "http://127.0.0.1:8100/" and app["frontend"]["live"]
    assert [(b["backend"], b["percent"]) for b in app["frontend"]["split"]] == [("blue", 50.0), ("green", 50.0)]
    assert app["canary"]["step"] == 2 and app["canary"]["percent"] == 50
    assert app["wave"]["wave"] == 1 and app["wave"]["change"] == "b" * 12
    assert r["resources"]["program:gitops-lb-haproxy"]["app"] == ""
    assert [e["message"] for e in r["events"]] == ["new", "old"]          # newest first


def test_report_ab_split_gives_the_variant_its_bucket_share():
    status = {"apps": {"w": {"services": {}, "environments": [], "traffic": {
        "listen": "127.0.0.1:1", "strategy": "ab", "weights": {"a": 1, "b": 0}, "ab": {"variant": "b", "percent": 30},
        "canary": None}}}}
    split = report(status, 0.0)["apps"][0]["frontend"]["split"]
    assert [(b["backend"], b["percent"]) for b in split] == [("a", 70.0), ("b", 30.0)]


def test_report_of_an_empty_status():
    r = report({}, 5.0)
    assert r["applied"] is None and r["apps"] == [] and r["events"] == [] and r["version"] == 1


def test_report_shows_suspension_quarantine_and_the_release_window():
    # outside a Saturday window and inside a Monday one
    now = 1795946400.0 + 86400      # Monday 2026-11-30 10:00 UTC (11:00 in Paris)
    apps = {name: {"services": {}, "environments": [], "traffic": None, "windows": windows}
            for name, windows in (("shop", [{"days": ["sat"], "start": "02:00", "end": "04:00", "timezone": "UTC"}]),
                                  ("web", [{"days": ["mon"], "start": "09:00", "end": "17:00", "timezone": "Europe/Paris"}]),
                                  ("calm", []))}
    control = {"suspended": {"shop": {"reason": "incident <b>42</b>", "at": now - 60}},
               "quarantined": {"web": {"sha": "c" * 40, "inputs": "x", "reason": "health gate failed", "at": now}}}
    r = report({"apps": apps}, now, control=control)
    by = {a["name"]: a for a in r["apps"]}
    assert by["shop"]["suspended"] == {"reason": "incident <b>42</b>", "at": now - 60, "host_wide": False}
    assert by["shop"]["window"]["open"] is False and by["shop"]["window"]["opens_at"] > now
    assert by["web"]["quarantined"] == {"revision": "c" * 12, "reason": "health gate failed", "at": now}
    assert by["web"]["window"] == {"open": True, "opens_at": None}
    assert by["calm"]["suspended"] is None and by["calm"]["window"] is None and r["host_suspended"] is None
    host_wide = report({"apps": apps}, now, control={"suspended": {"*": {"reason": "freeze", "at": now}}})
    assert all(a["suspended"]["host_wide"] for a in host_wide["apps"]) and host_wide["host_suspended"]["reason"] == "freeze"

    from agent.service.status_page import render_page

    page = render_page(r)
    assert 'data-suspended="app"' in page and "incident &lt;b&gt;42&lt;/b&gt;" in page and "<b>42" not in page
    assert 'data-quarantined="' + "c" * 12 + '"' in page and 'data-window="closed"' in page and 'data-window="open"' in page


def test_recorded_changes_nothing_it_is_given():
    """The reconciler hands `recorded` the status's own containers (Status.view, no copy): it must stay pure."""
    import copy

    from agent.core.status_view import recorded

    prev = {"apps": {"web": {"services": {"a": {}}, "environments": ["e"]}},
            "resources": {"program:a": {"state": "drift", "at": 1.0, "since": 1.0}, "venv:e": {"state": "ok", "at": 1.0}},
            "events": [{"at": 1.0, "kind": "drift", "app": "web", "message": "program:a: edited"}],
            "rollouts": {"web": {"state": "progressing", "step": 0, "id": "x"}}}
    before = copy.deepcopy(prev)
    action = NS(key="program:a", reason="edited", kind="write_program", describe=lambda: "write a")
    result = _result(result=ReconcileResult.APPLIED, plan=NS(actions=(action,)), facts=None, desired=None,
                     outcomes=(Outcome(action, Verdict.APPLIED),), rollouts={"web": {"state": "complete", "step": 1}},
                     resources={"program:a": {"state": "ok", "at": 2.0}, "venv:e": {"state": "drift", "at": 2.0}})
    out = recorded(prev, result, 2.0)
    assert prev == before
    assert out["resources"]["venv:e"]["since"] == 2.0 and [e["kind"] for e in out["events"]][-2:] == ["corrected", "canary"]
