"""The planner is pure: desired state + facts in, ordered actions with reasons out. Table-driven."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.core.facts import Facts, ProgramFact, VenvFact, text_digest
from agent.core.layout import Layout
from agent.core.model import DesiredState, Environment, HealthCheck, Service, App
from agent.core.plan import PlanOptions, make_plan, render_service

LAYOUT = Layout(Path("/srv/agent"))
OPTS = PlanOptions(LAYOUT, retention=2)


def env(identity: str = "aaaa", name: str = "blue", reqs=(("demoapp", "1.0.0"),)) -> Environment:
    return Environment(app="demo", name=name, python="3.11", lockfile=Path(f"/c/apps/demo/{name}.lock"),
                       lock_sha256="0" * 64, requirements=tuple(reqs), find_links=(), installer="pip",
                       options=(), identity=identity)


def svc(name: str = "web", environment: str = "blue", health: bool = True) -> Service:
    return Service(app="demo", name=name, environment=environment, command=("demoapp-server", "--port", "8101"),
                   port=8101, health=HealthCheck("http://127.0.0.1:8101/healthz") if health else None)


def desired(envs=None, svcs=None) -> DesiredState:
    envs = envs if envs is not None else (env(),)
    svcs = svcs if svcs is not None else (svc(),)
    return DesiredState.of("h1", (App("demo", None, tuple(envs), tuple(svcs)),))


def converged_facts(e: Environment = None, s: Service = None, **program) -> Facts:
    e = e or env()
    s = s or svc()
    text = render_service(s, e, LAYOUT)
    prog = dict(name=s.name, file_text=text, state="RUNNING", pid=42, pending=None, verified=text_digest(text))
    prog.update(program)
    return Facts("running", {e.name: VenvFact(e.name, e.identity, (e.identity,), (), e.requirements)},
                 {s.name: ProgramFact(**prog)})


def kinds(plan) -> list[tuple[str, str]]:
    return [(a.kind, a.key) for a in plan.actions]


def test_converged_host_has_empty_plan():
    plan = make_plan(desired(), converged_facts(), OPTS)
    assert plan.converged and "No changes" in plan.render()


def test_fresh_host_builds_switches_writes_updates_and_gates():
    plan = make_plan(desired(), Facts("stopped"), OPTS)
    assert kinds(plan) == [("ensure_supervisor", "supervisor"), ("build_venv", "venv:blue"),
                           ("switch_venv", "venv:blue"), ("write_program", "program:web"),
                           ("update_program", "program:web"), ("check_health", "program:web")]
    assert all(a.reason for a in plan.actions)
    assert plan.actions[4].gated         # the health gate, not startsecs, lets traffic come (and ends the apply)
    write = plan.actions[3]
    assert write.needs == ("venv:blue", "supervisor")
    assert "/srv/agent/venvs/blue-aaaa/bin/demoapp-server" in write.text


CASES = [
    pytest.param(dict(facts=lambda: converged_facts(state="STOPPED")),
                 [("start_program", "program:web"), ("check_health", "program:web")], "STOPPED", id="stopped"),
    pytest.param(dict(facts=lambda: converged_facts(file_text="[program:web]\ncommand=/bin/evil\n")),
                 [("write_program", "program:web"), ("update_program", "program:web"), ("check_health", "program:web")],
                 "differs", id="hand-edited-file"),
    pytest.param(dict(facts=lambda: converged_facts(file_text=None, pending="removed")),
                 [("write_program", "program:web"), ("update_program", "program:web"), ("check_health", "program:web")],
                 "missing", id="deleted-file"),
    pytest.param(dict(facts=lambda: converged_facts(pending="changed")),
                 [("update_program", "program:web"), ("check_health", "program:web")], "unapplied", id="pending"),
    pytest.param(dict(facts=lambda: Facts("running", {"blue": VenvFact("blue", "aaaa", ("aaaa",), (), (("demoapp", "1.0.0"), ("evil", "6.6.6")))},
                                          converged_facts().programs)),
                 [("repair_venv", "venv:blue"), ("restart_program", "program:web"), ("check_health", "program:web")],
                 "+evil==6.6.6", id="package-added-by-hand"),
    pytest.param(dict(facts=lambda: Facts("running", {"blue": VenvFact("blue", "aaaa", ("aaaa",), (), (("demoapp", "0.9"),))},
                                          converged_facts().programs)),
                 [("repair_venv", "venv:blue"), ("restart_program", "program:web"), ("check_health", "program:web")],
                 "demoapp 1.0.0->0.9", id="package-changed-by-hand"),
]


@pytest.mark.parametrize("case, expected, reason", CASES)
def test_drift_cases(case, expected, reason):
    plan = make_plan(desired(), case["facts"](), OPTS)
    assert kinds(plan) == expected
    assert reason in plan.actions[0].reason


def test_new_lock_builds_and_rewrites_only_that_service():
    old, new = env("aaaa"), env("bbbb")
    other_env = env("cccc", name="green")
    other = svc("web2", environment="green")
    facts = converged_facts(old)
    facts.venvs["green"] = VenvFact("green", "cccc", ("cccc",), (), other_env.requirements)
    other_text = render_service(other, other_env, LAYOUT)
    facts.programs["web2"] = ProgramFact("web2", other_text, "RUNNING", 7, verified=text_digest(other_text))
    plan = make_plan(desired((new, other_env), (svc(), other)), facts, OPTS)
    assert kinds(plan) == [("build_venv", "venv:blue"), ("switch_venv", "venv:blue"), ("write_program", "program:web"),
                           ("update_program", "program:web"), ("check_health", "program:web")]
    assert "venv changed to blue-bbbb" in plan.actions[2].reason
    assert plan.actions[2].previous is not None          # rollback target: what supervisord ran


def test_only_an_environment_run_as_another_user_is_compiled_up_front():
    """`user:` processes cannot write __pycache__ into the agent's venv: their environment is compiled whole."""
    blue, green = env("aaaa"), env("bbbb", name="green")
    other = Service(app="demo", name="worker", environment="green", command=("demoapp-server",), user="nobody")
    plan = make_plan(desired((blue, green), (svc(), other)), Facts("stopped"), OPTS)
    builds = {a.key: a.eager_bytecode for a in plan.actions if a.kind == "build_venv"}
    assert builds == {"venv:blue": False, "venv:green": True}


