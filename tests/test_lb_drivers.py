"""Integration: the real HAProxy and nginx (Debian packages) under an embedded supervisord, in front of
two tiny real HTTP backends on 127.0.0.1 that answer their own name.

Skipped (with the reason) only when a binary is absent.
"""

from __future__ import annotations

import collections
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.drivers._procfs import children, listening_pids, master_pid
from agent.drivers.haproxy import PROGRAM_NAME, HAProxyDriver, HAProxyRuntime, LBError
from agent.drivers.nginx import NginxDriver
from agent.drivers.supervisor import EmbeddedSupervisor, write_program_file
from agent.core.render.lb import ABSplit, Backend, Frontend
from agent.core.render.supervisor import render_program
from conftest import free_port

pytestmark = pytest.mark.timeout(60)

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy binary not installed (apt-get install haproxy)")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx binary not installed (apt-get install nginx-light)")


# --- fixtures -------------------------------------------------------------------------------------


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


BACKEND = Path(__file__).with_name("lb_backend.py")   # a keep-alive backend answering its own name


@pytest.fixture
def backends(tmp_path):
    """Two real HTTP backends, blue and green, answering "<name>\\n" on GET /; killed afterwards."""
    procs, out = [], {}
    for name in ("blue", "green"):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, str(BACKEND), name, str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out[name] = f"127.0.0.1:{port}"
    try:
        for addr in out.values():
            _wait_port(int(addr.rsplit(":", 1)[1]))
        yield out
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def lb_root(tmp_path):
    """A short agent root whose embedded supervisord (and the LB it runs) is stopped afterwards."""
    root = tmp_path / "r"
    yield root
    EmbeddedSupervisor(root).stop()


def start(driver, root: Path, frontends) -> None:
    """What the integrator does: apply (writes the config), add the program, start it, wait live."""
    assert driver.apply(frontends).action == "written"
    sup = EmbeddedSupervisor(root)
    client = sup.ensure_running()
    spec = driver.program_spec()
    write_program_file(sup.include_dir, spec.name, render_program(spec))
    client.update([spec.name])
    client.start(spec.name)
    driver.wait_live(frontends)


def frontend(backends, listen, blue, green, name="app", ab=None) -> tuple[Frontend, ...]:
    return (Frontend(name, listen, (Backend("blue", backends["blue"], blue),
                                    Backend("green", backends["green"], green)), ab),)


def get(port: int, headers: dict | None = None, conn: http.client.HTTPConnection | None = None) -> tuple[int, str]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers=headers or {})
        resp = conn.getresponse()
        body = resp.read().decode()
        return resp.status, body.split()[0] if resp.status == 200 else body
    finally:
        if own:
            conn.close()


