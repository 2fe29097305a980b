"""The daemon upgrades itself from fleet.yaml's `agent:` block (DESIGN §3c): a hashed lock pinning
gitops-agent==X and its dependencies, built with the same venv machinery as any app's environment.

Between two reconciles (never inside one), when the lock pins another version than the running one:

1. build `<root>/venvs/gitops-agent-<identity>` from the lock (`VenvManager.build`: hashes, pip check,
   every console script imports, marker last);
2. check it: `gitops-agent --version` from the new venv says the locked version, and `gitops-agent
   validate` from it accepts the revision being applied (the new agent can load it);
3. hand over by exec: the same process (same pid, so systemd or supervisord see nothing) becomes the new
   agent. It keeps the root lock (the flock'ed fd is inherited: no other agent can take the root in
   between) and the listening socket (inherited too: connections that arrive during the exec wait in
   the kernel's backlog and are answered by the new agent, none is refused). The managed services are
   not touched: they run under their supervisord, not under the agent.

The handover is recorded in `<root>/state/agent-upgrade.json` before the exec. The new agent confirms it
at start. An agent that starts and finds a handover to another version unconfirmed knows the new agent
died (its process manager restarted the command it knows, the old venv): it marks that lock failed.
With `agent.rollout.waves` in fleet.yaml the lock is staged across hosts like an app's change
(agent.core.waves, agent.service.staging): the change is the newest commit that touched the lockfile, and
until this host's wave has started and its gates passed, the running agent stays (`phase: waiting`).

A failed lock (build, check or handover) is not tried again until the lock changes; the failure is in
the metrics (`gitops_agent_self_upgrade_failed`), `gitops-agent status`, the log and, with `--notify`, one
notification ("agent upgrade failed"; "recovered" once a later upgrade succeeds or the lock no longer asks
for that version); the old agent runs on.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from agent import __version__
from agent.core._record import record
from agent.core.errors import AgentError, BuildError, InvalidState, Problem
from agent.core.lockfile import parse_lock, venv_identity
from agent.core.model import Rollout
from agent.drivers.fsutil import atomic_write

__all__ = ["AgentLock", "SelfUpgrade", "Handover", "agent_lock", "read_upgrade_state", "LOCK_FD_ENV", "VENV_NAME",
           "WAVE_KEY"]

log = logging.getLogger("gitops_agent.selfupgrade")

VENV_NAME = "gitops-agent"
LOCK_FD_ENV = "GITOPS_AGENT_LOCK_FD"
STATE_FILE = "agent-upgrade.json"
WAVE_KEY = "@agent"          # the agent's record in <root>/state/waves.json (no app name starts with @)
SELF_DIR = "self"           # <root>/self/venvs/gitops-agent-<identity>, <root>/self/envs/gitops-agent -> current


@record
class AgentLock:
    """fleet.yaml's `agent:` block, resolved against one checkout."""

    lockfile: Path
    find_links: tuple[Path, ...]
    version: str
    python: str
    installer: str
    options: tuple[str, ...]
    identity: str
    path: str = ""                      # the lockfile relative to the repo root: its history times the waves
    rollout: Rollout | None = None      # agent.rollout.waves, `selected` set for this host


def agent_lock(state_dir: Path, boundary: Path, default_python: str, default_installer: str,
               host: str | None = None) -> AgentLock | None:
    """The `agent:` block of `state_dir`/fleet.yaml (schema-checked with the revision), None if absent.
    Raises InvalidState when its lock is not a hashed lock pinning gitops-agent, or a path leaves the repo."""
    fleet = yaml.safe_load((state_dir / "fleet.yaml").read_text()) or {}
    block = fleet.get("agent") if isinstance(fleet, dict) else None
    if not block:
        return None

    def inside(rel: str, what: str) -> Path:
        path = (state_dir / rel).resolve()
        if not path.is_relative_to(boundary.resolve()) or not path.exists():
            raise InvalidState([Problem("fleet.yaml", None, f"agent.{what}", f"{rel!r} must exist inside the repo")])
        return path

    lockfile = inside(block["lockfile"], "lockfile")
    data = lockfile.read_bytes()
    pins = {r.name: r.version for r in parse_lock(data.decode("utf-8", "replace"), block["lockfile"])}
    if "gitops-agent" not in pins:
        raise InvalidState([Problem(block["lockfile"], None, "", "the agent's lock must pin gitops-agent==VERSION")])
    defaults = fleet.get("defaults") or {}
    python = block.get("python") or defaults.get("python") or default_python
    installer = block.get("installer") or defaults.get("installer") or default_installer
    options = () if block.get("index", True) else ("--no-index",)
    return AgentLock(lockfile, tuple(inside(d, "find_links") for d in block.get("find_links", [])),
                     pins["gitops-agent"], python, installer, options, venv_identity(python, data, installer, options),
                     lockfile.relative_to(boundary.resolve()).as_posix(), _rollout(block, fleet, host))