def test_kept_venv_is_a_switch_not_a_build():
    old, new = env("aaaa"), env("bbbb")
    facts = converged_facts(new)
    facts.venvs["blue"] = VenvFact("blue", "bbbb", ("bbbb", "aaaa"), (), new.requirements)
    plan = make_plan(desired((old,)), facts, OPTS)
    assert kinds(plan)[0] == ("switch_venv", "venv:blue")
    assert "kept venv, no rebuild" in plan.actions[0].reason


def test_removed_app_removes_programs_then_environments():
    plan = make_plan(DesiredState.of("h1", ()), converged_facts(), OPTS)
    assert kinds(plan) == [("remove_program", "program:web"), ("remove_environment", "venv:blue")]
    assert plan.actions[1].needs == ("program:web",)


def test_retention_prunes_oldest_but_never_current_or_desired():
    e = env("dddd")
    facts = converged_facts(e)
    facts.venvs["blue"] = VenvFact("blue", "dddd", ("dddd", "cccc", "bbbb", "aaaa"), ("eeee",), e.requirements)
    plan = make_plan(desired((e,)), facts, OPTS)
    prune = plan.actions[-1]
    assert prune.kind == "prune_venvs" and set(prune.identities) == {"bbbb", "aaaa", "eeee"}


def test_interrupted_build_is_named_in_the_reason():
    facts = Facts("running", {"blue": VenvFact("blue", None, (), ("aaaa",))}, {})
    plan = make_plan(desired(svcs=()), facts, OPTS)
    assert plan.actions[0].kind == "build_venv" and "interrupted build" in plan.actions[0].reason
    assert not any(a.kind == "prune_venvs" for a in plan.actions)