def split(port: int, n: int = 500) -> collections.Counter:
    """n sequential requests on one keep-alive connection: {backend name: count}."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        return collections.Counter(get(port, conn=conn)[1] for _ in range(n))
    finally:
        conn.close()


class KeepAliveLoad:
    """A few threads, each one reused HTTPConnection, bounded in count and time; counts failures."""

    def __init__(self, port: int, threads: int = 4, per_thread: int = 3000, seconds: float = 20.0):
        self.port, self.per_thread, self.seconds = port, per_thread, seconds
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(self.seconds + 10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        for _ in range(self.per_thread):
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            try:
                status, _ = get(self.port, conn=conn)
                good = status == 200
            except (OSError, http.client.HTTPException) as err:
                good = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                with self._lock:
                    self.errors.append(repr(err))
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.failed += 1
        conn.close()


# --- HAProxy --------------------------------------------------------------------------------------


@needs_haproxy
def test_haproxy_split_matches_weights(backends, lb_root):
    port = free_port()
    driver = HAProxyDriver(lb_root, haproxy_bin=HAPROXY)
    start(driver, lb_root, frontend(backends, f"127.0.0.1:{port}", 90, 10))
    counts = split(port, 500)
    assert abs(counts["blue"] - 450) <= 10 and counts["blue"] + counts["green"] == 500, counts


@needs_haproxy
def test_haproxy_weight_flips_use_runtime_api_without_loss(backends, lb_root):
    port = free_port()
    driver = HAProxyDriver(lb_root, haproxy_bin=HAPROXY)
    start(driver, lb_root, frontend(backends, f"127.0.0.1:{port}", 90, 10))
    worker_pid = driver.runtime.info()["Pid"]
    flips = 0
    with KeepAliveLoad(port) as load:
        for i in range(30):
            blue, green = (10, 90) if i % 2 == 0 else (90, 10)
            applied = driver.apply(frontend(backends, f"127.0.0.1:{port}", blue, green))
            assert applied.action == "weights", applied
            flips += 1
            time.sleep(0.02)
    assert load.failed == 0, load.errors[:5]
    assert load.ok > 300
    assert flips == 30
    assert driver.runtime.info()["Pid"] == worker_pid, "a weights-only change must not reload"
    # the last flip (90/10) is live and in the config file
    assert driver.facts()["weights"] == {"app": {"blue": 90, "green": 10}}
    assert "server green 127.0.0.1" in driver.config_path.read_text()
    assert " weight 10 check" in driver.config_path.read_text()


@needs_haproxy
def test_haproxy_runtime_weights_survive_reload_and_restart(backends, lb_root):
    port = free_port()
    driver = HAProxyDriver(lb_root, haproxy_bin=HAPROXY)
    start(driver, lb_root, frontend(backends, f"127.0.0.1:{port}", 90, 10))
    assert driver.apply(frontend(backends, f"127.0.0.1:{port}", 30, 70)).action == "weights"
    # a reload (SIGUSR2 to the master) re-reads the file
    before = driver.runtime.info()["Pid"]
    driver._reload()
    deadline = time.monotonic() + 10
    while driver.runtime.answers() is False or driver.runtime.info().get("Pid") == before:
        assert time.monotonic() < deadline, "HAProxy did not reload"
        time.sleep(0.05)
    assert driver.facts()["weights"] == {"app": {"blue": 30, "green": 70}}
    # a restart by supervisord too
    EmbeddedSupervisor(lb_root).client().restart(driver.program_spec().name)
    driver.wait_live(frontend(backends, f"127.0.0.1:{port}", 30, 70))
    counts = split(port, 100)
    assert abs(counts["green"] - 70) <= 3, counts


@needs_haproxy
def test_haproxy_topology_change_reloads_and_serves_new_frontend(backends, lb_root):
    port, port2 = free_port(), free_port()
    driver = HAProxyDriver(lb_root, haproxy_bin=HAPROXY)
    start(driver, lb_root, frontend(backends, f"127.0.0.1:{port}", 1, 1))
    both = frontend(backends, f"127.0.0.1:{port}", 1, 1) + frontend(backends, f"127.0.0.1:{port2}", 0, 1, name="other")
    applied = driver.apply(both)
    assert applied.action == "reload"
    assert split(port2, 20) == {"green": 20}
    assert driver.apply(both).action == "none"


@needs_haproxy
def test_haproxy_reload_that_cannot_bind_is_an_error(backends, lb_root):
    port = free_port()
    driver = HAProxyDriver(lb_root, haproxy_bin=HAPROXY, live_timeout=3)
    old = frontend(backends, f"127.0.0.1:{port}", 1, 1)
    start(driver, lb_root, old)
    old_text = driver.config_path.read_text()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(LBError, match="did not go live"):
            driver.apply(old + frontend(backends, f"127.0.0.1:{busy}", 1, 1, name="other"))
    assert driver.config_path.read_text() == old_text
    facts = driver.facts()
    assert facts["running"] and facts["topology"] == facts["config_topology"]
    assert get(port)[0] == 200


@needs_haproxy
def test_haproxy_facts_show_a_hand_change(backends, lb_root):
    port = free_port()
    driver = HAProxyDriver(lb_root, haproxy_bin=HAPROXY)
    wish = frontend(backends, f"127.0.0.1:{port}", 90, 10)
    start(driver, lb_root, wish)
    assert driver.facts()["weights"] == {"app": {"blue": 90, "green": 10}}
    HAProxyRuntime(driver.socket_path).command("set weight app/green 50")  # by hand
    assert driver.facts()["weights"] == {"app": {"blue": 90, "green": 50}}
    assert driver.runtime.get_weight("app", "green") == 50
    applied = driver.apply(wish)
    assert applied.action == "weights" and applied.changed == (("app", "green", 50, 10),)
    driver.runtime.set_state("app", "green", "drain")
    assert driver.facts()["states"]["app"]["green"] == "drain"
    with pytest.raises(LBError, match="No such server|not found"):
        driver.runtime.set_weight("app", "nope", 1)


@needs_haproxy
def test_haproxy_ab_is_sticky_and_ramp_only_moves_users_into_the_variant(backends, lb_root):
    port = free_port()
    driver = HAProxyDriver(lb_root, haproxy_bin=HAPROXY)
    _check_ab(driver, lb_root, backends, port)


@needs_haproxy
def test_haproxy_reload_returns_with_only_the_new_worker_accepting(backends, lb_root):
    """The new worker answers the stats socket ~1 ms before the master has soft-stopped the old one, and
    a request accepted in between is served with the old config (an A/B user flipped buckets in CI)."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    driver = HAProxyDriver(lb_root, haproxy_bin=HAPROXY)
    start(driver, lb_root, frontend(backends, listen, 1, 0, ab=ABSplit("green", 0)))
    master = master_pid(driver.pid_path, b"haproxy")
    for round_ in range(8):
        percent, want = (100, "green") if round_ % 2 == 0 else (0, "blue")
        before = children(master)
        assert driver.apply(frontend(backends, listen, 1, 0, ab=ABSplit("green", percent))).action == "reload"
        assert not listening_pids(before), round_
        assert listening_pids(children(master) - before), "no new worker listens"
        assert get(port)[1] == want, round_



