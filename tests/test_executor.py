"""agent/service/executor.py: `apply_plan` never raises, and every action becomes an `Outcome` whose `Verdict`
says how it ended. Driven through the real reconciler (real git, venvs, supervisord) on temp dirs; each
rollback test asserts what the host really runs afterwards, not only the verdict. A fault no real input
causes is handed in as a FAKE driver, named as such."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from agent.compose import world as build_world
from agent.core.layout import Layout
from agent.core.outcome import ReconcileResult, Verdict
from agent.core.actions import Action, PruneVenvs, RemoveEnvironment
from agent.core.plan import Plan
from agent.drivers._procfs import holds_url_listener
from agent.drivers.venv import VenvManager
from agent.service.executor import Drivers, apply_plan
from agent.service.reconciler import Reconciler
from agent.settings import Settings
from conftest import free_port, served_version
from daemon_helpers import wait_until

pytestmark = pytest.mark.timeout(300)

# A gate that fails does so only after waiting this long: short, as the failing cases wait it out in full.
FAILING_GATE_WAIT_S = 6


def settings(repo, root, health_wait_s: float = 15, **kw) -> Settings:
    return Settings(repo=repo.url, host="h1", root=root, health_wait_s=health_wait_s, **kw)


def reconcile(repo, root, world=None, **kw):
    s = settings(repo, root, **kw)
    w = build_world(s)
    return Reconciler(s, world(w) if world else w).reconcile()


def _outcomes(result) -> list[dict]:
    return [o.to_json() for o in result.outcomes]


def _of(result, kind: str, key: str):
    return next(o for o in result.outcomes if o.action.kind == kind and o.action.key == key)


def _processes(root: Path) -> dict[str, dict]:
    """What supervisord runs now, from supervisord itself."""
    layout = Layout(root)
    from agent.drivers.supervisor_handle import SupervisorHandle

    return SupervisorHandle("embedded", layout).ensure().process_info()


def _serves(port: int, version: str) -> None:
    """`version` answers on `port` (polled with a bound: a restarted process may still be binding)."""
    wait_until(lambda: served_version(port) == version, 30, f"version {version} on port {port}")


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _with_command_args(repo, app: str, service: str, port: int, *args: str) -> None:
    """Append `args` to one service's command in the app.yaml `StateRepo.app` wrote."""
    path = repo.path / f"apps/{app}/app.yaml"
    old = f'command: [demoapp-server, --port, "{port}"]'
    text = path.read_text()
    assert old in text, text
    path.write_text(text.replace(old, old[:-1] + "".join(f', "{a}"' for a in args) + "]"))


# --- rollbacks: the host afterwards ------------------------------------------------------------------------

