"""Multi-process programs (numprocs > 1) through the driver, against a REAL supervisord.

The planner talks about a program by its name whatever its process count: these tests use only the
program's name (`w`) with the driver, and look at the processes (`w:w-0`...) to check what happened.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from agent.core.errors import SupervisorError
from agent.core.render.supervisor import ProgramSpec, render_program
from agent.drivers.supervisor import aggregate_info, daemonized, leftover_pids, remove_program_file, write_program_file
import test_supervisor_driver as driver_tests
from test_supervisor_driver import DAEMONIZE, SLEEP, _pids, one_line, pid_alive, states, wait_for, wait_state

sup = driver_tests.sup                              # fixtures: a real supervisord root, stopped after each test
escaped_pidfiles = driver_tests.escaped_pidfiles

pytestmark = pytest.mark.timeout(120)

MEMBERS = ["w:w-0", "w:w-1", "w:w-2"]


def add_group(es, name="w", code=SLEEP, numprocs=3, **kw) -> None:
    spec = ProgramSpec(name, (sys.executable, "-c", one_line(code)), stopwaitsecs=2, numprocs=numprocs,
                       stdout_logfile=str(es.log_dir / f"{name}.out.log"),
                       stderr_logfile=str(es.log_dir / f"{name}.err.log"), **kw)
    write_program_file(es.include_dir, name, render_program(spec))


def member_pids(client, members=MEMBERS) -> dict[str, int]:
    info = client.process_info()
    return {m: info[m]["pid"] for m in members}


def env_of(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def test_a_multi_process_program_runs_under_its_name_with_one_aggregated_state(sup):
    client = sup.ensure_running()
    add_group(sup)
    logs = [sup.log_dir / f"w-{i}.{s}.log" for i in range(3) for s in ("out", "err")]
    assert [p.stat().st_mode & 0o777 for p in logs] == [0o600] * 6     # created private, before supervisord
    assert client.update(["w"]) == {"w": "added"}
    group = wait_state(client, "w", "RUNNING")
    info = client.process_info()
    assert group["members"] == MEMBERS and group["name"] == group["group"] == "w"
    assert all(info[m]["statename"] == "RUNNING" for m in MEMBERS)
    pids = member_pids(client)
    assert len(set(pids.values())) == 3 and group["pid"] == pids["w:w-0"]
    assert group["stdout_logfile"] == str(sup.log_dir / "w-0.out.log")
    for i, m in enumerate(MEMBERS):
        env = env_of(pids[m])
        assert b"GITOPS_AGENT_PROGRAM=w" in env and f"SUPERVISOR_PROCESS_NAME=w-{i}".encode() in env
        assert info[m]["stderr_logfile"] == str(sup.log_dir / f"w-{i}.err.log")
    assert [p.stat().st_mode & 0o777 for p in logs] == [0o600] * 6
    assert leftover_pids(sup.socket_path, "w") == sorted(pids.values())       # all carry the marker
    assert leftover_pids(sup.socket_path, "w:w-1") == [pids["w:w-1"]]
    assert daemonized(client, "w") is None


def test_one_process_down_makes_the_program_not_running_until_it_is_back(sup):
    client = sup.ensure_running()
    add_group(sup, autorestart="false", code="import sys, time\nsys.stderr.write('hello from ' + __import__('os').environ['SUPERVISOR_PROCESS_NAME'] + '\\n'); sys.stderr.flush()\nwhile True: time.sleep(1)")
    client.update(["w"])
    wait_state(client, "w", "RUNNING")
    for i in range(3):     # RUNNING means up startsecs, not that it has written yet (on a loaded machine)
        log = sup.log_dir / f"w-{i}.err.log"
        wait_for(lambda log=log: log.read_text(), what=f"{log.name} written")
    before = member_pids(client)
    os.kill(before["w:w-1"], signal.SIGKILL)
    group = wait_state(client, "w", "EXITED")            # autorestart=false: it stays down
    assert group["pid"] == 0 and states(client)["w:w-0"] == "RUNNING"
    assert "w-1: " in group["description"] and group["members"] == MEMBERS
    assert daemonized(client, "w") is None               # the others' processes are not leftovers
    tail = client.read_log_tail("w")
    assert tail.count("[w:") == 3, tail
    assert tail.index("[w:w-0]\nhello from w-0") < tail.index("[w:w-1]\nhello from w-1")
    assert tail.rstrip().endswith("hello from w-1")      # the one that is down comes last
    client.start("w")                                    # starts the one that is down
    assert wait_state(client, "w", "RUNNING")["pid"] == before["w:w-0"]
    after = member_pids(client)
    assert after["w:w-0"] == before["w:w-0"] and after["w:w-2"] == before["w:w-2"]
    assert after["w:w-1"] != before["w:w-1"]


def test_supervisord_restarts_a_killed_process_and_the_program_is_running_again(sup):
    client = sup.ensure_running()
    add_group(sup, startsecs=2)
    client.update(["w"])
    wait_state(client, "w", "RUNNING")
    before = member_pids(client)
    os.kill(before["w:w-2"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(before["w:w-2"]), what="the process gone")
    # supervisord restarts it (STARTING for startsecs): the program is RUNNING only once that is done.
    wait_for(lambda: client.process_info()["w:w-2"]["pid"] != before["w:w-2"], 20, "a new w-2")
    seen = client.process_info()
    assert (seen["w"]["statename"] == "RUNNING") == (seen["w:w-2"]["statename"] == "RUNNING")
    wait_state(client, "w", "RUNNING", timeout=20)
    assert member_pids(client)["w:w-0"] == before["w:w-0"]


def test_stop_start_restart_by_the_program_name(sup):
    client = sup.ensure_running()
    add_group(sup)
    client.update(["w"])
    wait_state(client, "w", "RUNNING")
    pids = member_pids(client)
    client.stop("w")
    assert {m: s for m, s in states(client).items()} == {"w": "STOPPED", **{m: "STOPPED" for m in MEMBERS}}
    assert not any(pid_alive(p) for p in pids.values())
    assert client.process_info()["w"]["pid"] == 0
    client.stop("w")                                     # not running is fine, as for one process
    client.start("w")                                    # waits for every process's startsecs
    assert states(client)["w"] == "RUNNING"
    client.start("w")                                    # already started is fine
    before = member_pids(client)
    client.restart("w")
    after = member_pids(client)
    assert states(client)["w"] == "RUNNING" and not set(before.values()) & set(after.values())
    client.stop("w:w-1")                                 # one process still works by its namespec
    assert states(client)["w"] == "STOPPED" and states(client)["w:w-0"] == "RUNNING"
    client.start("w", wait=False)
    wait_state(client, "w", "RUNNING")
    with pytest.raises(SupervisorError) as info:
        client.start("nope")
    assert info.value.code == 10 and "no such program" in str(info.value)
    with pytest.raises(SupervisorError) as info:
        client.stop("nope")
    assert info.value.code == 10
    with pytest.raises(SupervisorError) as info:
        client.read_log_tail("nope")
    assert info.value.code == 10


def test_update_changes_and_removes_the_group_and_its_per_process_logs(sup):
    client = sup.ensure_running()
    add_group(sup)
    add_group(sup, "other", numprocs=1)
    assert client.update() == {"w": "added", "other": "added"}
    wait_state(client, "w", "RUNNING")
    other = wait_state(client, "other", "RUNNING")["pid"]
    pids = member_pids(client)

    add_group(sup, environment=(("VERSION", "2"),))
    assert client.update(["w"]) == {"w": "changed"}
    wait_state(client, "w", "RUNNING")
    assert not set(pids.values()) & set(member_pids(client).values())
    assert not any(pid_alive(p) for p in pids.values())
    assert client.process_info()["other"]["pid"] == other

    add_group(sup, numprocs=2)                           # fewer processes: a change of the group
    assert client.update(["w"]) == {"w": "changed"}
    assert wait_state(client, "w", "RUNNING")["members"] == MEMBERS[:2]
    assert "w:w-2" not in client.process_info()

    remove_program_file(sup.include_dir, "w")
    assert client.update(["w"]) == {"w": "removed"}
    assert not [k for k in client.process_info() if k.startswith("w")]
    left = sorted(p.name for p in sup.log_dir.iterdir())
    assert not [n for n in left if n.startswith("w-")], left      # w-2's too, though numprocs was 2
    assert "other.out.log" in left


def test_a_process_that_cannot_start_fails_the_start_with_its_stderr(sup):
    client = sup.ensure_running()
    code = ("import os, sys, time\n"
            "if os.environ['SUPERVISOR_PROCESS_NAME'] == 'w-1': sys.stderr.write('boom: no DATABASE_URL\\n'); sys.exit(3)\n"
            "while True: time.sleep(1)")
    add_group(sup, code=code, startretries=0)
    client.update(["w"])
    group = wait_state(client, "w", "FATAL")
    assert "w-1: " in group["spawnerr"] and states(client)["w:w-0"] in ("STARTING", "RUNNING")
    wait_state(client, "w:w-0", "RUNNING")
    with pytest.raises(SupervisorError) as info:
        client.start("w")
    assert info.value.code in (40, 50)
    message = str(info.value)
    assert message.startswith("w could not be started: ") and "startProcessGroup" in message
    assert "[w:w-1]\nboom: no DATABASE_URL" in message


def test_processes_a_group_daemonized_are_found_per_process_and_stopped(sup, escaped_pidfiles):
    client = sup.ensure_running()
    pidfile = escaped_pidfiles[0]
    spec = ProgramSpec("w", (sys.executable, "-c", one_line(DAEMONIZE), str(pidfile)), numprocs=2,
                       stopwaitsecs=2, startretries=0)
    write_program_file(sup.include_dir, "w", render_program(spec))
    client.update(["w"])
    escaped = wait_for(lambda: len(_pids(pidfile)) >= 2 and _pids(pidfile), what="two daemons")
    wait_state(client, "w", "FATAL")
    why = daemonized(client, "w")
    assert why and all(str(p) in why for p in escaped) and "foreground" in why
    by_member = {m: leftover_pids(sup.socket_path, m) for m in ("w:w-0", "w:w-1")}
    assert sorted(by_member["w:w-0"] + by_member["w:w-1"]) == sorted(escaped)
    assert len(by_member["w:w-0"]) == 1
    client.stop("w")
    assert not [p for p in escaped if pid_alive(p)]


def test_aggregate_info_takes_the_worst_state():
    def proc(n, state, pid):
        return {"name": f"w-{n}", "group": "w", "statename": state, "state": 0, "pid": pid, "spawnerr": "",
                "description": f"d{n}", "exitstatus": n, "stdout_logfile": f"/l/w-{n}.out.log"}
    running = [proc(i, "RUNNING", 100 + i) for i in range(11)]
    agg = aggregate_info("w", list(reversed(running)))
    assert agg["statename"] == "RUNNING" and agg["pid"] == 100 and agg["stdout_logfile"] == "/l/w-0.out.log"
    assert agg["members"][:3] == ["w:w-0", "w:w-1", "w:w-2"] and agg["members"][-1] == "w:w-10"
    order = ["STARTING", "STOPPING", "STOPPED", "EXITED", "BACKOFF", "FATAL"]
    for worse, better in zip(order[1:], order):
        mixed = [proc(0, "RUNNING", 100), proc(1, better, 0), proc(2, worse, 0)]
        agg = aggregate_info("w", mixed)
        assert agg["statename"] == worse and agg["exitstatus"] == 2 and agg["pid"] == 0
        assert agg["description"] == "w-0: d0; w-1: d1; w-2: d2"
    starting = aggregate_info("w", [proc(0, "RUNNING", 100), proc(1, "STARTING", 101)])
    assert starting["statename"] == "STARTING" and starting["pid"] == 100
