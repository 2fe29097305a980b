"""Fleet targeting and overrides in the loader: label expressions, per-host/per-group values, precedence,
validation of override paths and of the result, and the notes that `plan` shows."""

from __future__ import annotations

import pytest

from agent.core.errors import InvalidState
from agent.core.load import LoadOptions, _expression_holds, _Host, _selects, load_desired, validate_tree
from test_load import APP, tree

FLEET = """\
apiVersion: gitops-agent/v1
kind: Fleet
hosts:
  h1: {groups: [web], labels: {zone: a, tier: prod}}
  h2: {groups: [web, canary], labels: {zone: b, tier: prod}}
  h3: {groups: [db], labels: {zone: c}}
"""


def host(name="x", groups=(), **labels) -> _Host:
    return _Host(name, frozenset(groups), labels)


@pytest.mark.parametrize("expr,labels,want", [
    ({"key": "zone", "operator": "In", "values": ["a", "b"]}, {"zone": "a"}, True),
    ({"key": "zone", "operator": "In", "values": ["a", "b"]}, {"zone": "c"}, False),
    ({"key": "zone", "operator": "In", "values": ["a"]}, {}, False),
    ({"key": "zone", "operator": "NotIn", "values": ["a"]}, {"zone": "b"}, True),
    ({"key": "zone", "operator": "NotIn", "values": ["a"]}, {}, True),          # Kubernetes: absent label passes NotIn
    ({"key": "zone", "operator": "NotIn", "values": ["a"]}, {"zone": "a"}, False),
    ({"key": "zone", "operator": "Exists"}, {"zone": ""}, True),
    ({"key": "zone", "operator": "Exists"}, {}, False),
    ({"key": "zone", "operator": "DoesNotExist"}, {}, True),
    ({"key": "zone", "operator": "DoesNotExist"}, {"zone": "a"}, False),
])
def test_match_expressions_follow_kubernetes(expr, labels, want):
    assert _expression_holds(expr, labels) is want