def test_no_health_check_means_no_gate():
    s = svc(health=False)
    plan = make_plan(desired(svcs=(s,)), Facts("running"), OPTS)
    kinds = [a.kind for a in plan.actions]
    assert "check_health" not in kinds
    assert kinds[-1] == "await_running"          # its start is confirmed last, overlapping the others' windows
    assert not next(a for a in plan.actions if a.kind == "update_program").gated


def test_many_ungated_services_start_together_and_are_confirmed_after():
    """Issue 12 item 9: 150 services without health checks applied ~1.1 s each in turn (each start
    waited out its startsecs). Every start comes before the first confirmation now."""
    svcs = tuple(svc(name=f"w{i}", health=False) for i in range(20))
    kinds = [a.kind for a in make_plan(desired(svcs=svcs), Facts("running"), OPTS).actions]
    last_start = max(i for i, k in enumerate(kinds) if k == "update_program")
    first_wait = min(i for i, k in enumerate(kinds) if k == "await_running")
    assert last_start < first_wait and kinds.count("await_running") == 20


def test_await_running_comes_after_traffic_and_before_removals():
    """startsecs windows overlap (one wait at the end, not one per service), and an old program is
    removed only once the new ones have held."""
    a, b = svc("web", health=False), svc("web2", health=False)
    facts = Facts("running", {}, {"old": ProgramFact("old", "[program:old]\n", "RUNNING", 9)})
    plan = make_plan(desired(svcs=(a, b)), facts, OPTS)
    order = [a.kind for a in plan.actions]
    assert order.count("await_running") == 2
    first_wait = order.index("await_running")
    assert max(i for i, k in enumerate(order) if k == "update_program") < first_wait
    assert order.index("remove_program") > max(i for i, k in enumerate(order) if k == "await_running")


def test_plan_json_is_serialisable_and_omits_rendered_text():
    import json

    data = make_plan(desired(), Facts("stopped"), OPTS).to_json()
    assert json.loads(json.dumps(data))["converged"] is False
    assert all("text" not in a for a in data["actions"])


def test_a_config_that_never_passed_its_gate_is_gated_again():
    facts = converged_facts(verified=None)
    plan = make_plan(desired(), facts, OPTS)
    assert kinds(plan) == [("check_health", "program:web")]
    assert "never passed its health gate" in plan.actions[0].reason
    stale = converged_facts(verified="0" * 64)          # the gate passed for another config
    assert kinds(make_plan(desired(), stale, OPTS)) == [("check_health", "program:web")]


def test_a_service_that_exited_after_its_gate_is_drift_and_gated_again():
    """Issue 12 item 4: a program supervisord restarted after its gate (a crash loop past startsecs
    looks RUNNING most of the time) is not converged: the new process must pass the gate itself."""
    assert make_plan(desired(), converged_facts(gated_pid=42), OPTS).converged      # the same process
    assert make_plan(desired(), converged_facts(gated_pid=None), OPTS).converged    # gated by an older agent
    plan = make_plan(desired(), converged_facts(gated_pid=41), OPTS)
    assert kinds(plan) == [("check_health", "program:web")]
    assert "exited after its health gate (pid 41, now 42" in plan.actions[0].reason


