"""Issue 17: a passed health gate stands in for supervisord's RUNNING (real git, venvs, supervisord).

A gated service with a long `startsecs` is applied by `once` without waiting that window out: supervisord
still says STARTING when `once` returns, and `plan`, `status` and the facts read the service as healthy.
A service without a health check still waits for RUNNING.
"""

from __future__ import annotations

import json

from conftest import free_port, run_agent, served_version

STARTSECS = 600       # far longer than any apply here: if `once` waited for RUNNING, it would time out


def _common(repo, root) -> list[str]:
    return ["--repo", repo.url, "--host", "h1", "--root", str(root), "--health-wait", "60"]


def _with_startsecs(repo, services: dict[str, dict]) -> None:
    repo.app(services=services)
    path = repo.path / "apps/demo/app.yaml"
    text = path.read_text()
    for svc, spec in services.items():
        line = f'    command: [demoapp-server, --port, "{spec["port"]}"]\n'
        text = text.replace(line, line + f"    startsecs: {spec.get('startsecs', STARTSECS)}\n")
    repo.write("apps/demo/app.yaml", text)
    repo.commit()


def test_once_returns_after_the_gate_while_supervisord_still_says_starting(state_repo, agent_root):
    port = free_port()
    _with_startsecs(state_repo, {"demo-web": {"port": port}})
    common = _common(state_repo, agent_root)
    once = run_agent("once", *common)
    assert once.returncode == 0, once.stdout + once.stderr
    assert "await_running" not in once.stdout and "check_health" in once.stdout, once.stdout
    assert served_version(port) == "1.0.0"

    fact = json.loads(run_agent("facts", "--json", *common).stdout)["programs"]["demo-web"]
    assert fact["state"] == "STARTING", fact            # supervisord still enforces its startsecs
    assert fact["gated_pid"] == fact["pid"]
    plan = run_agent("plan", *common)
    assert plan.returncode == 0, plan.stdout + plan.stderr     # healthy: nothing to do
    status = json.loads(run_agent("status", "--json", "--root", str(agent_root)).stdout)
    assert status["resources"]["program:demo-web"]["state"] == "ok", status["resources"]
    again = run_agent("once", *common)
    assert again.returncode == 0 and "result: converged" in again.stdout, again.stdout + again.stderr


def test_a_service_without_health_still_waits_for_running(state_repo, agent_root):
    port = free_port()
    _with_startsecs(state_repo, {"demo-web": {"port": port, "health": False, "startsecs": 2}})
    common = _common(state_repo, agent_root)
    once = run_agent("once", *common)
    assert once.returncode == 0, once.stdout + once.stderr
    assert "await_running" in once.stdout, once.stdout
    fact = json.loads(run_agent("facts", "--json", *common).stdout)["programs"]["demo-web"]
    assert fact["state"] == "RUNNING", fact
