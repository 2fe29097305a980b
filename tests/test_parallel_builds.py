"""Issue 17: independent venvs build in parallel (real git, uv, supervisord), never two builds of one path.

The proof of overlap is a barrier, not a clock: each build of the two environments waits (bounded) until
the other one has started too, which only happens when they run at the same time. A build that fails
still blocks only its own services.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from agent.compose import world as build_world
from agent.core.outcome import ReconcileResult, Verdict
from agent.drivers.venv import VenvManager
from agent.service.executor import _independent_builds
from agent.service.reconciler import Reconciler
from agent.settings import Settings
from conftest import free_port, served_version
from daemon_helpers import wait_until

pytestmark = pytest.mark.timeout(300)


class _MeetingVenvs(VenvManager):
    """The real VenvManager, whose builds first wait (up to 120 s) for `parties` builds to have started:
    a spy on concurrency, every build is real. `broken` names an environment whose build fails for real
    (its lock names a wheel the wheelhouse does not have)."""

    def __init__(self, root, parties: int):
        super().__init__(root)
        self.barrier = threading.Barrier(parties, timeout=120)
        self.threads: set[str] = set()

    def build(self, spec):
        self.threads.add(threading.current_thread().name)
        self.barrier.wait()
        return super().build(spec)


def _two_apps(repo, broken: bool = False) -> tuple[int, int]:
    a, b = free_port(), free_port()
    repo.app(name="one", env="one", services={"one-web": {"port": a}})
    repo.app(name="two", env="two", services={"two-web": {"port": b}})
    if broken:
        repo.write("apps/two/two.lock", "demoapp==9.9.9 --hash=sha256:" + "0" * 64 + "\n")
    repo.commit("two apps")
    return a, b


def _reconcile(repo, root, parties: int):
    s = Settings(repo=repo.url, host="h1", root=root, health_wait_s=30, installer="uv")
    spy: list[_MeetingVenvs] = []

    def world(w):
        spy.append(_MeetingVenvs(w.layout.root, parties))
        return dataclasses.replace(w, venvs=spy[0])

    return Reconciler(s, world(build_world(s))).reconcile(), spy[0]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: builds are bounded to one at a time")
def test_two_environments_build_at_the_same_time_and_both_serve(state_repo, agent_root):
    a, b = _two_apps(state_repo)
    result, spy = _reconcile(state_repo, agent_root, parties=2)
    assert result.result is ReconcileResult.APPLIED, [o.to_json() for o in result.outcomes]
    assert len(spy.threads) == 2 and all(t.startswith("venv-build") for t in spy.threads), spy.threads
    wait_until(lambda: served_version(a) == "1.0.0" and served_version(b) == "1.0.0", 30, "both services")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: builds are bounded to one at a time")
def test_a_failed_parallel_build_blocks_only_its_own_services(state_repo, agent_root):
    a, b = _two_apps(state_repo, broken=True)
    result, _ = _reconcile(state_repo, agent_root, parties=2)
    assert result.result is ReconcileResult.FAILED
    build = next(o for o in result.outcomes if o.action.key == "venv:two" and o.action.kind == "build_venv")
    assert build.failed, build.to_json()
    assert all(o.verdict is Verdict.SKIPPED_BLOCKED for o in result.outcomes if o.action.key == "program:two-web")
    assert not any(o.failed for o in result.outcomes if o.action.key in ("venv:one", "program:one-web"))
    wait_until(lambda: served_version(a) == "1.0.0", 30, "one-web")
    assert served_version(b) is None


def test_one_build_per_venv_path():
    """A plan never builds one venv path twice at once: a second build of it runs in plan order."""
    from pathlib import Path

    from agent.core.model import Environment
    from agent.core.actions import BuildVenv
    from agent.core.plan import Plan

    def env(name, identity):
        return Environment(app="x", name=name, python="3.11", lockfile=Path("/l"), lock_sha256="0",
                           requirements=(), find_links=(), installer="uv", options=(), identity=identity)

    plan = Plan((BuildVenv("venv:a", "r", env=env("a", "1")), BuildVenv("venv:a", "r", env=env("a", "1")),
                 BuildVenv("venv:b", "r", env=env("b", "1")), BuildVenv("venv:c", "r", ("x",), env=env("c", "2"))))
    assert _independent_builds(plan) == [0, 2]
