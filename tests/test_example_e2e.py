"""The one end-to-end run on the real example: the bundled desired-state-example and mandelbrot wheels."""

from __future__ import annotations

import collections
import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from conftest import StateRepo, run_agent

EXAMPLE = Path(__file__).resolve().parent.parent / "desired-state-example"
pytestmark = pytest.mark.timeout(600)


def test_agent_converges_the_bundled_example(tmp_path, agent_root):
    repo = StateRepo(tmp_path / "state")
    shutil.copytree(EXAMPLE, repo.path / "desired-state-example")
    sha = repo.commit("example")
    common = ["--repo", repo.url, "--path", "desired-state-example", "--host", "localhost", "--root", str(agent_root)]

    proc = run_agent("once", *common)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for port, version in ((8101, "1.0.0"), (8102, "1.1.0")):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5) as resp:
            assert json.loads(resp.read())["version"] == version
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/render?width=32&height=24&max_iter=50", timeout=10) as resp:
            assert resp.read()[:8] == b"\x89PNG\r\n\x1a\n"

    versions = collections.Counter()
    for _ in range(100):     # through the load balancer: the canary split of the example, 90/10
        with urllib.request.urlopen("http://127.0.0.1:8100/version", timeout=5) as resp:
            versions[json.loads(resp.read())["version"]] += 1
    assert 75 <= versions["1.0.0"] <= 98 and versions["1.1.0"] >= 2, versions

    plan = run_agent("plan", *common)
    assert plan.returncode == 0 and "No changes" in plan.stdout
    status = json.loads(run_agent("status", "--json", "--root", str(agent_root)).stdout)
    assert status["applied"]["sha"] == sha
    # the status report of the example: its app, both colours and the 90/10 split
    (app,) = status["apps"]
    assert app["name"] == "mandelbrot" and [s["name"] for s in app["services"]] == ["mandelbrot-blue", "mandelbrot-green"]
    assert {b["backend"]: b["percent"] for b in app["frontend"]["split"]} == {"mandelbrot-blue": 90.0, "mandelbrot-green": 10.0}

    # the quickstart's last line, "open http://127.0.0.1:8100/": the renderer's own page, from either colour,
    # with the image that colour rendered inline
    seen = set()
    for _ in range(40):
        with urllib.request.urlopen("http://127.0.0.1:8100/?width=48&height=32&max_iter=40", timeout=30) as resp:
            page = resp.read().decode()
        version = page.split('data-version="', 1)[1].split('"', 1)[0]
        assert 'src="data:image/png;base64,' in page and f"mandelbrot {version}" in page
        seen.add(version)
        if seen == {"1.0.0", "1.1.0"}:
            break
    assert "1.0.0" in seen, seen
