"""render_program: table-driven cases plus a Hypothesis proof against supervisord's own parser.

The oracle is supervisor's code itself (`ServerOptions.read_config`, which runs configparser, the
`%(here)s` rewrite, `%` expansion and the environment lexer), then `shlex.split` as supervisord does
at spawn time. No process is started.
"""

from __future__ import annotations

import io
import os
import shlex
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from supervisor.options import ServerOptions, UnhosedConfigParser

from agent.core.errors import Permanent
from agent.core.render.supervisor import (
    ENV_KEY_RE,
    MARKER_KEY,
    PROGRAM_NAME_RE,
    ProgramSpec,
    UnsafeValue,
    process_logfile,
    render_program,
    render_supervisord,
)

_MAIN = (
    "[supervisord]\nlogfile=/tmp/gitops-agent-test.log\npidfile=/tmp/gitops-agent-test.pid\n"
    "[include]\nfiles=/nonexistent-gitops-agent-test/*.conf\n"
)
_ALWAYS = {
    "autostart": "true",
    "stopasgroup": "true",
    "killasgroup": "true",
    "redirect_stderr": "false",
}


def load_all(text: str):
    """What supervisord makes of a program file: (ini sections, options, its group, its ProcessConfigs)."""
    parser = UnhosedConfigParser()
    parser.read_string(text)
    sections = parser.sections()
    options = {k: parser.get(s, k) for s in sections for k in parser.options(s)}
    server = ServerOptions()
    server.here = "/srv/here"  # the [include] section makes supervisord rewrite %(here)s
    [group] = server.read_config(io.StringIO(_MAIN + text)).process_group_configs
    return sections, options, group, list(group.process_configs)


def load(text: str):
    """(ini sections, options, the one ProcessConfig) of a single-process program file."""
    sections, options, _group, processes = load_all(text)
    assert len(processes) == 1, processes
    return sections, options, processes[0]


def assert_round_trip(spec: ProgramSpec) -> None:
    text = render_program(spec)
    sections, options, group, procs = load_all(text)
    assert sections == [f"program:{spec.name}"]
    for key, value in _ALWAYS.items():
        assert options[key] == value
    assert group.name == spec.name
    assert group.priority == (999 if spec.priority is None else spec.priority)
    assert len(procs) == spec.numprocs
    if spec.numprocs == 1:
        assert [p.name for p in procs] == [spec.name]
    else:
        assert sorted(p.name for p in procs) == sorted(f"{spec.name}-{i}" for i in range(spec.numprocs))
    for proc in procs:
        num = int(proc.name.rpartition("-")[2]) if spec.numprocs > 1 else None
        assert proc.priority == (999 if spec.priority is None else spec.priority)
        assert shlex.split(proc.command) == list(spec.command)
        assert proc.environment == {**dict(spec.environment), MARKER_KEY: spec.name}
        assert proc.umask == int(spec.umask, 8)
        assert proc.directory == spec.directory
        assert proc.startsecs == spec.startsecs >= 1
        assert proc.startretries == spec.startretries
        assert proc.stopwaitsecs == spec.stopwaitsecs
        assert proc.stopasgroup and proc.killasgroup and not proc.redirect_stderr and proc.autostart
        for attr in ("stdout_logfile", "stderr_logfile"):
            path = getattr(spec, attr)
            if path is not None:
                want = path if num is None else process_logfile(path, spec.name, num)
                assert getattr(proc, attr) == want
                assert getattr(proc, f"{attr}_maxbytes") == spec.log_maxbytes
                assert getattr(proc, f"{attr}_backups") == spec.log_backups
    for attr in ("stdout_logfile", "stderr_logfile"):
        if getattr(spec, attr) is not None:
            assert len({getattr(p, attr) for p in procs}) == len(procs), "processes would share a log file"


# --- table: accepted -----------------------------------------------------------------------------

HOSTILE_ARGS = [
    "plain",
    "",
    "with space",
    "it's",
    'say "hi"',
    "semi;colon",
    "a ;comment",
    "a #comment",
    "#start",
    ";start",
    "100%",
    "%(here)s",
    "%(ENV_HOME)s",
    "%%(program_name)s",
    "back\\slash",
    "trailing\\",
    "  padded  ",
    "[program:evil]",
    "nbsp\xa0;x",
    "ünïcødé ✓",
    "$HOME `id` $(id)",
    "a=b,c=d",
]

