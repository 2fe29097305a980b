"""Services run as the user app.yaml names (supervisord's `user=`), never as root unless allowed."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import free_port, run_agent

pytestmark = pytest.mark.timeout(300)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs the agent to run as root")
def test_service_runs_as_the_named_user(state_repo):
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this machine")
    # Venvs reuse the agent's interpreter; a pyenv Python under /root (0700) cannot be run by another user.
    # For this test only, let others traverse (not list) such directories; restored in `finally`.
    interpreter = Path(os.path.realpath(sys.executable))
    closed = {p: p.stat().st_mode for p in interpreter.parents if p.stat().st_mode & 0o001 == 0}
    base = Path(tempfile.mkdtemp(prefix="gitops-user-", dir="/tmp"))
    base.chmod(0o755)                       # the service's user must be able to reach its venv
    root = base / "root"
    try:
        for path, mode in closed.items():
            path.chmod(mode | 0o001)
        port = free_port()
        state_repo.app(services={"demo-web": {"port": port}})
        app = state_repo.path / "apps/demo/app.yaml"
        app.write_text(app.read_text().replace("    port:", "    user: nobody\n    port:"))
        state_repo.commit("as nobody")
        proc = run_agent("once", "--repo", state_repo.url, "--host", "h1", "--root", str(root))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        facts = json.loads(run_agent("facts", "--json", "--root", str(root)).stdout)
        pid = facts["programs"]["demo-web"]["pid"]
        uid = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
        assert uid == nobody.pw_uid

        app.write_text(app.read_text().replace("user: nobody", "user: root"))
        state_repo.commit("as root")
        refused = run_agent("once", "--repo", state_repo.url, "--host", "h1", "--root", str(root))
        assert refused.returncode == 1 and "--allow-root-services" in refused.stderr
    finally:
        for path, mode in closed.items():
            path.chmod(mode)
        run_agent("down", "--root", str(root))
        shutil.rmtree(base, ignore_errors=True)
