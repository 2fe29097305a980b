#!/usr/bin/env python3
"""Regenerate the status-page screenshots in docs/screenshots/ from the bundled example.

Runs the real thing: the example state (desired-state-example/) committed to a scratch git repo, a real
`gitops-agent run` converging it into a scratch root (venvs, embedded supervisord, HAProxy), then headless
Chromium (Debian's `chromium`) photographs the agent's status page (desktop and phone widths) and the
renderer's own page through the load balancer. Everything it started is stopped at the end, and the
scratch dir removed.

    python3 docs/screenshots/make.py                  # needs the example's ports 8100-8102 free
    python3 docs/screenshots/make.py --port-offset 1000   # shift them (8100 -> 9100, ...) when busy
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def shoot(url: str, path: Path, width: int, height: int, scratch: Path) -> None:
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=scratch))
    subprocess.run([shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                    f"--window-size={width},{height}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"wrote {path.relative_to(REPO)}")


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port-offset", type=int, default=0, help="add this to the example's ports")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="gitops-agent-screenshots-"))
    state, root, listen = scratch / "state", scratch / "root", free_port()
    daemon = None
    try:
        state.mkdir()
        git(state, "init", "-q", "-b", "main")
        git(state, "config", "user.email", "docs@example.invalid")
        git(state, "config", "user.name", "docs")
        shutil.copytree(REPO / "desired-state-example", state / "desired-state-example")
        app = state / "desired-state-example/apps/mandelbrot/app.yaml"
        text = app.read_text()
        for port in (8100, 8101, 8102):
            text = text.replace(str(port), str(port + args.port_offset))
        app.write_text(text)
        git(state, "add", "-A")
        git(state, "commit", "-q", "-m", "mandelbrot: green 1.1.0 as a 10% canary beside blue 1.0.0")
        log = open(scratch / "agent.log", "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--repo", f"file://{state}",
                                   "--path", "desired-state-example", "--host", "localhost", "--root", str(root),
                                   "--listen", f"127.0.0.1:{listen}", "--poll-interval", "5",
                                   "--lb-metrics", f"127.0.0.1:{free_port()}"],
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{listen}"

        def converged():
            with urllib.request.urlopen(base + "/api/status", timeout=5) as resp:
                status = json.loads(resp.read())
            return status["result"] in ("converged", "applied") and status["applied"] and status["apps"]

        wait(converged, 900, "the example to converge (see the agent's log in the scratch dir)")
        time.sleep(6)           # one more poll: the page shows a converged reconcile, not the apply
        args.out.mkdir(parents=True, exist_ok=True)
        shoot(base + "/", args.out / "status-page.png", 1100, 1000, scratch)
        shoot(base + "/", args.out / "status-page-phone.png", 412, 915, scratch)
        frontend = f"http://127.0.0.1:{8100 + args.port_offset}/"
        shoot(frontend, args.out / "mandelbrot-page.png", 520, 640, scratch)
        return 0
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(10)
        if root.exists():
            subprocess.run([sys.executable, "-m", "agent.cli", "down", "--root", str(root)], cwd=REPO,
                           capture_output=True, timeout=120)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
