"""`gitops-agent status | head -1`: a reader that leaves early ends the command quietly (exit 141)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agent import cli
from conftest import REPO_ROOT


def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI with stdout on a real pipe whose reader has already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "agent.cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=REPO_ROOT)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [("status",), ("status", "--json")])
def test_a_reader_that_left_ends_the_command_quietly(tmp_path, args):
    proc = run_into_closed_pipe(*args, "--root", str(tmp_path / "root"))
    assert (proc.returncode, proc.stderr) == (141, "")


def test_a_reader_closing_after_the_first_line(tmp_path):
    """`| head -1` for real: the shell's pipeline, with the agent's output longer than one line."""
    cmd = f"{sys.executable} -m agent.cli --help | head -1; echo rc=${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.stdout.startswith("usage: gitops-agent") and proc.stderr == ""
    assert proc.stdout.rstrip().splitlines()[-1] in ("rc=0", "rc=141")


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch):
    def command(_args):
        raise BrokenPipeError(32, "a socket's peer went away")

    monkeypatch.setitem(cli.COMMANDS, "status", command)
    with pytest.raises(BrokenPipeError):
        cli.main(["status"])