def test_a_changed_service_failing_its_gate_is_back_on_its_previous_config_venv_and_version(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit("1.0.0")
    assert reconcile(state_repo, agent_root).result is ReconcileResult.APPLIED
    program = agent_root / "supervisor" / "programs" / "demo-web.conf"
    link = agent_root / "envs" / "demo"
    old_text, old_target = program.read_text(), os.readlink(link)
    old_venv = str((link.parent / old_target).resolve())
    assert served_version(port) == "1.0.0"

    # 1.1.0 in a new venv, answering its health check with 500: it must never stay
    state_repo.app(services={"demo-web": {"port": port}}, version="1.1.0")
    _with_command_args(state_repo, "demo", "demo-web", port, "--healthz-status", "500")
    state_repo.commit("1.1.0, unhealthy")
    result = reconcile(state_repo, agent_root, health_wait_s=FAILING_GATE_WAIT_S)

    assert result.result is ReconcileResult.FAILED, _outcomes(result)
    assert _of(result, "build_venv", "venv:demo").verdict is Verdict.APPLIED
    assert _of(result, "switch_venv", "venv:demo").verdict is Verdict.APPLIED      # it did switch, then back
    gate = _of(result, "check_health", "program:demo-web")
    assert gate.verdict is Verdict.ROLLED_BACK, _outcomes(result)
    assert "HealthCheckFailed" in gate.message and "not healthy" in gate.message
    old_identity = Path(old_target).name.removeprefix("demo-")
    assert f"rolled back demo-web: its previous config; envs/demo back to {old_identity}, running" in gate.message
    assert all(o.verdict is Verdict.SKIPPED_BLOCKED for o in result.outcomes
               if o.action.key == "program:demo-web" and result.outcomes.index(o) > result.outcomes.index(gate))

    assert program.read_text() == old_text
    assert os.readlink(link) == old_target
    info = _processes(agent_root)["demo-web"]
    assert info["statename"] == "RUNNING" and info["pid"]
    argv = _cmdline(info["pid"])
    assert argv[1].startswith(old_venv + "/bin/") and "--healthz-status" not in argv, argv
    _serves(port, "1.0.0")
    assert holds_url_listener(info["pid"], f"http://127.0.0.1:{port}/") is not False


def test_a_new_service_failing_its_gate_is_uninstalled_and_its_neighbour_keeps_running(state_repo, agent_root):
    port, new_port = free_port(), free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit("one service")
    assert reconcile(state_repo, agent_root).result is ReconcileResult.APPLIED
    before = _processes(agent_root)["demo-web"]["pid"]

    state_repo.app(services={"demo-web": {"port": port}, "demo-new": {"port": new_port}})
    _with_command_args(state_repo, "demo", "demo-new", new_port, "--healthz-status", "500")
    state_repo.commit("a new, unhealthy service")
    result = reconcile(state_repo, agent_root, health_wait_s=FAILING_GATE_WAIT_S)

    assert result.result is ReconcileResult.FAILED, _outcomes(result)
    gate = _of(result, "check_health", "program:demo-new")
    assert gate.verdict is Verdict.ROLLED_BACK, _outcomes(result)
    assert "rolled back demo-new: not installed (it is new)" in gate.message
    assert not (agent_root / "supervisor" / "programs" / "demo-new.conf").exists()
    running = _processes(agent_root)
    assert "demo-new" not in running
    assert served_version(new_port) is None
    assert running["demo-web"]["pid"] == before and running["demo-web"]["statename"] == "RUNNING"
    _serves(port, "1.0.0")
    assert not any(o.failed for o in result.outcomes if o.action.key != "program:demo-new"), _outcomes(result)


def test_a_failure_over_a_hand_edited_config_keeps_the_new_one_as_nobody_vouches_for_the_old(state_repo, agent_root):
    """A program file edited by hand and not yet applied by supervisord is no known-good config: a failed
    gate after it is reported (FAILED_TEMPORARY, retried), not 'rolled back' to a config that never ran."""
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit("1.0.0")
    assert reconcile(state_repo, agent_root).result is ReconcileResult.APPLIED
    program = agent_root / "supervisor" / "programs" / "demo-web.conf"
    edited = program.read_text().replace("startsecs=1\n", "startsecs=2\n")
    assert edited != program.read_text()
    program.write_text(edited)

    state_repo.app(services={"demo-web": {"port": port}}, version="1.1.0")
    _with_command_args(state_repo, "demo", "demo-web", port, "--healthz-status", "500")
    state_repo.commit("1.1.0, unhealthy")
    result = reconcile(state_repo, agent_root, health_wait_s=FAILING_GATE_WAIT_S)

    assert result.result is ReconcileResult.FAILED, _outcomes(result)
    write = _of(result, "write_program", "program:demo-web")
    assert write.action.previous is None and write.action.existed
    gate = _of(result, "check_health", "program:demo-web")
    assert gate.verdict is Verdict.FAILED_TEMPORARY, _outcomes(result)
    assert gate.message.endswith("(no known-good config to roll back to)"), gate.message
    assert program.read_text() == write.action.text                 # the desired file stays, the edit is gone
    info = _processes(agent_root)["demo-web"]
    assert "--healthz-status" in _cmdline(info["pid"])
    _serves(port, "1.1.0")


# --- blocked, unexpected and permanent failures ---------------------------------------------------------------

def test_actions_blocked_by_a_failed_build_are_skipped_and_never_run(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    # a hashed lock pinning a version the wheelhouse does not hold: a real build failure
    state_repo.write("apps/demo/demo.lock", "demoapp==9.9.9 --hash=sha256:" + "0" * 64 + "\n")
    state_repo.commit("unbuildable")
    result = reconcile(state_repo, agent_root)

    assert result.result is ReconcileResult.FAILED, _outcomes(result)
    build = _of(result, "build_venv", "venv:demo")
    assert build.verdict is Verdict.FAILED_TEMPORARY and "BuildError" in build.message, build.message
    dependents = [o for o in result.outcomes if o.action.key in ("venv:demo", "program:demo-web") and o is not build]
    assert {o.action.kind for o in dependents} >= {"switch_venv", "write_program", "check_health"}, _outcomes(result)
    for o in dependents:
        assert o.verdict is Verdict.SKIPPED_BLOCKED, o.to_json()
        assert o.message in ("venv:demo failed", "program:demo-web failed"), o.message
        assert o.seconds == 0.0

    # nothing of it ran: no env link, no venv left behind, no program file, no process, nothing serving
    assert not (agent_root / "envs" / "demo").exists()
    assert not list((agent_root / "venvs").glob("demo-*"))
    assert not (agent_root / "supervisor" / "programs" / "demo-web.conf").exists()
    assert "demo-web" not in _processes(agent_root)
    assert served_version(port) is None


class _DividingVenvs(VenvManager):
    """FAKE, for a fault no real input causes: a driver bug raising an exception type nobody expects
    (ZeroDivisionError) while building environment `bad`; every other environment builds for real."""

    def build(self, spec):
        if spec.name == "bad":
            return 1 // 0
        return super().build(spec)


def test_an_unexpected_exception_is_a_temporary_failure_and_independent_actions_still_run(state_repo, agent_root):
    good_port, bad_port = free_port(), free_port()
    state_repo.app(name="bad", env="bad", services={"bad-web": {"port": bad_port}})
    state_repo.app(name="good", env="good", services={"good-web": {"port": good_port}})
    state_repo.commit("two apps")
    result = reconcile(state_repo, agent_root,
                       world=lambda w: dataclasses.replace(w, venvs=_DividingVenvs(w.layout.root)))

    assert result.result is ReconcileResult.FAILED, _outcomes(result)
    build = _of(result, "build_venv", "venv:bad")
    assert build.verdict is Verdict.FAILED_TEMPORARY
    assert build.message == "ZeroDivisionError: integer division or modulo by zero"
    blocked = [o for o in result.outcomes if o.action.key == "program:bad-web"]
    assert blocked and all(o.verdict is Verdict.SKIPPED_BLOCKED for o in blocked), _outcomes(result)
    assert not (agent_root / "supervisor" / "programs" / "bad-web.conf").exists()
    assert served_version(bad_port) is None

    good = [o for o in result.outcomes if o.action.key in ("venv:good", "program:good-web")]
    assert {o.action.kind for o in good} >= {"build_venv", "switch_venv", "write_program", "check_health"}
    assert all(o.verdict is Verdict.APPLIED for o in good), _outcomes(result)
    # its health gate passed; supervisord's startsecs may still run (issue 17: the apply does not wait it out)
    wait_until(lambda: _processes(agent_root)["good-web"]["statename"] == "RUNNING", 30, "good-web RUNNING")
    _serves(good_port, "1.0.0")


def test_a_permanent_error_is_failed_permanent_and_blocks_only_what_needs_it(tmp_path):
    """A venv reference that would leave the root (the executor's input, straight from a plan) is refused by
    the real VenvManager with InvalidVenvRef, a Permanent error; a retry of the same plan cannot help."""
    root = tmp_path / "root"
    outside = tmp_path / "escape"
    outside.mkdir()
    (outside / "keep").write_text("not the agent's")
    venvs = VenvManager(root)
    (root / "envs").mkdir(parents=True)
    kept = tmp_path / "somewhere"
    kept.mkdir()
    os.symlink(kept, root / "envs" / "other")
    os.symlink(kept, root / "envs" / "gone")
    plan = Plan((
        RemoveEnvironment("venv:../escape", "left the repo", name="../escape"),
        PruneVenvs("venv:demo", "retention", name="demo", identities=("../../escape",)),
        RemoveEnvironment("venv:other", "left the repo", needs=("venv:../escape",), name="other"),
        RemoveEnvironment("venv:gone", "left the repo", name="gone"),
    ))
    outcomes = apply_plan(plan, Drivers(Layout(root), venvs, supervisor=None))

    assert [o.verdict for o in outcomes] == [Verdict.FAILED_PERMANENT, Verdict.FAILED_PERMANENT,
                                             Verdict.SKIPPED_BLOCKED, Verdict.APPLIED]
    assert outcomes[0].message.startswith("InvalidVenvRef: bad environment name '../escape'")
    assert outcomes[1].message.startswith("InvalidVenvRef: bad venv identity '../../escape'")
    assert outcomes[2].message == "venv:../escape failed"
    assert (outside / "keep").read_text() == "not the agent's"
    assert os.path.islink(root / "envs" / "other")                  # the blocked removal never ran
    assert not os.path.lexists(root / "envs" / "gone")              # the independent one did
    assert kept.is_dir()


@dataclasses.dataclass(frozen=True)
class _Unplanned(Action):
    """An action type no planner makes (a plan from a newer agent, say): the executor has no driver for it."""


def test_an_action_without_a_driver_fails_without_raising_and_the_rest_goes_on(tmp_path):
    root = tmp_path / "root"
    (root / "envs").mkdir(parents=True)
    plan = Plan((_Unplanned("thing:x", "why"), RemoveEnvironment("venv:gone", "left", name="gone")))
    outcomes = apply_plan(plan, Drivers(Layout(root), VenvManager(root), supervisor=None))
    assert [o.verdict for o in outcomes] == [Verdict.FAILED_TEMPORARY, Verdict.APPLIED]
    assert outcomes[0].message == "AgentError: no driver for action unplanned"
    assert [o.action for o in outcomes] == list(plan.actions)
