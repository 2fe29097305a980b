"""The loader's checks that must not hide behind another error, and messages that say how to fix."""

from __future__ import annotations

import pytest

from agent.core.errors import InvalidState
from agent.core.load import load_desired, validate_tree
from test_load import APP, tree

OTHER = APP.replace("name: demo", "name: other").replace("demo-web", "other-web").replace("blue", "green")


def two_apps(tmp_path, demo: str = APP, other: str = OTHER):
    root = tree(tmp_path, {"apps/demo/app.yaml": demo, "apps/other/app.yaml": other})
    (root / "apps/other/green.lock").write_text((root / "apps/demo/blue.lock").read_text())
    return root


def messages(root) -> str:
    return "\n".join(map(str, validate_tree(root)))


# -- item 2: no check is skipped because another error is present ----------------------------------------

def test_port_clash_across_apps_is_reported_next_to_a_schema_error(tmp_path):
    # before: an app with any schema error was left out of the conflict check
    text = messages(two_apps(tmp_path, other=OTHER + "colour: red\n"))
    assert "unknown field 'colour'" in text
    assert "port 8101 is also defined in apps/" in text, text


def test_port_clash_inside_an_app_is_reported_next_to_a_schema_error(tmp_path):
    app = APP + """\
  demo-admin:
    environment: blue
    port: 8101
    command: [demoapp-server]
    privileged: true
"""
    text = messages(tree(tmp_path, {"apps/demo/app.yaml": app}))
    assert "unknown field 'privileged'" in text
    assert "services.demo-admin.port: port 8101 is also used by service 'demo-web'" in text, text


def test_a_cut_field_does_not_make_false_problems(tmp_path):
    # a bad port is reported once; the service's other references are still checked; traffic does not
    # claim the service "has no port" because its (bad) port was left out
    app = APP.replace("port: 8101", "port: 0").replace("environment: blue", "environment: nope") \
        + "traffic: {listen: '127.0.0.1:8100', weights: {demo-web: 1}}\n"
    problems = validate_tree(tree(tmp_path, {"apps/demo/app.yaml": app}))
    fields = sorted(p.field for p in problems)
    assert fields == ["services.demo-web.environment", "services.demo-web.port"], problems


def test_a_bug_in_a_check_is_raised_not_swallowed(tmp_path, monkeypatch):
    # before: reference checks on a schema-invalid app swallowed KeyError/TypeError/AttributeError/ValueError,
    # so a bug in a check made its problems vanish silently
    import agent.core.load.builders as builders

    def broken(*args, **kwargs):
        raise TypeError("a bug in a check")

    monkeypatch.setattr(builders, "render_program", broken)
    root = tree(tmp_path, {"apps/demo/app.yaml": APP + "colour: red\n"})
    with pytest.raises(TypeError, match="a bug in a check"):
        validate_tree(root)
    assert load_desired  # the public API is unchanged


# -- item 3: YAML 1.2 core-schema scalars -----------------------------------------------------------------

FLEET_LABELS = """\
apiVersion: gitops-agent/v1
kind: Fleet
hosts:
  h1: {groups: [web], labels: {country: no, power: on, ok: yes, short: y, off: off}}
"""


def test_norway_stays_a_string_in_labels(tmp_path):
    # before (YAML 1.1): `no`/`on`/`yes` were booleans, so the label failed its schema (or, as a key, was True)
    app = APP.replace("hosts: {groups: [web]}", "hosts: {matchLabels: {country: 'no', power: 'on', off: 'off'}}")
    root = tree(tmp_path, {"fleet.yaml": FLEET_LABELS, "apps/demo/app.yaml": app})
    assert validate_tree(root) == []
    assert [a.name for a in load_desired(root, "h1").apps] == ["demo"]


