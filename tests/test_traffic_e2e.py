"""Traffic through a real load balancer run by the agent under its embedded supervisord.

Blue and green are two services of one app; `traffic:` splits a loopback frontend between them.
"""

from __future__ import annotations

import collections
import http.client
import json
import shutil
import threading
import time

import pytest

from conftest import free_port, run_agent

pytestmark = pytest.mark.timeout(300)


def split(port: int, n: int = 200, headers: dict | None = None) -> collections.Counter:
    """Which version answered each of n fresh requests through the frontend."""
    seen = collections.Counter()
    for i in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/", headers=headers or {})
        seen[conn.getresponse().read().decode().split()[1]] += 1
        conn.close()
    return seen


def two_colour_app(repo, listen: int, traffic: str) -> tuple[int, int]:
    blue, green = free_port(), free_port()
    repo.app(services={"web-blue": {"port": blue, "environment": "blue"},
                       "web-green": {"port": green, "environment": "green"}}, env="blue")
    repo.lock("apps/demo/green.lock", "2.0.0")
    app = repo.path / "apps/demo/app.yaml"
    text = app.read_text().replace("services:", "  green: {lockfile: green.lock, find_links: [../../wheelhouse], index: false}\nservices:")
    app.write_text(text + f"traffic:\n  listen: \"127.0.0.1:{listen}\"\n" + traffic)
    return blue, green


def args(repo, root, lb):
    return ["--repo", repo.url, "--host", "h1", "--root", str(root), "--lb", lb, "--health-wait", "15"]


@pytest.mark.parametrize("lb", ["haproxy", "nginx"])
def test_weighted_split_then_reweight_and_hand_change_is_drift(lb, state_repo, agent_root):
    if shutil.which(lb) is None:
        pytest.skip(f"{lb} is not installed")
    listen = free_port()
    two_colour_app(state_repo, listen, "  strategy: canary\n  weights: {web-blue: 90, web-green: 10}\n")
    state_repo.commit("canary 10%")
    proc = run_agent("once", *args(state_repo, agent_root, lb))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = split(listen, 2000)
    assert abs(seen["2.0.0"] - 200) <= 40, seen          # 90/10 over 2,000 requests, within 2 points
    assert run_agent("plan", *args(state_repo, agent_root, lb)).returncode == 0

    facts = json.loads(run_agent("facts", "--json", "--root", str(agent_root), "--lb", lb).stdout)
    assert facts["traffic"]["weights"] == {"demo": {"web-blue": 90, "web-green": 10}}

    # a weight-only commit: applied, no service restarted
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace("web-blue: 90, web-green: 10", "web-blue: 0, web-green: 100"))
    state_repo.commit("all green")
    proc = run_agent("once", *args(state_repo, agent_root, lb))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "configure_traffic" in proc.stdout and "update_program web-" not in proc.stdout
    assert split(listen, 50) == {"2.0.0": 50}

    if lb == "haproxy":   # a hand change through the runtime API is drift, healed by once
        from agent.drivers.haproxy import HAProxyRuntime

        HAProxyRuntime(agent_root / "lb" / "haproxy.sock").set_weight("demo", "web-blue", 50)
        plan = run_agent("plan", *args(state_repo, agent_root, lb))
        assert plan.returncode == 2 and "weights differ" in plan.stdout, plan.stdout
        assert run_agent("once", *args(state_repo, agent_root, lb)).returncode == 0
        assert split(listen, 30) == {"2.0.0": 30}


