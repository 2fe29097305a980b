"""Property tests of the loader and of the program renderer, end to end.

Loader: for any app.yaml (generated documents mixing good and hostile values, and byte-level mutations
of a good file), `validate_tree` never raises; it returns problems that each name a file, a line and a
field, or the tree is valid and the DesiredState holds exactly the input's values (nothing added, nothing
dropped) and every service renders to a program file supervisord reads back to exactly that input.

Renderer: for any Service, `agent.core.plan.render_service` either raises UnsafeValue naming the field, or
gives exactly one `[program:NAME]` section whose command and environment come back unchanged through
supervisor's own config reader (`ServerOptions.read_config`) and `shlex.split` (what it does at spawn).
"""

from __future__ import annotations

import atexit
import io
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from supervisor.options import ServerOptions, UnhosedConfigParser

from agent.core.errors import InvalidState
from agent.core.layout import Layout
from agent.core.load import load_desired, validate_tree
from agent.core.model import Environment, HealthCheck as Health, Service
from agent.core.plan import render_service
from agent.core.render.supervisor import UnsafeValue
from wheelfactory import lock_line, make_http_app_wheel

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
APP_FILE = "apps/demo/app.yaml"
FLEET = "apiVersion: gitops-agent/v1\nkind: Fleet\nhosts:\n  h1: {groups: [web]}\n"
_ROOT = Path(tempfile.mkdtemp(prefix="gitops-agent-prop-"))
atexit.register(shutil.rmtree, _ROOT, True)
LAYOUT = Layout(_ROOT)
LAYOUT.logs.mkdir()                   # supervisord checks that a log file's directory exists

_MAIN = ("[supervisord]\nlogfile=/tmp/gitops-agent-prop.log\npidfile=/tmp/gitops-agent-prop.pid\n"
         "[include]\nfiles=/nonexistent-gitops-agent-prop/*.conf\n")


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    """A state tree with a fleet, a wheelhouse and a lock; each example writes its own app.yaml."""
    root = tmp_path_factory.mktemp("prop") / "state"
    wheel = make_http_app_wheel(root / "wheelhouse", "demoapp", "1.0.0")
    (root / "apps/demo").mkdir(parents=True)
    (root / "apps/demo/demo.lock").write_text(lock_line(wheel) + "\n")
    (root / "fleet.yaml").write_text(FLEET)
    return root


def supervisord_reads(text: str):
    """(ini options, the one ProcessConfig) as supervisord reads a program file.

    `user=` is compared as ini text: supervisord resolves it to a uid and refuses names unknown here.
    """
    parser = UnhosedConfigParser()
    parser.read_string(text)
    sections = parser.sections()
    assert len(sections) == 1, sections
    options = {k: parser.get(sections[0], k) for k in parser.options(sections[0])}
    server = ServerOptions()
    server.here = "/srv/here"
    without_user = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("user="))
    groups = server.read_config(io.StringIO(_MAIN + without_user)).process_group_configs
    processes = [p for g in groups for p in g.process_configs]
    assert len(processes) == 1, processes
    return sections[0], options, processes[0]


def assert_renders_exactly(svc: Service, env: Environment) -> None:
    text = render_service(svc, env, LAYOUT)
    section, options, proc = supervisord_reads(text)
    venv = LAYOUT.venv(env.name, env.identity)
    assert section == f"program:{svc.name}" and proc.name == svc.name
    assert shlex.split(proc.command) == [str(venv / "bin" / svc.command[0]), *svc.command[1:]]
    assert proc.environment == {**dict(svc.env), "GITOPS_AGENT_PROGRAM": svc.name}   # + the agent's marker
    assert options.get("user") == svc.user
    assert proc.directory == str(venv)
    assert (proc.startsecs, proc.stopwaitsecs) == (svc.startsecs, svc.stopwaitsecs)


# --- strategies -----------------------------------------------------------------------------------

_TRICKY = ["\n", "\r", "\0", "\t", "\x7f", "\u2028", "\x85", " ;", " #", ";", "#", "%", "%(here)s",
           "%(ENV_HOME)s", "[program:evil]", "'", '"', "\\", "=", ",", " ", "\xa0", "../", "/", "é", "x"]