def test_an_ungated_backend_gaining_traffic_holds_its_startsecs_before_the_switch():
    """Blue-green (no health checks) with a restart of green in the same revision: green's await_running comes before
    configure_traffic (a program that dies right after its gate never gets the users); blue, which
    loses traffic, is confirmed after."""
    from agent.core.model import Traffic
    from agent.drivers.lb import LoadBalancer

    blue_env, green_env = env("aaaa"), env("bbbb", name="green")
    blue, green = svc("web_blue", health=False), svc("web_green", environment="green", health=False)
    app = App("demo", None, (blue_env, green_env), (blue, green),
              traffic=Traffic("127.0.0.1:8100", "blue-green", (("web_blue", 0), ("web_green", 100))))
    want = DesiredState.of("h1", (app,))
    lb = LoadBalancer("haproxy", LAYOUT.root)
    facts = Facts("running", {e.name: VenvFact(e.name, e.identity, (e.identity,), (), e.requirements)
                              for e in (blue_env, green_env)},
                  {"web_blue": ProgramFact("web_blue", "[program:web_blue]\nold\n", "RUNNING", 7),
                   "web_green": ProgramFact("web_green", "[program:web_green]\nold\n", "RUNNING", 8),
                   lb.program_name: ProgramFact(lb.program_name, lb.program_text(), "RUNNING", 9)},
                  traffic={"running": True, "weights": {"demo": {"web_blue": 100, "web_green": 0}}})
    order = kinds(make_plan(want, facts, PlanOptions(LAYOUT, lb=lb)))
    assert order.index(("await_running", "program:web_green")) < order.index(("configure_traffic", "traffic:lb"))
    assert order.index(("configure_traffic", "traffic:lb")) < order.index(("await_running", "program:web_blue"))


def test_a_gated_service_waits_for_no_startsecs_after_its_gate():
    """Issue 17: a passed health gate stands in for supervisord's RUNNING. A gated backend gaining traffic
    gets it right after its gate, and no apply of a gated service waits out startsecs."""
    from agent.core.model import Traffic
    from agent.drivers.lb import LoadBalancer

    blue_env, green_env = env("aaaa"), env("bbbb", name="green")
    blue, green = svc("web_blue"), svc("web_green", environment="green")
    app = App("demo", None, (blue_env, green_env), (blue, green),
              traffic=Traffic("127.0.0.1:8100", "blue-green", (("web_blue", 0), ("web_green", 100))))
    lb = LoadBalancer("haproxy", LAYOUT.root)
    facts = Facts("running", {e.name: VenvFact(e.name, e.identity, (e.identity,), (), e.requirements)
                              for e in (blue_env, green_env)},
                  {"web_blue": ProgramFact("web_blue", "[program:web_blue]\nold\n", "RUNNING", 7),
                   "web_green": ProgramFact("web_green", "[program:web_green]\nold\n", "RUNNING", 8),
                   lb.program_name: ProgramFact(lb.program_name, lb.program_text(), "RUNNING", 9)},
                  traffic={"running": True, "weights": {"demo": {"web_blue": 100, "web_green": 0}}})
    order = kinds(make_plan(DesiredState.of("h1", (app,)), facts, PlanOptions(LAYOUT, lb=lb)))
    assert not [k for k in order if k[0] == "await_running"]
    assert order.index(("check_health", "program:web_green")) < order.index(("configure_traffic", "traffic:lb"))


def test_a_gated_service_that_passed_its_gate_is_converged_while_starting():
    """supervisord says STARTING (inside startsecs) for the pid that passed the gate: healthy, nothing to do."""
    facts = converged_facts(state="STARTING", gated_pid=42)
    assert make_plan(desired(), facts, OPTS).converged


def _two_backends(weights=(("web_blue", 90), ("web_green", 10))):
    from agent.core.model import Traffic

    blue_env, green_env = env("aaaa"), env("bbbb", name="green")
    blue, green = svc("web_blue"), svc("web_green", environment="green")
    return App("demo", None, (blue_env, green_env), (blue, green),
               traffic=Traffic("127.0.0.1:8100", "canary", weights))


def test_independent_services_all_start_before_their_gates():
    """Issue 17: blue and green start together, then both gates run: their start-up times overlap."""
    order = kinds(make_plan(DesiredState.of("h1", (_two_backends(),)), Facts("stopped"), OPTS))
    starts = [order.index(("update_program", f"program:{n}")) for n in ("web_blue", "web_green")]
    gates = [order.index(("check_health", f"program:{n}")) for n in ("web_blue", "web_green")]
    assert max(starts) < min(gates)


