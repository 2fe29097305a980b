"""A hand-made mess at `envs/<name>` is healed by the next reconcile, end to end (issue 12 item 11).

Real git, real venv + pip, real embedded supervisord and HTTP service, driven through the CLI. Before,
a directory there made every `once` fail (the symlink swap cannot rename over a directory) for ever.
"""

from __future__ import annotations

import subprocess
import urllib.request

import pytest

from conftest import free_port, run_agent

pytestmark = pytest.mark.timeout(300)


def once(repo, root) -> subprocess.CompletedProcess:
    proc = run_agent("once", "--repo", repo.url, "--host", "h1", "--root", str(root), "--health-wait", "15")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.read().decode()


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_a_directory_or_file_at_the_env_link_is_set_aside_and_the_link_healed(state_repo, agent_root, kind):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit("first")
    once(state_repo, agent_root)
    link = agent_root / "envs" / "demo"
    venv = link.resolve()

    link.unlink()                                   # someone "fixed" the env by hand
    if kind == "directory":
        link.mkdir()
        (link / "notes.txt").write_text("keep me")
    else:
        link.write_text("keep me")

    proc = once(state_repo, agent_root)             # applied: the switch puts the link back
    assert "switch_venv" in proc.stdout and "result: applied" in proc.stdout
    assert link.is_symlink() and link.resolve() == venv
    aside = [p for p in link.parent.iterdir() if p.name.startswith(".demo.aside-")]
    assert len(aside) == 1
    assert (aside[0] / "notes.txt" if kind == "directory" else aside[0]).read_text() == "keep me"
    assert str(aside[0]) in proc.stderr and "WARNING" in proc.stderr
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"

    assert "result: converged" in once(state_repo, agent_root).stdout   # and it stays healed
