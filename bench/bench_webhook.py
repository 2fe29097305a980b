"""Push to serving through a webhook: a daemon that polls every 5 minutes, a state repo served by a real
`git daemon` (not a path the agent's watcher sees), a signed `POST /hooks/git` right after each push.

    python bench/bench_webhook.py [ROUNDS]

Measures, from the webhook's POST to the new version answering on the service's port:
- the first push of a version (its venv is built in that reconcile), once;
- then ROUNDS (default 6) pushes alternating between two versions whose venvs are kept (retention), which
  is a switch: fetch, plan, program rewrite, restart, health gate. Target: <= 1 s.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# isort: split
from conftest import StateRepo, free_port, served_version, stop_process  # noqa: E402
from daemon_helpers import Daemon, wait_until  # noqa: E402

SECRET = b"bench-webhook-secret"


def post(port: int) -> int:
    body = b'{"ref": "refs/heads/main"}'
    sig = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/hooks/git", body=body, headers={"X-Hub-Signature-256": sig})
        return conn.getresponse().status
    finally:
        conn.close()


def push_and_time(repo: StateRepo, daemon: Daemon, port: int, version: str) -> float:
    repo.app(services={"demo-web": {"port": port}}, version=version)
    repo.commit(f"demoapp {version}")
    started = time.monotonic()
    assert post(daemon.port) == 202
    wait_until(lambda: served_version(port) == version, 600, f"{version} served", daemon.log, step=0.01)
    return time.monotonic() - started


def main(rounds: int = 6) -> int:
    import subprocess

    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as tmp:
        tmp = Path(tmp)
        repo = StateRepo(tmp / "state")
        port = free_port()
        repo.app(services={"demo-web": {"port": port}})
        repo.commit("v1")
        git_port = free_port()
        gitd = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={tmp}",
                                 "--listen=127.0.0.1", f"--port={git_port}", str(tmp)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        secret = tmp / "hook.secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        root = tmp / "root"
        daemon = Daemon(f"git://127.0.0.1:{git_port}/state", root, tmp / "agent.log",
                        "--webhook-secret-file", str(secret), poll=300)
        try:
            wait_until(lambda: served_version(port) == "1.0.0", 600, "v1 served", daemon.log, step=0.1)
            time.sleep(1)
            first = push_and_time(repo, daemon, port, "2.0.0")
            print(f"push -> serving, new venv built:      {first:6.2f} s")
            samples = [push_and_time(repo, daemon, port, "1.0.0" if i % 2 == 0 else "2.0.0") for i in range(rounds)]
            print(f"push -> serving, kept venv (switch):  median {statistics.median(samples):.2f} s, "
                  f"min {min(samples):.2f}, max {max(samples):.2f} over {rounds} pushes "
                  f"(target <= 1 s, poll interval 300 s)")
        finally:
            daemon.stop()
            import shutil

            shutil.copy(daemon.log, Path(tempfile.gettempdir()) / "bench-webhook-agent.log")
            stop_process(gitd)
            from agent.drivers.supervisor import EmbeddedSupervisor

            EmbeddedSupervisor(root).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 6))