texty = st.one_of(
    st.text(max_size=16),
    st.lists(st.sampled_from(_TRICKY), max_size=8).map("".join),
    st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True),
)
identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True)
names = identifiers | texty
scalars = st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=False) | texty
ports = st.integers(1, 65535) | st.integers(-100, 100_000) | texty
commands = st.tuples(st.sampled_from(["demoapp-server", "/bin/sh", "../x", "a b"]) | texty,
                     st.lists(texty | st.integers(0, 9), max_size=4)).map(lambda t: [t[0], *t[1]])
env_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True) | texty
env_maps = st.dictionaries(env_keys, texty | st.integers(0, 9), max_size=3)
users = st.sampled_from(["nobody", "root", "www-data", "0", "Root"]) | texty
healths = st.fixed_dictionaries(
    {"http": st.sampled_from(["http://127.0.0.1:8080/healthz", "http://localhost/", "http://10.0.0.1/",
                              "file:///etc/passwd", "http://[::1]:1/x y"])},
    optional={"timeout_s": st.floats(-1, 400, allow_nan=False) | texty})


_PRINTABLE = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))
good_args = st.text(_PRINTABLE, max_size=12) | st.lists(
    st.sampled_from([s for s in _TRICKY if s.isprintable() or s == " "]), max_size=5).map("".join)


def representable_env_value(v: str) -> bool:
    """supervisord's environment= syntax, restated: no quote at either end, not both quote kinds,
    no `;`/`#` after whitespace, no `%(here)s` (and no control characters)."""
    return (v.isprintable() or all(c == " " or c.isprintable() for c in v)) and not (
        v[:1] in ("'", '"') or v[-1:] in ("'", '"') or ("'" in v and '"' in v) or "%(here)s" in v
        or any(c in ";#" and i > 0 and v[i - 1].isspace() for i, c in enumerate(v)))


good_env = st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
                           good_args.filter(representable_env_value), max_size=3)


@st.composite
def good_services(draw, ports):
    spec = {"environment": "demo",
            "command": ["demoapp-server", *draw(st.lists(good_args, max_size=4))]}
    if draw(st.booleans()):
        spec["port"] = next(ports)
    if draw(st.booleans()):
        spec["env"] = draw(good_env)
    if draw(st.booleans()):
        spec["user"] = draw(st.sampled_from(["nobody", "www-data", "app_1"]))
    if draw(st.booleans()):
        spec["startsecs"] = draw(st.integers(1, 600))
    if draw(st.booleans()):
        spec["stopwaitsecs"] = draw(st.integers(1, 600))
    if draw(st.booleans()):
        spec["health"] = {"http": draw(st.sampled_from(["http://127.0.0.1:8080/healthz", "http://localhost/",
                                                         "http://[::1]:9/x?y=1"]))}
        if draw(st.booleans()):
            spec["health"]["timeout_s"] = draw(st.floats(0.01, 300) | st.integers(1, 300))
    return spec


# hostile replacements: (where, strategy); where is a key path below one service, or the environment
HOSTILE = [
    (("port",), ports), (("command",), commands), (("command", 0), texty), (("command", 1), texty | st.integers()),
    (("env",), env_maps), (("user",), users), (("startsecs",), st.integers(-1, 700) | scalars),
    (("stopwaitsecs",), scalars), (("health",), healths), (("privileged",), scalars), (("environment",), texty),
    (("@env", "lockfile"), st.sampled_from(["../../fleet.yaml", "/etc/passwd", "missing.lock", "../../../x", "."])),
    (("@env", "find_links"), st.lists(st.sampled_from(["/tmp", "../..", "../../../..", "nope"]), min_size=1, max_size=2)),
    (("@env", "installer"), st.sampled_from(["curl", "", "PIP"])), (("@env", "index"), scalars),
    (("@name",), texty), (("@top",), texty),
]


