"""The one end-to-end run on the real example: the bundled desired-state-example as shipped.

Both apps: the mandelbrot renderer (two venvs from the bundled wheels, a 90/10 canary on HAProxy) and
the shop (Django under gunicorn from PyPI's wheels, a migration job, two workers after the web process,
files rendered from templates and an age-encrypted secret the host decrypts with the demo key).

The example's ports (8100-8102, 8200) are kept when free. On a shared machine another run of the
example may hold them; then this test's copy moves them to free ports (the same text edit for every
mention), so two runs do not fight over one port.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest
from conftest import StateRepo, free_port, run_agent

EXAMPLE = Path(__file__).resolve().parent.parent / "desired-state-example"
IDENTITY = EXAMPLE / "keys" / "demo-host.agekey"
SHIPPED_PORTS = {"lb": 8100, "blue": 8101, "green": 8102, "shop": 8200}
APP_FILES = ("apps/mandelbrot/app.yaml", "apps/shop/app.yaml")
pytestmark = pytest.mark.timeout(900)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _copy_example(dest: Path) -> dict[str, int]:
    """Copy the example to `dest`; return the ports it uses (the shipped ones unless taken here)."""
    shutil.copytree(EXAMPLE, dest)
    ports = {name: port if _port_free(port) else free_port() for name, port in SHIPPED_PORTS.items()}
    moves = {str(SHIPPED_PORTS[name]): str(port) for name, port in ports.items() if port != SHIPPED_PORTS[name]}
    if moves:
        pattern = re.compile(r"\b(" + "|".join(moves) + r")\b")
        for rel in APP_FILES:
            path = dest / rel
            path.write_text(pattern.sub(lambda m: moves[m.group(1)], path.read_text()))
    return ports


def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


def test_agent_converges_the_bundled_example(tmp_path, agent_root):
    repo = StateRepo(tmp_path / "state")
    ports = _copy_example(repo.path / "desired-state-example")
    sha = repo.commit("example")
    common = ["--repo", repo.url, "--path", "desired-state-example", "--host", "localhost", "--root", str(agent_root),
              "--age-identity", str(IDENTITY)]

    proc = run_agent("once", *common, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for port, version in ((ports["blue"], "1.0.0"), (ports["green"], "1.1.0")):
        assert json.loads(_get(f"http://127.0.0.1:{port}/version")[1])["version"] == version
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/render?width=32&height=24&max_iter=50", timeout=10) as resp:
            assert resp.read()[:8] == b"\x89PNG\r\n\x1a\n"

    versions = collections.Counter()
    for _ in range(100):     # through the load balancer: the canary split of the example, 90/10
        versions[json.loads(_get(f"http://127.0.0.1:{ports['lb']}/version", 5)[1])["version"]] += 1
    assert 75 <= versions["1.0.0"] <= 98 and versions["1.1.0"] >= 2, versions

    # The shop: migrated (healthz is 503 until every migration is applied), the rendered greeting on its
    # front page, its version, and both worker processes up after the web process.
    shop = f"http://127.0.0.1:{ports['shop']}"
    assert _get(shop + "/healthz")[0] == 200
    code, page = _get(shop + "/")
    assert code == 200 and "Welcome to the shop on localhost (zone dev)." in page, page
    assert json.loads(_get(shop + "/version")[1]) == {"app": "shop", "version": "1.0.0"}
    from agent.drivers.supervisor import EmbeddedSupervisor

    info = EmbeddedSupervisor(agent_root).client().process_info()
    workers = {name: i["statename"] for name, i in info.items() if name.startswith("shop-worker:")}
    assert workers == {"shop-worker:shop-worker-0": "RUNNING", "shop-worker:shop-worker-1": "RUNNING"}, info
    # shop-web passed its health gate: `once` did not wait out its startsecs (issue 17); supervisord does
    from daemon_helpers import wait_until

    client = EmbeddedSupervisor(agent_root).client()
    wait_until(lambda: client.process_info()["shop-web"]["statename"] == "RUNNING", 30, "shop-web RUNNING")

    plan = run_agent("plan", *common)
    assert plan.returncode == 0 and "No changes" in plan.stdout, plan.stdout + plan.stderr
    status = json.loads(run_agent("status", "--json", "--root", str(agent_root)).stdout)
    assert status["applied"]["sha"] == sha
    assert {"program:shop-web", "program:shop-worker", "venv:main"} <= status["resources"].keys(), status["resources"]
    text = run_agent("status", "--root", str(agent_root)).stdout
    assert "program:shop-web" in text and "program:shop-worker" in text, text

    # A second `once` is a no-op: nothing applied, the migration job not run again.
    again = run_agent("once", "--json", *common)
    assert again.returncode == 0, again.stdout + again.stderr
    result = json.loads(again.stdout)
    assert result["result"] == "converged" and result["outcomes"] == [], result
    from shopfactory import decrypt_dotenv

    for key, value in decrypt_dotenv(EXAMPLE / "apps" / "shop" / "django.env.age", IDENTITY).items():
        for out in (proc.stdout, proc.stderr, again.stdout, again.stderr, plan.stdout, text):
            assert value not in out, f"the value of {key} (a secret) is in the agent's output"
    # the status report of the example: its app, both colours and the 90/10 split
    app = {a["name"]: a for a in status["apps"]}["mandelbrot"]
    assert app["name"] == "mandelbrot" and [s["name"] for s in app["services"]] == ["mandelbrot-blue", "mandelbrot-green"]
    assert {b["backend"]: b["percent"] for b in app["frontend"]["split"]} == {"mandelbrot-blue": 90.0, "mandelbrot-green": 10.0}

    # the quickstart's last line, "open http://127.0.0.1:8100/": the renderer's own page, from either colour,
    # with the image that colour rendered inline
    seen = set()
    for _ in range(40):
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['lb']}/?width=48&height=32&max_iter=40", timeout=30) as resp:
            page = resp.read().decode()
        version = page.split('data-version="', 1)[1].split('"', 1)[0]
        assert 'src="data:image/png;base64,' in page and f"mandelbrot {version}" in page
        seen.add(version)
        if seen == {"1.0.0", "1.1.0"}:
            break
    assert "1.0.0" in seen, seen
