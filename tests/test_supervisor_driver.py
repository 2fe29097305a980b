"""The supervisord driver against a REAL supervisord (EmbeddedSupervisor in tmp_path).

Every test that starts one stops it in the fixture's finalizer, even on failure (and kills it if a
graceful stop fails), so no supervisord or program outlives the test run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.core.errors import ConfigError, SupervisorError
from agent.drivers.supervisor import (
    EmbeddedSupervisor,
    SupervisorClient,
    connect,
    daemonized,
    leftover_pids,
    read_program_files,
    remove_program_file,
    write_program_file,
)
from agent.core.render.supervisor import ProgramSpec, UnsafeValue, render_program

pytestmark = pytest.mark.timeout(60)

SLEEP = "import time\nwhile True: time.sleep(1)"


@pytest.fixture
def sup(tmp_path):
    """An embedded supervisord root; started by the test, always stopped afterwards."""
    es = EmbeddedSupervisor(tmp_path / "r")
    try:
        yield es
    finally:
        _stop_hard(es)


def _stop_hard(es: EmbeddedSupervisor) -> None:
    try:
        es.stop(timeout=20)
    except SupervisorError:
        pid = es._live_pid()
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)  # supervisord is a session leader; programs have own groups
            raise


def add(es: EmbeddedSupervisor, name: str, code: str = SLEEP, **kw) -> None:
    spec = ProgramSpec(name, (sys.executable, "-c", one_line(code)), stopwaitsecs=2, **kw)
    write_program_file(es.include_dir, name, render_program(spec))


def one_line(code: str) -> str:
    """Program text for `python -c` without newlines (render_program refuses control characters)."""
    return f"exec({code!r})"


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def states(client: SupervisorClient) -> dict[str, str]:
    return {name: info["statename"] for name, info in client.process_info().items()}


def wait_state(client: SupervisorClient, name: str, state: str, timeout: float = 10.0) -> dict:
    wait_for(lambda: states(client).get(name) == state, timeout, f"{name} {state}")
    return client.process_info()[name]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] != "Z"


# --- lifecycle ------------------------------------------------------------------------------------


def test_ensure_running_start_stop(sup):
    t0 = time.monotonic()
    client = sup.ensure_running()
    started = time.monotonic() - t0
    assert client.state() == "RUNNING" and sup.is_running()
    assert started < 5, started
    assert oct(sup.conf_path.stat().st_mode & 0o777) == "0o600"
    assert oct(sup.socket_path.stat().st_mode & 0o777) == "0o700"
    assert sup.ensure_running().state() == "RUNNING"  # idempotent: same daemon
    assert int(sup.pid_path.read_text()) == client.pid()

    add(sup, "sleeper")
    assert client.update() == {"sleeper": "added"}
    pid = wait_state(client, "sleeper", "RUNNING")["pid"]
    client.stop("sleeper")
    assert states(client)["sleeper"] == "STOPPED" and not pid_alive(pid)
    client.stop("sleeper")  # NOT_RUNNING is not an error
    client.start("sleeper")
    assert states(client)["sleeper"] == "RUNNING"
    client.start("sleeper")  # ALREADY_STARTED is not an error
    before = client.process_info()["sleeper"]["pid"]
    client.restart("sleeper")
    assert client.process_info()["sleeper"]["pid"] != before

    assert sup.stop() is True
    assert not sup.is_running() and not sup.socket_path.exists() and not sup.pid_path.exists()
    assert sup.stop() is False


def test_update_touches_only_changed_programs(sup):
    client = sup.ensure_running()
    for name in ("a", "b", "c"):
        add(sup, name)
    assert client.update() == {"a": "added", "b": "added", "c": "added"}
    pids = {n: wait_state(client, n, "RUNNING")["pid"] for n in ("a", "b", "c")}

    assert client.update() == {}  # nothing changed: nothing touched
    add(sup, "a", environment=(("VERSION", "2"),))
    remove_program_file(sup.include_dir, "c")
    add(sup, "d")
    assert client.update() == {"a": "changed", "c": "removed", "d": "added"}
    info = client.process_info()
    assert set(info) == {"a", "b", "d"}
    assert info["b"]["pid"] == pids["b"]  # untouched keeps its pid
    assert not pid_alive(pids["a"]) and not pid_alive(pids["c"])

    # Restricted to names: only `b` is applied; the pending change of `d` waits.
    pid_d = wait_state(client, "d", "RUNNING")["pid"]
    add(sup, "b", environment=(("VERSION", "2"),))
    add(sup, "d", environment=(("VERSION", "2"),))
    assert client.update(["b", "unknown"]) == {"b": "changed"}
    assert client.process_info()["d"]["pid"] == pid_d
    assert client.reload_config() == ([], ["d"], [])


# --- hostile values -------------------------------------------------------------------------------

DUMP = textwrap.dedent(
    """
    import json, os, sys, time
    out = sys.argv[1]
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"env": dict(os.environ), "argv": sys.argv[2:]}, f)
    os.replace(out + ".tmp", out)
    while True: time.sleep(1)
    """
)

HOSTILE_ENV = {
    "COMMAS": "a,b,c=d,E=f",
    "QUOTES_D": 'say "hi" twice',
    "QUOTES_S": "it's",
    "HASH": "#x#y;z#",
    "PERCENT": "100% %(ENV_HOME)s %(program_name)s %%",
    "SPACES": "  two  spaces  ",
    "BACKSLASH": "C:\\dir\\ \\n\\",
    "SECTION": "[program:evil]",
    "UNICODE": "ünïcødé ✓ \xa0nbsp",
    "EMPTY": "",
}
HOSTILE_ARGS = ["it's", 'a "b"', "x ;y", "x #y", "%(here)s", "%(ENV_HOME)s", "", "  ", "\\", "[program:evil]"]


def test_hostile_values_arrive_exactly_and_never_add_a_program(sup, tmp_path):
    client = sup.ensure_running()
    out = tmp_path / "dump.json"
    spec = ProgramSpec(
        "dump",
        (sys.executable, "-c", one_line(DUMP), str(out), *HOSTILE_ARGS),
        environment=tuple(HOSTILE_ENV.items()),
        directory=str(tmp_path),
    )
    write_program_file(sup.include_dir, "dump", render_program(spec))
    evil = "x\n[program:evil]\ncommand=/bin/sh -c 'touch /tmp/pwned'"
    for bad in (
        ProgramSpec("dump2", (sys.executable,), environment=(("X", evil),)),
        ProgramSpec("dump2", (sys.executable, evil)),
        ProgramSpec("dump2", (sys.executable,), directory="/tmp\n[program:evil]"),
    ):
        with pytest.raises(UnsafeValue):
            render_program(bad)
    # Hand-written text that smuggles a second section is refused before it reaches the glob.
    with pytest.raises(UnsafeValue, match="exactly"):
        smuggled = f"[program:dump2]\ncommand=/bin/true\n[program:evil]\ncommand={sys.executable}\n"
        write_program_file(sup.include_dir, "dump2", smuggled)
    assert set(read_program_files(sup.include_dir)) == {"dump"}

    assert client.update() == {"dump": "added"}
    data = json.loads(wait_for(lambda: out.exists() and out.read_text(encoding="utf-8"), what="dump"))
    for key, value in HOSTILE_ENV.items():
        assert data["env"][key] == value, key
    assert data["argv"] == HOSTILE_ARGS
    assert set(client.process_info()) == {"dump"}
    assert client.reload_config() == ([], [], [])


# --- errors ---------------------------------------------------------------------------------------


def test_broken_include_file_is_fault_92_with_a_clear_message(sup):
    client = sup.ensure_running()
    add(sup, "ok")
    (sup.include_dir / "broken.conf").write_text("[program:broken\ncommand=/bin/true\n")
    with pytest.raises(SupervisorError) as info:
        client.update()
    assert info.value.code == 92
    message = str(info.value)
    assert message.startswith("an include file is unparsable: ")
    assert "broken.conf" in message
    # The same text through write_program_file is refused and leaves nothing behind.
    (sup.include_dir / "broken.conf").unlink()
    with pytest.raises(UnsafeValue):
        write_program_file(sup.include_dir, "broken", "[program:broken\ncommand=/bin/true\n")
    with pytest.raises(UnsafeValue, match="refuse"):
        no_user = "[program:nouser]\ncommand=/bin/true\nuser=no-such-user-x\n"
        write_program_file(sup.include_dir, "nouser", no_user)
    assert sorted(p.name for p in sup.include_dir.iterdir()) == ["ok.conf"]
    assert client.update() == {"ok": "added"}


def test_spawn_error_is_clear_and_carries_the_stderr_tail(sup):
    client = sup.ensure_running()
    code = "import sys; sys.stderr.write('boom: missing DATABASE_URL\\n'); sys.exit(3)"
    add(sup, "crash", code, startretries=0)
    client.update()
    wait_state(client, "crash", "FATAL")
    with pytest.raises(SupervisorError) as info:
        client.start("crash")
    assert info.value.code == 50
    message = str(info.value)
    # supervisord's spawnerr, or the driver's own words when it has none yet (both say it)
    assert message.lower().startswith("crash could not be started: exited too quickly")
    assert "SPAWN_ERROR" in message and "boom: missing DATABASE_URL" in message

    ghost = ProgramSpec("ghost", ("/nonexistent/bin/app",))
    write_program_file(sup.include_dir, "ghost", render_program(ghost))
    client.update()
    with pytest.raises(SupervisorError) as info:
        client.start("ghost")
    assert info.value.code == 20 and "does not exist" in str(info.value)
    with pytest.raises(SupervisorError) as info:
        client.start("nope")
    assert info.value.code == 10 and "no such program" in str(info.value)


def test_unreachable_socket_is_an_error_naming_the_socket(tmp_path):
    missing = tmp_path / "missing.sock"
    with pytest.raises(SupervisorError) as info:
        SupervisorClient(missing).state()
    assert info.value.code is None and str(missing) in str(info.value)
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()  # the file stays, nobody listens: connection refused
    with pytest.raises(SupervisorError) as info:
        connect(f"unix://{dead}").state()
    assert info.value.code is None and str(dead) in str(info.value)
    with pytest.raises(ConfigError):
        connect("http://127.0.0.1:9001")
    assert EmbeddedSupervisor(tmp_path).stop() is False
    with pytest.raises(SupervisorError) as info:       # the split query says so at once, as the call does
        SupervisorClient(missing).process_info_later()
    assert info.value.code is None and str(missing) in str(info.value)


def test_process_info_later_is_process_info_read_after_other_work(sup):
    """The facts send getAllProcessInfo, read the venvs, then read the answer: the same answer, and an
    answer dropped unread leaves supervisord serving the next call."""
    client = sup.ensure_running()
    add(sup, "sleeper")
    client.update()
    wait_state(client, "sleeper", "RUNNING")
    later = client.process_info_later()
    time.sleep(0.05)                                   # the other work
    got = later.result()
    assert got["sleeper"]["statename"] == "RUNNING" and set(got) == set(client.process_info())
    client.process_info_later().close()
    assert client.state() == "RUNNING" and client.process_info()["sleeper"]["pid"] == got["sleeper"]["pid"]


# --- daemon behaviour -----------------------------------------------------------------------------


def test_embedded_supervisord_survives_the_process_that_started_it(sup):
    code = (
        "import sys; from pathlib import Path; from agent.drivers.supervisor import EmbeddedSupervisor;"
        "EmbeddedSupervisor(Path(sys.argv[1])).ensure_running()"
    )
    # capture_output: if supervisord kept our pipe open, run() would hang until the timeout.
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, str(sup.root)], capture_output=True, timeout=30)
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert elapsed < 10
    assert sup.is_running()
    assert connect(f"unix://{sup.socket_path}").state() == "RUNNING"
    pid = sup._live_pid()
    assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == ["/dev/null"] * 3
    assert Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[2] != str(os.getpgrp())


def test_stale_pid_and_socket_are_cleaned(sup):
    sup.socket_path.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "print(__import__('os').getpid())"], capture_output=True, text=True)
    sup.pid_path.write_text(dead.stdout)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sup.socket_path))
    s.close()
    assert not sup.is_running()
    assert sup.ensure_running().state() == "RUNNING"


def test_stop_stops_everything_it_ran(sup, tmp_path):
    client = sup.ensure_running()
    pidfile = tmp_path / "grandchild.pid"
    spawner = textwrap.dedent(
        f"""
        import subprocess, sys, time, pathlib
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        pathlib.Path({str(pidfile)!r}).write_text(str(p.pid))
        while True: time.sleep(1)
        """
    )
    add(sup, "spawner", spawner)
    add(sup, "plain")
    client.update()
    pids = [wait_state(client, n, "RUNNING")["pid"] for n in ("spawner", "plain")]
    grandchild = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="grandchild"))
    daemon = client.pid()
    assert all(pid_alive(p) for p in (*pids, grandchild, daemon))
    assert sup.stop() is True
    wait_for(lambda: not any(pid_alive(p) for p in (*pids, grandchild, daemon)), 5, "all gone")


# --- daemonizing programs, limits, logs ------------------------------------------------------------

DAEMONIZE = """
import os, sys, time, pathlib
if os.fork():
    sys.exit(0)
