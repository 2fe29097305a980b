"""The secret env launcher: the env file format (pure), the launcher script run for real, and under a
REAL supervisord a service started through it gets its secret values byte for byte, under its own pid.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.core.errors import Permanent
from agent.core.render.launcher import (
    EX_CONFIG,
    LAUNCHER_SOURCE,
    EnvFileError,
    decode_env,
    encode_env,
    launched_command,
)
from agent.core.render.supervisor import ENV_KEY_RE, MARKER_KEY, ProgramSpec, render_program
from agent.drivers.supervisor import read_program_files, write_program_file
import test_supervisor_driver as driver_tests
from test_supervisor_driver import wait_for, wait_state

sup = driver_tests.sup          # fixture: a real supervisord root, stopped after each test

pytestmark = pytest.mark.timeout(120)

# Values that no ini/shell/environment= parser would give back unchanged; the launcher must.
SECRETS = {
    "PASSWORD": "p%a,s\"s= w'rd",
    "HERE": "%(here)s",
    "COMMENT": "a;b #c",
    "PADDED": "  lead and trail  ",
    "QUOTED": "\"quoted both ends\"",
    "SQUOTED": "'single'",
    "UNICODE": "ünïcødé ✓ 日本語 \u2028 \xa0",
    "DOLLAR": "$HOME ${HOME} $(id) `id`",
    "NEWLINES": "x\n[program:evil]\ncommand=/bin/sh -c 'touch /tmp/pwned'\r\n",
    "EQUALS": "=a=b==",
    "BACKSLASH": "C:\\dir\\ \\n\\",
    "TAB": "\tcol\t",
    "EMPTY": "",
    "PERCENTS": "%% %s %d %(ENV_HOME)s 100%",
}


# --- the env file format (pure) --------------------------------------------------------------------


def test_encode_is_sorted_nul_ended_utf8_and_deterministic():
    data = encode_env({"B": "2 ü", "A": "x=y", "C": ""})
    assert data == "A=x=y\0B=2 ü\0C=\0".encode()
    assert encode_env({"C": "", "A": "x=y", "B": "2 ü"}) == data
    assert encode_env({}) == b"" and decode_env(b"") == {}
    assert decode_env(encode_env(SECRETS)) == SECRETS


@pytest.mark.parametrize(("pairs", "why"), [
    ({"1A": "x"}, "not a variable name"),
    ({"A-B": "x"}, "not a variable name"),
    ({"": "x"}, "not a variable name"),
    ({"A=B": "x"}, "not a variable name"),
    ({"KÉ": "x"}, "not a variable name"),
    ({MARKER_KEY: "x"}, "reserved"),
    ({"SUPERVISOR_SERVER_URL": "x"}, "reserved"),
    ({"A": "sec\0ret"}, "NUL"),
    ({"A": "sec\udcffret"}, "UTF-8"),
    ({"A": b"secret"}, "string"),
    ({"A": None}, "string"),
])
def test_encode_refuses_naming_the_key_never_the_value(pairs, why):
    with pytest.raises(EnvFileError) as info:
        encode_env(pairs)
    assert why in str(info.value)
    assert "sec" not in str(info.value)
    assert isinstance(info.value, Permanent) and isinstance(info.value, ValueError)


CORRUPT = [
    (b"A=secret", "truncated"),
    (b"A=secret\0B=tail", "truncated"),
    (b"Asecret\0", "record 1: no '='"),
    (b"A=1\0=secret\0", "record 2: not a valid variable name"),
    (b"A=1\09secret=x\0", "record 2: not a valid variable name"),
    (b"A=1\0B\xffsecret=x\0", "record 2: not a valid variable name"),
    (b"GITOPS_AGENT_PROGRAM=secret\0", "record 1: not a valid variable name"),
    (b"SUPERVISOR_X=secret\0", "record 1: not a valid variable name"),
    (b"B=secret\0A=1\0", "record 2: names not sorted or given twice"),
    (b"A=secret\0A=secret\0", "record 2: names not sorted or given twice"),
    (b"A=\xffsecret\0", "record 1: the value is not UTF-8"),
    (b"A=1\0\0", "record 2: no '='"),
]


@pytest.mark.parametrize(("data", "why"), CORRUPT)
def test_decode_refuses_corrupt_files_naming_the_record_never_the_content(data, why):
    with pytest.raises(EnvFileError) as info:
        decode_env(data)
    assert str(info.value) == why or str(info.value).startswith(why)
    assert "secret" not in str(info.value)


def test_launched_command_wraps_the_program():
    assert launched_command("/v/bin/python", "/r/launcher.py", "/r/secrets/web.env", ["/v/bin/gunicorn", "-w", "2"]) == (
        "/v/bin/python", "-I", "-S", "/r/launcher.py", "/r/secrets/web.env", "/v/bin/gunicorn", "-w", "2")
    for bad in (("python", "/l", "/e", ("/c",)), ("/p", "/l", "e", ("/c",)), ("/p", "/l", "/e", ()),
                ("/p", "/l", "/e", ("c",)), ("/p", "/l", "/e", ("/c", 1))):
        with pytest.raises(EnvFileError):
            launched_command(*bad)


def test_the_launcher_imports_only_os_and_sys():
    tree = ast.parse(LAUNCHER_SOURCE)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or ".")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("__import__", "exec", "eval"):
            imported.add(node.func.id)
    assert imported == {"os", "sys"}


def _launcher_parse():
    """The launcher's own `parse`, loaded without running its main()."""
    tree = ast.parse(LAUNCHER_SOURCE)
    tree.body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Call))]
    namespace: dict = {}
    exec(compile(tree, "launcher", "exec"), namespace)  # noqa: S102 - our own constant source, to test its parser
    return namespace["parse"]


