"""Chaos on: the daemon (GITOPS_AGENT_ALLOW_CHAOS=1, i.e. --allow-chaos) SIGKILLs random programs of an app
behind nginx for a bounded run. Every killed program is back (its recovery time reported in a histogram and
the log), and nginx (proxy_next_upstream error) served every request: the stated budget is 0.5% lost."""

from __future__ import annotations

import collections
import http.client
import shutil
import time

import pytest

from conftest import free_port
from daemon_helpers import start_daemon, wait_until

pytestmark = pytest.mark.timeout(180)

RUN_S = 20.0
LOSS_BUDGET = 0.005


ERRORS: collections.Counter = collections.Counter()


def get(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        conn.request("GET", "/")
        status = conn.getresponse().status
        conn.close()
        ERRORS[status] += status != 200
        return status == 200
    except OSError as exc:
        ERRORS[type(exc).__name__] += 1
        return False


def test_chaos_kills_are_healed_and_nginx_loses_no_requests(request, monkeypatch, state_repo, agent_root, tmp_path):
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed")
    a, b, listen = free_port(), free_port(), free_port()
    state_repo.app(services={"demo-a": {"port": a}, "demo-b": {"port": b}},
                   extra=f'traffic:\n  listen: "127.0.0.1:{listen}"\n  weights: {{demo-a: 50, demo-b: 50}}\n'
                         "chaos:\n  kill: {rate_per_hour: 1800}\n")
    state_repo.commit("demo with chaos")
    monkeypatch.setenv("GITOPS_AGENT_ALLOW_CHAOS", "1")
    d = start_daemon(request, state_repo.url, agent_root, tmp_path, "--lb", "nginx", poll=2.0)
    d.wait_ready(90)
    wait_until(lambda: get(listen), 30, "frontend serving", d.log)

    ok = failed = 0
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        if get(listen):
            ok += 1
        else:
            failed += 1
        time.sleep(0.005)          # ~150 requests/s: fresh connections without exhausting ephemeral ports
    kills = d.value("gitops_agent_chaos_events_total", app="demo", kind="kill") or 0
    assert kills >= 2, d.log_text()[-3000:]
    # every killed program comes back: recoveries observed == kills (the last one may need a moment)
    d.wait_value("gitops_agent_chaos_recovery_seconds_count", lambda v: v is not None and v >= kills, 20,
                 "every killed program back")
    recovered = d.value("gitops_agent_chaos_recovery_seconds_count")
    total_s = d.value("gitops_agent_chaos_recovery_seconds_sum")
    log = d.log_text()
    assert log.count("chaos: app demo: killed") >= kills and log.count(" back (pid ") >= kills   # chaos goes on
    slowest = max(float(line.rsplit("after ", 1)[1].rstrip("s")) for line in log.splitlines() if " back (pid " in line)
    assert slowest < 10.0, slowest
    print(f"chaos: {int(kills)} kills over {RUN_S:.0f}s, {int(recovered)} back, mean recovery "
          f"{total_s / recovered:.2f}s, slowest {slowest:.2f}s; requests ok {ok}, failed {failed}")
    assert ok > 100 and failed <= LOSS_BUDGET * (ok + failed), (ok, failed, ERRORS)


def test_chaos_disables_haproxy_backends_and_they_come_back(request, monkeypatch, state_repo, agent_root, tmp_path):
    """disable_backend: a random backend's weight goes to 0 for a while (HAProxy runtime API), each event is
    counted, and the weights come back (restored by the monkey, or healed as drift by the next reconcile)."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    a, b, listen = free_port(), free_port(), free_port()
    state_repo.app(services={"demo-a": {"port": a}, "demo-b": {"port": b}},
                   extra=f'traffic:\n  listen: "127.0.0.1:{listen}"\n  weights: {{demo-a: 50, demo-b: 50}}\n'
                         "chaos:\n  disable_backend: {rate_per_hour: 3600, duration: 1s}\n")
    state_repo.commit("demo with backend chaos")
    monkeypatch.setenv("GITOPS_AGENT_ALLOW_CHAOS", "1")
    d = start_daemon(request, state_repo.url, agent_root, tmp_path, poll=2.0)
    d.wait_ready(90)
    wait_until(lambda: get(listen), 30, "frontend serving", d.log)
    from agent.drivers.haproxy import HAProxyRuntime

    runtime = HAProxyRuntime(agent_root / "lb" / "haproxy.sock")
    seen_zero = False
    ok = failed = 0
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        weights = {s: runtime.get_weight("demo", s) for s in ("demo-a", "demo-b")}
        seen_zero = seen_zero or 0 in weights.values()
        assert any(weights.values()), weights          # never both at once: a drill, not an outage
        ok, failed = (ok + 1, failed) if get(listen) else (ok, failed + 1)
        time.sleep(0.02)
    events = d.value("gitops_agent_chaos_events_total", app="demo", kind="disable_backend") or 0
    assert events >= 1 and seen_zero, d.log_text()[-3000:]
    wait_until(lambda: all(runtime.get_weight("demo", s) == 50 for s in ("demo-a", "demo-b")), 10,
               "both backends back at weight 50", d.log)
    assert failed == 0, (ok, failed, ERRORS)           # HAProxy drains a weight-0 server without errors
