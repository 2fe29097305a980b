"""The state repo over git's ssh transport (ssh://host/path and scp-like host:path).

No sshd runs on these machines, so `GIT_SSH_COMMAND` points at a FAKE ssh client (named as such): it
ignores the host and runs the remote command (`git-upload-pack '/path'`) locally. Everything else is
real: git's ssh transport, the agent's URL handling and GIT_SSH_COMMAND passthrough.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import free_port, run_agent

FAKE_SSH = """#!/bin/sh
# fake ssh: skip options and the host, run the remote command here
while [ $# -gt 1 ]; do
  case "$1" in -p|-o|-i|-l) shift 2 ;; -*) shift ;; *) shift; break ;; esac
done
echo "$@" >> "$(dirname "$0")/ssh.log"
exec sh -c "$*"
"""


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    script = tmp_path / "fake-ssh"
    script.write_text(FAKE_SSH)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("GIT_SSH_COMMAND", str(script))
    return tmp_path / "ssh.log"


@pytest.mark.parametrize("form", ["ssh://git@statehost{path}", "git@statehost:{path}"])
def test_once_over_ssh_transport(form, fake_ssh, state_repo, agent_root):
    state_repo.app(services={"demo-web": {"port": free_port(), "health": False}})
    sha = state_repo.commit("over ssh")
    url = form.format(path=state_repo.path)
    proc = run_agent("once", "--repo", url, "--host", "h1", "--root", str(agent_root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "git-upload-pack" in fake_ssh.read_text()           # it really went through the ssh transport
    status = json.loads(run_agent("status", "--json", "--root", str(agent_root)).stdout)
    assert status["applied"]["sha"] == sha
    assert os.environ["GIT_SSH_COMMAND"].endswith("fake-ssh")
