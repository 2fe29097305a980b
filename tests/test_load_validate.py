"""The loader's checks that must not hide behind another error, and messages that say how to fix."""

from __future__ import annotations

import pytest

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