keys = st.from_regex(ENV_KEY_RE, fullmatch=True).filter(lambda k: len(k) <= 12 and k != MARKER_KEY
                                                         and not k.startswith("SUPERVISOR_"))
values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=30)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.dictionaries(keys, values, max_size=6))
@example(SECRETS)
def test_any_pairs_round_trip(pairs):
    assert decode_env(encode_env(pairs)) == pairs


@PROPERTY
@given(st.dictionaries(keys, values, max_size=4).map(encode_env).flatmap(
    lambda data: st.one_of(
        st.just(data),
        st.binary(max_size=40),
        st.tuples(st.integers(0, len(data)), st.binary(max_size=3)).map(
            lambda cut: data[:cut[0]] + cut[1] + data[cut[0] + len(cut[1]):]),
    )))
@example(b"A=1\0\0")
@example(b"a=1\0B=2\0")      # bytes order: "B" < "a"
def test_the_launcher_and_decode_env_agree_on_every_file(data):
    """One format, two readers (the agent's and the launcher's): they accept the same files, with the
    same pairs, and refuse the same ones."""
    parse = _launcher_parse()
    try:
        want = decode_env(data)
    except EnvFileError:
        with pytest.raises(ValueError):
            parse(data)
        return
    assert {k.decode(): v.decode() for k, v in parse(data)} == want


# --- the launcher run for real (no supervisord) ----------------------------------------------------


@pytest.fixture
def launcher(tmp_path) -> Path:
    path = tmp_path / "launcher.py"
    path.write_text(LAUNCHER_SOURCE, encoding="utf-8")
    return path


def write_env(path: Path, pairs) -> Path:
    path.write_bytes(encode_env(pairs))
    path.chmod(0o600)
    return path


def run_env0(launcher: Path, envfile: Path, base_env: dict[str, str]) -> subprocess.CompletedProcess:
    """`env -0` (coreutils: prints its environment exactly, NUL-separated) through the launcher."""
    argv = launched_command(sys.executable, str(launcher), str(envfile), [shutil.which("env"), "-0"])
    return subprocess.run(argv, env=base_env, capture_output=True, timeout=60)


def parse_env0(out: bytes) -> dict[bytes, bytes]:
    return dict(entry.split(b"=", 1) for entry in out.split(b"\0") if entry)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(keys, values, max_size=5))
@example(SECRETS)
def test_the_launched_program_gets_exactly_the_pairs_added_to_its_environment(launcher, tmp_path, pairs):
    base = {"PATH": "/usr/bin:/bin", "KEEP": "kept %(x)s", "PLAIN": "from supervisord"}   # C locale
    envfile = write_env(tmp_path / "test.env", pairs)
    done = run_env0(launcher, envfile, base)
    assert done.returncode == 0, done.stderr
    got = parse_env0(done.stdout)
    want = {k.encode(): v.encode() for k, v in {**base, **pairs}.items()}
    assert got == want              # no LC_CTYPE from Python's locale coercion, nothing else either


def test_a_missing_unreadable_or_corrupt_env_file_exits_78_naming_the_path(launcher, tmp_path):
    base = {"PATH": "/usr/bin:/bin"}
    cases = {
        tmp_path / "missing.env": "No such file or directory",
        tmp_path: "Is a directory",
    }
    corrupt = tmp_path / "corrupt.env"
    corrupt.write_bytes(b"A=topsecret-value\0B=also-secret")    # a torn write: no final NUL
    cases[corrupt] = "is corrupt: truncated"
    for path, why in cases.items():
        done = run_env0(launcher, path, base)
        assert done.returncode == EX_CONFIG, (path, done)
        assert done.stdout == b""
        message = done.stderr.decode()
        assert message.startswith("gitops-agent launcher: ") and str(path) in message and why in message
        assert "secret" not in message
    missing_program = launched_command(sys.executable, str(launcher), str(write_env(tmp_path / "ok.env", {})),
                                       ["/nonexistent/bin/app"])
    done = subprocess.run(missing_program, env=base, capture_output=True, timeout=60)
    assert done.returncode == 127 and b"cannot execute /nonexistent/bin/app" in done.stderr


# --- under a real supervisord -------------------------------------------------------------------

DUMP = textwrap.dedent(
    """\
    import json, os, sys, time
    out = sys.argv[1]
    raw = open("/proc/self/environ", "rb").read()
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"environ": dict(os.environ), "raw": raw.hex(), "pid": os.getpid(),
                   "sigign": status["SigIgn"].strip(), "argv": sys.argv}, f)
    os.replace(out + ".tmp", out)
    while True: time.sleep(1)
    """
)