ACCEPTED_ENV = [
    "",
    "plain",
    "a,b,c",
    "K=V,K2=V2",
    "has space",
    'dq"inside',
    "sq'inside",
    "hash#tag",
    "semi;colon",
    "100%",
    "%(ENV_HOME)s",
    "%%",
    "back\\slash\\",
    "C:\\path",
    "=leading",
    "  padded  ",
    "ünïcødé ✓",
    "[program:evil]",
    "a)b(c",
]


@pytest.mark.parametrize("arg", HOSTILE_ARGS)
def test_command_argument_round_trips(arg):
    assert_round_trip(ProgramSpec("app", ("/usr/bin/env", arg, "--x", arg)))


@pytest.mark.parametrize("value", ACCEPTED_ENV)
def test_environment_value_round_trips(value):
    spec = ProgramSpec("app", ("/bin/true",), environment=(("V", value), ("AFTER", "kept")))
    assert_round_trip(spec)


def test_full_spec_round_trips_and_is_deterministic():
    spec = ProgramSpec(
        name="web.blue-1_x",
        command=("/srv/app/venv/bin/python", "-m", "app", "--greeting", "50% off; #1"),
        directory="/srv/app 100%",
        environment=(("Z", "last"), ("A", "first, with comma"), ("_U", "x")),
        user="root",
        stdout_logfile="/tmp/web.out.log",
        stderr_logfile="/tmp/web.err.log",
        startsecs=3,
        startretries=0,
        stopwaitsecs=0,
        autorestart="true",
    )
    assert_round_trip(spec)
    text = render_program(spec)
    assert text == render_program(spec)
    assert text.index("A=") < text.index("Z=") < text.index("_U=")  # sorted: stable file text
    assert "[program:web.blue-1_x]\n" in text
    assert "autorestart=true\n" in text and "user=root\n" in text


def test_environment_order_does_not_change_the_text():
    a = ProgramSpec("app", ("/bin/true",), environment=(("A", "1"), ("B", "2")))
    b = ProgramSpec("app", ("/bin/true",), environment=(("B", "2"), ("A", "1")))
    assert render_program(a) == render_program(b)


def test_exact_rendering_of_a_small_spec():
    spec = ProgramSpec("svc", ("/bin/echo", "it's 5%"), environment=(("K", "a,b"),))
    assert render_program(spec) == (
        "; managed by gitops-agent: edits are overwritten\n"
        "[program:svc]\n"
        "command=/bin/echo 'it'\\''s 5'%%\n"
        'environment=GITOPS_AGENT_PROGRAM="svc",K="a,b"\n'
        "umask=022\n"
        "autostart=true\n"
        "autorestart=unexpected\n"
        "startsecs=1\n"
        "startretries=3\n"
        "stopwaitsecs=10\n"
        "stopasgroup=true\n"
        "killasgroup=true\n"
        "redirect_stderr=false\n"
    )


def test_logs_rotate_by_default_and_limits_are_per_spec():
    spec = ProgramSpec("svc", ("/bin/true",), stdout_logfile="/tmp/svc.out.log", stderr_logfile="/tmp/svc.err.log")
    text = render_program(spec)
    for stream in ("stdout", "stderr"):
        assert f"{stream}_logfile_maxbytes=10MB\n{stream}_logfile_backups=3\n" in text
    assert_round_trip(spec)
    small = ProgramSpec("svc", ("/bin/true",), stdout_logfile="/tmp/o", log_maxbytes=12345, log_backups=0)
    assert "stdout_logfile_maxbytes=12345\nstdout_logfile_backups=0\n" in render_program(small)
    assert_round_trip(small)


