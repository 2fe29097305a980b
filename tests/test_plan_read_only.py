"""Issue 12 item 1 with a running daemon: `plan --repo OTHER` on the daemon's root never redirects it.

Before: `plan` fetched through the root's own mirror and re-pointed its remote to OTHER without the root
lock; the running daemon, which checked the URL once at start, applied OTHER's commit on its next poll.
(That plan, status and facts leave the root byte-for-byte unchanged: tests/test_reconciler.py.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import StateRepo, free_port, run_agent
from daemon_helpers import start_daemon, wait_until

pytestmark = pytest.mark.timeout(300)


def _common(url: str, root: Path) -> list[str]:
    return ["--repo", url, "--host", "h1", "--root", str(root), "--health-wait", "15"]


def _other_repo(tmp_path: Path) -> tuple[StateRepo, str]:
    other = StateRepo(tmp_path / "other")
    other.app(name="other", env="other", services={"other-web": {"port": free_port(), "health": False}})
    return other, other.commit("other's first")


def _mirror_url(root: Path) -> str:
    return subprocess.run(["git", "--git-dir", str(root / "source" / "repo.git"), "config", "remote.origin.url"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_plan_against_another_repo_does_not_redirect_a_running_daemon(request, state_repo, agent_root, tmp_path,
                                                                      monkeypatch):
    state_repo.app(services={"demo-web": {"port": free_port(), "health": False}})
    first = state_repo.commit("first")

    def applied() -> str | None:
        proc = run_agent("status", "--json", "--root", str(agent_root))
        return (json.loads(proc.stdout).get("applied") or {}).get("sha") if proc.returncode == 0 else None

    daemon = start_daemon(request, state_repo.url, agent_root, tmp_path, poll=1.0)
    wait_until(lambda: applied() == first, 120, "the daemon applies the first commit", daemon.log)
    other, other_sha = _other_repo(tmp_path)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))          # where plan's temp mirror goes
    plan = run_agent("plan", *_common(other.url, agent_root))
    assert plan.returncode in (0, 2), plan.stdout + plan.stderr
    assert other_sha in plan.stdout
    assert list(scratch.iterdir()) == []                # and it is removed
    state_repo.write("notes.txt", "a second commit on the daemon's repo\n")
    second = state_repo.commit("second")
    wait_until(lambda: applied() == second, 120, "the daemon applies its own repo's second commit", daemon.log)
    assert other_sha not in daemon.log_text()
    assert _mirror_url(agent_root) == state_repo.url