def _rollout(block: dict, fleet: dict, host: str | None) -> Rollout | None:
    """The block's waves as the loader builds an app's (the revision was validated: last wave 100%)."""
    import dataclasses

    from agent.core.load.builders import rollout_of
    from agent.core.load.selectors import hosts_of, selects

    specs = (block.get("rollout") or {}).get("waves")
    if not specs:
        return None
    me = hosts_of(fleet).get(host or "")
    waves = rollout_of(specs).waves
    return Rollout(tuple(dataclasses.replace(w, selected=me is not None and "hosts" in spec and selects(spec["hosts"], me))
                         for w, spec in zip(waves, specs)))


@record
class Handover:
    """Everything the exec needs: the new agent's executable and the state to record."""

    executable: Path
    lock: AgentLock

    def exec(self, lock_fd: int, listen_fd: int) -> None:
        """Become the new agent (does not return). Both fds are inherited; their numbers go in the env."""
        os.set_inheritable(lock_fd, True)
        os.set_inheritable(listen_fd, True)
        env = dict(os.environ)
        env[LOCK_FD_ENV] = str(lock_fd)
        env["GITOPS_AGENT_LISTEN_FD"] = str(listen_fd)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(self.executable, [str(self.executable), *sys.argv[1:]], env)


def read_upgrade_state(state_dir: Path) -> dict:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class SelfUpgrade:
    """Decides and prepares the agent's own upgrade; `run_daemon` calls `after_reconcile` between runs."""

    def __init__(self, settings, layout, venvs=None, registry=None, clock=time.time, notifications=None, waves=None):
        from agent.drivers.venv import VenvManager

        self.settings = settings
        self.layout = layout
        # Its own venv manager under <root>/self: the reconciler prunes every venv under <root>/venvs that
        # no app wants, which would delete the running agent's own code under it.
        self.venvs = venvs if venvs is not None else VenvManager(layout.root / SELF_DIR, retention=3)
        self.clock = clock
        self.notifications = notifications      # agent.service.notify.Notifications, or None without --notify
        self.waves = waves                      # agent.service.staging.Stager: decides agent.rollout.waves
        self.file = layout.state / STATE_FILE
        self.failed_gauge = self.info_gauge = None
        if registry is not None:
            from prometheus_client import Gauge

            self.failed_gauge = Gauge("gitops_agent_self_upgrade_failed",
                                      "1 while the agent's locked version could not be taken into use", ["version"],
                                      registry=registry)
        self.state = read_upgrade_state(layout.state)

    # -- start: confirm or detect a failed handover ---------------------------------------------

    def on_start(self) -> None:
        s = self.state
        if s.get("phase") == "handing-over":
            if s.get("to") == __version__:
                log.info("self-upgrade: took over from gitops-agent %s (pid %d, root lock and listener kept)",
                         s.get("from"), os.getpid())
                self._write({**s, "phase": "done", "done_at": self.clock()})
                self._settle(Path(sys.prefix))
            else:
                self._fail(s, f"the new agent {s.get('to')} did not come up (this agent, {__version__}, was "
                              f"started instead by the service manager)")
        elif s.get("phase") == "failed" and self.failed_gauge is not None:
            self.failed_gauge.labels(s.get("to", "")).set(1)
        self._announce()        # a failure recorded before --notify was given is sent now, once

    def _settle(self, running: Path) -> None:
        """Point <root>/self/envs/gitops-agent at the venv now running (a stable path a service manager
        can start, so a restart runs the upgraded agent at once) and drop all but the newest 3."""
        try:
            if running.parent == self.venvs.root / "venvs":
                self.venvs.switch(VENV_NAME, running)
            self.venvs.prune(VENV_NAME, protect=[running])
        except (AgentError, OSError) as exc:
            log.warning("self-upgrade: could not switch or prune the agent's venvs: %s", exc)

    # -- between reconciles ------------------------------------------------------------------------

    def after_reconcile(self, state_dir: Path | None, boundary: Path | None, revision: str | None = None) -> Handover | None:
        """A Handover when the revision's lock wants another agent, this host's wave (if any) has started and
        that agent is built and checked. `revision`: the commit applied (its history times the waves)."""
        if state_dir is None:
            return None
        try:
            lock = agent_lock(state_dir, boundary or state_dir, "%d.%d" % sys.version_info[:2],
                              self.settings.installer, self.settings.host)
        except (InvalidState, OSError, yaml.YAMLError) as exc:
            reason = f"fleet.yaml's agent: block is unusable: {exc}"
            if self.state.get("phase") != "failed" or self.state.get("reason") != reason:   # once, not every poll
                self._fail({"from": __version__, "to": "unknown", "identity": ""}, reason)
            return None
        if lock is None or lock.version == __version__:
            if self.state.get("phase") in ("failed", "waiting") and (lock is None or lock.identity != self.state.get("identity")):
                self._clear_failure()           # the failed (or waiting) lock is no longer asked for
            return None
        if self.state.get("phase") == "failed" and self.state.get("identity") == lock.identity:
            return None                 # reported once; a new lock (commit) is needed to try again
        record = {"from": __version__, "to": lock.version, "identity": lock.identity, "at": self.clock()}
        if lock.rollout is not None and self.waves is not None and revision:
            try:
                decision = self.waves.decide_path(WAVE_KEY, lock.rollout, revision, lock.path)
            except AgentError as exc:
                log.error("self-upgrade: cannot time agent.rollout.waves (%s): waiting", exc)
                return None
            if not decision.due:
                self._waiting(record, decision)
                return None
        try:
            exe = self._prepare(lock, state_dir, boundary)
        except (AgentError, OSError, subprocess.SubprocessError) as exc:
            self._fail(record, str(exc))
            return None
        self._write({**record, "phase": "handing-over", "venv": str(exe.parent.parent)})
        log.info("self-upgrade: handing over from gitops-agent %s to %s (%s)", __version__, lock.version, exe)
        return Handover(exe, lock)

    def _prepare(self, lock: AgentLock, state_dir: Path, boundary: Path | None) -> Path:
        from agent.drivers.venv import VenvSpec

        log.info("self-upgrade: fleet.yaml locks gitops-agent %s (running %s): building its venv",
                 lock.version, __version__)
        path = self.venvs.build(VenvSpec(VENV_NAME, lock.python, lock.lockfile, lock.find_links, lock.installer,
                                         lock.options, lock.identity, compile_bytecode=True))   # starts often
        exe = path / "bin" / "gitops-agent"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("GITOPS_AGENT_")}
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env, timeout=120)
        said = version.stdout.strip()
        if version.returncode != 0 or said != f"gitops-agent {lock.version}":
            raise BuildError(f"the new agent's --version says {said or version.stderr.strip()[-300:]!r}, "
                             f"not gitops-agent {lock.version}")
        argv = [exe, "validate", str(state_dir)] + (["--repo-root", str(boundary)] if boundary else [])
        if self.settings.allow_root_services:
            argv.append("--allow-root-services")
        check = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        if check.returncode != 0:
            raise BuildError(f"the new agent {lock.version} does not accept the current revision: "
                             f"{(check.stdout + check.stderr).strip()[-600:]}")
        return exe

    # -- the record ----------------------------------------------------------------------------------

    def _waiting(self, record: dict, decision) -> None:
        """Not this host's turn yet: the running agent stays; status says why (written when it changes)."""
        if self.state.get("phase") == "failed" and self.failed_gauge is not None:
            self.failed_gauge.clear()           # an older lock's failure is superseded by this one
        waiting = {**record, "phase": "waiting", "wave": decision.wave + 1, "state": decision.state,
                   "reason": decision.reason}
        keep = ("phase", "to", "identity", "wave", "state", "reason")
        if any(self.state.get(k) != waiting[k] for k in keep):
            if self.state.get("phase") != "waiting" or self.state.get("identity") != record["identity"]:
                log.info("self-upgrade to gitops-agent %s waits for this host's wave: %s", record["to"], decision.reason)
            self._write(waiting)

    def _fail(self, record: dict, reason: str) -> None:
        log.error("self-upgrade to gitops-agent %s failed; %s keeps running: %s", record.get("to"), __version__, reason)
        self._write({**record, "phase": "failed", "reason": reason, "failed_at": self.clock()})
        if self.failed_gauge is not None:
            self.failed_gauge.labels(record.get("to", "")).set(1)

    def _clear_failure(self) -> None:
        if self.failed_gauge is not None:
            self.failed_gauge.clear()
        self._write({})

    def _write(self, state: dict) -> None:
        self.state = state
        self.layout.state.mkdir(parents=True, exist_ok=True)
        atomic_write(self.file, json.dumps(state, sort_keys=True) + "\n", mode=0o644)
        self._announce()

    def _announce(self) -> None:
        if self.notifications is not None:      # deduplicated by the notifier's memory: once, not per poll
            self.notifications.observe_upgrade(self.state, __version__)