def test_exact_rendering_of_a_multi_process_spec_with_a_priority():
    spec = ProgramSpec("worker", ("/bin/sleep", "9"), numprocs=3, priority=20,
                       stdout_logfile="/tmp/worker.out.log", stderr_logfile="/tmp/worker.err.log")
    assert render_program(spec) == (
        "; managed by gitops-agent: edits are overwritten\n"
        "[program:worker]\n"
        "command=/bin/sleep 9\n"
        "process_name=%(program_name)s-%(process_num)d\n"
        "numprocs=3\n"
        'environment=GITOPS_AGENT_PROGRAM="worker"\n'
        "umask=022\n"
        "autostart=true\n"
        "priority=20\n"
        "autorestart=unexpected\n"
        "startsecs=1\n"
        "startretries=3\n"
        "stopwaitsecs=10\n"
        "stopasgroup=true\n"
        "killasgroup=true\n"
        "redirect_stderr=false\n"
        "stdout_logfile=/tmp/worker-%(process_num)d.out.log\n"
        "stdout_logfile_maxbytes=10MB\n"
        "stdout_logfile_backups=3\n"
        "stderr_logfile=/tmp/worker-%(process_num)d.err.log\n"
        "stderr_logfile_maxbytes=10MB\n"
        "stderr_logfile_backups=3\n"
    )
    assert_round_trip(spec)
    _, _, group, procs = load_all(render_program(spec))
    assert group.priority == 20 and [p.priority for p in procs] == [20, 20, 20]   # boot order is by group
    assert [p.stdout_logfile for p in procs] == [f"/tmp/worker-{i}.out.log" for i in range(3)]


def test_numprocs_1_and_no_priority_add_nothing():
    """Program files already on hosts must not change (a change would restart every service)."""
    base = ProgramSpec("svc", ("/bin/true",), stdout_logfile="/l/svc.out.log")
    text = render_program(base)
    assert render_program(ProgramSpec("svc", ("/bin/true",), stdout_logfile="/l/svc.out.log", numprocs=1)) == text
    assert "numprocs" not in text and "process_name" not in text and "priority" not in text
    assert "stdout_logfile=/l/svc.out.log\n" in text
    with_priority = render_program(ProgramSpec("svc", ("/bin/true",), stdout_logfile="/l/svc.out.log", priority=5))
    assert with_priority.replace("priority=5\n", "") == text


@pytest.mark.parametrize(("path", "name", "want"), [
    ("/tmp/web.out.log", "web", "/tmp/web-{}.out.log"),
    ("/tmp/web.blue.out.log", "web.blue", "/tmp/web.blue-{}.out.log"),     # a name with a dot
    ("/tmp/web.blue.out.log", "web", "/tmp/web-{}.blue.out.log"),
    ("/tmp/web", "web", "/tmp/web-{}"),
    ("/tmp/other.log", "web", "/tmp/other-{}.log"),
    ("/tmp/plain", "web", "/tmp/plain-{}"),
    ("/no.such.dir/web2.log", "web", "/no.such.dir/web2-{}.log"),
    ("/tmp/50%.log", "web", "/tmp/50%-{}.log"),
])
def test_per_process_log_files(path, name, want):
    spec = ProgramSpec(name, ("/bin/true",), numprocs=2, stdout_logfile=path, stderr_logfile=path + ".err")
    for i in range(2):
        assert process_logfile(path, name, i) == want.format(i)
    if os.path.isdir(os.path.dirname(path)):
        assert_round_trip(spec)
    else:
        with pytest.raises(ValueError, match="directory"):     # supervisord checks the directory exists
            load_all(render_program(spec))


@pytest.mark.parametrize("path", ["/tmp/100%", "/tmp/%%", "/tmp/%(ENV_HOME)s", "/tmp/%(process_num)d",
                                  "/tmp/%s%d", "/tmp/a%", "/tmp/%(program_name)s.log"])
@pytest.mark.parametrize("numprocs", [1, 3])
def test_percent_in_log_file_names_survives_both_expansions(path, numprocs):
    """A literal % in a log file name is written %%%% (supervisord expands it twice) and comes back."""
    assert_round_trip(ProgramSpec("app", ("/bin/true",), stdout_logfile=path, numprocs=numprocs))


def test_every_program_carries_its_marker_and_a_user_cannot_set_it():
    """The marker names the program in every process it starts (the driver finds daemonized ones by it)."""
    _, _, proc = load(render_program(ProgramSpec("web", ("/bin/true",))))
    assert proc.environment == {MARKER_KEY: "web"}
    with pytest.raises(UnsafeValue, match=f"^environment.{MARKER_KEY}: reserved"):
        render_program(ProgramSpec("web", ("/bin/true",), environment=((MARKER_KEY, "other"),)))


# --- table: refused ------------------------------------------------------------------------------

EVIL = "x\n[program:evil]\ncommand=/bin/sh -c id"

