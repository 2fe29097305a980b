"""Self-upgrade (DESIGN §3c): the daemon, installed from a wheel of this checkout (0.1.0), finds fleet.yaml's
`agent:` lock pinning a second wheel built from a copy of the checkout with the version bumped, builds
that venv from a wheelhouse made here (the wheel and its dependencies) with a hashed lock (uv pip compile
--generate-hashes), checks it and hands over by exec: same pid, root lock and listener kept, the managed
service untouched (0 failed requests to it, same pid). Then a lock pinning a broken wheel (its CLI raises
at import): the running agent keeps running and reports the failure in metrics, status and one notification
to a real json:// receiver; "recovered" once fleet.yaml no longer asks for the broken version."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from agent import __version__
from agent_wheel import REPO, build_dists, clean_env, install_into_venv
from conftest import free_port, run_agent, stop_process
from daemon_helpers import http_get, wait_until
from test_notify import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

V2, V3, V4 = "0.2.0", "0.3.0", "0.4.0"


def _wheel_of_copy(tmp: Path, version: str, broken: bool = False, dies_in_run: bool = False) -> Path:
    """A wheel built from a copy of this checkout with `version` (and, if `broken`, a CLI that raises at
    import; if `dies_in_run`, a daemon that raises as it starts while --version and validate work)."""
    src = tmp / f"src-{version}"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "tests", "bench", "examples", "*.egg-info",
                                                             "__pycache__", "agent-root", "build", "dist"))
    init = src / "agent" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{__version__}"', f'__version__ = "{version}"'))
    if broken:
        with open(src / "agent" / "cli.py", "a") as fh:
            fh.write('\nraise RuntimeError("this gitops-agent wheel is broken on purpose")\n')
    if dies_in_run:
        runtime = src / "agent" / "service" / "runtime.py"
        text = runtime.read_text()
        head = "def run_daemon(settings, lock_fd: int | None = None) -> int:\n"
        assert head in text
        runtime.write_text(text.replace(head, head + '    raise RuntimeError("this agent dies at start on purpose")\n'))
    out = tmp / f"dist-{version}"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)], check=True,
                   capture_output=True, env=clean_env(), timeout=600)
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """(dir, {version: lock text}): the two new wheels, their dependencies, and a hashed lock for each."""
    tmp = tmp_path_factory.mktemp("agent-wheels")
    house = tmp / "house"
    house.mkdir()
    good, bad, dies = _wheel_of_copy(tmp, V2), _wheel_of_copy(tmp, V3, broken=True), _wheel_of_copy(tmp, V4, dies_in_run=True)
    for wheel in (good, bad, dies):
        shutil.copy(wheel, house)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "--dest",
                           str(house), str(good)], capture_output=True, text=True, env=clean_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr
    locks = {}
    for version in (V2, V3, V4):
        proc = subprocess.run([shutil.which("uv") or "uv", "pip", "compile", "-", "--quiet", "--generate-hashes",
                               "--no-index", "--find-links", str(house), "--python-version", "%d.%d" % sys.version_info[:2],
                               "--no-header", "--no-annotate"],
                              input=f"gitops-agent=={version}\n", capture_output=True, text=True, env=clean_env(),
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        locks[version] = proc.stdout
    return house, locks


@pytest.fixture(scope="module")
def v1_bin(tmp_path_factory):
    return install_into_venv(build_dists()[1], tmp_path_factory.mktemp("v1") / "venv")


class Hammer:
    """GETs `url` back to back on a thread; counts failures and the longest gap between two answers."""

    def __init__(self, url: str):
        self.url, self.ok, self.failed, self.max_gap = url, 0, 0, 0.0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as resp:
                    resp.read()
                    self.ok += 1
                now = time.monotonic()
                self.max_gap, last = max(self.max_gap, now - last), now
            except OSError as exc:
                self.failed += 1
                self.errors.append(repr(exc))
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def _metrics(listen: int) -> str:
    return http_get(f"http://127.0.0.1:{listen}/metrics")[1]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def _upgrade_notes(receiver: Receiver) -> list[str]:
    return [p["title"] + ": " + p["message"] for p in receiver.got
            if p["title"].endswith(("agent upgrade failed", "recovered"))]


def test_self_upgrade_hands_over_and_a_broken_one_is_refused(v1_bin, wheelhouse, state_repo, agent_root, tmp_path,
                                                            receiver):
    house, locks = wheelhouse
    shutil.copytree(house, state_repo.path / "agent-wheels")
    port, listen = free_port(), free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    fleet = (state_repo.path / "fleet.yaml").read_text()
    state_repo.commit("the app")
    log_path = tmp_path / "agent.log"
    log = open(log_path, "wb")
    daemon = subprocess.Popen([str(v1_bin / "gitops-agent"), "run", "--repo", state_repo.url, "--host", "h1",
                               "--root", str(agent_root), "--listen", f"127.0.0.1:{listen}", "--poll-interval", "1",
                               "--health-wait", "60", "--notify", receiver.url], cwd=tmp_path, env=clean_env(), stdout=log,
                              stderr=subprocess.STDOUT)
    hammers: list[Hammer] = []
    try:
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/")[0] == 200, 300, "the service", log=log_path, step=0.2)
        assert f'gitops_agent_build_info{{version="{__version__}"}} 1.0' in _metrics(listen)
        service_pid = json.loads(run_agent("facts", "--json", "--root", str(agent_root)).stdout)["programs"]["demo-web"]["pid"]
        hammers = [Hammer(f"http://127.0.0.1:{port}/"), Hammer(f"http://127.0.0.1:{listen}/healthz")]

        state_repo.write("agent.lock", locks[V2])
        state_repo.write("fleet.yaml", fleet + "agent: {lockfile: agent.lock, find_links: [agent-wheels], index: false}\n")
        state_repo.commit(f"agent {V2}")
        wait_until(lambda: f'gitops_agent_build_info{{version="{V2}"}} 1.0' in _metrics(listen), 600,
                   f"the agent to become {V2}", log=log_path, step=0.2)
        wait_until(lambda: http_get(f"http://127.0.0.1:{listen}/readyz")[0] == 200, 120,
                   "the new agent ready", log=log_path, step=0.2)
        time.sleep(1)
        for h in hammers:
            h.stop()
        service, agent = hammers
        print(f"\nhandover: service {service.ok} ok / {service.failed} failed, longest gap {service.max_gap:.3f}s; "
              f"agent /healthz {agent.ok} ok / {agent.failed} failed, longest gap {agent.max_gap:.3f}s")
        assert daemon.poll() is None                       # the same process (exec): no restart by anyone
        assert service.failed == 0, service.errors[:5]
        assert agent.failed == 0, agent.errors[:5]         # the listener was handed over: nothing refused
        facts = json.loads(run_agent("facts", "--json", "--root", str(agent_root)).stdout)
        assert facts["programs"]["demo-web"]["pid"] == service_pid
        record = json.loads((agent_root / "state" / "agent-upgrade.json").read_text())
        assert record["phase"] == "done" and record["from"] == __version__ and record["to"] == V2
        current = agent_root / "self" / "envs" / "gitops-agent"     # a stable path for the service manager
        assert subprocess.run([current / "bin" / "gitops-agent", "--version"], capture_output=True, text=True,
                              env=clean_env()).stdout.strip() == f"gitops-agent {V2}"
        text = log_path.read_text()
        assert "handing over from gitops-agent" in text and "took over from gitops-agent" in text

        # A broken wheel: its venv fails the build's entry-point check; the running agent stays and says so.
        state_repo.write("agent.lock", locks[V3])
        state_repo.commit(f"agent {V3} (broken)")
        wait_until(lambda: f'gitops_agent_self_upgrade_failed{{version="{V3}"}} 1.0' in _metrics(listen), 600,
                   "the failed upgrade reported", log=log_path, step=0.2)
        assert f'gitops_agent_build_info{{version="{V2}"}} 1.0' in _metrics(listen) and daemon.poll() is None
        status = run_agent("status", "--root", str(agent_root)).stdout
        assert f"agent upgrade to {V3} FAILED (running {V2})" in status and "broken on purpose" in status
        assert json.loads(http_get(f"http://127.0.0.1:{listen}/api/status")[1])["agent_upgrade"]["phase"] == "failed"
        assert json.loads(run_agent("facts", "--json", "--root", str(agent_root)).stdout)["programs"]["demo-web"]["pid"] == service_pid
        assert http_get(f"http://127.0.0.1:{port}/")[0] == 200
        # ... and sends it once, not on every poll (the poll interval is 1 s: several polls pass here)
        wait_until(lambda: _upgrade_notes(receiver), 120, "the failure notification", log=log_path, step=0.2)
        time.sleep(4)
        notes = _upgrade_notes(receiver)
        assert len(notes) == 1 and f"agent upgrade failed: host h1, app *, revision -: upgrade to gitops-agent {V3} " \
            f"failed, {V2} keeps running" in notes[0] and "broken on purpose" in notes[0], notes

        # fleet.yaml back on the running version: the failure clears, "recovered" is sent once
        state_repo.write("agent.lock", locks[V2])
        state_repo.commit(f"agent back to {V2}")
        wait_until(lambda: len(_upgrade_notes(receiver)) > 1, 300, "the recovery notification", log=log_path, step=0.2)
        time.sleep(3)
        notes = _upgrade_notes(receiver)
        assert len(notes) == 2 and notes[1].startswith("gitops-agent h1: recovered") and \
            f"running gitops-agent {V2}" in notes[1], notes
        assert 'gitops_agent_self_upgrade_failed{' not in _metrics(listen)
        assert "FAILED" not in run_agent("status", "--root", str(agent_root)).stdout
    finally:
        for h in hammers:
            h.stop()
        stop_process(daemon, timeout=60)
        log.close()


def test_a_new_agent_that_dies_at_start_is_reported_by_the_old_one(v1_bin, wheelhouse, state_repo, agent_root, tmp_path):
    """The handover's crash path under a real process manager: the agent runs as the one program of a
    supervisord (as bootstrap sets it up); the locked agent passes --version and validate but dies as its
    daemon starts. supervisord starts the command it knows (the old agent), which finds the handover
    unconfirmed, reports it, and does not try that lock again."""
    house, locks = wheelhouse
    shutil.copytree(house, state_repo.path / "agent-wheels")
    state_repo.write("fleet.yaml", "apiVersion: gitops-agent/v1\nkind: Fleet\nhosts: {h1: {}}\n"
                                   "agent: {lockfile: agent.lock, find_links: [agent-wheels], index: false}\n")
    state_repo.write("agent.lock", locks[V4])
    state_repo.commit(f"agent {V4}")
    listen = free_port()
    sup = tmp_path / "sup"
    sup.mkdir()
    (sup / "supervisord.conf").write_text(f"""\