@needs_haproxy
def test_haproxy_reload_reaches_a_master_that_is_starting_or_re_executing(backends, lb_root):
    """HAProxy's master drops a SIGUSR2 that comes while it starts or re-executes after a reload: it has
    SIGUSR2 blocked, then sets it to SIG_IGN (which discards a pending one) before its loop catches it,
    and its new worker answers the stats socket ~20-600 ms before that. Measured: 8 of 8 SIGUSR2 sent the
    moment the first worker answered were lost (no "Reloading HAProxy" in its log)."""
    port = free_port()
    driver = HAProxyDriver(lb_root, haproxy_bin=HAPROXY)
    wish = frontend(backends, f"127.0.0.1:{port}", 1, 1)
    start(driver, lb_root, wish)
    client = EmbeddedSupervisor(lb_root).client()

    def wait_reloads(n: int) -> None:
        deadline = time.monotonic() + 20
        while (log := client.read_log_tail(PROGRAM_NAME, 20000)).count("Reloading HAProxy") < n:
            assert time.monotonic() < deadline, f"reload {n} was lost: {log}"
            time.sleep(0.01)

    driver._reload()   # its worker answers, but the master may still be starting
    wait_reloads(1)
    driver._reload()   # the master is re-executing (it logged "Reloading HAProxy" ~1 s ago at most)
    wait_reloads(2)
    driver.wait_live(wish)
    assert get(port)[0] == 200