@st.composite
def apps(draw):
    """A good app document, then 0-2 hostile edits. Returns (doc, number of hostile edits)."""
    first = draw(st.integers(1, 65533))
    ports = iter((first, first + 1, first + 2))
    names = draw(st.lists(identifiers, unique=True, min_size=1, max_size=3))
    env = {"lockfile": "demo.lock", "find_links": ["../../wheelhouse"] * draw(st.integers(0, 1)),
           "index": draw(st.booleans())}
    if draw(st.booleans()):
        env["installer"] = draw(st.sampled_from(["pip", "uv"]))
    doc = {"apiVersion": "gitops-agent/v1", "kind": "App", "name": "demo", "environments": {"demo": env},
           "services": {n: draw(good_services(ports)) for n in names}}
    if draw(st.booleans()):
        doc["hosts"] = draw(st.sampled_from([{"groups": ["web"]}, {"names": ["h2"]}, {"names": ["h1", "h2"]}]))
    edits = draw(st.sampled_from([0, 0, 1, 1, 2]))
    for _ in range(edits):
        where, strategy = draw(st.sampled_from(HOSTILE))
        value = draw(strategy)
        svc = doc["services"][draw(st.sampled_from(sorted(doc["services"])))]   # names as renamed so far
        if where[0] == "@env":
            env[where[1]] = value
        elif where[0] == "@name":
            doc["services"][value] = doc["services"].pop(names[0]) if names[0] in doc["services"] else svc
        elif where[0] == "@top":
            doc[value] = "x"
        elif len(where) == 2:
            if isinstance(svc["command"], list) and len(svc["command"]) > where[1]:
                svc["command"][where[1]] = value
        else:
            svc[where[0]] = value
    return doc, edits


# --- loader ---------------------------------------------------------------------------------------


def _problems_are_located(problems, files=(APP_FILE, "apps/demo/demo.lock", "fleet.yaml")) -> None:
    for p in problems:
        assert p.file in files, p
        assert p.message, p
        if p.file == APP_FILE:
            assert isinstance(p.line, int) and p.line >= 1, p
            assert isinstance(p.field, str), p


def _check_valid_load(state: Path, doc: dict) -> None:
    desired = load_desired(state, "h1")
    targeted = "hosts" not in doc or doc["hosts"].get("groups") == ["web"] or "h1" in doc["hosts"].get("names", [])
    if not targeted:
        assert desired.apps == ()
        return
    assert [a.name for a in desired.apps] == ["demo"]
    assert set(desired.environments) == {"demo"}
    env = desired.environments["demo"]
    assert env.lockfile == (state / "apps/demo" / doc["environments"]["demo"]["lockfile"]).resolve()
    assert env.find_links == tuple((state / "apps/demo" / f).resolve() for f in doc["environments"]["demo"]["find_links"])
    assert env.options == (() if doc["environments"]["demo"]["index"] else ("--no-index",))
    assert env.installer == doc["environments"]["demo"].get("installer", "pip")
    assert set(desired.services) == set(doc["services"])       # nothing added, nothing dropped
    for name, spec in doc["services"].items():
        svc = desired.services[name]
        assert (svc.app, svc.environment, svc.command) == ("demo", spec["environment"], tuple(spec["command"]))
        assert svc.port == spec.get("port") and svc.user == spec.get("user")
        assert dict(svc.env) == spec.get("env", {})
        assert (svc.startsecs, svc.stopwaitsecs) == (spec.get("startsecs", 1), spec.get("stopwaitsecs", 10))
        health = spec.get("health")
        assert svc.health == (Health(health["http"], float(health.get("timeout_s", 2.0))) if health else None)
        assert svc.port is None or isinstance(svc.port, int) and 1 <= svc.port <= 65535
        assert_renders_exactly(svc, env)                          # accepted implies supervisord reads it back


class _Quoting(yaml.SafeDumper):
    """Every string double-quoted: PyYAML writes YAML 1.1, where `0E0` is a plain string, but the agent reads
    YAML 1.2, where it is a float (the document must mean to the agent what the test generated)."""