def test_a_dependent_service_starts_only_after_the_gate_of_what_it_depends_on():
    from dataclasses import replace as swap

    base = _two_backends()
    blue, green = base.services
    app = swap(base, traffic=None, services=(swap(blue, priority=100),
                                             swap(green, depends_on=("web_blue",), priority=110)))
    order = kinds(make_plan(DesiredState.of("h1", (app,)), Facts("stopped"), OPTS))
    assert order.index(("check_health", "program:web_blue")) < order.index(("update_program", "program:web_green"))
    green_start = next(a for a in make_plan(DesiredState.of("h1", (app,)), Facts("stopped"), OPTS).actions
                       if a.key == "program:web_green")
    assert "program:web_blue" in green_start.needs


def test_a_stopped_haproxy_starts_alongside_the_services_with_no_weight_then_gets_its_weights():
    """Issue 17: HAProxy starts before the services (every backend at weight 0), and only once the gates
    passed does it get the weights over the runtime API, taking those backends as up."""
    from agent.drivers.lb import LoadBalancer

    lb = LoadBalancer("haproxy", LAYOUT.root)
    plan = make_plan(DesiredState.of("h1", (_two_backends(),)), Facts("stopped"), PlanOptions(LAYOUT, lb=lb))
    order = kinds(plan)
    boot = order.index(("update_program", f"program:{lb.program_name}"))
    assert boot < order.index(("update_program", "program:web_blue"))
    first, last = [a for a in plan.actions if a.kind == "configure_traffic"]
    assert {be.weight for fe in first.frontends for be in fe.backends} == {0} and first.needs == ("supervisor",)
    assert [(be.name, be.weight) for be in last.frontends[0].backends] == [("web_blue", 90), ("web_green", 10)]
    assert order.index(("check_health", "program:web_green")) < plan.actions.index(last)
    assert {"program:web_blue", "program:web_green", f"program:{lb.program_name}"} <= set(last.needs)
    assert last.up == ("demo/web_blue", "demo/web_green")


@pytest.mark.parametrize("kind", ["nginx", "running"])
def test_nginx_or_a_running_haproxy_is_configured_after_the_services(kind):
    """nginx sets no weights without a reload, and a running HAProxy keeps serving the old weights until
    the new backends passed: both are configured after the gates, as before."""
    from agent.drivers.lb import LoadBalancer

    lb = LoadBalancer("nginx" if kind == "nginx" else "haproxy", LAYOUT.root)
    facts = Facts("stopped", traffic={"running": kind == "running", "weights": {}})
    order = kinds(make_plan(DesiredState.of("h1", (_two_backends(),)), facts, PlanOptions(LAYOUT, lb=lb)))
    assert [k for k in order if k[0] == "configure_traffic"] == [("configure_traffic", "traffic:lb")]
    assert order.index(("check_health", "program:web_green")) < order.index(("configure_traffic", "traffic:lb"))


def test_a_haproxy_whose_socket_did_not_answer_while_supervisord_runs_it_keeps_its_weights():
    """The stats socket failing once (a busy host) must not send every weight to 0 on a serving HAProxy."""
    from agent.drivers.lb import LoadBalancer

    lb = LoadBalancer("haproxy", LAYOUT.root)
    facts = Facts("running", traffic={"running": False, "error": "timed out", "weights": {}},
                  programs={lb.program_name: ProgramFact(lb.program_name, lb.program_text(), "RUNNING", 9)})
    plan = make_plan(DesiredState.of("h1", (_two_backends(),)), facts, PlanOptions(LAYOUT, lb=lb))
    configure = [a for a in plan.actions if a.kind == "configure_traffic"]
    assert len(configure) == 1 and {be.weight for be in configure[0].frontends[0].backends} == {90, 10}