os.setsid()
if os.fork():
    os._exit(0)
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
while True: time.sleep(1)
"""


@pytest.fixture
def escaped_pidfiles(tmp_path):
    """Pid files of daemonized processes; whatever they name is killed after the test, pass or fail."""
    files = [tmp_path / f"d{i}.pid" for i in range(2)]
    yield files
    for f in files:
        for pid in _pids(f):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _pids(pidfile: Path) -> list[int]:
    try:
        return [int(line) for line in pidfile.read_text().split()]
    except FileNotFoundError:
        return []


def add_daemonizer(es: EmbeddedSupervisor, name: str, pidfile: Path) -> None:
    """A program that double-forks into a new session and exits 0, as `--daemon` servers do."""
    spec = ProgramSpec(name, (sys.executable, "-c", one_line(DAEMONIZE), str(pidfile)), stopwaitsecs=2, startretries=0)
    write_program_file(es.include_dir, name, render_program(spec))


def test_a_daemonized_program_is_named_and_its_escaped_process_stopped_on_removal(tmp_path, escaped_pidfiles):
    """The escaped process is found by the program's marker (not by its process group or session), is
    stopped when the program is removed, and the same program name under another root is left alone."""
    roots = [EmbeddedSupervisor(tmp_path / "r1"), EmbeddedSupervisor(tmp_path / "r2")]
    try:
        clients = [es.ensure_running() for es in roots]
        pidfiles = escaped_pidfiles
        for es, client, pidfile in zip(roots, clients, pidfiles):
            add_daemonizer(es, "daemon", pidfile)
            client.update()
        escaped = [int(wait_for(lambda f=f: f.exists() and f.read_text(), what="daemon pid")) for f in pidfiles]
        info = wait_state(clients[0], "daemon", "FATAL")     # exited at once: supervisord gave up
        assert leftover_pids(roots[0].socket_path, "daemon") == [escaped[0]]
        assert os.getsid(escaped[0]) != info.get("pid")
        why = daemonized(clients[0], "daemon")
        assert why and "daemonized" in why and str(escaped[0]) in why and "foreground" in why
        assert daemonized(clients[0], "nope", {"statename": "EXITED"}) is None

        remove_program_file(roots[0].include_dir, "daemon")
        assert clients[0].update(["daemon"]) == {"daemon": "removed"}
        wait_for(lambda: not pid_alive(escaped[0]), 15, "the escaped process stopped")
        assert pid_alive(escaped[1]), "another root's program of the same name was touched"
    finally:
        for es in roots:
            _stop_hard(es)


def test_start_says_daemonized_and_stop_ends_the_escaped_processes(sup, escaped_pidfiles):
    """supervisord sees the program as FATAL (not running), yet its daemons run: a start names the cause,
    and a stop (a restart's first half) ends them all instead of leaving one more copy per start."""
    client = sup.ensure_running()
    pidfile = escaped_pidfiles[0]
    add_daemonizer(sup, "daemon", pidfile)
    client.update()
    wait_for(lambda: _pids(pidfile), what="daemon pid")
    wait_state(client, "daemon", "FATAL")
    with pytest.raises(SupervisorError, match="daemonized.*foreground"):
        client.start("daemon")
    escaped = wait_for(lambda: len(_pids(pidfile)) >= 2 and _pids(pidfile), what="a second daemon")
    assert all(pid_alive(p) for p in escaped)
    client.stop("daemon")
    assert not [p for p in escaped if pid_alive(p)]


def test_down_stops_what_its_programs_daemonized(sup, escaped_pidfiles):
    client = sup.ensure_running()
    pidfile = escaped_pidfiles[0]
    add_daemonizer(sup, "daemon", pidfile)
    client.update()
    escaped = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="daemon pid"))
    assert sup.stop() is True
    wait_for(lambda: not pid_alive(escaped), 15, "the escaped process stopped")