REFUSED = [
    ({"name": "bad name"}, "name", "must match"),
    ({"name": "a:b"}, "name", "must match"),
    ({"name": "x]"}, "name", "must match"),
    ({"name": "-lead"}, "name", "must match"),
    ({"name": "a" * 65}, "name", "must match"),
    ({"command": ()}, "command", "non-empty"),
    ({"command": ["/bin/true"]}, "command", "tuple"),
    ({"command": ("relative",)}, "command[0]", "absolute"),
    ({"command": ("/bin/echo", EVIL)}, "command[1]", "U+000A"),
    ({"command": ("/bin/echo", "a\rb")}, "command[1]", "U+000D"),
    ({"command": ("/bin/echo", "tab\there")}, "command[1]", "U+0009"),
    ({"command": ("/bin/echo", "nul\x00")}, "command[1]", "U+0000"),
    ({"command": ("/bin/echo", "nel\x85")}, "command[1]", "U+0085"),
    ({"command": ("/bin/echo", "ls\u2028")}, "command[1]", "U+2028"),
    ({"command": ("/bin/echo", 3)}, "command[1]", "string"),
    ({"environment": (("A", EVIL),)}, "environment.A", "U+000A"),
    ({"environment": (("A", "x\x0bx"),)}, "environment.A", "U+000B"),
    ({"environment": (("1A", "x"),)}, "environment", "key"),
    ({"environment": (("A-B", "x"),)}, "environment", "key"),
    ({"environment": (("A", "x"), ("A", "y"))}, "environment.A", "twice"),
    ({"environment": (("A", "both ' and \" inside"),)}, "environment.A", "both"),
    ({"environment": (("A", "'quoted'"),)}, "environment.A", "quote character"),
    ({"environment": (("A", 'end"'),)}, "environment.A", "quote character"),
    ({"environment": (("A", "a ;b"),)}, "environment.A", "comment"),
    ({"environment": (("A", "a #b"),)}, "environment.A", "comment"),
    ({"environment": (("A", "a\xa0#b"),)}, "environment.A", "comment"),
    ({"environment": (("A", "%(here)s"),)}, "environment.A", "%(here)s"),
    ({"environment": (("A", 1),)}, "environment.A", "string"),
    ({"environment": [("A", "x")]}, "environment", "tuple"),
    ({"umask": "22; x"}, "umask", "octal"),
    ({"log_maxbytes": -1}, "log_maxbytes", ">= 0"),
    ({"log_backups": True}, "log_backups", "integer"),
    ({"directory": "relative"}, "directory", "absolute"),
    ({"directory": "/x\n[program:evil]"}, "directory", "U+000A"),
    ({"directory": "/trailing "}, "directory", "whitespace"),
    ({"directory": "/a ;b"}, "directory", "comment"),
    ({"directory": "/%(here)s"}, "directory", "%(here)s"),
    ({"user": "root\n"}, "user", "user name"),
    ({"user": "a b"}, "user", "user name"),
    ({"user": ""}, "user", "user name"),
    ({"stdout_logfile": "AUTO"}, "stdout_logfile", "absolute"),
    ({"stdout_logfile": "/tmp/%(here)s"}, "stdout_logfile", "%(here)s"),
    ({"stdout_logfile": "/tmp/a ;b"}, "stdout_logfile", "comment"),
    ({"stdout_logfile": "/tmp/a\n[program:evil]"}, "stdout_logfile", "U+000A"),
    ({"numprocs": 0}, "numprocs", "1..64"),
    ({"numprocs": 65}, "numprocs", "1..64"),
    ({"numprocs": True}, "numprocs", "integer"),
    ({"numprocs": "2"}, "numprocs", "integer"),
    ({"priority": 0}, "priority", "1..999"),
    ({"priority": 1000}, "priority", "1..999"),
    ({"priority": 5.0}, "priority", "integer"),
    ({"stderr_logfile": "/tmp/x\r"}, "stderr_logfile", "U+000D"),
    ({"startsecs": 0}, "startsecs", "retries"),
    ({"startsecs": True}, "startsecs", "integer"),
    ({"startretries": -1}, "startretries", ">= 0"),
    ({"stopwaitsecs": "10"}, "stopwaitsecs", "integer"),
    ({"autorestart": "yes"}, "autorestart", "one of"),
]


