"""Recorder.observe on hand-built reconcile Results: pure, no daemon, no HTTP (except one server test)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.core.outcome import Outcome, ReconcileResult, Verdict
from agent.drivers.git import Revision
from agent.core.facts import Facts, ProgramFact, VenvFact
from agent.service.http import MetricsServer
from agent.service.metrics import Recorder, resource_of
from agent.core.actions import BuildVenv, CheckHealth, RemoveProgram, StartProgram, WriteProgram
from agent.core.plan import Plan
from agent.service.reconciler import Result

SHA1, SHA2 = "a" * 40, "b" * 40


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def samples(rec: Recorder) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(rec.exposition().decode()):
        for s in fam.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(rec: Recorder, metric: str, **labels) -> float | None:
    return samples(rec).get((metric, tuple(sorted(labels.items()))))


def names_of(rec: Recorder, metric: str) -> set[tuple]:
    return {labels for (n, labels) in samples(rec) if n == metric}


def facts(programs: dict[str, str] | None = None, venvs: tuple[str, ...] = ("demo",)) -> Facts:
    return Facts("running", venvs={v: VenvFact(v, "id") for v in venvs},
                 programs={n: ProgramFact(n, "text", state) for n, state in (programs or {"web": "RUNNING"}).items()})


def rev(sha: str = SHA1, committed_at: float = 999_990.0) -> Revision:
    return Revision(sha, "main", committed_at, "msg")


def write_web(reason: str = "program file differs from the desired config") -> WriteProgram:
    return WriteProgram("program:web", reason, name="web", text="x")


def ok(*actions) -> tuple[Outcome, ...]:
    return tuple(Outcome(a, Verdict.APPLIED, "done") for a in actions)


def converged(sha=SHA1, **kw) -> Result:
    return Result(ReconcileResult.CONVERGED, rev(sha), Plan(()), facts=kw.pop("facts", facts()), **kw)


def test_resource_of():
    assert resource_of("program:web") == ("program", "web")
    assert resource_of("venv:blue") == ("venv", "blue")
    assert resource_of("supervisor") == ("supervisor", "supervisor")


def test_all_design_names_exist_with_their_labels():
    rec = Recorder(clock=Clock())
    rec.observe(converged())
    rec.set_traffic({("web", "blue"): 90, ("web", "green"): 10})
    families = {fam.name: (fam.type, {tuple(sorted(s.labels)) for s in fam.samples if not s.name.endswith(("_created", "_bucket"))})
                for fam in text_string_to_metric_families(rec.exposition().decode()) if not fam.name.endswith("_created")}
    design = {   # DESIGN.md §5 (counter families are named without _total by the parser)
        "gitops_agent_drift": ("gauge", ("kind", "name")),
        "gitops_agent_drifted_resources": ("gauge", ()),
        "gitops_agent_drift_since_timestamp_seconds": ("gauge", ("kind", "name")),
        "gitops_agent_drift_corrected": ("counter", ("kind",)),
        "gitops_agent_reconcile": ("counter", ("result",)),
        "gitops_agent_reconcile_duration_seconds": ("histogram", ()),
        "gitops_agent_applied_revision_info": ("gauge", ("revision",)),
        "gitops_agent_revision_invalid": ("gauge", ()),
        "gitops_agent_source_fetch_errors": ("counter", ()),
        "gitops_agent_last_success_timestamp_seconds": ("gauge", ()),
        "gitops_agent_commit_to_converged_seconds": ("histogram", ()),
        "gitops_agent_actions": ("counter", ("action", "result")),
        "gitops_agent_rollbacks": ("counter", ("service",)),
        "gitops_agent_service_up": ("gauge", ("service",)),
        "gitops_agent_traffic_weight": ("gauge", ("backend", "frontend")),
        # fleet (docs/fleet.md): staged waves and chaos
        "gitops_agent_wave_gate": ("gauge", ("app", "result", "wave")),
        "gitops_agent_wave_due": ("gauge", ("app",)),
        "gitops_agent_chaos_events": ("counter", ("app", "kind")),
        "gitops_agent_chaos_recovery_seconds": ("histogram", ()),
    }
    assert set(design) <= set(families)                  # DESIGN §5 names; later issues add more (waves, chaos)
    for name, (kind, labels) in design.items():
        assert families[name][0] == kind, name
        assert families[name][1] <= {labels}, (name, families[name][1])      # no other label set (empty: not set yet)
    assert value(rec, "gitops_agent_traffic_weight", frontend="web", backend="blue") == 90
    rec.set_traffic({("web", "green"): 100})
    assert names_of(rec, "gitops_agent_traffic_weight") == {(("backend", "green"), ("frontend", "web"))}
    # reconcile results are all pre-declared, so rate() works from the first scrape
    assert {dict(l)["result"] for l in names_of(rec, "gitops_agent_reconcile_total")} >= {
        "converged", "applied", "failed", "invalid", "error", "drift"}
    assert value(rec, "gitops_agent_reconcile_total", result="converged") == 1


def test_warn_mode_drift_begins_stays_then_is_corrected_and_cleared():
    clock = Clock()
    rec = Recorder(clock=clock)
    rec.observe(converged())
    assert value(rec, "gitops_agent_drift", kind="program", name="web") == 0
    assert value(rec, "gitops_agent_drifted_resources") == 0

    # warn mode: the hand edit is reported, not applied
    edit = write_web()
    clock.t += 10
    began = clock.t
    rec.observe(Result(ReconcileResult.DRIFT, rev(), Plan((edit,)), facts=facts(), drift=(edit,)))
    assert value(rec, "gitops_agent_drift", kind="program", name="web") == 1
    assert value(rec, "gitops_agent_drift_since_timestamp_seconds", kind="program", name="web") == began
    assert value(rec, "gitops_agent_drifted_resources") == 1
    assert value(rec, "gitops_agent_drift_corrected_total", kind="program") is None

    clock.t += 10   # still drifted: the start time is remembered, not reset
    rec.observe(Result(ReconcileResult.DRIFT, rev(), Plan((edit,)), facts=facts(), drift=(edit,)))
    assert value(rec, "gitops_agent_drift_since_timestamp_seconds", kind="program", name="web") == began

    # switched to enforce: healed by an apply -> counted once, gauges back to 0, since cleared
    clock.t += 10
    rec.observe(Result(ReconcileResult.APPLIED, rev(), Plan((edit,)), outcomes=ok(edit), facts=facts()))
    assert value(rec, "gitops_agent_drift", kind="program", name="web") == 0
    assert value(rec, "gitops_agent_drifted_resources") == 0
    assert value(rec, "gitops_agent_drift_corrected_total", kind="program") == 1
    assert names_of(rec, "gitops_agent_drift_since_timestamp_seconds") == set()
    assert value(rec, "gitops_agent_actions_total", action="write_program", result="ok") == 1


def test_enforce_heals_within_one_reconcile_counts_a_resource_once_not_per_action():
    rec = Recorder(clock=Clock())
    rec.observe(converged())
    acts = (StartProgram("program:web", "program is STOPPED", name="web"),
            CheckHealth("program:web", "gate", name="web"))
    rec.observe(Result(ReconcileResult.APPLIED, rev(), Plan(acts), outcomes=ok(*acts), facts=facts({"web": "STOPPED"})))
    assert value(rec, "gitops_agent_drift_corrected_total", kind="program") == 1
    assert value(rec, "gitops_agent_drift", kind="program", name="web") == 0
    # facts were read before the start; the apply's success wins
    assert value(rec, "gitops_agent_service_up", service="web") == 1


def test_a_new_commits_changes_are_not_drift_and_commit_to_converged_is_observed_once():
    clock = Clock(1_000_000.0)
    rec = Recorder(clock=clock)
    rec.observe(converged())
    build = BuildVenv("venv:demo", "demo.lock changed")
    write = write_web("new config")
    new = Result(ReconcileResult.APPLIED, rev(SHA2, committed_at=999_970.0), Plan((build, write)), outcomes=ok(build, write),
                 facts=facts(), new_commit=True)
    rec.observe(new)
    assert value(rec, "gitops_agent_drift_corrected_total", kind="venv") is None
    assert value(rec, "gitops_agent_commit_to_converged_seconds_count") == 1
    assert value(rec, "gitops_agent_commit_to_converged_seconds_sum") == pytest.approx(30.0)
    # only the current revision has an info series
    assert names_of(rec, "gitops_agent_applied_revision_info") == {(("revision", SHA2),)}
    clock.t += 15
    rec.observe(new)              # the same revision again (e.g. the flag raced): observed once only
    rec.observe(converged(SHA2))
    assert value(rec, "gitops_agent_commit_to_converged_seconds_count") == 1


def test_invalid_revision_flag_and_fetch_errors():
    rec = Recorder(clock=Clock())
    rec.restore(SHA1)
    assert value(rec, "gitops_agent_applied_revision_info", revision=SHA1) == 1
    rec.observe(Result(ReconcileResult.INVALID, rev(SHA2), Plan(()), facts=facts(), error="bad", desired_from=SHA1))
    assert value(rec, "gitops_agent_revision_invalid") == 1
    assert value(rec, "gitops_agent_applied_revision_info", revision=SHA1) == 1     # the last good one stays
    rec.observe(Result(ReconcileResult.ERROR, error="source: cannot reach", source_failed=True))
    assert value(rec, "gitops_agent_source_fetch_errors_total") == 1
    assert value(rec, "gitops_agent_revision_invalid") == 1                         # unknown: unchanged
    rec.observe(converged(SHA1))
    assert value(rec, "gitops_agent_revision_invalid") == 0
    assert value(rec, "gitops_agent_reconcile_total", result="invalid") == 1
    assert value(rec, "gitops_agent_reconcile_total", result="error") == 1


def test_failed_action_keeps_drift_counts_rollback_and_service_down():
    rec = Recorder(clock=Clock())
    rec.observe(converged())
    write, start = write_web(), StartProgram("program:web", "program is STOPPED", name="web")
    outcomes = (Outcome(write, Verdict.APPLIED, "written"),
                Outcome(start, Verdict.ROLLED_BACK, "SupervisorError: spawn error (rolled back web: its previous config)"))
    rec.observe(Result(ReconcileResult.FAILED, rev(), Plan((write, start)), outcomes=outcomes, facts=facts(), error="x"))
    assert value(rec, "gitops_agent_drift", kind="program", name="web") == 1
    assert value(rec, "gitops_agent_drift_corrected_total", kind="program") is None
    assert value(rec, "gitops_agent_rollbacks_total", service="web") == 1
    assert value(rec, "gitops_agent_service_up", service="web") == 0
    assert value(rec, "gitops_agent_actions_total", action="start_program", result="failed") == 1


def test_removed_resources_lose_their_series():
    rec = Recorder(clock=Clock())
    two = facts({"web": "RUNNING", "old": "RUNNING"}, venvs=("demo", "legacy"))
    rec.observe(converged(facts=two))
    assert value(rec, "gitops_agent_service_up", service="old") == 1
    rm = RemoveProgram("program:old", "not desired any more", name="old")
    rec.observe(Result(ReconcileResult.APPLIED, rev(), Plan((rm,)), outcomes=ok(rm), facts=two))
    assert value(rec, "gitops_agent_drift", kind="program", name="old") is None
    assert value(rec, "gitops_agent_service_up", service="old") is None
    rec.observe(converged(facts=facts()))           # the next facts no longer list the legacy venv either
    assert names_of(rec, "gitops_agent_drift") == {(("kind", "program"), ("name", "web")),
                                                   (("kind", "venv"), ("name", "demo"))}
    assert names_of(rec, "gitops_agent_service_up") == {(("service", "web"),)}


def test_label_sets_stay_bounded_over_many_revisions_and_drifts():
    rec = Recorder(clock=Clock())
    for i in range(200):
        sha = f"{i:040x}"
        edit = write_web()
        rec.observe(Result(ReconcileResult.DRIFT, rev(sha), Plan((edit,)), facts=facts(), drift=(edit,)))
        rec.observe(Result(ReconcileResult.APPLIED, rev(sha), Plan((edit,)), outcomes=ok(edit), facts=facts(), new_commit=True))
    s = samples(rec)
    assert len(names_of(rec, "gitops_agent_applied_revision_info")) == 1
    shas = [k for k in s if any(len(v) == 40 for _, v in k[1])]
    assert all(name == "gitops_agent_applied_revision_info" for name, _ in shas)
    assert len(s) < 100, len(s)


def test_readiness():
    clock = Clock()
    rec = Recorder(clock=clock)
    assert not rec.readiness(15).ready and "no reconcile" in rec.readiness(15).reason
    rec.observe(converged(seconds=2.0))
    assert rec.readiness(15).ready
    clock.t += 46.0                       # within 3 x 15 s + 2 s
    assert rec.readiness(15).ready
    clock.t += 2.0
    r = rec.readiness(15)
    assert not r.ready and "stale" in r.reason
    rec.observe(Result(ReconcileResult.ERROR, error="source: unreachable", source_failed=True))
    r = rec.readiness(15)
    assert not r.ready and "unreachable" in r.reason
    rec.observe(Result(ReconcileResult.INVALID, rev(), Plan(()), facts=facts(), error="bad"))
    assert rec.readiness(15).ready        # an invalid revision is reported, the agent keeps its last good one


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_http_endpoints():
    rec = Recorder()
    server = MetricsServer(rec, "127.0.0.1:0", 15).start()
    try:
        base = "http://%s:%d" % server.address
        assert _get(base + "/healthz") == (200, "ok\n")
        code, body = _get(base + "/readyz")
        assert code == 503 and "no reconcile" in body
        rec.observe(converged())
        assert _get(base + "/readyz")[0] == 200
        code, body = _get(base + "/metrics")
        assert code == 200 and 'gitops_agent_reconcile_total{result="converged"} 1.0' in body
        assert _get(base + "/nope")[0] == 404
    finally:
        server.stop()


def test_traffic_weights_follow_the_load_balancer():
    from agent.core.render.lb import Backend, Frontend
    from agent.core.actions import ConfigureTraffic

    rec = Recorder(clock=Clock())
    seen = facts()
    seen = Facts(seen.supervisor, seen.venvs, seen.programs, traffic={"running": True, "weights": {"web": {"blue": 90, "green": 10}}})
    rec.observe(Result(ReconcileResult.CONVERGED, rev(), Plan(()), facts=seen))
    assert value(rec, "gitops_agent_traffic_weight", frontend="web", backend="green") == 10
    fe = Frontend("web", "127.0.0.1:8100", (Backend("blue", "127.0.0.1:1", 0), Backend("green", "127.0.0.1:2", 100)))
    action = ConfigureTraffic("traffic:lb", "weights differ", frontends=(fe,))
    rec.observe(Result(ReconcileResult.APPLIED, rev(), Plan((action,)), outcomes=ok(action), facts=seen))
    assert value(rec, "gitops_agent_traffic_weight", frontend="web", backend="green") == 100
    assert value(rec, "gitops_agent_traffic_weight", frontend="web", backend="blue") == 0