_Quoting.add_representer(str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"'))


def _good(doc: dict) -> dict:
    return {"apiVersion": "gitops-agent/v1", "kind": "App", "name": "demo",
            "environments": {"demo": {"lockfile": "demo.lock", "find_links": ["../../wheelhouse"], "index": False}},
            "services": {"demo-web": {"environment": "demo", "command": ["demoapp-server"], **doc}}}


@PROPERTY
@given(apps())
@example((_good({"command": ["demoapp-server", "%(ENV_X)s", "[program:x]", "a ;b", "%(here)s"],
                 "env": {"A": "%(ENV_HOME)s,B=c", "B": "[program:x]"}, "port": 8101}), 0))
@example((_good({"env": {"A": "a ;b"}}), 1))
@example((_good({"env": {"A": "%(here)s"}}), 1))
@example((_good({"command": ["demoapp-server", "x\n[program:evil]\ncommand=/bin/sh"]}), 1))
@example((_good({"user": "root"}), 1))
def test_any_app_document_is_rejected_with_located_problems_or_loads_exactly(state, doc_edits):
    doc, edits = doc_edits
    (state / APP_FILE).write_text(yaml.dump(doc, Dumper=_Quoting, allow_unicode=True, sort_keys=False))
    problems = validate_tree(state)
    event("rejected" if problems else "valid")
    if problems:
        assert edits, f"a good document was refused: {[str(p) for p in problems]}"
        _problems_are_located(problems)
        with pytest.raises(InvalidState):  # and the agent refuses the same revision
            load_desired(state, "h1")
        return
    _check_valid_load(state, doc)


GOOD_APP = """\
apiVersion: gitops-agent/v1
kind: App
name: demo
hosts: {groups: [web]}
environments:
  demo: {lockfile: demo.lock, find_links: [../../wheelhouse], index: false}
services:
  demo-web:
    environment: demo
    port: 8101
    command: [demoapp-server, --port, "8101"]
    env: {MODE: "prod", LEVEL: 'a b'}
    health: {http: "http://127.0.0.1:8101/healthz", timeout_s: 1}
"""

_SNIPPETS = ["\n", ": ", "- ", "&a ", "*a", "<<: *a", "!!python/name:os.system", "{", "}", "[", "]", "'", '"',
             "\\n", "\\0", "%(here)s", "[program:x]", "\t", "#", "---\n", "\x00", "\ufeff", "?", "|", ">"]


@PROPERTY
@given(st.lists(st.tuples(st.integers(0, len(GOOD_APP)), st.integers(0, 3),
                          st.sampled_from(_SNIPPETS) | st.text(max_size=4)), max_size=4))
def test_any_mutation_of_a_good_file_never_crashes_the_loader(state, edits):
    text = GOOD_APP
    for at, cut, insert in edits:
        at = min(at, len(text))
        text = text[:at] + insert + text[at + cut:]
    (state / APP_FILE).write_bytes(text.encode("utf-8", "surrogatepass"))
    problems = validate_tree(state)
    event("rejected" if problems else "valid")
    _problems_are_located([p for p in problems if p.line is not None or p.file != APP_FILE])
    if not problems:
        desired = load_desired(state, "h1")
        for svc in desired.services.values():
            assert_renders_exactly(svc, desired.environments[svc.environment])


# --- renderer, end to end through agent.core.plan.render_service ---------------------------------------

ENV = Environment(app="demo", name="demo", python="3.11", lockfile=Path("/s/apps/demo/demo.lock"), lock_sha256="0" * 64,
                  requirements=(("demoapp", "1.0.0"),), find_links=(), installer="pip", options=(),
                  identity="0123456789abcdef")


@st.composite
def any_service(draw):
    return Service(
        app="demo", name=draw(names), environment="demo",
        command=tuple(draw(st.lists(texty, min_size=1, max_size=4))),
        port=None, env=tuple(sorted(draw(st.dictionaries(env_keys, texty, max_size=3)).items())),
        user=draw(st.none() | users), startsecs=draw(st.integers(1, 5)), stopwaitsecs=draw(st.integers(1, 5)),
    )


@PROPERTY
@given(any_service())
@example(Service("demo", "demo-web", "demo", ("demoapp-server", "x\n[program:evil]\ncommand=/bin/sh")))
@example(Service("demo", "demo-web", "demo", ("demoapp-server",), env=(("A", "x\n[program:evil]\ncommand=/bin/sh"),)))
@example(Service("demo", "x]\n[program:evil", "demo", ("demoapp-server",)))
@example(Service("demo", "demo-web", "demo", ("demoapp-server", "%(ENV_HOME)s", "%(here)s", "a ;b", "[program:x]"),
                 env=(("A", "%(ENV_HOME)s"), ("B", "[program:x]"))))
def test_render_service_refuses_or_supervisord_reads_back_exactly(svc):
    try:
        render_service(svc, ENV, LAYOUT)
    except UnsafeValue as exc:
        event(f"refused: {exc.field.split('[')[0].split('.')[0]}")
        assert exc.field and exc.reason
        return
    event("rendered")
    assert_renders_exactly(svc, ENV)
