"""Faults, each on real components: git, venv builds (uv or pip), the embedded supervisord, the daemon.

In every case the host keeps serving the last good state, status.json always parses, and the agent
recovers on its own once the fault is gone. No fakes: faults are caused for real (a repo moved away, a
wheel missing from the wheelhouse, an unreachable proxy, SIGKILL, a full tmpfs, a crashing program).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, StateRepo, free_port, git, run_agent
from reliability._support import Daemon, agent_args, get_text, metric, once, programs, status, wait_until
from wheelfactory import lock_line, make_http_app_wheel

pytestmark = pytest.mark.timeout(300)


def _uv() -> bool:
    from agent.drivers.venv import find_uv

    return find_uv() is not None


INSTALLER = "uv" if _uv() else "pip"


@pytest.fixture
def root(agent_root):
    """The agent root; afterwards its supervisord is stopped (conftest) and any program it left is too."""
    yield agent_root
    from agent.drivers.supervisor import EmbeddedSupervisor

    EmbeddedSupervisor(agent_root).stop()
    EmbeddedSupervisor(agent_root)._stop_orphans(timeout=5)


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def app_yaml(services: dict[str, dict], *, installer: str = INSTALLER, index: bool = False) -> str:
    """apps/demo/app.yaml with environment `demo`; each service: port, args (after --port N), health."""
    lines = ["apiVersion: gitops-agent/v1", "kind: App", "name: demo", "hosts: {groups: [web]}", "environments:",
             f"  demo: {{lockfile: demo.lock, find_links: [../../wheelhouse], index: {str(index).lower()}, "
             f"installer: {installer}}}", "services:"]
    for name, spec in services.items():
        port = spec["port"]
        args = "".join(f', "{a}"' for a in spec.get("args", ()))
        lines += [f"  {name}:", "    environment: demo", f"    port: {port}",
                  f'    command: [demoapp-server, --port, "{port}"{args}]']
        if spec.get("health", True):
            lines.append(f'    health: {{http: "http://127.0.0.1:{port}/healthz", timeout_s: 1}}')
    return "\n".join(lines) + "\n"


def setup_state(repo: StateRepo, services: dict[str, dict], version: str = "1.0.0", **kw) -> str:
    repo.write("fleet.yaml", "apiVersion: gitops-agent/v1\nkind: Fleet\nhosts:\n  h1: {groups: [web]}\n")
    repo.lock("apps/demo/demo.lock", version)
    repo.write("apps/demo/app.yaml", app_yaml(services, **kw))
    return repo.commit(f"demo {version}")


def served(port: int) -> str | None:
    return get_text(f"http://127.0.0.1:{port}/", timeout=2)


def assert_no_half_venv_in_use(root: Path) -> None:
    """Every envs/<name> link points at a venv whose completion marker exists."""
    from agent.drivers.venv import MARKER

    envs = root / "envs"
    if not envs.is_dir():
        return
    for link in envs.iterdir():
        if link.is_symlink():
            target = (envs / os.readlink(link)).resolve()
            assert (target / MARKER).is_file(), f"envs/{link.name} -> {target} has no marker"


# --- the git server unreachable / the repo deleted ---------------------------------------------------


def test_repo_gone_keeps_last_good_and_the_daemon_counts_backs_off_and_recovers(state_repo, root, daemons, tmp_path):
    port = free_port()
    good = setup_state(state_repo, {"demo-web": {"port": port}})
    once(state_repo.url, root)
    pid = programs(root)["demo-web"]["pid"]
    away = tmp_path / "moved-away"
    state_repo.path.rename(away)
    try:
        proc = once(state_repo.url, root, expect=1)
        assert "error: source: cannot" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        st = status(root)
        assert st["applied"]["sha"] == good and st["result"] == "error" and st["last_error"].startswith("source:")
        assert programs(root)["demo-web"]["pid"] == pid and served(port) == "demoapp 1.0.0\n"

        daemon = Daemon(state_repo.url, root, tmp_path / "daemon.log", poll=1)
        daemons.append(daemon)
        wait_until(lambda: metric(daemon.metrics_text(), "gitops_agent_source_fetch_errors_total") >= 3, 30,
                   "3 fetch errors counted", daemon.log)
        log = daemon.log_text()
        delays = [float(d) for d in re.findall(r"next attempt in ([0-9.]+)s", log)]
        assert len(delays) >= 3 and delays[2] > delays[0], delays        # backing off, not hammering
        assert metric(daemon.metrics_text(), "gitops_agent_reconcile_total", {"result": "error"}) >= 3
        assert programs(root)["demo-web"]["pid"] == pid and served(port) == "demoapp 1.0.0\n"
    finally:
        away.rename(state_repo.path)
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    new = state_repo.commit("2.0.0 while the agent could not see the repo")
    wait_until(lambda: served(port) == "demoapp 2.0.0\n", 60, "recovery onto the new commit", daemon.log)
    wait_until(lambda: metric(daemon.metrics_text(), "gitops_agent_applied_revision_info", {"revision": new}) == 1, 10,
               "applied revision metric", daemon.log)
    assert status(root)["applied"]["sha"] == new


# --- the package index unreachable / a package missing during a venv build ------------------------------


def test_missing_package_keeps_old_venv_and_the_daemon_retries_with_backoff(state_repo, root, daemons, tmp_path):
    port = free_port()
    setup_state(state_repo, {"demo-web": {"port": port}})
    good = state_repo.commit("good")
    once(state_repo.url, root)
    before = (programs(root)["demo-web"]["pid"], os.readlink(root / "envs/demo"), sorted(os.listdir(root / "venvs")))

    # the lock pins demoapp 3.0.0 by its real hash, but the wheel is not in the wheelhouse (index: false)
    elsewhere = make_http_app_wheel(tmp_path / "elsewhere", "demoapp", "3.0.0")
    state_repo.write("apps/demo/demo.lock", lock_line(elsewhere) + "\n")
    bad = state_repo.commit("3.0.0 without its wheel")
    proc = once(state_repo.url, root, expect=1)
    assert "[FAILED] build_venv demo" in proc.stdout and "demoapp" in proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    after = (programs(root)["demo-web"]["pid"], os.readlink(root / "envs/demo"), sorted(os.listdir(root / "venvs")))
    assert after == before and served(port) == "demoapp 1.0.0\n"      # old venv kept, no partial dir left
    st = status(root)
    assert (st["applied"]["sha"], st["attempted"]["sha"], st["result"]) == (good, bad, "failed")
    assert st["resources"]["venv:demo"]["state"] == "failed" and "demoapp" in st["resources"]["venv:demo"]["message"]

    daemon = Daemon(state_repo.url, root, tmp_path / "daemon.log", poll=1)
    daemons.append(daemon)
    wait_until(lambda: metric(daemon.metrics_text(), "gitops_agent_actions_total",
                              {"action": "build_venv", "result": "failed"}) >= 3, 60, "3 failed builds", daemon.log)
    delays = [float(d) for d in re.findall(r"next attempt in ([0-9.]+)s", daemon.log_text())]
    assert len(delays) >= 2 and delays[1] > delays[0], delays
    assert programs(root)["demo-web"]["pid"] == before[0] and served(port) == "demoapp 1.0.0\n"

    shutil.copy(elsewhere, state_repo.path / "wheelhouse")              # the fix: publish the wheel
    fixed = state_repo.commit("add the 3.0.0 wheel")
    wait_until(lambda: served(port) == "demoapp 3.0.0\n", 60, "recovery onto 3.0.0", daemon.log)
    wait_until(lambda: status(root)["applied"]["sha"] == fixed, 10, "status records the fix", daemon.log)


def test_index_unreachable_fails_the_build_cleanly(state_repo, root, tmp_path):
    """`index: true` and every proxy pointing at a closed port: the installer cannot reach any index."""
    port = free_port()
    setup_state(state_repo, {"demo-web": {"port": port}}, index=True)
    good = state_repo.commit("good")
    once(state_repo.url, root)
    pid = programs(root)["demo-web"]["pid"]
    elsewhere = make_http_app_wheel(tmp_path / "elsewhere", "demoapp", "3.0.0")
    state_repo.write("apps/demo/demo.lock", lock_line(elsewhere) + "\n")
    state_repo.commit("3.0.0 only on an index")
    dead = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy",)}
    env.update(HTTP_PROXY=dead, HTTPS_PROXY=dead, ALL_PROXY=dead, http_proxy=dead, https_proxy=dead, all_proxy=dead,
               PIP_PROXY=dead, PIP_RETRIES="0", PIP_TIMEOUT="3", UV_HTTP_TIMEOUT="3")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "once", *agent_args(state_repo.url, root)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[FAILED] build_venv demo" in proc.stdout and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert programs(root)["demo-web"]["pid"] == pid and served(port) == "demoapp 1.0.0\n"
    assert status(root)["applied"]["sha"] == good
    assert_no_half_venv_in_use(root)
    print(f"\nindex unreachable: build failed cleanly in {time.monotonic() - started:.1f}s ({INSTALLER})")


# --- SIGKILL of the agent at random points during apply ---------------------------------------------------

KILLS_WANTED = 20


def test_sigkill_during_apply_always_recovers(state_repo, root):
    """Each round commits a new lock (so a venv build and a program update are always due), starts
    `once`, SIGKILLs it after a random 0-3 s, checks the invariants on what the kill left, then runs
    `once` to completion. Most kills hit the whole process group (as systemd does: the agent and its
    installer); every third round kills the agent alone and the recovery starts while its orphaned
    installer may still be writing."""
    rng = random.Random(int(os.environ.get("KILL_SEED", time.time())))
    port = free_port()
    setup_state(state_repo, {"demo-web": {"port": port}})
    started = time.monotonic()
    once(state_repo.url, root)
    full = time.monotonic() - started
    kills, completed_first, rounds, alone = 0, 0, 0, 0
    moments: list[float] = []
    while kills < KILLS_WANTED:
        rounds += 1
        assert rounds <= 3 * KILLS_WANTED, f"only {kills} kills landed in {rounds} rounds"
        version = ("1.0.0", "2.0.0")[rounds % 2]
        state_repo.write("apps/demo/demo.lock", f"# round {rounds}\n" + lock_line(state_repo.wheel(version)) + "\n")
        state_repo.commit(f"round {rounds}: {version}")
        delay = rng.uniform(0, min(3.0, full * 1.3))
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "once", *agent_args(state_repo.url, root)],
                                cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            proc.wait(timeout=delay)
            completed_first += 1                       # it finished before the kill: still a valid round
        except subprocess.TimeoutExpired:
            if rounds % 3 == 0:                            # the agent alone: its installer, if any, runs on
                os.kill(proc.pid, signal.SIGKILL)
                alone += 1
            else:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
            moments.append(round(delay, 2))
        # invariants on what the kill left behind, before any recovery
        assert_no_half_venv_in_use(root)
        if (root / "state/status.json").exists():
            status(root)                                 # parses
        # recovery
        recovery = once(state_repo.url, root)
        code = run_agent("plan", *agent_args(state_repo.url, root)).returncode
        assert code == 0, f"round {rounds}: plan after recovery exit {code}"
        # a kill after supervisord took the new config but before the health gate leaves it STARTING;
        # the recovery run takes STARTING as healthy (see test_kill_before_the_health_gate_...), so wait
        wait_until(lambda: set(programs(root)) == {"demo-web"} and programs(root)["demo-web"]["statename"] == "RUNNING",
                   10, f"round {rounds}: demo-web RUNNING after recovery:\n{recovery.stdout}", root / "logs/supervisord.log")
        assert sorted(p.name for p in (root / "supervisor/programs").iterdir()) == ["demo-web.conf"]
        assert served(port) == f"demoapp {version}\n", f"round {rounds}"
        assert status(root)["applied"]["sha"] == git(state_repo.path, "rev-parse", "HEAD")
    print(f"\nSIGKILL during apply: {kills} kills survived ({alone} of the agent alone; {completed_first} rounds "
          f"finished before the kill), "
          f"kill moments (s): {sorted(moments)}; a full once took {full:.2f}s; installer {INSTALLER}")


def test_kill_before_the_health_gate_is_not_taken_as_healthy(state_repo, root):
    port = free_port()
    good = setup_state(state_repo, {"demo-web": {"port": port}})
    once(state_repo.url, root)
    state_repo.write("apps/demo/app.yaml", app_yaml({"demo-web": {"port": port, "args": ["--healthz-status", "500"]}}))
    bad = state_repo.commit("unhealthy")
    old_pid = programs(root)["demo-web"]["pid"]
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "once", *agent_args(state_repo.url, root),
                             "--health-wait", "60"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # the new program is up (RUNNING, new pid): the agent is now polling its /healthz (500)
        # (get: between supervisord's removeProcessGroup and addProcessGroup the program is briefly absent)
        wait_until(lambda: programs(root).get("demo-web", {}).get("pid") not in (None, 0, old_pid)
                   and programs(root)["demo-web"]["statename"] == "RUNNING", 30, "the new program to run")
        time.sleep(0.5)
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    recovery = once(state_repo.url, root, "--health-wait", "3", expect=None)
    assert recovery.returncode == 1, recovery.stdout      # the gate is still owed: it must run and fail
    assert status(root)["applied"]["sha"] == good != bad


# --- the embedded supervisord killed ------------------------------------------------------------------------


def _kill_supervisord(root: Path) -> int:
    pid = int((root / "supervisor/supervisord.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3],
               10, "supervisord to die")
    return pid


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_supervisord_sigkill_is_detected_restarted_and_orphans_do_not_keep_the_port(state_repo, root, daemons, tmp_path):
    a, b = free_port(), free_port()
    setup_state(state_repo, {"svc-a": {"port": a}, "svc-b": {"port": b}})
    once(state_repo.url, root)
    old = {n: p["pid"] for n, p in programs(root).items()}

    dead = _kill_supervisord(root)
    # measured: the programs survive their supervisord (own process groups) and keep their ports
    assert all(_alive(p) for p in old.values()), "expected the children to outlive a SIGKILLed supervisord"
    assert run_agent("plan", *agent_args(state_repo.url, root)).returncode == 2                                     # detected: ensure_supervisor is planned
    proc = once(state_repo.url, root)
    assert "ensure_supervisor" in proc.stdout and "left programs running" in proc.stderr, proc.stderr
    new = {n: p["pid"] for n, p in programs(root).items()}
    assert set(new) == {"svc-a", "svc-b"} and not set(new.values()) & set(old.values())
    assert not any(_alive(p) for p in old.values()), "orphans of the killed supervisord still run"
    assert served(a) == served(b) == "demoapp 1.0.0\n"
    assert int((root / "supervisor/supervisord.pid").read_text()) != dead

    # and the daemon notices on its own
    daemon = Daemon(state_repo.url, root, tmp_path / "daemon.log", poll=1)
    daemons.append(daemon)
    wait_until(lambda: metric(daemon.metrics_text(), "gitops_agent_reconcile_total") >= 1, 20, "a first reconcile", daemon.log)
    second = _kill_supervisord(root)
    orphans = dict(new)
    wait_until(lambda: (root / "supervisor/supervisord.pid").exists()
               and int((root / "supervisor/supervisord.pid").read_text()) != second
               and set(programs(root)) == {"svc-a", "svc-b"}
               and all(p["statename"] == "RUNNING" for p in programs(root).values()), 40,
               "the daemon to restart supervisord and its programs", daemon.log)
    wait_until(lambda: served(a) == served(b) == "demoapp 1.0.0\n", 20, "services answering", daemon.log)
    assert not any(_alive(p) for p in orphans.values())


# --- a service crash-looping ------------------------------------------------------------------------------


def test_crash_looping_service_fails_alone_and_the_host_is_not_flapped(state_repo, root):
    ok, crash, sick = free_port(), free_port(), free_port()
    setup_state(state_repo, {"svc-ok": {"port": ok}})
    once(state_repo.url, root)
    sup_pid = int((root / "supervisor/supervisord.pid").read_text())
    ok_pid = programs(root)["svc-ok"]["pid"]

    state_repo.write("apps/demo/app.yaml", app_yaml({
        "svc-ok": {"port": ok},
        "svc-new": {"port": free_port()},                               # a good new service in the same revision
        "svc-crash": {"port": crash, "args": ["--no-such-flag"]},       # exits at once, every time
        "svc-sick": {"port": sick, "args": ["--healthz-status", "500"]},  # runs, never healthy
    }))
    state_repo.commit("two broken services and a good one")
    proc = once(state_repo.url, root, "--health-wait", "3", expect=1)
    out = proc.stdout
    # gated: its health gate sees it die (supervisord's BACKOFF) and says why, with its stderr
    assert "[FAILED] check_health svc-crash" in out and "unrecognized arguments: --no-such-flag" in out, out
    assert "[FAILED] check_health svc-sick" in out and "HTTP 500" in out, out
    info = programs(root)
    assert info["svc-ok"]["pid"] == ok_pid and info["svc-new"]["statename"] == "RUNNING"
    assert "svc-crash" not in info and "svc-sick" not in info, info      # new and failed: rolled back to absent
    assert int((root / "supervisor/supervisord.pid").read_text()) == sup_pid
    st = status(root)
    res = st["resources"]
    assert res["program:svc-crash"]["state"] == "failed" and "no-such-flag" in res["program:svc-crash"]["message"]
    assert res["program:svc-sick"]["state"] == "failed" and "HTTP 500" in res["program:svc-sick"]["message"]
    assert res["program:svc-ok"]["state"] == "ok" and res["program:svc-new"]["state"] == "ok"
    assert st["result"] == "failed" and "svc-crash" in st["last_error"] and "svc-sick" in st["last_error"]

    # the next reconcile retries only the broken ones; the good ones are never restarted
    once(state_repo.url, root, "--health-wait", "3", expect=1)
    info = programs(root)
    assert info["svc-ok"]["pid"] == ok_pid and info["svc-new"]["statename"] == "RUNNING"
    assert int((root / "supervisor/supervisord.pid").read_text()) == sup_pid
    assert served(ok) == "demoapp 1.0.0\n"


# --- disk full while building a venv ------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        from agent.drivers.supervisor import EmbeddedSupervisor

        try:
            EmbeddedSupervisor(mnt / "root").stop()
            EmbeddedSupervisor(mnt / "root")._stop_orphans(timeout=5)
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path, leave: int) -> Path:
    """Fill the file system of `path` leaving about `leave` bytes free."""
    filler = path / "filler"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as fh:
        chunk = b"\0" * (1 << 20)
        todo = max(free - leave, 0)
        while todo > 0:
            n = fh.write(chunk[:min(len(chunk), todo)])
            todo -= n
    return filler


@pytest.mark.parametrize("leave", [16 * 1024, 0], ids=["16KiB-free", "0-free"])
def test_disk_full_during_build_switches_nothing(state_repo, tmpfs, leave):
    root = tmpfs / "root"
    port = free_port()
    good = setup_state(state_repo, {"demo-web": {"port": port}})
    once(state_repo.url, root)
    pid = programs(root)["demo-web"]["pid"]
    link = os.readlink(root / "envs/demo")
    venvs = sorted(os.listdir(root / "venvs"))
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    new = state_repo.commit("2.0.0")
    assert run_agent("plan", *agent_args(state_repo.url, root)).returncode == 2
    # fetch and check out the new commit into the root first (plan is read-only: it fetches aside), so the
    # full disk hits the build, not the fetch
    from agent.drivers.git import GitSource

    with GitSource(state_repo.url, "main", root / "source") as source:
        source.checkout(source.resolve())
    filler = _fill(tmpfs, leave=leave)

    proc = once(state_repo.url, root, expect=1)
    assert "[FAILED] build_venv demo" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "No space left" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert os.readlink(root / "envs/demo") == link and sorted(os.listdir(root / "venvs")) == venvs
    assert programs(root)["demo-web"]["pid"] == pid and served(port) == "demoapp 1.0.0\n"
    st = status(root)                                     # parses; maybe not updated if even that did not fit
    assert st["applied"]["sha"] == good
    if st["attempted"]["sha"] == new:
        assert st["result"] == "failed" and "No space left" in st["last_error"]
        print("\ndisk full: build failed cleanly, status recorded the failure")
    else:
        assert "cannot write status" in proc.stderr, proc.stderr
        print("\ndisk full: build failed cleanly; status could not be written and the old one is intact")
    assert not [p for p in (root / "state").iterdir() if p.name.endswith(".tmp")]

    filler.unlink()
    once(state_repo.url, root)
    assert served(port) == "demoapp 2.0.0\n" and status(root)["applied"]["sha"] == new


# --- credentials never leak ------------------------------------------------------------------------------------

TOKEN = "ghp_SeCrEtT0kenValue123"


def test_token_in_repo_url_never_appears_in_output_status_logs_or_metrics(root, daemons, tmp_path):
    """An https URL with a token, to a server that is not there: every error path prints the URL."""
    url = f"https://x-access-token:{TOKEN}@127.0.0.1:{free_port()}/org/state.git"
    proc = run_agent("once", *agent_args(url, root), "--log-format", "json")
    assert proc.returncode == 1 and "source:" in proc.stderr, proc.stderr
    plan = run_agent("plan", "--json", *agent_args(url, root))
    daemon = Daemon(url, root, tmp_path / "daemon.log", "--log-format", "json", poll=1)
    daemons.append(daemon)
    wait_until(lambda: metric(daemon.metrics_text(), "gitops_agent_source_fetch_errors_total") >= 2, 30,
               "fetch errors", daemon.log)
    metrics = daemon.metrics_text()
    ready = get_text(daemon.base + "/readyz") or ""
    daemon.stop()
    logs = daemon.log_text()
    for line in logs.splitlines():
        json.loads(line)                                  # json logs stay json
    texts = {"once stdout": proc.stdout, "once stderr": proc.stderr, "plan": plan.stdout + plan.stderr,
             "status.json": (root / "state/status.json").read_text(), "daemon log": logs, "metrics": metrics,
             "readyz": ready}
    # on disk the token is only where git itself needs it: the mirror's remote URL, behind a 0700 dir
    mirror_config = root / "source/repo.git/config"
    assert TOKEN in mirror_config.read_text() and (root / "source").stat().st_mode & 0o077 == 0
    texts.update({f"file {p.relative_to(root)}": p.read_text(errors="replace")
                  for p in root.rglob("*") if p.is_file() and p.stat().st_size < 1 << 20 and p != mirror_config})
    leaks = [where for where, text in texts.items() if TOKEN in text or TOKEN[4:14] in text]
    assert not leaks, leaks
    assert "***@127.0.0.1" in proc.stderr