def _limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/limits")


def test_embedded_supervisord_raises_its_open_files_limit(sup):
    """Started from an agent with the common soft limit of 1024, supervisord (and so every program)
    still gets 65536 file descriptors, or the hard limit when that is lower."""
    import resource

    code = (
        "import resource, sys; from pathlib import Path; from agent.drivers.supervisor import EmbeddedSupervisor;"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1];"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard));"
        "EmbeddedSupervisor(Path(sys.argv[1])).ensure_running()"
    )
    done = subprocess.run([sys.executable, "-c", code, str(sup.root)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    assert _limits(sup.client().pid())[0] == want
    add(sup, "plain")
    sup.client().update()
    assert _limits(wait_state(sup.client(), "plain", "RUNNING")["pid"])[0] == want


def test_program_logs_are_private_rotated_and_removed_with_the_program(sup):
    """Logs can hold secrets: 0600 from the start and after supervisord rotates them; they rotate at the
    configured size; removing the program removes them, rotated backups included."""
    client = sup.ensure_running()
    out, err = sup.log_dir / "chatty.out.log", sup.log_dir / "chatty.err.log"
    code = "import sys, time\nfor i in range(40): print('x' * 99, flush=True); time.sleep(0.01)\nwhile True: time.sleep(1)"
    add(sup, "chatty", code, stdout_logfile=str(out), stderr_logfile=str(err), log_maxbytes=1024, log_backups=2)
    assert out.stat().st_mode & 0o777 == 0o600 and err.stat().st_mode & 0o777 == 0o600
    assert sup.log_dir.stat().st_mode & 0o777 in (0o750, 0o700)
    client.update()
    wait_state(client, "chatty", "RUNNING")
    backups = [Path(f"{out}.1"), Path(f"{out}.2")]
    wait_for(lambda: all(b.exists() for b in backups), 15, "rotated logs")
    for path in (out, err, *backups):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert out.stat().st_size <= 1024 + 100
    assert not Path(f"{out}.3").exists()

    remove_program_file(sup.include_dir, "chatty")
    client.update(["chatty"])
    assert not [p.name for p in sup.log_dir.iterdir() if p.name.startswith("chatty.")]
    assert (sup.log_dir / "supervisord.log").exists()


def test_an_existing_world_readable_log_is_made_private(tmp_path):
    include, logs = tmp_path / "programs", tmp_path / "logs"
    logs.mkdir()
    old = logs / "svc.out.log"
    old.write_text("from an older version\n")
    old.chmod(0o644)
    spec = ProgramSpec("svc", ("/bin/true",), stdout_logfile=str(old), stderr_logfile=str(logs / "svc.err.log"))
    write_program_file(include, "svc", render_program(spec))
    assert old.stat().st_mode & 0o777 == 0o600 and old.read_text() == "from an older version\n"
    remove_program_file(include, "svc", keep_logs=True)
    assert old.exists()


def test_a_percent_in_a_log_file_name_is_the_file_supervisord_writes(sup):
    """supervisord expands log file names twice; the driver pre-creates (0600) and removes the same file."""
    client = sup.ensure_running()
    out = sup.log_dir / "50% %(ENV_HOME)s.out.log"
    code = "import time\nprint('to the odd name', flush=True)\nwhile True: time.sleep(1)"
    add(sup, "pct", code, stdout_logfile=str(out))
    assert out.stat().st_mode & 0o777 == 0o600
    client.update(["pct"])
    assert wait_state(client, "pct", "RUNNING")["stdout_logfile"] == str(out)
    wait_for(lambda: "to the odd name" in out.read_text(), what="output in the log")
    remove_program_file(sup.include_dir, "pct")
    client.update(["pct"])
    assert not out.exists()
