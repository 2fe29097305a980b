"""agent/core/rollout.py: the pure traffic decisions (canary walk, blue-green, weighted, A/B), as tables of
cases plus Hypothesis properties. Time is an argument here: no clock, no sleeps."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.core.model import App, Canary, DesiredState, Gate, Service, Traffic
from agent.core.render.lb import ABSplit, Backend, Frontend
from agent.core.rollout import (
    CanaryProgress, canary_percent, canary_step, effective_weights, frontends_of, with_canary,
)

CANARY = Canary("green", steps=(5, 25, 50, 100), pause_s=30.0, max_error_rate=0.1, probes=10)
ID = "c0ffee0000000001"
T0 = 1_000.0


def _at(step: int, since: float = T0, probes: int = 0, errors: int = 0, state: str = "progressing",
        id: str = ID) -> CanaryProgress:
    return CanaryProgress(id, step, since, probes, errors, state)


# --- canary_step: one reconcile's decision ---------------------------------------------------------------

STEP_CASES = [
    # (previous, canary id now, now, probe (probes, errors) or None) -> (state, step, since, probes, errors)
    pytest.param(None, ID, T0, None, ("progressing", 0, T0, 0, 0), id="first-sight-starts-at-step-0"),
    pytest.param(None, ID, T0, (10, 10), ("progressing", 0, T0, 0, 0), id="first-sight-ignores-probe"),
    pytest.param(_at(2, probes=7), "another-id", T0 + 99, (10, 0), ("progressing", 0, T0 + 99, 0, 0),
                 id="changed-id-restarts-from-step-0"),
    pytest.param(_at(1, state="failed"), "another-id", T0 + 5, None, ("progressing", 0, T0 + 5, 0, 0),
                 id="changed-id-retries-a-failed-canary"),
    pytest.param(_at(3, state="complete"), "another-id", T0 + 5, None, ("progressing", 0, T0 + 5, 0, 0),
                 id="changed-id-restarts-a-complete-canary"),
    pytest.param(_at(0), ID, T0 + 10, (10, 0), ("progressing", 0, T0, 10, 0), id="holds-while-pause-not-over"),
    pytest.param(_at(1, probes=10), ID, T0 + 29.999, (10, 1), ("progressing", 1, T0, 20, 1),
                 id="holds-just-before-pause-accumulating-evidence"),
    pytest.param(_at(0), ID, T0 + 30, (10, 0), ("progressing", 1, T0 + 30, 0, 0),
                 id="advances-exactly-at-pause"),
    pytest.param(_at(1, probes=10, errors=1), ID, T0 + 100, (10, 0), ("progressing", 2, T0 + 100, 0, 0),
                 id="advances-resetting-evidence"),
    pytest.param(_at(0, probes=10), ID, T0 + 60, None, ("progressing", 1, T0 + 60, 0, 0),
                 id="advances-on-evidence-from-earlier-in-the-step"),
    pytest.param(_at(0), ID, T0 + 3600, None, ("progressing", 0, T0, 0, 0),
                 id="holds-without-any-evidence-however-long"),
    pytest.param(_at(0), ID, T0 + 3600, (0, 0), ("progressing", 0, T0, 0, 0),
                 id="holds-on-an-empty-probe"),
    pytest.param(_at(0), ID, T0 + 31, (10, 1), ("progressing", 1, T0 + 31, 0, 0),
                 id="error-ratio-at-the-limit-passes"),
    pytest.param(_at(1), ID, T0 + 5, (10, 2), ("failed", 1, T0, 10, 2), id="aborts-above-limit-before-pause"),
    pytest.param(_at(1), ID, T0 + 500, (10, 2), ("failed", 1, T0, 10, 2), id="aborts-above-limit-after-pause"),
    pytest.param(_at(2, probes=10, errors=1), ID, T0 + 5, (10, 2), ("failed", 2, T0, 20, 3),
                 id="aborts-on-accumulated-errors"),
    pytest.param(_at(3), ID, T0 + 10, (10, 0), ("progressing", 3, T0, 10, 0), id="last-step-holds-during-pause"),
    pytest.param(_at(3, probes=10), ID, T0 + 30, (10, 0), ("complete", 3, T0, 20, 0),
                 id="last-step-promotes-to-complete"),
    pytest.param(_at(3), ID, T0 + 30, (10, 5), ("failed", 3, T0, 10, 5), id="last-step-can-still-abort"),
    pytest.param(_at(2, state="failed", probes=10, errors=9), ID, T0 + 999, (10, 0),
                 ("failed", 2, T0, 10, 9), id="failed-stays-failed-for-the-same-id"),
    pytest.param(_at(3, state="complete", probes=20), ID, T0 + 999, (10, 10),
                 ("complete", 3, T0, 20, 0), id="complete-stays-complete-for-the-same-id"),
]


@pytest.mark.parametrize("previous, canary_id, now, probe, expected", STEP_CASES)
def test_canary_step(previous, canary_id, now, probe, expected):
    got = canary_step(CANARY, previous, canary_id, now, probe)
    assert (got.state, got.step, got.since, got.probes, got.errors) == expected
    assert got.id == canary_id


def test_an_abort_says_which_step_why_and_that_traffic_went_to_zero():
    got = canary_step(CANARY, _at(1), ID, T0 + 5, (10, 3))
    assert got.state == "failed"
    assert got.reason == "step 2 (25%): error rate 3/10 above 0.1; aborted to 0%"
    assert canary_percent(CANARY, got) == 0


def test_promotion_says_so_and_gives_the_canary_everything():
    got = canary_step(CANARY, _at(3, probes=10), ID, T0 + 30, None)
    assert (got.state, got.reason) == ("complete", "all steps passed")
    assert canary_percent(CANARY, got) == 100


def test_a_terminal_progress_is_returned_as_it_is():
    for state in ("failed", "complete"):
        progress = replace(_at(2, probes=3, errors=1, state=state), reason="why")
        assert canary_step(CANARY, progress, ID, T0 + 10_000, (10, 0)) is progress


def test_an_abort_on_a_progress_past_the_last_step_does_not_raise():
    shortened = replace(CANARY, steps=(50, 100))
    got = canary_step(shortened, _at(2), ID, T0 + 5, (10, 5))
    assert got.state == "failed" and canary_percent(shortened, got) == 0


# --- canary_percent -------------------------------------------------------------------------------------

@pytest.mark.parametrize("progress, percent", [
    pytest.param(_at(0), 5, id="step-0"),
    pytest.param(_at(1), 25, id="step-1"),
    pytest.param(_at(2), 50, id="step-2"),
    pytest.param(_at(3), 100, id="last-step"),
    pytest.param(_at(9), 100, id="past-the-steps-clamps-to-the-last"),
    pytest.param(_at(2, state="failed"), 0, id="failed-is-zero"),
    pytest.param(_at(0, state="complete"), 100, id="complete-is-all"),
])
def test_canary_percent(progress, percent):
    assert canary_percent(CANARY, progress) == percent


# --- with_canary: the traffic block at the canary's percent --------------------------------------------

def _canary_traffic(weights: dict[str, int], service: str = "green") -> Traffic:
    return Traffic("127.0.0.1:8100", "canary", tuple(sorted(weights.items())),
                   canary=replace(CANARY, service=service))


@pytest.mark.parametrize("weights, percent, expected", [
    pytest.param({"blue": 90, "green": 10}, 5, {"blue": 95, "green": 5}, id="two-services"),
    pytest.param({"blue": 90, "green": 10}, 0, {"blue": 100, "green": 0}, id="aborted-to-zero"),
    pytest.param({"blue": 90, "green": 10}, 100, {"blue": 0, "green": 100}, id="promoted"),
    pytest.param({"a": 60, "b": 30, "green": 10}, 25, {"a": 50, "b": 25, "green": 25},
                 id="stable-side-shares-by-weight"),
    pytest.param({"a": 0, "b": 0, "green": 100}, 50, {"a": 25, "b": 25, "green": 50},
                 id="stable-weights-all-zero-share-equally"),
    pytest.param({"a": 3, "b": 0, "green": 1}, 40, {"a": 60, "b": 0, "green": 40},
                 id="a-zero-stable-weight-stays-zero"),
    pytest.param({"a": 1, "b": 1, "green": 1}, 99, {"a": 1, "b": 0, "green": 99},
                 id="rounding-never-starves-the-stable-side"),
    pytest.param({"a": 1, "b": 2, "green": 1}, 99, {"a": 0, "b": 1, "green": 99},
                 id="the-rounding-unit-goes-to-the-heavier"),
])
def test_with_canary(weights, percent, expected):
    traffic = _canary_traffic(weights)
    got = with_canary(traffic, percent)
    assert dict(got.weights) == expected
    assert got.weights == tuple(sorted(got.weights))                      # kept sorted, like the loader's
    assert (got.listen, got.strategy, got.canary) == (traffic.listen, traffic.strategy, traffic.canary)


@pytest.mark.parametrize("percent", [5, 50], ids=["step-5", "step-50"])
def test_with_canary_weights_sum_to_100(percent):
    got = with_canary(_canary_traffic({"a": 1, "b": 1, "c": 1, "green": 1}), percent)
    assert sum(w for _, w in got.weights) == 100


_NAMES = st.sampled_from(["a", "b", "c", "d", "e"])


@settings(max_examples=300, deadline=None)
@given(stable=st.dictionaries(_NAMES, st.integers(0, 256), min_size=1, max_size=5),
       canary_weight=st.integers(0, 256), percent=st.integers(0, 100))
def test_with_canary_gives_the_canary_its_percent_and_the_stable_side_the_rest_by_weight(
        stable, canary_weight, percent):
    weights = {**stable, "green": canary_weight}
    got = dict(with_canary(_canary_traffic(weights), percent).weights)
    assert set(got) == set(weights)
    assert got["green"] == percent
    shares = {n: w for n, w in got.items() if n != "green"}
    rest = 100 - percent
    assert all(w >= 0 for w in shares.values())
    assert sum(shares.values()) == rest                            # largest remainder: nothing lost to rounding
    assert (sum(shares.values()) > 0) == (rest > 0)                # the stable side is never starved


@example(stable={"a": 0, "b": 3, "c": 3}, canary_weight=1, percent=99)
@settings(max_examples=300, deadline=None)
@given(stable=st.dictionaries(_NAMES, st.integers(0, 256), min_size=1, max_size=5),
       canary_weight=st.integers(0, 256), percent=st.integers(0, 100))
def test_with_canary_never_favours_a_lighter_stable_service(stable, canary_weight, percent):
    got = dict(with_canary(_canary_traffic({**stable, "green": canary_weight}), percent).weights)
    for x in stable:
        for y in stable:
            if stable[x] > stable[y]:
                assert got[x] >= got[y], (x, y, got)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.integers(1, 99), max_size=5, unique=True).map(lambda s: tuple(sorted(s)) + (100,)),
       pause=st.floats(0, 120),
       reconciles=st.lists(st.tuples(st.floats(0, 90), st.integers(0, 12)), max_size=40))
def test_a_canary_with_passing_probes_only_moves_forward_and_ends_at_100(steps, pause, reconciles):
    """Percent is monotonic in time while the probes pass, the step never skips, and a completed canary
    has 100%."""
    canary = Canary("green", steps=steps, pause_s=pause, max_error_rate=0.0)
    now = T0
    progress = canary_step(canary, None, ID, now, None)
    seen = [canary_percent(canary, progress)]
    for dt, probes in reconciles:
        now += dt
        before = progress
        progress = canary_step(canary, before, ID, now, (probes, 0) if probes else None)
        assert progress.state in ("progressing", "complete")
        assert progress.step in (before.step, before.step + 1)
        if progress.step == before.step + 1:
            assert now - before.since >= pause and progress.since == now
        seen.append(canary_percent(canary, progress))
        if progress.state == "complete":
            assert seen[-1] == 100
    assert seen == sorted(seen)
    assert set(seen) <= set(steps) | {100}


@settings(max_examples=200, deadline=None)
@given(step=st.integers(0, 3), probes=st.integers(1, 50), data=st.data())
def test_any_error_ratio_above_the_limit_aborts_at_once(step, probes, data):
    errors = data.draw(st.integers(0, probes))
    got = canary_step(CANARY, _at(step), ID, T0 + 1, (probes, errors))
    assert (got.state == "failed") == (errors / probes > CANARY.max_error_rate)
    assert canary_percent(CANARY, got) == (0 if got.state == "failed" else CANARY.steps[step])


# --- effective_weights and frontends_of: blue-green, weighted, canary (manual), A/B -------------------------

@pytest.mark.parametrize("traffic, expected", [
    pytest.param(Traffic("l", "weighted", (("a", 3), ("b", 1), ("c", 0))), {"a": 3, "b": 1, "c": 0},
                 id="weighted-as-written"),
    pytest.param(Traffic("l", "canary", (("blue", 90), ("green", 10))), {"blue": 90, "green": 10},
                 id="manual-canary-as-written"),
    pytest.param(Traffic("l", "blue-green", (("blue", 0), ("green", 7))), {"blue": 0, "green": 100},
                 id="blue-green-live-colour-gets-all"),
    pytest.param(Traffic("l", "blue-green", (("blue", 1), ("green", 0))), {"blue": 100, "green": 0},
                 id="blue-green-switched-back"),
    pytest.param(Traffic("l", "ab", (("blue", 80), ("green", 20)), ab_variant="green", ab_percent=30),
                 {"blue": 80, "green": 0}, id="ab-variant-gets-only-its-buckets"),
    pytest.param(Traffic("l", "ab", (("a", 1), ("b", 2), ("v", 5)), ab_variant="v", ab_percent=10),
                 {"a": 1, "b": 2, "v": 0}, id="ab-others-keep-their-weights"),
])
def test_effective_weights(traffic, expected):
    assert effective_weights(traffic) == expected


@settings(max_examples=200, deadline=None)
@given(names=st.lists(_NAMES, min_size=1, max_size=5, unique=True), data=st.data())
def test_blue_green_always_sums_to_100_on_the_one_live_colour(names, data):
    live = data.draw(st.sampled_from(names))
    weights = tuple(sorted((n, data.draw(st.integers(1, 256)) if n == live else 0) for n in names))
    got = effective_weights(Traffic("l", "blue-green", weights))
    assert sum(got.values()) == 100 and got[live] == 100


def _svc(name: str, port: int) -> Service:
    return Service(app="shop", name=name, environment="main", command=("srv",), port=port)


def test_frontends_of_one_frontend_per_app_with_traffic_on_the_services_loopback_ports():
    desired = DesiredState.of("h1", (
        App("zeta", None, (), (_svc("z-blue", 9001), _svc("z-green", 9002)),
            traffic=Traffic("127.0.0.1:9000", "blue-green", (("z-blue", 0), ("z-green", 5)))),
        App("alpha", None, (), (_svc("a-1", 8001), _svc("a-2", 8002)),
            traffic=Traffic("127.0.0.1:8000", "ab", (("a-1", 100), ("a-2", 0)), ab_variant="a-2", ab_percent=20)),
        App("quiet", None, (), (_svc("q", 7001),)),
        App("weighted", None, (), (_svc("w-1", 6001),),
            # a weight for a service this host does not run gets no backend
            traffic=Traffic("127.0.0.1:6000", "weighted", (("elsewhere", 50), ("w-1", 50)))),
    ))
    assert frontends_of(desired) == (
        Frontend("alpha", "127.0.0.1:8000", (Backend("a-1", "127.0.0.1:8001", 100), Backend("a-2", "127.0.0.1:8002", 0)),
                 ABSplit("a-2", 20)),
        Frontend("weighted", "127.0.0.1:6000", (Backend("w-1", "127.0.0.1:6001", 50),)),
        Frontend("zeta", "127.0.0.1:9000", (Backend("z-blue", "127.0.0.1:9001", 0), Backend("z-green", "127.0.0.1:9002", 100))),
    )


def test_frontends_of_a_host_without_traffic_is_empty():
    assert frontends_of(DesiredState.of("h1", (App("quiet", None, (), (_svc("q", 7001),)),))) == ()


# --- canary.analysis: a Prometheus query per step ---------------------------------------------------------

ANALYSED = replace(CANARY, analysis=Gate("http://prom:9090", "ratio", "<=", 0.05, "pause"))
PASS, FAIL, PAUSE = ("pass", "1 sample(s) <= 0.05"), ("fail", "1/1 sample(s) not <= 0.05 (e.g. 1)"), \
    ("pause", "no data (on_no_data: pause)")

ANALYSIS_CASES = [
    # (previous, now, probe, analysis verdict) -> (state, step)
    pytest.param(_at(0), T0 + 30, (10, 0), PASS, ("progressing", 1), id="pass-and-pause-over-advances"),
    pytest.param(_at(0), T0 + 5, (10, 0), PASS, ("progressing", 0), id="pass-before-pause-holds"),
    pytest.param(_at(1), T0 + 5, (10, 0), FAIL, ("failed", 1), id="fail-aborts-at-once-with-healthy-probes"),
    pytest.param(_at(0), T0 + 999, (10, 0), PAUSE, ("progressing", 0), id="no-data-pause-holds-however-long"),
    pytest.param(_at(0), T0 + 999, (10, 0), None, ("progressing", 0), id="not-run-holds"),
    pytest.param(_at(3), T0 + 30, (10, 0), PASS, ("complete", 3), id="last-step-promotes-on-pass"),
    pytest.param(_at(3), T0 + 30, (10, 0), FAIL, ("failed", 3), id="last-step-aborts-on-fail"),
    pytest.param(_at(1), T0 + 30, (10, 5), PASS, ("failed", 1), id="probes-still-abort-on-a-pass"),
]


@pytest.mark.parametrize("previous, now, probe, verdict, expected", ANALYSIS_CASES)
def test_canary_step_with_analysis(previous, now, probe, verdict, expected):
    got = canary_step(ANALYSED, previous, ID, now, probe, verdict)
    assert (got.state, got.step) == expected
    if verdict is not None:
        assert got.analysis == f"{verdict[0]}: {verdict[1]}"
    if got.state == "failed" and verdict == FAIL:
        assert "analysis failed" in got.reason and "aborted to 0%" in got.reason
        assert canary_percent(ANALYSED, got) == 0


def test_a_canary_without_analysis_ignores_a_verdict_it_did_not_ask_for():
    assert canary_step(CANARY, _at(0), ID, T0 + 30, (10, 0), PAUSE).step == 1