def test_selector_rule_names_or_groups_or_all_label_terms():
    sel = {"names": ["n1"], "groups": ["g"],
           "matchLabels": {"tier": "prod"}, "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}
    assert _selects(sel, host("n1"))                                       # named
    assert _selects(sel, host("x", ["g"]))                                 # in a group
    assert _selects(sel, host("x", tier="prod", zone="b"))                 # labels AND expressions
    assert not _selects(sel, host("x", tier="prod", zone="a"))             # expression fails
    assert not _selects(sel, host("x", zone="b"))                          # matchLabels fails
    assert _selects({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}, host(zone="q"))
    assert not _selects({"groups": []}, host())                            # a selector naming nothing matches nothing
    assert _selects({}, host()) and _selects(None, host())                 # absent / empty: every host


def test_app_selected_by_match_expressions(tmp_path):
    app = APP.replace("hosts: {groups: [web]}",
                      "hosts: {matchExpressions: [{key: zone, operator: In, values: [b, c]}]}")
    root = tree(tmp_path, {"fleet.yaml": FLEET, "apps/demo/app.yaml": app})
    assert validate_tree(root) == []
    assert [h for h in ("h1", "h2", "h3") if load_desired(root, h).apps] == ["h2", "h3"]


def test_bad_expression_is_a_schema_problem(tmp_path):
    app = APP.replace("hosts: {groups: [web]}",
                      "hosts: {matchExpressions: [{key: zone, operator: In}, {key: z, operator: Exists, values: [a]}, "
                      "{key: z, operator: Near, values: [a]}]}")
    problems = validate_tree(tree(tmp_path, {"fleet.yaml": FLEET, "apps/demo/app.yaml": app}))
    fields = sorted(p.field for p in problems)
    assert fields == ["hosts.matchExpressions.0", "hosts.matchExpressions.1.values",
                      "hosts.matchExpressions.2.operator"], problems


OVERRIDES = """\
overrides:
  - hosts: {groups: [web]}
    set: {services.demo-web.port: 8201, "services.demo-web.command.2": "8201"}
  - hosts: {groups: [canary]}
    set: {services.demo-web.port: 8301, "services.demo-web.command.2": "8301",
          services.demo-web.health.http: "http://127.0.0.1:8301/healthz"}
  - hosts: {matchExpressions: [{key: zone, operator: In, values: [b]}]}
    set: {services.demo-web.env.ZONE: b}
"""


def test_overrides_apply_in_list_order_and_are_noted(tmp_path):
    root = tree(tmp_path, {"fleet.yaml": FLEET, "apps/demo/app.yaml": APP.replace("[web]", "[web, db]") + OVERRIDES})
    assert validate_tree(root) == []
    h1, h2, h3 = (load_desired(root, h) for h in ("h1", "h2", "h3"))
    s1, s2, s3 = (d.services["demo-web"] for d in (h1, h2, h3))
    assert (s1.port, s1.command[2], s1.env) == (8201, "8201", ())
    assert (s2.port, s2.command[2], s2.env) == (8301, "8301", (("ZONE", "b"),))     # the later entry wins
    assert s2.health.url == "http://127.0.0.1:8301/healthz"
    assert (s3.port, s3.command[2]) == (8101, "8101")                                 # no override: base values
    assert h3.notes == ()
    assert len(h2.notes) == 3 and h2.notes[1].startswith("app demo: overrides[1] (hosts: groups canary) set "
                                                         "services.demo-web.port=8301")
    assert h1.notes == ('app demo: overrides[0] (hosts: groups web) set services.demo-web.port=8201, '
                        'services.demo-web.command.2="8201"',)


def test_override_paths_must_exist_in_schema_and_app(tmp_path):
    bad = """\
overrides:
  - hosts: {names: [h1]}
    set: {services.demo-web.prot: 1, name: other, services.ghost.port: 9000, traffic.weights.demo-web: 5,
          environments.blue.python: "3.11"}
"""
    problems = validate_tree(tree(tmp_path, {"fleet.yaml": FLEET, "apps/demo/app.yaml": APP + bad}))
    msgs = {p.field.rsplit(".", 1)[-1] if p.field.count(".") > 3 else p.field: p.message for p in problems}
    text = "\n".join(map(str, problems))
    assert "'services.demo-web.prot' is not a field of an App" in text
    assert "only fields under environments, services, traffic, mode can be overridden" in text
    assert "'services.ghost' is not defined in this app" in text
    assert not any("python" in p.field for p in problems), msgs        # a valid path: no problem
    assert all(p.line and p.line >= 15 for p in problems if p.field.startswith("overrides")), problems


def test_override_result_is_validated_again_and_blocks_the_revision(tmp_path):
    bad = """\
overrides:
  - hosts: {groups: [canary]}
    set: {services.demo-web.port: 70000}
"""
    root = tree(tmp_path, {"fleet.yaml": FLEET, "apps/demo/app.yaml": APP + bad})
    problems = validate_tree(root)
    assert len(problems) == 1 and "(with overrides[0] applied)" in problems[0].message, problems
    assert problems[0].field == "services.demo-web.port"
    with pytest.raises(InvalidState):
        load_desired(root, "h1")          # a revision is accepted or rejected as a whole, on every host
    # a created section is validated too: traffic without listen
    app = APP + "overrides:\n  - hosts: {names: [h1]}\n    set: {traffic.weights.demo-web: 5}\n"
    problems = validate_tree(tree(tmp_path / "t", {"fleet.yaml": FLEET, "apps/demo/app.yaml": app}))
    assert [p.field for p in problems] == ["traffic"] and "'listen' is a required property" in problems[0].message


def test_override_creating_a_port_conflict_on_one_host_is_reported(tmp_path):
    other = APP.replace("name: demo", "name: other").replace("demo-web", "other-web").replace("8101", "8102") \
        .replace("blue", "green")
    bad = "overrides:\n  - hosts: {names: [h2]}\n    set: {services.other-web.port: 8101}\n"
    root = tree(tmp_path, {"fleet.yaml": FLEET, "apps/other/app.yaml": other + bad,
                           "apps/other/green.lock": (tmp_path / "x").name and None})
    (root / "apps/other/green.lock").write_text((root / "apps/demo/blue.lock").read_text())
    text = "\n".join(map(str, validate_tree(root)))
    assert "port 8101 is also defined in apps/" in text and "(both run on host h2)" in text, text


def test_chaos_ignored_with_a_note_unless_allowed(tmp_path):
    app = APP + "chaos: {kill: {rate_per_hour: 60}, disable_backend: {rate_per_hour: 6, duration: 2m}}\n"
    root = tree(tmp_path, {"fleet.yaml": FLEET, "apps/demo/app.yaml": app})
    d = load_desired(root, "h1")
    assert d.apps[0].chaos is None and "chaos block ignored" in d.notes[0]
    d = load_desired(root, "h1", LoadOptions(allow_chaos=True))
    assert (d.apps[0].chaos.kill_per_hour, d.apps[0].chaos.disable_s) == (60.0, 120.0) and d.notes == ()


def test_waves_parse_and_hosts_waves_are_resolved_per_host(tmp_path):
    app = APP + """\
rollout:
  waves:
    - hosts: {groups: [canary]}
    - {percent: 25, after: 10m, gate: {prometheus: "http://127.0.0.1:9090", query: "up", expect: "== 1"}}
    - {percent: 100, after: 1800}
"""
    root = tree(tmp_path, {"fleet.yaml": FLEET, "apps/demo/app.yaml": app})
    w1 = load_desired(root, "h1").apps[0].rollout.waves
    w2 = load_desired(root, "h2").apps[0].rollout.waves
    assert (w1[0].selected, w2[0].selected) == (False, True)
    assert (w1[1].percent, w1[1].after_s, w1[1].gate.op, w1[1].gate.threshold, w1[1].gate.on_no_data) == \
        (25, 600.0, "==", 1.0, "pause")
    assert w1[2].after_s == 1800.0
    bad = app.replace("{percent: 100, after: 1800}", "{percent: 50, after: 1800}")
    problems = validate_tree(tree(tmp_path / "b", {"fleet.yaml": FLEET, "apps/demo/app.yaml": bad}))
    assert [p.field for p in problems] == ["rollout.waves.2"] and "percent: 100" in problems[0].message
