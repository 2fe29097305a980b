"""Loader and validation: every problem reported with file, line and field; valid trees load exactly."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from agent.core.errors import InvalidState
from agent.core.load import LoadOptions, load_desired, validate_tree
from wheelfactory import lock_line, make_http_app_wheel

FLEET = """\
apiVersion: gitops-agent/v1
kind: Fleet
hosts:
  h1: {groups: [web], labels: {zone: a}}
  h2: {groups: [db], labels: {zone: b}}
"""

APP = """\
apiVersion: gitops-agent/v1
kind: App
name: demo
hosts: {groups: [web]}
environments:
  blue: {lockfile: blue.lock, find_links: [../../wheelhouse]}
services:
  demo-web:
    environment: blue
    port: 8101
    command: [demoapp-server, --port, "8101"]
    health: {http: "http://127.0.0.1:8101/healthz"}
"""


def tree(tmp_path: Path, files: dict[str, str | None]) -> Path:
    """A valid state tree, with `files` replacing (text) or deleting (None) some of it."""
    root = tmp_path / "state"
    wheel = make_http_app_wheel(root / "wheelhouse", "demoapp", "1.0.0")
    base = {"fleet.yaml": FLEET, "apps/demo/app.yaml": APP, "apps/demo/blue.lock": lock_line(wheel) + "\n"}
    base.update(files)
    for rel, text in base.items():
        if text is None:
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


def test_valid_tree_loads_for_targeted_host(tmp_path):
    root = tree(tmp_path, {})
    assert validate_tree(root) == []
    desired = load_desired(root, "h1")
    assert [a.name for a in desired.apps] == ["demo"]
    env = desired.environments["blue"]
    assert env.requirements == (("demoapp", "1.0.0"),)
    assert env.find_links == ((root / "wheelhouse").resolve(),)
    assert desired.services["demo-web"].command == ("demoapp-server", "--port", "8101")
    assert desired.services["demo-web"].health.url == "http://127.0.0.1:8101/healthz"
    # h2 is not in group web; a host fleet.yaml does not list is refused, never emptied (DESIGN §3d)
    assert load_desired(root, "h2").apps == ()
    with pytest.raises(InvalidState, match="host 'nobody' is not defined in fleet.yaml"):
        load_desired(root, "nobody")


def test_identity_changes_with_lock_python_installer(tmp_path):
    root = tree(tmp_path, {})
    a = load_desired(root, "h1").environments["blue"].identity
    b = load_desired(root, "h1", LoadOptions(default_installer="uv")).environments["blue"].identity
    (root / "apps/demo/blue.lock").write_text((root / "apps/demo/blue.lock").read_text() + "# comment\n")
    c = load_desired(root, "h1").environments["blue"].identity
    assert len({a, b, c}) == 3


BAD = [
    pytest.param({"apps/demo/app.yaml": APP.replace("port: 8101", "port: 70000")},
                 [("apps/demo/app.yaml", 10, "services.demo-web.port", "maximum")], id="port-range"),
    pytest.param({"apps/demo/app.yaml": APP + "colour: red\n"},
                 [("apps/demo/app.yaml", 13, "colour", "unknown field")], id="unknown-field"),
    pytest.param({"apps/demo/app.yaml": APP.replace("name: demo", "name: demo\nname: other")},
                 [("apps/demo/app.yaml", 4, "name", "duplicate key")], id="duplicate-key"),
    pytest.param({"apps/demo/app.yaml": APP.replace("environment: blue", "environment: green")},
                 [("apps/demo/app.yaml", 9, "services.demo-web.environment", "not defined")], id="unknown-env"),
    pytest.param({"apps/demo/blue.lock": None},
                 [("apps/demo/app.yaml", 6, "environments.blue.lockfile", "does not exist")], id="missing-lock"),
    pytest.param({"apps/demo/app.yaml": APP.replace("blue.lock,", "../../../../etc/passwd,")},
                 [("apps/demo/app.yaml", 6, "environments.blue.lockfile", "escapes")], id="lock-escapes"),
    pytest.param({"apps/demo/app.yaml": APP.replace("../../wheelhouse", "/tmp")},
                 [("apps/demo/app.yaml", 6, "environments.blue.find_links.0", "absolute")], id="find-links-absolute"),
    pytest.param({"apps/demo/blue.lock": "demoapp==1.0.0\n"},
                 [("apps/demo/blue.lock", 1, "", "hash")], id="lock-without-hash"),
    pytest.param({"apps/demo/app.yaml": APP.replace('"8101"]', '"8101\\n[program:evil]"]')},
                 [("apps/demo/app.yaml", 11, "services.demo-web.command.2", "not allowed")], id="newline-in-arg"),
    pytest.param({"apps/demo/app.yaml": APP.replace("[demoapp-server,", "[/bin/sh,")},
                 [("apps/demo/app.yaml", 11, "services.demo-web.command.0", "not allowed")], id="absolute-command"),
    pytest.param({"apps/demo/app.yaml": APP.replace("    port: 8101\n", "    port: 8101\n    user: root\n")},
                 [("apps/demo/app.yaml", 11, "services.demo-web.user", "root")], id="root-service"),
    pytest.param({"apps/demo/app.yaml": APP.replace("environments:", "environments: [\n")},
                 [("apps/demo/app.yaml", None, "", "YAML syntax error")], id="yaml-syntax"),
    pytest.param({"apps/demo/app.yaml": APP.replace("name: demo", "name: wrong")},
                 [("apps/demo/app.yaml", 3, "name", "must match its directory")], id="name-vs-dir"),
    pytest.param({"apps/demo/app.yaml": APP + "traffic: {listen: '127.0.0.1:8100', weights: {ghost: 10}}\n"},
                 [("apps/demo/app.yaml", 13, "traffic.weights.ghost", "unknown service")], id="traffic-unknown"),
    pytest.param({"fleet.yaml": FLEET.replace("kind: Fleet", "kind: Flet")},
                 [("fleet.yaml", 2, "kind", "Fleet")], id="fleet-kind"),
    pytest.param({"fleet.yaml": None}, [("fleet.yaml", None, "", "missing")], id="no-fleet"),
    pytest.param({"apps/demo/app.yaml": "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                  "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
                  "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"},
                 [("apps/demo/app.yaml", None, "", "alias bomb")], id="yaml-bomb"),
]


@pytest.mark.parametrize("files, expected", BAD)
def test_bad_input_is_reported_with_file_line_field(tmp_path, files, expected):
    root = tree(tmp_path, files)
    problems = validate_tree(root)
    for file, line, field, text in expected:
        match = [p for p in problems if p.file == file and field in p.field and text in p.message
                 and (line is None or p.line == line)]
        assert match, f"no problem like {(file, line, field, text)} in:\n" + "\n".join(map(str, problems))
    with pytest.raises(InvalidState):
        load_desired(root, "h1")


def test_every_problem_reported_in_one_run(tmp_path):
    app = APP.replace("port: 8101", "port: 0").replace("environment: blue", "environment: nope") + "extra: 1\n"
    root = tree(tmp_path, {"apps/demo/app.yaml": app, "fleet.yaml": FLEET + "  h3: {grups: []}\n"})
    fields = {p.field for p in validate_tree(root)}
    assert {"services.demo-web.port", "extra", "hosts.h3.grups", "services.demo-web.environment"} <= fields


def test_symlinked_lockfile_pointing_outside_is_rejected(tmp_path):
    outside = tmp_path / "secret.lock"
    outside.write_text("x==1 --hash=sha256:" + "0" * 64 + "\n")
    root = tree(tmp_path, {"apps/demo/blue.lock": None})
    os.symlink(outside, root / "apps/demo/blue.lock")
    assert any("escapes" in p.message for p in validate_tree(root))


def test_conflicting_names_across_apps_on_one_host(tmp_path):
    other = APP.replace("name: demo", "name: other")
    root = tree(tmp_path, {"apps/other/app.yaml": other, "apps/other/blue.lock": (tmp_path / "x").name and None})
    (root / "apps/other/blue.lock").write_text((root / "apps/demo/blue.lock").read_text())
    messages = [str(p) for p in validate_tree(root)]
    assert any("service 'demo-web' is also defined" in m for m in messages), messages
    assert any("port 8101" in m for m in messages), messages
