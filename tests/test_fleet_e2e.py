"""A fleet on one machine: 5 agents (own --host, --root, embedded supervisord) against one state repo served
by `git daemon` on 127.0.0.1, and a real Prometheus answering the wave gates.

Observed in order: targeting (matchExpressions keeps h5 out), overrides (each host its own port, a group
override on top), waves (the canary host first, the rest only after `after`), a failed gate stopping the later
wave for good, and a new commit whose gate passes rolling out everywhere.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import StateRepo, free_port, git, run_agent, served_version, start_git_daemon
from daemon_helpers import start_prometheus

pytestmark = pytest.mark.timeout(300)

HOSTS = ("h1", "h2", "h3", "h4", "h5")


def _installer() -> str:
    from agent.drivers.venv import find_uv

    return "uv" if find_uv() else "pip"


@pytest.fixture
def git_daemon(request, tmp_path):
    """`git daemon` exporting tmp_path/served on 127.0.0.1; returns (base dir, url prefix)."""
    base = tmp_path / "served"
    base.mkdir()
    port = start_git_daemon(request, base)
    return base, f"git://127.0.0.1:{port}"


@pytest.fixture
def prometheus(request, tmp_path):
    return start_prometheus(request, tmp_path, "global: {scrape_interval: 15s}\nscrape_configs: []\n")


@pytest.fixture
def roots(tmp_path):
    made = {h: tmp_path / f"root-{h}" for h in HOSTS}
    yield made
    from agent.drivers.supervisor import EmbeddedSupervisor

    for root in made.values():
        EmbeddedSupervisor(root).stop()


def app_yaml(ports: dict[str, int], prom: str, query: str, after: int) -> str:
    base = ports["h1"]
    lines = [
        "apiVersion: gitops-agent/v1", "kind: App", "name: demo",
        "hosts: {matchExpressions: [{key: zone, operator: In, values: [a, b]}]}",
        "environments:",
        f"  demo: {{lockfile: demo.lock, find_links: [../../wheelhouse], index: false, installer: {_installer()}}}",
        "services:", "  demo-web:", "    environment: demo", f"    port: {base}",
        f'    command: [demoapp-server, --port, "{base}"]',
        f'    health: {{http: "http://127.0.0.1:{base}/healthz", timeout_s: 1}}',
        "    env: {ROLE: plain}",
        "overrides:",
        "  - hosts: {groups: [canary]}",          # group entry first ...
        "    set: {services.demo-web.env.ROLE: canary}",
    ]
    for h in ("h2", "h3", "h4"):                  # ... host entries last: later entries win
        p = ports[h]
        lines += [f"  - hosts: {{names: [{h}]}}",
                  f'    set: {{services.demo-web.port: {p}, "services.demo-web.command.2": "{p}", '
                  f'services.demo-web.health.http: "http://127.0.0.1:{p}/healthz"}}']
    lines += ["rollout:", "  waves:", "    - hosts: {groups: [canary]}",
              '    - percent: 100', f"      after: {after}",
              f'      gate: {{prometheus: "{prom}", query: "{query}", expect: "< 0.05", on_no_data: pause}}']
    return "\n".join(lines) + "\n"


def test_fleet_targeting_overrides_waves_and_a_failed_gate(git_daemon, prometheus, roots, tmp_path):
    served_dir, url_base = git_daemon
    repo = StateRepo(served_dir / "state")
    url = f"{url_base}/state"
    ports = {h: free_port() for h in HOSTS}
    repo.write("fleet.yaml", "apiVersion: gitops-agent/v1\nkind: Fleet\nhosts:\n"
               "  h1: {groups: [web, canary], labels: {zone: a}}\n  h2: {groups: [web], labels: {zone: a}}\n"
               "  h3: {groups: [web], labels: {zone: b}}\n  h4: {groups: [web], labels: {zone: b}}\n"
               "  h5: {groups: [web], labels: {zone: c}}\n")
    repo.lock("apps/demo/demo.lock", "1.0.0")
    repo.write("apps/demo/app.yaml", app_yaml(ports, prometheus, "vector(0)", 0))
    repo.commit("demo 1.0.0")

    def once(h: str) -> subprocess.CompletedProcess:
        proc = run_agent("once", "--repo", url, "--host", h, "--root", str(roots[h]), "--health-wait", "15")
        assert proc.returncode == 0, f"{h}: {proc.stdout}\n{proc.stderr}"
        return proc

    def plan(h: str) -> dict:
        proc = run_agent("plan", "--json", "--repo", url, "--host", h, "--root", str(roots[h]))
        return json.loads(proc.stdout)

    def fleet() -> dict[str, str | None]:
        return {h: served_version(ports[h]) for h in HOSTS[:4]}

    # 1. targeting + overrides: h1..h4 run 1.0.0 each on its own port; h5 (zone c) runs nothing
    for h in HOSTS:
        once(h)
    assert fleet() == {h: "1.0.0" for h in HOSTS[:4]}
    assert json.loads(run_agent("facts", "--json", "--root", str(roots["h5"])).stdout)["programs"] == {}
    conf = {h: (roots[h] / "supervisor/programs/demo-web.conf").read_text() for h in HOSTS[:4]}
    assert "ROLE=\"canary\"" in conf["h1"] or "ROLE=canary" in conf["h1"], conf["h1"]
    assert "canary" not in conf["h2"] and f'"{ports["h3"]}"' not in conf["h2"]

    # 2. a change with waves: the canary host (wave 1) at once; the rest wait `after`, then ask the gate
    after = 20                  # long enough for 5 `once` runs on a loaded machine to finish inside it
    repo.lock("apps/demo/demo.lock", "2.0.0")
    repo.write("apps/demo/app.yaml", app_yaml(ports, prometheus, "vector(0.2)", after))   # gate will fail
    change = repo.commit("demo 2.0.0")
    committed = float(git(repo.path, "log", "-1", "--format=%ct"))
    started = time.monotonic()
    for h in HOSTS:
        once(h)
    round_s = time.monotonic() - started   # what a round of `once` costs on this machine now
    assert fleet() == {"h1": "2.0.0", "h2": "1.0.0", "h3": "1.0.0", "h4": "1.0.0"}
    waves = json.loads((roots["h1"] / "state/waves.json").read_text())
    assert waves["demo"]["change"] == change and waves["demo"]["state"] == "due"

    # 3. the wave starts; its gate (error rate 0.2, expect < 0.05) fails: the later wave stops, for good
    time.sleep(max(0.0, committed + after + 1 - time.time()))
    for h in HOSTS[1:]:
        out = once(h)
        assert h == "h5" or "gate of wave 2 failed" in out.stderr, out.stderr
    assert fleet() == {"h1": "2.0.0", "h2": "1.0.0", "h3": "1.0.0", "h4": "1.0.0"}
    for h in ("h2", "h3", "h4"):
        rec = json.loads((roots[h] / "state/waves.json").read_text())["demo"]
        assert rec["state"] == "failed" and "gate of wave 2 failed" in rec["reason"], rec

    # 4. a fix commit whose gate passes: canary first, the rest after `after` (long enough for a round of
    # `once` on this machine, however busy: the check below is about order, not speed)
    after = max(after, int(3 * round_s) + 5)
    repo.lock("apps/demo/demo.lock", "3.0.0")
    repo.write("apps/demo/app.yaml", app_yaml(ports, prometheus, "vector(0.01)", after))
    repo.commit("demo 3.0.0")
    committed = float(git(repo.path, "log", "-1", "--format=%ct"))
    for h in HOSTS[:4]:
        once(h)
    assert time.time() < committed + after, f"a round of once took {time.time() - committed:.0f}s, over 3x the last"
    assert fleet() == {"h1": "3.0.0", "h2": "2.0.0", "h3": "2.0.0", "h4": "2.0.0"}  # previous revision kept
    time.sleep(max(0.0, committed + after + 1 - time.time()))
    for h in HOSTS:
        once(h)
    assert fleet() == {h: "3.0.0" for h in HOSTS[:4]}
    assert all(served_version(ports[h]) for h in HOSTS[:4])