@pytest.mark.parametrize(("changes", "field", "why"), REFUSED)
def test_unsafe_values_are_refused_naming_the_field(changes, field, why):
    spec = ProgramSpec(**{"name": "app", "command": ("/bin/true",), **changes})
    with pytest.raises(UnsafeValue) as info:
        render_program(spec)
    assert info.value.field == field
    assert why in info.value.reason
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError) and isinstance(info.value, Permanent)


def test_control_character_message_names_field_and_code_point():
    spec = ProgramSpec("app", ("/bin/true",), environment=(("FOO", "a\nb"),))
    with pytest.raises(UnsafeValue, match=r"^environment\.FOO: control character U\+000A not allowed$"):
        render_program(spec)


# --- render_supervisord --------------------------------------------------------------------------


def test_supervisord_conf_parses_and_points_at_our_paths(tmp_path):
    text = render_supervisord(
        socket_path=f"{tmp_path}/s.sock", pid_path=f"{tmp_path}/s.pid", log_dir=str(tmp_path)
    )
    server = ServerOptions()
    server.here = str(tmp_path)
    section = server.read_config(io.StringIO(text))
    assert section.pidfile == f"{tmp_path}/s.pid"
    assert section.childlogdir == str(tmp_path)
    [http] = section.server_configs
    assert http["file"] == f"{tmp_path}/s.sock" and http["chmod"] == 0o700
    assert "files=programs/*.conf\n" in text
    assert section.minfds == 65536 and section.umask == 0o077


def test_supervisord_conf_takes_the_minfds_it_is_given():
    text = render_supervisord(socket_path="/r/s.sock", pid_path="/r/p", log_dir="/r/l", minfds=4096)
    assert "minfds=4096\n" in text
    with pytest.raises(UnsafeValue, match="minfds"):
        render_supervisord(socket_path="/r/s.sock", pid_path="/r/p", log_dir="/r/l", minfds=0)


@pytest.mark.parametrize("bad", ["/r/a\nb", "/r/a ;b", "relative", "/r/%(here)s"])
def test_supervisord_conf_refuses_unsafe_root(bad):
    with pytest.raises(UnsafeValue):
        render_supervisord(socket_path=f"{bad}/s.sock", pid_path="/r/p", log_dir="/r/l")


# --- property: anything accepted round-trips exactly --------------------------------------------

_TRICKY = [
    "'", '"', "\\", "%", "#", ";", ",", "=", " ", "\t", "\n", "\r", "\x00", "\x0b", "\x85",
    "\xa0", "\u2028", "[", "]", "(", ")", "$", "a", "Z", "0", "ü", "%(here)s", "%(ENV_HOME)s",
    "%(program_name)s", "\n[program:evil]\ncommand=/bin/sh\n", " ;", " #", "\\'",
]
_WORST = ["'", '"', "\\", "%", "#", ";", " ", "\xa0", "x", "%(here)s"]
texts = st.one_of(
    st.text(max_size=24),
    st.lists(st.sampled_from(_TRICKY), max_size=10).map("".join),
    st.lists(st.sampled_from(_WORST), max_size=6).map("".join),
)
names = st.from_regex(PROGRAM_NAME_RE, fullmatch=True)
env_keys = st.from_regex(ENV_KEY_RE, fullmatch=True).filter(lambda k: len(k) <= 12)
argvs = st.tuples(st.sampled_from(["/bin/echo", "/x y/%(here)s"]) | texts.map("/".__add__)).flatmap(
    lambda head: st.lists(texts, max_size=4).map(lambda rest: head + tuple(rest))
)
environments = st.dictionaries(env_keys, texts, max_size=4).map(lambda d: tuple(d.items()))
logfiles = st.none() | texts.filter(lambda t: "/" not in t).map("/tmp/".__add__)
numprocs = st.sampled_from([1, 1, 2, 3, 64])
priorities = st.none() | st.integers(1, 999)
specs = st.builds(
    ProgramSpec,
    name=names,
    command=argvs,
    directory=st.none() | texts.map("/".__add__),
    environment=environments,
    user=st.sampled_from([None, "root", "0"]),
    stdout_logfile=logfiles,
    stderr_logfile=logfiles,
    startsecs=st.integers(1, 3),
    startretries=st.integers(0, 3),
    stopwaitsecs=st.integers(0, 3),
    autorestart=st.sampled_from(["true", "false", "unexpected"]),
    numprocs=numprocs,
    priority=priorities,
)
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def refuses_or_round_trips(spec: ProgramSpec) -> None:
    try:
        render_program(spec)
    except UnsafeValue:
        return
    assert_round_trip(spec)


