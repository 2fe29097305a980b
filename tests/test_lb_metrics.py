"""--lb-metrics: the agent's HAProxy config serves HAProxy's own Prometheus exporter (real HAProxy)."""

from __future__ import annotations

import http.client
import shutil
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.core.render.lb import METRICS_FRONTEND, Backend, Frontend, InvalidLBConfig, render_haproxy
from conftest import free_port, run_agent

pytestmark = pytest.mark.timeout(300)

# The exporter's series the dashboard (deploy/grafana) and canary analysis examples rely on; checked below
# against a real HAProxy 2.6, and allowed by tests/test_deploy.py's metric-name check.
RELIED_ON = frozenset({"haproxy_server_http_responses_total", "haproxy_server_response_time_average_seconds",
                       "haproxy_backend_http_requests_total", "haproxy_backend_http_responses_total"})


def test_render_adds_the_exporter_frontend_only_when_asked():
    fe = Frontend("web", "127.0.0.1:8100", (Backend("a", "127.0.0.1:8101", 1),))
    plain = render_haproxy([fe], stats_socket="/s.sock")
    assert "prometheus-exporter" not in plain
    text = render_haproxy([fe], stats_socket="/s.sock", metrics="127.0.0.1:8405")
    assert f"frontend {METRICS_FRONTEND}\n    bind 127.0.0.1:8405\n" in text
    assert "http-request use-service prometheus-exporter if { path /metrics }" in text
    assert text.split("setenv GITOPS_AGENT_TOPOLOGY ")[1][:16] != plain.split("setenv GITOPS_AGENT_TOPOLOGY ")[1][:16]
    for bad in ("127.0.0.1:8100", "127.0.0.1:80 #", "nope"):
        with pytest.raises(InvalidLBConfig) as exc:
            render_haproxy([fe], stats_socket="/s.sock", metrics=bad)
        assert exc.value.fields == ("lb_metrics",)


def samples(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_haproxy_serves_per_backend_metrics(state_repo, agent_root):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    listen, exporter, blue, green = free_port(), free_port(), free_port(), free_port()
    state_repo.app(services={"web-blue": {"port": blue, "environment": "blue"},
                             "web-green": {"port": green, "environment": "green"}}, env="blue")
    state_repo.lock("apps/demo/green.lock", "2.0.0")
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace("services:", "  green: {lockfile: green.lock, find_links: [../../wheelhouse], "
                                                        "index: false}\nservices:")
                   + f'traffic:\n  listen: "127.0.0.1:{listen}"\n  strategy: weighted\n'
                     "  weights: {web-blue: 3, web-green: 1}\n")
    state_repo.commit("two colours")
    common = ["--repo", state_repo.url, "--host", "h1", "--root", str(agent_root), "--health-wait", "15",
              "--lb-metrics", f"127.0.0.1:{exporter}"]
    proc = run_agent("once", *common)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prometheus-exporter" in (agent_root / "lb" / "haproxy.cfg").read_text()

    for _ in range(40):
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=5)
        conn.request("GET", "/")
        conn.getresponse().read()
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=5)
    conn.request("GET", "/missing")           # a 4xx, counted apart
    assert conn.getresponse().status == 404
    conn.close()

    got = samples(exporter)
    assert RELIED_ON <= {name for name, _ in got}

    def responses(server: str, code: str) -> float:
        return got.get(("haproxy_server_http_responses_total",
                        (("code", code), ("proxy", "demo"), ("server", server))), 0.0)

    assert responses("web-blue", "2xx") + responses("web-green", "2xx") == 40
    assert responses("web-blue", "2xx") == 30 and responses("web-green", "2xx") == 10   # roundrobin 3:1
    assert responses("web-blue", "4xx") + responses("web-green", "4xx") == 1
    assert got[("haproxy_backend_http_requests_total", (("proxy", "demo"),))] == 41
    assert ("haproxy_server_response_time_average_seconds", (("proxy", "demo"), ("server", "web-green"))) in got
    # the plan is clean: the exporter is part of the topology the agent verified live
    assert run_agent("plan", *common).returncode == 0
    # without --lb-metrics (off) the same state is a topology change: planned, not silently kept
    off = [a if a != f"127.0.0.1:{exporter}" else "off" for a in common]
    plan = run_agent("plan", *off)
    assert plan.returncode == 2 and "config must be reloaded" in plan.stdout, plan.stdout
