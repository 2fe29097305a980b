"""canary.analysis with a real Prometheus scraping the real HAProxy exporter (--lb-metrics): a canary
that is healthy (/healthz 200, so the agent's own probes pass) but answers its users 500s is aborted to
0% by the query, never promoted, although its 1 s pause would have promoted it on probes alone while the
query had no data yet (no_data: pause held it)."""

from __future__ import annotations

import collections
import http.client
import json
import shutil
import threading
import time

import pytest

from chromium import dump_dom
from conftest import free_port
from daemon_helpers import http_get, start_daemon, start_prometheus, wait_until

pytestmark = pytest.mark.timeout(600)

QUERY = ('sum(rate(haproxy_server_http_responses_total{proxy="demo",server="web-green",code="5xx"}[15s]))'
         ' / sum(rate(haproxy_server_http_responses_total{proxy="demo",server="web-green"}[15s]))')


class Load:
    """Requests through the frontend every ~20 ms until stopped: the traffic Prometheus judges."""

    def __init__(self, port: int):
        self.port, self.codes, self.stop_event = port, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                self.codes.append((time.monotonic(), resp.status))
                conn.close()
            except OSError:
                pass                  # the frontend is not up yet
            self.stop_event.wait(0.02)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


def test_a_canary_answering_500s_is_aborted_by_prometheus_and_never_promoted(request, state_repo, agent_root, tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    listen, exporter, blue, green = free_port(), free_port(), free_port(), free_port()
    prometheus = start_prometheus(request, tmp_path, f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: haproxy
    static_configs: [{{targets: ["127.0.0.1:{exporter}"]}}]
""")
    state_repo.app(services={"web-blue": {"port": blue, "environment": "blue"},
                             "web-green": {"port": green, "environment": "green"}}, env="blue")
    state_repo.lock("apps/demo/green.lock", "2.0.0")
    app = state_repo.path / "apps/demo/app.yaml"
    text = app.read_text().replace("services:", "  green: {lockfile: green.lock, find_links: [../../wheelhouse], "
                                                "index: false}\nservices:")
    text = text.replace(f'command: [demoapp-server, --port, "{green}"]',
                        f'command: [demoapp-server, --port, "{green}", --root-status, "500"]')
    app.write_text(text + f'traffic:\n  listen: "127.0.0.1:{listen}"\n  strategy: canary\n'
                          "  weights: {web-blue: 100, web-green: 0}\n"
                          "  canary:\n    service: web-green\n    steps: [50, 100]\n    pause_s: 1\n    probes: 2\n"
                          f"    analysis:\n      prometheus: {prometheus}\n      query: '{QUERY}'\n"
                          "      max: 0.05\n      no_data: pause\n")
    state_repo.commit("canary green, judged by Prometheus")

    load = Load(listen)
    request.addfinalizer(load.stop)
    daemon = start_daemon(request, state_repo.url, agent_root, tmp_path, "--lb-metrics", f"127.0.0.1:{exporter}",
                          poll=1.0)
    seen: list[tuple[float, str, int]] = []

    def rollout():
        code, body = http_get(daemon.base + "/api/status", timeout=10)
        if code != 200:
            return None
        r = json.loads(body)["rollouts"].get("demo")
        if r:
            seen.append((time.monotonic(), r["state"], r["step"]))
        return r if r and r["state"] != "progressing" else None

    final = wait_until(rollout, 300, "the canary decided", daemon.log, step=0.25)
    load.stop()
    assert final["state"] == "failed", final
    assert "analysis failed" in final["reason"] and "aborted to 0%" in final["reason"], final
    assert {step for _, state, step in seen if state == "progressing"} <= {0}, f"promoted past step 1: {seen}"
    assert all(state != "complete" for _, state, _ in seen)
    progressing = [t for t, state, _ in seen if state == "progressing"]
    aborted = next(t for t, state, _ in seen if state == "failed")
    print(f"canary aborted {aborted - progressing[0]:.1f}s after it was first seen at 50%"
          if progressing else "canary aborted before the first status read")

    # traffic went back to blue: the live weight of the canary is 0, and requests are answered by blue
    def green_weight():
        (demo,) = json.loads(http_get(daemon.base + "/api/status")[1])["apps"]
        return {b["backend"]: b["weight"] for b in demo["frontend"]["split"]}["web-green"]

    wait_until(lambda: green_weight() == 0, 60, "the canary's weight at 0", daemon.log)
    codes = collections.Counter()
    for _ in range(20):
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=5)
        conn.request("GET", "/")
        codes[conn.getresponse().status] += 1
        conn.close()
    assert codes == {200: 20}, codes
    assert any(code == 500 for _, code in load.codes), "the canary never got traffic: nothing was judged"
    # the page says why
    status = json.loads(http_get(daemon.base + "/api/status")[1])
    (demo,) = status["apps"]
    assert demo["canary"]["state"] == "failed" and demo["canary"]["analysis"].startswith("fail")
    dom = dump_dom(daemon.base + "/")
    assert 'data-canary="failed"' in dom and "analysis failed" in dom
    assert 'data-backend="web-green" data-percent="0.0"' in dom


def _canary_state(repo, analysis: str) -> None:
    repo.app(services={"web-blue": {"port": free_port(), "environment": "blue"},
                       "web-green": {"port": free_port(), "environment": "blue"}}, env="blue")
    app = repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text() + f'traffic:\n  listen: "127.0.0.1:{free_port()}"\n  strategy: canary\n'
                                     "  weights: {web-blue: 100, web-green: 0}\n"
                                     f"  canary:\n    service: web-green\n    analysis: {analysis}\n")


def test_analysis_is_loaded_as_a_gate_and_a_bad_one_is_located(state_repo):
    from agent.core.load import LoadOptions, load_desired, validate_tree

    _canary_state(state_repo, "{prometheus: 'http://127.0.0.1:9090/', query: 'up', max: 0.01}")
    (app,) = load_desired(state_repo.path, "h1", LoadOptions(boundary=state_repo.path)).apps
    gate = app.traffic.canary.analysis
    assert (gate.prometheus, gate.query, gate.op, gate.threshold, gate.on_no_data) == \
        ("http://127.0.0.1:9090", "up", "<=", 0.01, "pause")

    _canary_state(state_repo, "{prometheus: 'prom:9090', query: 'up', no_data: maybe}")
    text = "\n".join(str(p) for p in validate_tree(state_repo.path, LoadOptions(boundary=state_repo.path)))
    assert "traffic.canary.analysis" in text and "max" in text and "no_data" in text and "prometheus" in text, text
