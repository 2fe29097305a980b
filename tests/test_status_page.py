"""The status page and /api/status of a real daemon that converged a real state repo, read by real Chromium.

Two colours behind HAProxy (90/10), a commit subject carrying markup, the daemon in warn mode so a
hand-made drift stays on the page (enforce mode heals it within a second).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import time
import urllib.request

import pytest

from chromium import dump_dom, screenshot
from conftest import free_port
from daemon_helpers import http_get, start_daemon, wait_until

pytestmark = pytest.mark.timeout(600)

EVIL = '<script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'


def two_colours(repo, listen: int) -> None:
    blue, green = free_port(), free_port()
    repo.app(services={"web-blue": {"port": blue, "environment": "blue"},
                       "web-green": {"port": green, "environment": "green"}}, env="blue")
    repo.lock("apps/demo/green.lock", "2.0.0")
    app = repo.path / "apps/demo/app.yaml"
    text = app.read_text().replace("services:", "  green: {lockfile: green.lock, find_links: [../../wheelhouse], "
                                                "index: false}\nservices:")
    app.write_text(text + f'traffic:\n  listen: "127.0.0.1:{listen}"\n  strategy: canary\n'
                          "  weights: {web-blue: 90, web-green: 10}\n")


def api(daemon) -> dict:
    code, body = http_get(daemon.base + "/api/status", timeout=10)
    assert code == 200, body
    return json.loads(body)


@pytest.fixture
def daemon(request, state_repo, agent_root, tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    listen = free_port()
    two_colours(state_repo, listen)
    sha = state_repo.commit(f"release {EVIL}")
    d = start_daemon(request, state_repo.url, agent_root, tmp_path, "--mode", "warn", "--apply-commits", poll=5)
    d.listen, d.sha = listen, sha
    wait_until(lambda: (api(d).get("applied") or {}).get("sha") == sha, 240, "the first commit applied", d.log)
    return d


def test_page_shows_the_app_split_and_drift_and_escapes_repo_text(daemon, agent_root, tmp_path):
    # headers: a content security policy without inline code, no framing, no sniffing
    with urllib.request.urlopen(daemon.base + "/", timeout=10) as resp:
        headers = resp.headers
        raw = resp.read().decode()
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    assert "<script>document" not in raw and "&lt;script&gt;" in raw
    assert not re.search(r"<script>|<[^>]*\s(style|on[a-z]+)=", raw), "inline code or style on the page"

    dom = dump_dom(daemon.base + "/")
    short = daemon.sha[:12]
    assert 'data-app="demo"' in dom
    assert 'data-service="web-blue"' in dom and 'data-service="web-green"' in dom
    assert f">{short}</code>" in dom
    assert 'data-backend="web-blue" data-percent="90.0"' in dom and 'data-backend="web-green" data-percent="10.0"' in dom
    assert f'href="http://127.0.0.1:{daemon.listen}/"' in dom
    assert 'data-live="js"' in dom, "the refresh script did not run (blocked by the CSP?)"
    # the commit subject is text: shown, never run
    assert "pwned" not in re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert html.escape(EVIL, quote=False) in dom
    assert '<img src="x"' not in dom
    # the refresh script swaps in a fresh body (Chromium runs its 10 s timer in virtual time)
    refreshed = dump_dom(daemon.base + "/", "--virtual-time-budget=25000")
    assert re.search(r'data-refreshes="[1-9]', refreshed) and 'data-service="web-green"' in refreshed, refreshed[:500]
    screenshot(daemon.base + "/", tmp_path / "phone.png")
    assert (tmp_path / "phone.png").stat().st_size > 5000

    # a hand-made drift: the program file of web-green edited by hand
    conf = agent_root / "supervisor" / "programs" / "web-green.conf"
    conf.write_text(conf.read_text() + "\n; edited by hand\n")
    started = time.monotonic()
    wait_until(lambda: (api(daemon)["resources"].get("program:web-green") or {}).get("state") == "drift", 60,
               "the hand edit reported as drift", daemon.log)
    seen_after = time.monotonic() - started
    dom = dump_dom(daemon.base + "/")
    assert re.search(r'<tr class="service state-drift" data-service="web-green">', dom), dom
    assert re.search(r'data-service="web-green">.*?since <time', dom, re.S)
    assert 'class="badge drift" id="drifted"' in dom
    status = api(daemon)
    assert status["resources"]["program:web-green"]["drift_since"] is not None
    assert any(e["kind"] == "drift" and "web-green" in e["message"] for e in status["events"])
    print(f"hand-made drift on the status API after {seen_after:.1f}s")

    # the CLI reads the same report
    from conftest import run_agent

    cli = json.loads(run_agent("status", "--json", "--root", str(agent_root)).stdout)
    assert cli["resources"]["program:web-green"]["state"] == "drift"
    assert cli["apps"] == status["apps"] or cli["apps"][0]["name"] == "demo"


def test_an_invalid_revision_with_markup_is_shown_as_text(daemon, state_repo):
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace("name: demo", 'name: "<script>document.title=1</script>"'))
    bad = state_repo.commit("bad name")
    wait_until(lambda: (api(daemon).get("attempted") or {}).get("sha") == bad, 60, "the bad commit attempted",
               daemon.log)
    status = api(daemon)
    assert status["result"] == "invalid" and "<script>" in status["last_error"]
    dom = dump_dom(daemon.base + "/")
    assert 'id="last-error"' in dom and "&lt;script&gt;document.title=1&lt;/script&gt;" in dom
    assert re.search(r"<title>(.*?)</title>", dom, re.S).group(1) != "1"
    assert 'data-app="demo"' in dom            # the last good revision's app is still shown