[unix_http_server]
file={sup}/s.sock
[supervisord]
pidfile={sup}/supervisord.pid
logfile={sup}/supervisord.log
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[program:gitops-agent]
command={v1_bin}/gitops-agent run --repo {state_repo.url} --host h1 --root {agent_root} --listen 127.0.0.1:{listen} --poll-interval 1
autorestart=true
startsecs=1
startretries=100
stopwaitsecs=60
redirect_stderr=true
stdout_logfile={sup}/agent.log
""")
    subprocess.run([str(v1_bin / "supervisord"), "-c", str(sup / "supervisord.conf")], check=True, env=clean_env())
    try:
        wait_until(lambda: f'gitops_agent_self_upgrade_failed{{version="{V4}"}} 1.0' in _metrics(listen), 600,
                   "the old agent to report the failed handover", log=sup / "agent.log", step=0.2)
        assert f'gitops_agent_build_info{{version="{__version__}"}} 1.0' in _metrics(listen)
        record = json.loads((agent_root / "state" / "agent-upgrade.json").read_text())
        assert record["phase"] == "failed" and "did not come up" in record["reason"]
        log = (sup / "agent.log").read_text()
        assert "dies at start on purpose" in log and log.count("handing over from gitops-agent") == 1
        time.sleep(3)                               # several polls: the failed lock is not tried again
        assert (sup / "agent.log").read_text().count("handing over from gitops-agent") == 1
        status = run_agent("status", "--root", str(agent_root)).stdout
        assert f"agent upgrade to {V4} FAILED (running {__version__})" in status
    finally:
        pid = int((sup / "supervisord.pid").read_text())
        subprocess.run(["kill", str(pid)])
        wait_until(lambda: subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0, 120,
                   "supervisord to stop")


def test_agent_upgrade_follows_the_waves(v1_bin, wheelhouse, state_repo, agent_root, tmp_path):
    """fleet.yaml `agent.rollout.waves` (DESIGN §3c: waves apply to the agent's own upgrade like to any app):
    two real agents on one repo, `early` in the canary wave, `late` in a wave that starts 1 h after the commit
    that changed agent.lock. `early` upgrades; `late` keeps its agent and says why; once its wave's `after`
    is shortened to 20 s (a commit to fleet.yaml only: the clock still runs from the lock's commit) it upgrades
    when that time has come."""
    from agent.drivers.supervisor import EmbeddedSupervisor

    house, locks = wheelhouse
    shutil.copytree(house, state_repo.path / "agent-wheels")
    fleet = "apiVersion: gitops-agent/v1\nkind: Fleet\nhosts:\n  early: {groups: [canary]}\n  late: {}\n"
    state_repo.write("fleet.yaml", fleet)
    state_repo.commit("two hosts")
    roots = {"early": agent_root, "late": tmp_path / "root-late"}
    listen = {host: free_port() for host in roots}
    logs, daemons = {}, {}
    try:
        for host, root in roots.items():
            logs[host] = tmp_path / f"{host}.log"
            with open(logs[host], "wb") as out:
                daemons[host] = subprocess.Popen(
                    [str(v1_bin / "gitops-agent"), "run", "--repo", state_repo.url, "--host", host, "--root", str(root),
                     "--listen", f"127.0.0.1:{listen[host]}", "--poll-interval", "1"],
                    cwd=tmp_path, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)

        def version_is(host: str, version: str) -> bool:
            try:
                return f'gitops_agent_build_info{{version="{version}"}} 1.0' in _metrics(listen[host])
            except OSError:
                return False

        def record(host: str) -> dict:
            path = roots[host] / "state" / "agent-upgrade.json"
            return json.loads(path.read_text()) if path.exists() else {}

        for host in roots:
            wait_until(lambda: version_is(host, __version__), 300, f"{host} up", log=logs[host], step=0.2)
        agent_block = ("agent:\n  lockfile: agent.lock\n  find_links: [agent-wheels]\n  index: false\n"
                       "  rollout:\n    waves:\n      - hosts: {groups: [canary]}\n      - {percent: 100, after: 1h}\n")
        state_repo.write("agent.lock", locks[V2])
        state_repo.write("fleet.yaml", fleet + agent_block)
        state_repo.commit(f"agent {V2}, canary first")
        lock_time = float(subprocess.run(["git", "-C", str(state_repo.path), "log", "-1", "--format=%ct"],
                                         capture_output=True, text=True, check=True).stdout)

        wait_until(lambda: version_is("early", V2), 600, "early to upgrade", log=logs["early"], step=0.2)
        wait_until(lambda: record("late").get("phase") == "waiting", 120, "late to wait", log=logs["late"], step=0.2)
        time.sleep(3)                                       # several polls of `late`: still its own agent
        assert version_is("late", __version__) and record("late")["to"] == V2 and record("late")["wave"] == 2
        assert not (roots["late"] / "self" / "venvs").exists() or not any((roots["late"] / "self" / "venvs").iterdir())
        status = run_agent("status", "--root", str(roots["late"])).stdout
        assert f"agent upgrade to {V2} waiting for this host's wave (running {__version__}): wave 2" in status, status
        api = json.loads(http_get(f"http://127.0.0.1:{listen['late']}/api/status")[1])
        assert api["agent_upgrade"]["phase"] == "waiting" and api["agent_upgrade"]["to"] == V2
        assert "handing over" not in logs["late"].read_text()

        state_repo.write("fleet.yaml", fleet + agent_block.replace("after: 1h", "after: 20s"))
        state_repo.commit("agent: the second wave after 20 s")
        wait_until(lambda: version_is("late", V2), 600, "late to upgrade in its turn", log=logs["late"], step=0.2)
        done = record("late")
        assert done["phase"] == "done" and done["to"] == V2 and done["at"] >= lock_time + 20
        assert daemons["late"].poll() is None and daemons["early"].poll() is None     # handed over in place
        assert json.loads((roots["late"] / "state" / "waves.json").read_text())["@agent"]["state"] == "due"
    finally:
        for proc in daemons.values():
            stop_process(proc, timeout=60)
        EmbeddedSupervisor(roots["late"]).stop()