@pytest.fixture
def venv(tmp_path) -> Path:
    """A real venv (no pip: not needed) with a console script that dumps what its process got."""
    path = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    script = path / "bin" / "dumpenv"
    script.write_text(f"#!{path}/bin/python\n{DUMP}", encoding="utf-8")
    script.chmod(0o755)
    return path


def add_program(es, name: str, command, **kw) -> None:
    spec = ProgramSpec(name, tuple(command), stopwaitsecs=2, environment=(("PLAIN", "not secret"),),
                       stdout_logfile=str(es.log_dir / f"{name}.out.log"),
                       stderr_logfile=str(es.log_dir / f"{name}.err.log"), **kw)
    write_program_file(es.include_dir, name, render_program(spec))


def read_dump(path: Path) -> dict:
    return json.loads(wait_for(lambda: path.exists() and path.read_text(encoding="utf-8"), 30, path.name))


def raw_env(dump: dict) -> dict[bytes, bytes]:
    return parse_env0(bytes.fromhex(dump["raw"]))


def test_secrets_reach_the_process_exactly_under_its_own_pid(sup, venv, tmp_path):
    client = sup.ensure_running()
    launcher = sup.root / "launcher.py"
    launcher.write_text(LAUNCHER_SOURCE, encoding="utf-8")
    envfile = write_env(sup.root / "web.env", SECRETS)
    out_launched, out_direct = tmp_path / "launched.json", tmp_path / "direct.json"
    command = launched_command(str(venv / "bin" / "python"), str(launcher), str(envfile),
                               [str(venv / "bin" / "dumpenv"), str(out_launched)])
    add_program(sup, "launched", command)
    add_program(sup, "direct", [str(venv / "bin" / "dumpenv"), str(out_direct)])   # the control: no launcher
    assert client.update() == {"launched": "added", "direct": "added"}
    launched, direct = read_dump(out_launched), read_dump(out_direct)

    for key, value in SECRETS.items():
        assert launched["environ"][key] == value, key
    # Exactly what supervisord gave the launcher, plus the pairs: compared with the program it runs
    # directly (their own names aside), byte for byte.
    own = (b"SUPERVISOR_PROCESS_NAME", b"SUPERVISOR_GROUP_NAME", MARKER_KEY.encode())
    got = {k: v for k, v in raw_env(launched).items() if k not in own}
    want = {k: v for k, v in raw_env(direct).items() if k not in own}
    assert got == {**want, **{k.encode(): v.encode() for k, v in SECRETS.items()}}
    assert launched["sigign"] == direct["sigign"]            # same signal dispositions as without it

    info = wait_state(client, "launched", "RUNNING")
    assert info["pid"] == launched["pid"]                    # exec'd in place: supervisord's pid is the service's
    cmdline = Path(f"/proc/{launched['pid']}/cmdline").read_bytes().split(b"\0")
    assert str(launcher).encode() not in cmdline and str(envfile).encode() not in cmdline
    assert launched["argv"] == [str(venv / "bin" / "dumpenv"), str(out_launched)]

    client.stop("launched")
    client.stop("direct")
    texts = [*read_program_files(sup.include_dir).values(), sup.supervisord_log.read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sup.log_dir.glob("*.log")]
    for value in SECRETS.values():
        if len(value.strip()) >= 4:
            assert not any(value in text for text in texts), value
    assert not any("p%a,s" in text or "ünïcødé" in text or "[program:evil]" in text for text in texts)
    assert set(read_program_files(sup.include_dir)) == {"launched", "direct"}


def test_an_unreadable_env_file_fails_the_start_with_exit_78_and_a_clear_stderr(sup, venv, tmp_path):
    client = sup.ensure_running()
    launcher = sup.root / "launcher.py"
    launcher.write_text(LAUNCHER_SOURCE, encoding="utf-8")
    missing = sup.root / "gone.env"
    corrupt = sup.root / "torn.env"
    corrupt.write_bytes(encode_env({"TOKEN": "do-not-print-me"})[:-1])
    for name, envfile in (("nofile", missing), ("torn", corrupt)):
        command = launched_command(str(venv / "bin" / "python"), str(launcher), str(envfile),
                                   [str(venv / "bin" / "dumpenv"), str(tmp_path / f"{name}.json")])
        add_program(sup, name, command, startretries=0)
    client.update()
    for name, envfile, why in (("nofile", missing, "No such file or directory"), ("torn", corrupt, "truncated")):
        wait_state(client, name, "FATAL", timeout=30)
        # supervisord keeps no exitstatus for a process that exited within startsecs; its log says it
        assert f"exited: {name} (exit status {EX_CONFIG}; not expected)" in sup.supervisord_log.read_text()
        tail = client.read_log_tail(name)
        assert tail.startswith("gitops-agent launcher: ") and str(envfile) in tail and why in tail, tail
        assert not (tmp_path / f"{name}.json").exists()      # the program never ran
    everything = "".join(p.read_text(encoding="utf-8") for p in sup.log_dir.glob("*.log"))
    assert "do-not-print-me" not in everything