STARTING_MASTER = """
import signal, sys, time
# Like HAProxy's master while it starts or re-executes: SIGUSR2 blocked, then set to SIG_IGN (which
# discards a pending one), then caught and unblocked once its loop runs.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
print("starting", flush=True)
time.sleep(float(sys.argv[1]))
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
got = []
signal.signal(signal.SIGUSR2, lambda *_: got.append(1))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
deadline = time.monotonic() + 3
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
print("reloaded" if got else "lost", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("starts_for, fails", [(0.5, False), (30, True)])
def test_reload_waits_until_the_master_catches_sigusr2(tmp_path, starts_for, fails):
    """`_reload` against a real process standing in for a master that is still starting."""
    proc = subprocess.Popen([sys.executable, "-c", STARTING_MASTER, str(starts_for), "haproxy"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "starting"
        driver = HAProxyDriver(tmp_path, haproxy_bin="haproxy", live_timeout=2.0)
        driver.lb_dir.mkdir()
        driver.pid_path.write_text(f"{proc.pid}\n")
        if fails:
            with pytest.raises(LBError, match=rf"master {proc.pid} .*SIGUSR2"):
                driver._reload()
        else:
            driver._reload()
            assert proc.stdout.readline().strip() == "reloaded"
    finally:
        proc.kill()
        proc.wait()


LISTENER = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print("listening", flush=True)
time.sleep(float(sys.argv[1])); s.close()
print("closed", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("holds_for, fails", [(0.3, False), (30, True)])
def test_wait_retired_waits_until_the_old_worker_closed_its_listener(tmp_path, holds_for, fails):
    """`_wait_retired`, against a real process standing in for an old worker that is slow to stop."""
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(holds_for)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "listening"
        driver = HAProxyDriver(tmp_path, haproxy_bin="haproxy", live_timeout=1.0)
        started = time.monotonic()
        if fails:
            with pytest.raises(LBError, match=rf"workers \[{proc.pid}\] of the previous config still accept"):
                driver._wait_retired({proc.pid})
        else:
            driver._wait_retired({proc.pid})
            assert time.monotonic() - started >= 0.2
            assert proc.stdout.readline().strip() == "closed"
    finally:
        proc.kill()
        proc.wait()


# --- nginx ----------------------------------------------------------------------------------------


@needs_nginx
def test_nginx_split_matches_weights_exactly(backends, lb_root):
    port = free_port()
    driver = NginxDriver(lb_root, nginx_bin=NGINX)
    start(driver, lb_root, frontend(backends, f"127.0.0.1:{port}", 90, 10))
    assert split(port, 500) == {"blue": 450, "green": 50}


@needs_nginx
def test_nginx_weight_zero_is_down_and_gets_no_traffic(backends, lb_root):
    port = free_port()
    driver = NginxDriver(lb_root, nginx_bin=NGINX)
    start(driver, lb_root, frontend(backends, f"127.0.0.1:{port}", 90, 10))
    applied = driver.apply(frontend(backends, f"127.0.0.1:{port}", 5, 0))
    assert applied.action == "reload" and ("app", "green", 10, 0) in applied.changed
    assert f"server {backends['green']} down;" in driver.config_path.read_text()
    assert split(port, 100) == {"blue": 100}
    driver.apply(frontend(backends, f"127.0.0.1:{port}", 0, 0))
    assert get(port)[0] == 503
    assert driver.facts()["weights"] == {"app": {"blue": 0, "green": 0}}


@needs_nginx
def test_nginx_reload_is_verified_live(backends, lb_root):
    port = free_port()
    driver = NginxDriver(lb_root, nginx_bin=NGINX)
    start(driver, lb_root, frontend(backends, f"127.0.0.1:{port}", 90, 10))
    new = frontend(backends, f"127.0.0.1:{port}", 1, 1)
    applied = driver.apply(new)
    assert applied.action == "reload"
    assert driver.live_version() == driver.version_of(new)
    assert split(port, 100) == {"blue": 50, "green": 50}
    facts = driver.facts()
    assert facts["running"] and not facts["edited"] and facts["error"] is None
    assert facts["weights"] == {"app": {"blue": 1, "green": 1}}
    assert driver.apply(new).action == "none"


@needs_nginx
def test_nginx_reload_that_cannot_bind_is_an_error(backends, lb_root):
    port = free_port()
    driver = NginxDriver(lb_root, nginx_bin=NGINX, live_timeout=2)
    old = frontend(backends, f"127.0.0.1:{port}", 90, 10)
    start(driver, lb_root, old)
    old_text = driver.config_path.read_text()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(LBError, match="did not go live") as info:
            driver.apply(old + frontend(backends, f"127.0.0.1:{busy}", 1, 1, name="other"))
    assert "Address already in use" in str(info.value)
    assert driver.config_path.read_text() == old_text
    assert driver.live_version() == driver.version_of(old)
    assert driver.facts()["weights"] == {"app": {"blue": 90, "green": 10}}


@needs_nginx
def test_nginx_refused_config_never_reaches_the_file(backends, lb_root, monkeypatch):
    port = free_port()
    driver = NginxDriver(lb_root, nginx_bin=NGINX)
    start(driver, lb_root, frontend(backends, f"127.0.0.1:{port}", 1, 1))
    old_text = driver.config_path.read_text()
    monkeypatch.setattr("agent.drivers.nginx.render_nginx", lambda *a, **k: "this is not nginx;\n")
    with pytest.raises(LBError, match="nginx -t refused"):
        driver.apply(frontend(backends, f"127.0.0.1:{port}", 2, 1))
    assert driver.config_path.read_text() == old_text
    assert not list(driver.prefix.glob(".nginx.conf.*"))


@needs_nginx
def test_nginx_facts_show_a_hand_edit(backends, lb_root):
    port = free_port()
    driver = NginxDriver(lb_root, nginx_bin=NGINX)
    start(driver, lb_root, frontend(backends, f"127.0.0.1:{port}", 90, 10))
    text = driver.config_path.read_text().replace("weight=10 max_fails=0;", "weight=40 max_fails=0;")
    driver.config_path.write_text(text)
    os.kill(int(driver.pid_path.read_text()), signal.SIGHUP)
    time.sleep(0.3)
    facts = driver.facts()
    assert facts["edited"] and facts["weights"] == {"app": {"blue": 90, "green": 40}}


@needs_nginx
def test_nginx_ab_is_sticky_and_ramp_only_moves_users_into_the_variant(backends, lb_root):
    port = free_port()
    driver = NginxDriver(lb_root, nginx_bin=NGINX)
    _check_ab(driver, lb_root, backends, port)


def _check_ab(driver, root, backends, port):
    listen = f"127.0.0.1:{port}"
    start(driver, root, frontend(backends, listen, 1, 0, ab=ABSplit("green", 20)))
    users = [f"user-{i}" for i in range(200)]

    def buckets() -> dict[str, str]:
        out = {}
        for user in users:
            seen = {get(port, {"Cookie": f"uid={user}"})[1] for _ in range(2)}
            assert len(seen) == 1, (user, seen)  # sticky
            out[user] = seen.pop()
        return out

    first = buckets()
    share = sum(v == "green" for v in first.values())
    assert 20 <= share <= 60, share  # ~20% of 200
    driver.apply(frontend(backends, listen, 1, 0, ab=ABSplit("green", 50)))
    second = buckets()
    assert not [u for u in users if first[u] == "green" and second[u] != "green"], "a ramp moved users back"
    assert sum(v == "green" for v in second.values()) > share
    assert get(port, {"X-Variant": "green"})[1] == "green"
    assert get(port, {"Cookie": "uid=x", "X-Variant": "blue"})[1] == "blue"
