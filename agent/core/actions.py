"""The actions a plan is made of: what to change, why (`reason`), which resource (`key`), after what (`needs`).

Their own module so that a `once` no-op, whose plan is empty, never creates these 22 dataclasses (about 20 ms
of its 0.15 s budget on the bench machine: Python 3.11 execs six generated methods per frozen dataclass).
agent.core.plan reaches them through `ACTIONS`, which imports this module at its first use.
"""

from __future__ import annotations

from dataclasses import asdict, field
from typing import TYPE_CHECKING

from agent.core._record import record

if TYPE_CHECKING:
    from agent.core.model import Environment

__all__ = [
    "Action", "EnsureSupervisor", "BuildVenv", "RepairVenv", "SwitchVenv", "WriteProgram", "UpdateProgram",
    "StartProgram", "RestartProgram", "AwaitRunning", "CheckHealth", "RemoveProgram", "RemoveEnvironment", "PruneVenvs",
    "ConfigureTraffic", "VerifyTraffic", "EnsureDataDir", "WriteFile", "WriteLauncher", "WriteSecretEnv", "RunJob",
    "PruneFiles",
]

# Action fields never shown (plan --json, status): file contents, which may hold secrets, and long texts.
_PRIVATE_FIELDS = frozenset({"text", "previous", "data", "secret_env"})


@record
class Action:
    key: str
    reason: str
    needs: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return _snake(type(self).__name__)

    def describe(self) -> str:
        return f"{self.kind} {self.key.partition(':')[2] or self.key}"

    def to_json(self) -> dict:
        data = {k: _jsonable(v) for k, v in asdict(self).items() if k not in _PRIVATE_FIELDS}
        if isinstance(data.get("env"), dict):   # the environment: what identifies it, not all of it
            data["env"] = {k: data["env"][k] for k in ("name", "identity", "python", "installer", "lockfile")}
        return {"action": self.kind, **data}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


@record
class EnsureSupervisor(Action):
    pass


@record
class BuildVenv(Action):
    """Build a venv aside. `eager_bytecode`: compile every module now, because a service or job of this
    environment runs as another `user:` that cannot write `__pycache__` into the agent's venv; otherwise
    bytecode is written lazily (the build's entry point check compiles what the console scripts import)."""
    env: Environment | None = None
    eager_bytecode: bool = False


@record
class RepairVenv(Action):
    """The current venv no longer matches its lock (hand change): rebuild it in place."""
    env: Environment | None = None
    eager_bytecode: bool = False


@record
class SwitchVenv(Action):
    name: str = ""
    identity: str = ""
    previous: str | None = None


@record
class WriteProgram(Action):
    """Write a program file. `previous` is the config supervisord ran before (the rollback target);
    `existed` with no `previous` means it is unknown (hand-edited, not applied), so a failure keeps
    the new file and reports instead of restoring a config nobody can vouch for."""
    name: str = ""
    text: str = ""
    previous: str | None = None
    existed: bool = False


@record
class UpdateProgram(Action):
    """supervisorctl-update semantics for one program: add, replace (restart) or remove."""
    name: str = ""
    startsecs: int = 1
    gated: bool = False     # a health check follows: it, not startsecs, decides when traffic may come


@record
class StartProgram(Action):
    name: str = ""
    startsecs: int = 1
    gated: bool = False


@record
class RestartProgram(Action):
    name: str = ""
    startsecs: int = 1
    gated: bool = False


@record
class AwaitRunning(Action):
    """After the (re)start of a service WITHOUT a health check: wait until supervisord calls the program
    RUNNING (up `startsecs`), its only evidence that the start worked.

    Planned at the end, so the startsecs windows of all services overlap instead of adding up; before a
    traffic change for a backend that gains weight, after it for the others. A program that dies inside
    its window fails here and is rolled back. A gated service gets none: its passed health gate stands in
    for RUNNING (supervisord still enforces startsecs), and a death after the gate is drift (the pid that
    passed it, ProgramFact.gated_pid, is gone), healed by the next reconcile.
    """
    name: str = ""
    startsecs: int = 1


@record
class CheckHealth(Action):
    """Gate a (re)start: `url` answers 2xx, or `tcp` accepts, from the service's own process; or `command`
    (absolute argv in its venv, run with its env) exits 0."""
    name: str = ""
    url: str = ""
    timeout_s: float = 2.0
    tcp: str = ""
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    secret_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@record
class RemoveProgram(Action):
    name: str = ""


@record
class RemoveEnvironment(Action):
    name: str = ""


@record
class PruneVenvs(Action):
    name: str = ""
    identities: tuple[str, ...] = ()


@record
class ConfigureTraffic(Action):
    """Make the load balancer serve `frontends`: runtime weights when only they changed, else a checked reload.
    `up`: "frontend/backend" servers to take as healthy now (their gate just passed), instead of waiting for
    the load balancer's own slower checks to notice (HAProxy marks a server DOWN after 3 failed checks)."""
    frontends: tuple = ()
    up: tuple[str, ...] = ()


@record
class VerifyTraffic(Action):
    frontends: tuple = ()


@record
class EnsureDataDir(Action):
    """The app's data dir: created once, kept across deploys, rollbacks and the app's removal."""
    app: str = ""
    path: str = ""
    owner: str | None = None


@record
class WriteFile(Action):
    """Write one rendered file version (content-addressed, so programs still running on the previous one keep
    it) and point files/<name> at it."""
    app: str = ""
    name: str = ""
    path: str = ""
    link: str = ""
    digest: str = ""
    mode: int = 0o600
    owner: str | None = None
    data: bytes = field(default=b"", repr=False)


@record
class WriteLauncher(Action):
    """The exec wrapper that reads a secret env file into a program's environment (agent.core.render.launcher)."""
    path: str = ""
    text: str = field(default="", repr=False)


@record
class WriteSecretEnv(Action):
    """A service's secret values, as the 0600 env file its launcher reads (owned by the service's user)."""
    name: str = ""
    path: str = ""
    owner: str | None = None
    data: bytes = field(default=b"", repr=False)


@record
class RunJob(Action):
    """Run a release job (a migration) to completion; on success its inputs digest is recorded, so it runs
    again only when they change. `rollback`: the programs an `after` job's failure puts back."""
    app: str = ""
    name: str = ""
    run: str = "before"
    command: tuple[str, ...] = ()
    cwd: str = ""
    user: str | None = None
    timeout_s: float = 300.0
    inputs: str = ""
    env: tuple[tuple[str, str], ...] = ()
    secret_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    venv: str = ""
    rollback: tuple[str, ...] = ()


@record
class PruneFiles(Action):
    """Delete file versions and secret env files nothing uses any more (an app's data dir is never pruned)."""
    app: str = ""
    paths: tuple[str, ...] = ()
