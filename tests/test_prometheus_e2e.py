"""A real Prometheus (Debian's package) scraping a running agent: what a fleet operator would query."""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest

from conftest import free_port
from daemon_helpers import http_get, start_daemon, start_prometheus, wait_until

pytestmark = pytest.mark.timeout(120)

PROGRAM = "demo-web"


@pytest.fixture
def prometheus(request, tmp_path):
    """Start Prometheus scraping 127.0.0.1:<port> every second; returns (scrape port, query function)."""
    target = free_port()
    base = start_prometheus(request, tmp_path,
                            "global: {scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 900ms}\n"
                            "scrape_configs:\n"
                            "  - job_name: gitops-agent\n"
                            f"    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n")

    def query(promql: str) -> list[dict]:
        code, body = http_get(base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        data = json.loads(body)
        assert code == 200 and data["status"] == "success", body
        return data["data"]["result"]

    return target, query


def values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def test_prometheus_sees_revision_reconciles_and_drift(request, prometheus, state_repo, agent_root, tmp_path):
    target, query = prometheus
    port = free_port()
    state_repo.app(services={PROGRAM: {"port": port}})
    sha = state_repo.commit("first")

    warn = start_daemon(request, state_repo.url, agent_root, tmp_path, "--mode", "warn", "--apply-commits", port=target)

    wait_until(lambda: query(f'gitops_agent_applied_revision_info{{revision="{sha}"}} == 1'), 60,
               "applied revision in prometheus", warn.log)
    wait_until(lambda: query('sum(gitops_agent_reconcile_total{result=~"applied|converged"}) >= 1'), 10,
               "reconcile_total in prometheus", warn.log)

    # hand edit in warn mode: Prometheus sees drift 1 for exactly that resource
    from agent.drivers.supervisor import EmbeddedSupervisor

    EmbeddedSupervisor(agent_root).client(timeout=10).stop(PROGRAM)
    drift = wait_until(lambda: query("gitops_agent_drift == 1"), 15, "drift == 1 in prometheus", warn.log)
    assert [(r["metric"]["kind"], r["metric"]["name"]) for r in drift] == [("program", PROGRAM)]
    assert values(query(f'gitops_agent_drift_since_timestamp_seconds{{name="{PROGRAM}"}}'))[0] > time.time() - 60
    assert values(query("gitops_agent_drifted_resources")) == [1.0]

    # switch to enforce (same root, same scrape target): healed, drift 0, corrected counted
    assert warn.stop() == 0
    enforce = start_daemon(request, state_repo.url, agent_root, tmp_path, port=target)
    wait_until(lambda: values(query(f'gitops_agent_drift{{kind="program",name="{PROGRAM}"}}')) == [0.0], 30,
               "drift back to 0 in prometheus", enforce.log)
    wait_until(lambda: values(query('gitops_agent_drift_corrected_total{kind="program"}')) == [1.0], 15,
               "drift_corrected_total rose", enforce.log)
    assert http_get(f"http://127.0.0.1:{port}/")[0] == 200
    assert values(query("gitops_agent_revision_invalid")) == [0.0]
    assert values(query(f'gitops_agent_service_up{{service="{PROGRAM}"}}')) == [1.0]