def test_a_fresh_host_starts_haproxy_alongside_the_services_and_serves_a_slow_backend_at_once(state_repo, agent_root):
    """Issue 17: HAProxy starts before the services with no weight, and gets its weights once their gates
    passed. Blue binds its port only after 8 s, so HAProxy's own checks (every 2 s, fall 3) have called it
    DOWN by then, and would keep it out for `rise 2` checks more; the passed gate takes it as up at once."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    listen = free_port()
    two_colour_app(state_repo, listen, "  strategy: canary\n  weights: {web-blue: 50, web-green: 50}\n")
    app = state_repo.path / "apps/demo/app.yaml"
    text = app.read_text()
    blue_cmd = next(line for line in text.splitlines() if "command: [demoapp-server" in line)
    app.write_text(text.replace(blue_cmd, blue_cmd.replace("]", ', --bind-delay, "8"]'), 1))
    state_repo.commit("a slow blue")
    proc = run_agent("once", *args(state_repo, agent_root, "haproxy")[:-1], "60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = split(listen, 200)                # right away: no 503, and the slow blue already has its half
    assert seen["1.0.0"] >= 60 and seen["2.0.0"] >= 60, seen
    out = proc.stdout
    assert out.index("update_program gitops-lb-haproxy") < out.index("update_program web-blue") < \
        out.index("check_health web-blue") < out.index("configure_traffic lb: haproxy weights"), out


class Load:
    """A bounded concurrent load during a switch: keep-alive threads (one connection each, reused, no
    retry) and new-connection threads; counts answers per version and failures."""

    def __init__(self, port: int, keepalive: int = 3, fresh: int = 3, limit: int = 3000):
        self.port, self.limit = port, limit
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = collections.Counter()
        self.failed = collections.Counter()
        self.threads = [threading.Thread(target=self._run, args=(kind,), daemon=True)
                        for kind in ["keepalive"] * keepalive + ["fresh"] * fresh]

    def _run(self, kind: str) -> None:
        conn = None
        for _ in range(self.limit):
            if self.stop.is_set():
                break
            try:
                if conn is None or kind == "fresh":
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/")
                body = conn.getresponse().read().decode()
                with self.lock:
                    self.ok[(kind, body.split()[1])] += 1
                if kind == "fresh":
                    conn.close()
            except (OSError, http.client.HTTPException, IndexError):
                with self.lock:
                    self.failed[kind] += 1
                conn = None

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@pytest.mark.parametrize("lb", ["haproxy", "nginx"])
def test_blue_green_switch_under_load_loses_nothing_and_keeps_idle_colour(lb, state_repo, agent_root):
    if shutil.which(lb) is None:
        pytest.skip(f"{lb} is not installed")
    listen = free_port()
    blue, green = two_colour_app(state_repo, listen, "  strategy: blue-green\n  weights: {web-blue: 1, web-green: 0}\n")
    state_repo.commit("blue live")
    assert run_agent("once", *args(state_repo, agent_root, lb)).returncode == 0
    assert split(listen, 20) == {"1.0.0": 20}
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace("web-blue: 1, web-green: 0", "web-blue: 0, web-green: 1"))
    state_repo.commit("switch to green")
    with Load(listen) as load:
        time.sleep(0.3)
        assert run_agent("once", *args(state_repo, agent_root, lb)).returncode == 0
        time.sleep(0.3)
    assert load.ok[("fresh", "1.0.0")] and load.ok[("fresh", "2.0.0")], load.ok   # the switch happened under load
    assert load.failed["fresh"] == 0, load.failed
    if lb == "haproxy":                    # runtime API, no reload: keep-alive clients lose nothing either
        assert load.failed["keepalive"] == 0, load.failed
    assert split(listen, 20) == {"2.0.0": 20}
    conn = http.client.HTTPConnection("127.0.0.1", blue, timeout=5)   # idle colour still up for switch-back
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"demoapp 1.0.0\n"


def test_ab_split_is_sticky_with_header_override(state_repo, agent_root):
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed")
    listen = free_port()
    two_colour_app(state_repo, listen, "  strategy: ab\n  weights: {web-blue: 1, web-green: 0}\n"
                                       "  ab: {variant: web-green, percent: 30}\n")
    state_repo.commit("ab 30%")
    proc = run_agent("once", *args(state_repo, agent_root, "nginx"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    users = {}
    for uid in range(100):
        answers = {split(listen, 1, {"Cookie": f"uid=user{uid}"}).most_common(1)[0][0] for _ in range(3)}
        assert len(answers) == 1          # sticky: a user always sees the same variant
        users[uid] = answers.pop()
    greens = sum(1 for v in users.values() if v == "2.0.0")
    assert 15 <= greens <= 45, greens
    assert split(listen, 5, {"Cookie": "uid=user1", "X-Variant": "web-green"}) == {"2.0.0": 5}

    # raising the share only moves users into the variant, never back
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace("percent: 30", "percent: 60"))
    state_repo.commit("ab 60%")
    assert run_agent("once", *args(state_repo, agent_root, "nginx")).returncode == 0
    after = {uid: split(listen, 1, {"Cookie": f"uid=user{uid}"}).most_common(1)[0][0] for uid in range(100)}
    assert all(after[uid] == "2.0.0" for uid, v in users.items() if v == "2.0.0")
    assert sum(1 for v in after.values() if v == "2.0.0") > greens


def test_invalid_traffic_is_rejected(state_repo):
    two_colour_app(state_repo, free_port(), "  strategy: blue-green\n  weights: {web-blue: 50, web-green: 50, ghost: 1}\n")
    proc = run_agent("validate", str(state_repo.path))
    assert proc.returncode == 1
    assert "traffic.weights.ghost" in proc.stdout and "exactly one weight" in proc.stdout, proc.stdout


def test_automatic_canary_walks_steps_and_a_failed_gate_aborts_to_zero(state_repo, agent_root):
    listen = free_port()
    blue, green = two_colour_app(state_repo, listen, "  strategy: canary\n  weights: {web-blue: 100, web-green: 0}\n"
                                 "  canary: {service: web-green, steps: [20, 100], pause_s: 0, probes: 5, max_error_rate: 0.2}\n")
    state_repo.commit("canary green 2.0.0")
    a = args(state_repo, agent_root, "haproxy")

    def progress():
        return json.loads(run_agent("status", "--json", "--root", str(agent_root)).stdout)["rollouts"]["demo"]

    assert run_agent("once", *a).returncode == 0
    assert progress()["step"] == 0
    seen = split(listen, 100)
    assert 8 <= seen["2.0.0"] <= 35, seen                       # step 1: 20%
    assert run_agent("once", *a).returncode == 0                # probes pass, pause 0: next step
    assert progress()["step"] == 1 and split(listen, 20) == {"2.0.0": 20}
    assert run_agent("once", *a).returncode == 0
    assert progress()["state"] == "complete"
    assert "canary demo: complete" in run_agent("status", "--root", str(agent_root)).stdout

    # a new canary release whose process dies: the gate sees the failures and aborts to 0%, for good
    state_repo.lock("apps/demo/green.lock", "3.0.0")
    state_repo.commit("canary green 3.0.0")
    assert run_agent("once", *a).returncode == 0
    assert progress()["step"] == 0 and progress()["state"] == "progressing"
    from agent.drivers.supervisor import EmbeddedSupervisor

    EmbeddedSupervisor(agent_root).client().stop("web-green")
    run_agent("once", *a)
    p = progress()
    assert p["state"] == "failed" and "aborted to 0%" in p["reason"], p
    assert split(listen, 30) == {"1.0.0": 30}
    run_agent("once", *a)                                       # not retried until a new commit
    assert progress()["state"] == "failed" and split(listen, 10) == {"1.0.0": 10}


def test_canary_release_failing_health_never_gets_traffic_and_ends_at_zero(state_repo, agent_root):
    listen = free_port()
    blue, green = two_colour_app(state_repo, listen, "  strategy: canary\n  weights: {web-blue: 100, web-green: 0}\n"
                                 "  canary: {service: web-green, steps: [20, 100], pause_s: 0, probes: 3}\n")
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace(f'"{green}"]', f'"{green}", --healthz-status, "500"]'))
    state_repo.commit("a canary release that fails its health check")
    a = args(state_repo, agent_root, "haproxy")[:-2] + ["--health-wait", "2"]
    first = run_agent("once", *a)
    assert first.returncode == 1 and "check_health web-green" in first.stdout, first.stdout
    status = json.loads(run_agent("status", "--json", "--root", str(agent_root)).stdout)
    assert status["rollouts"]["demo"]["state"] == "failed", status["rollouts"]
    run_agent("once", *a)                       # the failed release is retried, never given traffic
    assert split(listen, 50) == {"1.0.0": 50}
    facts = json.loads(run_agent("facts", "--json", "--root", str(agent_root)).stdout)
    assert facts["traffic"]["weights"]["demo"]["web-green"] == 0


def test_drives_a_system_haproxy_through_its_config_and_reload_command(tmp_path, state_repo, agent_root):
    """--lb-config/--lb-reload: HAProxy run by 'the system' (here: started by the reload command itself,
    like `systemctl reload-or-restart haproxy`), not by the agent's supervisord."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    system = tmp_path / "etc-haproxy"
    system.mkdir()
    cfg, pid = system / "haproxy.cfg", system / "haproxy.pid"
    reload = system / "reload-or-restart"
    reload.write_text(f"""#!/bin/sh
if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then kill -USR2 "$(cat {pid})"
else exec haproxy -W -D -p {pid} -f {cfg}; fi
""")
    reload.chmod(0o755)
    listen = free_port()
    two_colour_app(state_repo, listen, "  strategy: weighted\n  weights: {web-blue: 50, web-green: 50}\n")
    state_repo.commit("system lb")
    a = args(state_repo, agent_root, "haproxy") + ["--lb-config", str(cfg), "--lb-reload", str(reload)]
    try:
        proc = run_agent("once", *a)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"open http://127.0.0.1:{listen}/" in proc.stdout
        assert "gitops-lb" not in run_agent("facts", "--root", str(agent_root)).stdout   # not under supervisord
        seen = split(listen, 100)
        assert seen["1.0.0"] and seen["2.0.0"], seen
        app = state_repo.path / "apps/demo/app.yaml"
        app.write_text(app.read_text().replace("web-blue: 50, web-green: 50", "web-blue: 0, web-green: 10"))
        state_repo.commit("green only")
        assert run_agent("once", *a).returncode == 0
        assert split(listen, 20) == {"2.0.0": 20}
        assert run_agent("plan", *a).returncode == 0
    finally:
        if pid.exists():
            import os
            import signal

            try:
                os.kill(int(pid.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def test_daemon_applies_a_weight_commit_within_one_poll_interval(request, tmp_path, state_repo, agent_root):
    from daemon_helpers import start_daemon, wait_until

    listen = free_port()
    two_colour_app(state_repo, listen, "  strategy: canary\n  weights: {web-blue: 90, web-green: 10}\n")
    state_repo.commit("90/10")
    daemon = start_daemon(request, state_repo.url, agent_root, tmp_path, poll=30.0)
    daemon.wait_value("gitops_agent_traffic_weight", lambda v: v == 10, 120, frontend="demo", backend="web-green")
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace("web-blue: 90, web-green: 10", "web-blue: 50, web-green: 50"))
    state_repo.commit("50/50")
    started = time.monotonic()
    daemon.wait_value("gitops_agent_traffic_weight", lambda v: v == 50, 30, frontend="demo", backend="web-green")
    assert time.monotonic() - started < 30          # well inside one poll interval (the repo is watched)
    wait_until(lambda: split(listen, 40)["2.0.0"] >= 10, 10, "the load balancer to serve 50/50")