@PROPERTY
@given(argvs)
@example(("/bin/echo", "a ;b", "a\xa0#b", "%(here)s", "%(ENV_HOME)s", "'", "#", "x'", ""))
@example(("/bin/echo", "\n[program:evil]\ncommand=/bin/sh"))
def test_any_command_refuses_or_round_trips(argv):
    refuses_or_round_trips(ProgramSpec("app", argv))


@PROPERTY
@given(environments)
@example((("A", "\n[program:evil]\ncommand=/bin/sh"),))
@example((("A", "%(ENV_HOME)s"), ("B", "a,b=c"), ("C", "x#y;z"), ("D", "a\\b")))
@example((("B", "'x"),))
@example((("B", "x'"),))
@example((("B", '"x'),))
@example((("B", "a'b\"c"),))
@example((("C", "a ;b"),))
@example((("C", "a\xa0#b"),))
@example((("D", "%(here)s"),))
def test_any_environment_refuses_or_round_trips(env):
    refuses_or_round_trips(ProgramSpec("app", ("/bin/true",), environment=env))


@PROPERTY
@given(st.none() | texts.map("/".__add__), logfiles, logfiles)
def test_any_paths_refuse_or_round_trip(directory, stdout, stderr):
    spec = ProgramSpec(
        "app", ("/bin/true",), directory=directory, stdout_logfile=stdout, stderr_logfile=stderr
    )
    refuses_or_round_trips(spec)


@PROPERTY
@given(specs)
def test_any_spec_refuses_or_round_trips(spec):
    refuses_or_round_trips(spec)


@PROPERTY
@given(names, logfiles, logfiles, st.integers(1, 4))
@example("app", "/tmp/%(here)s", None, 2)
@example("app", "/tmp/%%%%(process_num)d", "/tmp/x%", 2)
@example("app", "/tmp/\n[program:evil]\ncommand=/bin/sh", None, 2)
@example("a.b", "/tmp/a.b.%(ENV_HOME)s", "/tmp/a.b", 3)
def test_any_log_file_names_refuse_or_round_trip(name, stdout, stderr, n):
    """Whatever the name, paths and process count: refused, or every process logs exactly where asked."""
    if stdout is not None and n > 1 and stdout.startswith("/tmp/x"):
        stdout = f"/tmp/{name}." + stdout[len("/tmp/x"):]    # also the `NAME.` prefix case
    refuses_or_round_trips(ProgramSpec(name, ("/bin/true",), stdout_logfile=stdout, stderr_logfile=stderr, numprocs=n))


@PROPERTY
@given(texts.filter(lambda t: "/" not in t), st.integers(1, 3))
def test_log_file_names_are_refused_only_for_the_documented_reasons(base, n):
    """Printable names without `%(here)s`, edge whitespace or an inline comment are always accepted."""
    path = "/tmp/" + base
    ok = (base.isprintable() and base == base.strip() and "%(here)s" not in path
          and not any(c in ";#" and base[i - 1].isspace() for i, c in enumerate(base) if i)
          and not (n > 1 and "%(here)s" in process_logfile(path, "app", 0)))
    spec = ProgramSpec("app", ("/bin/true",), stdout_logfile=path, numprocs=n)
    if ok:
        assert_round_trip(spec)
    else:
        refuses_or_round_trips(spec)


def _representable_env_value(v: str) -> bool:
    """The documented limits of supervisord's environment= syntax, restated independently."""
    if any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in v):
        return False
    if v and (v[0] in "'\"" or v[-1] in "'\""):
        return False
    if "'" in v and '"' in v:
        return False
    if any(c in ";#" and i > 0 and v[i - 1].isspace() for i, c in enumerate(v)):
        return False
    return "%(here)s" not in v


@PROPERTY
@given(st.lists(texts.filter(str.isprintable), max_size=5), texts.filter(_representable_env_value))
def test_refusals_are_narrow(args, env_value):
    """Printable argv is never refused; env values are refused only for the documented reasons."""
    spec = ProgramSpec("app", ("/bin/echo", *args), environment=(("V", env_value),))
    assert_round_trip(spec)
