"""Signals to a real `gitops-agent run`: SIGHUP is logged and ignored; SIGTERM and SIGINT stop it cleanly."""

from __future__ import annotations

import signal

import pytest

from agent.service.runtime import SIGHUP_MESSAGE
from daemon_helpers import http_get, start_daemon, wait_until

pytestmark = pytest.mark.timeout(180)


def empty_state(state_repo) -> None:
    """A fleet with this host and no apps: enough for the daemon to run, serve and reconcile."""
    state_repo.write("fleet.yaml", """\
        apiVersion: gitops-agent/v1
        kind: Fleet
        hosts:
          h1: {groups: [web]}
        """)
    state_repo.commit("fleet only")


def test_sighup_is_logged_and_the_daemon_keeps_running(request, state_repo, agent_root, tmp_path):
    empty_state(state_repo)
    d = start_daemon(request, state_repo.url, agent_root, tmp_path)
    d.wait_healthy(60)
    for n in (1, 2):
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.proc.poll() is not None or d.log_text().count(SIGHUP_MESSAGE) >= n, 60,
                   f"SIGHUP {n} logged", d.log)
        assert d.proc.poll() is None, f"SIGHUP killed the daemon ({d.proc.returncode})\n{d.log_text()}"
    assert http_get(d.base + "/healthz") == (200, "ok\n")
    assert d.stop() == 0
    log = d.log_text()
    assert "SIGTERM: stopping after the current reconcile" in log and "Traceback" not in log


def test_sigint_stops_the_daemon_cleanly(request, state_repo, agent_root, tmp_path):
    empty_state(state_repo)
    d = start_daemon(request, state_repo.url, agent_root, tmp_path)
    d.wait_healthy(60)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(60) == 0
    log = d.log_text()
    assert "SIGINT: stopping after the current reconcile" in log and "stopped after" in log