@pytest.mark.parametrize("text, value", [
    ("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False), ("FALSE", False),
    ("no", "no"), ("No", "No"), ("yes", "yes"), ("y", "y"), ("n", "n"), ("on", "on"), ("off", "off"), ("OFF", "OFF"),
    ("0777", 777), ("0o17", 15), ("0x1F", 31), ("1:30", "1:30"), ("1_000", "1_000"), ("2024-01-01", "2024-01-01"),
    ("1.5", 1.5), ("~", None), ("null", None), ("'true'", "true"),
])
def test_scalars_follow_the_yaml_1_2_core_schema(text, value):
    from agent.core.load._yaml import parse

    assert parse(f"k: {text}\n", "f.yaml").data == {"k": value}


def test_a_bool_field_refuses_yes(tmp_path):
    app = APP.replace("find_links: [../../wheelhouse]}", "find_links: [../../wheelhouse], index: yes}")
    text = messages(tree(tmp_path, {"apps/demo/app.yaml": app}))
    assert "environments.blue.index: 'yes' is not of type 'boolean'" in text, text


def test_an_explicit_tag_must_hold_a_core_value(tmp_path):
    from agent.core.errors import InvalidState
    from agent.core.load._yaml import parse

    assert parse("k: !!bool true\n", "f.yaml").data == {"k": True}
    with pytest.raises(InvalidState, match="'yes' is not a bool"):
        parse("k: !!bool yes\n", "f.yaml")


# -- item 4: messages say how to fix ------------------------------------------------------------------------

def test_unknown_environment_lists_the_defined_ones(tmp_path):
    app = APP.replace("environment: blue", "environment: bleu") \
        .replace("environments:\n", "environments:\n  green: {lockfile: blue.lock}\n")
    text = messages(tree(tmp_path, {"apps/demo/app.yaml": app}))
    assert "environment 'bleu' is not defined in this app (did you mean 'blue'?); defined: blue, green" in text, text


def test_unknown_field_suggests_the_close_one(tmp_path):
    app = APP.replace("    port: 8101\n", "    prot: 8101\n")
    problems = validate_tree(tree(tmp_path, {"apps/demo/app.yaml": app,
                                             "fleet.yaml": FLEET_LABELS.replace("groups:", "grups:")}))
    text = "\n".join(map(str, problems))
    assert "apps/demo/app.yaml:10: services.demo-web.prot: unknown field 'prot' (did you mean 'port'?)" in text, text
    assert "hosts.h1.grups: unknown field 'grups' (did you mean 'groups'?)" in text, text


def test_command_path_says_console_script_not_path(tmp_path):
    app = APP.replace("[demoapp-server,", "[/opt/venv/bin/demoapp-server,")
    text = messages(tree(tmp_path, {"apps/demo/app.yaml": app}))
    assert ("services.demo-web.command.0: '/opt/venv/bin/demoapp-server' is not allowed here: argv[0] is a console "
            "script name from the venv, not a path (write 'demoapp-server'") in text, text
    assert "must match ^" not in text, text           # not a regex


def test_yaml_syntax_error_names_where_the_bracket_opened(tmp_path):
    app = APP.replace("command: [demoapp-server, --port, \"8101\"]", "command: [demoapp-server, --port, \"8101\"")
    problems = validate_tree(tree(tmp_path, {"apps/demo/app.yaml": app}))
    assert len(problems) == 1, problems
    p = problems[0]
    assert p.file == "apps/demo/app.yaml" and p.line == 12, p       # where the parser gave up
    assert "flow sequence that opened at line 11, column 14 (is it closed?)" in p.message, p


# -- item 5 (issue 12.3): listen addresses compared as what they bind --------------------------------------

OTHER2 = OTHER.replace("8101", "8102")


def with_traffic(app: str, service: str, listen: str) -> str:
    return app + f"traffic: {{listen: '{listen}', weights: {{{service}: 1}}}}\n"


@pytest.mark.parametrize("demo_listen, other_listen, clash", [
    ("localhost:18300", "127.0.0.1:18300", "127.0.0.1:18300"),
    ("127.0.0.1:18300", "localhost:18300", "127.0.0.1:18300"),
    ("0.0.0.0:18300", "127.0.0.1:18300", "127.0.0.1:18300"),
    ("[::1]:18300", "localhost:18300", "[::1]:18300"),
    ("0.0.0.0:18300", "[::1]:18300", "[::1]:18300"),
    ("[::1]:18300", "127.0.0.1:18300", None),
    ("localhost:18300", "localhost:18301", None),
])
def test_frontends_that_bind_the_same_address_clash(tmp_path, demo_listen, other_listen, clash):
    root = two_apps(tmp_path, with_traffic(APP, "demo-web", demo_listen), with_traffic(OTHER2, "other-web", other_listen))
    problems = [p for p in validate_tree(root) if "listen" in p.field]
    if clash is None:
        assert problems == []
        return
    assert len(problems) == 1, problems
    p = problems[0]
    assert (p.file, p.line, p.field) == ("apps/other/app.yaml", 13, "traffic.listen"), p
    assert (f"listen address {other_listen!r} overlaps listen address {demo_listen!r} of apps/demo/app.yaml:13 "
            f"(both take {clash}) (both run on host h1)") == p.message, p
    with pytest.raises(InvalidState, match="apps/demo/app.yaml:13"):
        load_desired(root, "h1")


@pytest.mark.parametrize("listen", ["127.0.0.1:8101", "localhost:8101", "0.0.0.0:8101"])
def test_a_frontend_may_not_take_a_service_port_of_another_app(tmp_path, listen):
    root = two_apps(tmp_path, APP, with_traffic(OTHER2, "other-web", listen))
    problems = [p for p in validate_tree(root)]
    assert len(problems) == 1, problems
    p = problems[0]
    assert (p.file, p.line, p.field) == ("apps/other/app.yaml", 13, "traffic.listen"), p
    assert (f"listen address {listen!r} takes 127.0.0.1:8101, where service 'demo-web' of apps/demo/app.yaml:10 "
            "listens") in p.message, p


def test_a_service_port_may_not_be_taken_by_an_earlier_apps_frontend(tmp_path):
    # the other order: the frontend's app is read first, the service comes later
    root = two_apps(tmp_path, with_traffic(APP, "demo-web", "0.0.0.0:8102"), OTHER2)
    text = messages(root)
    assert ("apps/other/app.yaml:10: services.other-web.port: port 8102 (127.0.0.1:8102) is also taken by listen "
            "address '0.0.0.0:8102' of apps/demo/app.yaml:13 (both run on host h1)") in text, text


def test_a_frontend_may_not_take_its_own_apps_service_port(tmp_path):
    app = with_traffic(APP, "demo-web", "localhost:8101")
    problems = validate_tree(tree(tmp_path, {"apps/demo/app.yaml": app}))
    assert [(p.line, p.field) for p in problems] == [(13, "traffic.listen")], problems
    assert "takes 127.0.0.1:8101, where service 'demo-web' of apps/demo/app.yaml:10 listens" in problems[0].message
    assert "::1" not in problems[0].message          # only the address both take


def test_only_apps_on_the_same_host_clash(tmp_path):
    other = with_traffic(OTHER2.replace("groups: [web]", "groups: [db]"), "other-web", "0.0.0.0:8101")
    root = two_apps(tmp_path, APP, other)
    assert validate_tree(root) == []                    # demo runs on h1 (web), other on h2 (db)
    both = other.replace("groups: [db]", "groups: [db, web]")
    text = messages(two_apps(tmp_path / "b", APP, both))
    assert "(both run on host h1)" in text and "h2" not in text, text


@pytest.mark.parametrize("listen", ["*:9000", ":9000", "[::]:9000", "0.0.0.0:9000"])
def test_wildcards_take_every_address(listen):
    from agent.core.load.conflicts import bind_of_listen, bind_of_service

    wild = bind_of_listen(listen)
    for other in ("127.0.0.1:9000", "[::1]:9000", "localhost:9000", "10.1.2.3:9000", "*:9000"):
        assert wild.overlap(bind_of_listen(other)), other
    assert wild.overlap(bind_of_service(9000)) and not wild.overlap(bind_of_service(9001))
    assert not bind_of_listen("10.1.2.3:9000").overlap(bind_of_service(9000))


def test_staging_uses_the_same_check_for_kept_back_apps():
    from agent.core.model import App, Service, Traffic
    from agent.service.staging import _check_mixed

    web = App("a", None, (), (Service("a", "a-web", "e", ("x",), port=8001),))
    front = App("b", None, (), (), Traffic("localhost:8001", "weighted", (("b-web", 1),)))
    with pytest.raises(InvalidState, match="takes 127.0.0.1:8001, where service 'a-web' of apps/a/app.yaml"):
        _check_mixed([web, front])
    _check_mixed([web, App("b", None, (), (), Traffic("[::1]:8001", "weighted", (("b-web", 1),)))])


# -- item 6 (issue 12.5): a typo in fleet.yaml must not empty a host (DESIGN §3d) --------------------------

def test_a_host_missing_from_fleet_yaml_is_refused_not_emptied(tmp_path):
    # before: a renamed or misspelt host entry loaded as an empty desired state, and the host was torn down
    root = tree(tmp_path, {"fleet.yaml": FLEET_LABELS.replace("h1:", "hl:")})
    assert validate_tree(root) == []                      # the revision is fine as such ...
    with pytest.raises(InvalidState) as info:             # ... but not for a host it does not list
        load_desired(root, "h1")
    (p,) = info.value.problems
    assert (p.file, p.line, p.field) == ("fleet.yaml", 3, "hosts"), p
    assert "host 'h1' is not defined in fleet.yaml" in p.message and "(did you mean 'hl'?); defined: hl" in p.message


def test_decommission_is_read_from_fleet_yaml(tmp_path):
    fleet = FLEET_LABELS + "  h2: {groups: [db], decommission: true}\n"
    root = tree(tmp_path, {"fleet.yaml": fleet})
    assert validate_tree(root) == []
    assert (load_desired(root, "h1").decommission, load_desired(root, "h2").decommission) == (False, True)
    text = messages(tree(tmp_path / "b", {"fleet.yaml": fleet.replace("decommission: true", "decommission: yes")}))
    assert "hosts.h2.decommission: 'yes' is not of type 'boolean'" in text, text


def test_desired_state_keeps_decommission_across_with_apps():
    from agent.core.model import DesiredState

    d = DesiredState.of("h1", (), notes=("n",), decommission=True)
    assert d.with_apps(()).decommission is True and d.with_apps((), ("m",)).notes == ("m",)
    assert DesiredState.of("h1", ()).decommission is False          # the old callers' form still works


# -- item 7 (issue 12.11): a missing fleet.yaml (an empty checkout, a wrong --path) is an invalid revision ----

def test_a_missing_fleet_yaml_is_an_invalid_revision_naming_the_file(tmp_path):
    empty = tmp_path / "empty"
    (empty / "apps").mkdir(parents=True)
    for root in (empty, tree(tmp_path, {"fleet.yaml": None})):
        problems = validate_tree(root)
        assert [(p.file, p.line) for p in problems] == [("fleet.yaml", None)], problems
        assert "missing: a state repo needs a fleet.yaml at its root" in problems[0].message
        with pytest.raises(InvalidState, match="fleet.yaml: missing"):
            load_desired(root, "h1")
    # with nothing at all, the message asks whether this is the state repo's root (a wrong --path)
    assert "is this the state repo's root?" in validate_tree(empty)[0].message


def test_an_app_file_with_the_wrong_name_is_not_silently_skipped(tmp_path):
    root = tree(tmp_path, {"apps/other/app.yml": OTHER2})
    text = messages(root)
    assert "apps/other/app.yml: is not read: an app is defined by apps/<app>/app.yaml (rename it to app.yaml)" in text


def test_a_fleet_without_hosts_refuses_every_host(tmp_path):
    root = tree(tmp_path, {"fleet.yaml": "apiVersion: gitops-agent/v1\nkind: Fleet\n"})
    with pytest.raises(InvalidState, match="host 'h1' is not defined in fleet.yaml.*; no host is defined"):
        load_desired(root, "h1")


def test_a_typo_in_one_host_entry_does_not_hide_a_clash_on_another(tmp_path):
    root = two_apps(tmp_path, APP, OTHER)              # both on h1 (web), both on port 8101
    (root / "fleet.yaml").write_text(FLEET_LABELS + "  h2: {grups: [db]}\n")
    text = messages(root)
    assert "hosts.h2.grups: unknown field 'grups' (did you mean 'groups'?)" in text, text
    assert "port 8101 is also defined in apps/demo/app.yaml (both run on host h1)" in text, text


# -- item 1: read is the only step that touches files ------------------------------------------------------

def test_validate_works_on_the_read_snapshot_alone(tmp_path):
    import shutil

    from agent.core.load import LoadOptions
    from agent.core.load.read import read_tree
    from agent.core.load.validate import validate

    app = APP + "overrides:\n  - hosts: {names: [h1]}\n    set: {environments.blue.lockfile: other.lock}\n"
    root = tree(tmp_path, {"apps/demo/app.yaml": app})
    (root / "apps/demo/other.lock").write_text((root / "apps/demo/blue.lock").read_text())
    raw = read_tree(root, LoadOptions())
    assert {k[2] for k in raw.refs} == {"blue.lock", "other.lock", "../../wheelhouse"}   # overrides' paths too
    shutil.rmtree(root)                                  # nothing left to read: validate must not need it
    result = validate(raw, LoadOptions())
    assert result.problems == () and [a.name for _, a in result.apps] == ["demo"]
    variant = result.variants.of(result.apps[0][0], result.apps[0][1], result.hosts["h1"])
    assert variant.environments[0].lockfile.name == "other.lock"


def test_an_override_of_an_undefined_service_lists_the_defined_ones(tmp_path):
    app = APP + "overrides:\n  - hosts: {names: [h1]}\n    set: {services.demo-wbe.port: 9000}\n"
    text = messages(tree(tmp_path, {"apps/demo/app.yaml": app}))
    assert ("'services.demo-wbe' is not defined in this app (or an index is out of range): overrides change an "
            "app's environments and services, never add them (did you mean 'demo-web'?); defined: demo-web") in text, text
