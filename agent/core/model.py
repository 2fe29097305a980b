"""The desired state of one host, as frozen values built from a validated revision.

Everything here is plain data: the planner compares it with facts without touching the host.
"""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Union

from agent.core._enum import StrEnum
from agent.core._record import record

__all__ = ["HealthCheck", "SecretRef", "FileRef", "DataDir", "EnvValue", "SecretFile", "FileSpec", "JobRun", "Job",
           "IndexCredentials", "Environment", "Service", "Traffic", "Canary", "Gate", "Wave", "Rollout", "Chaos", "App",
           "DesiredState"]


@record
class HealthCheck:
    """A probe of a (re)started service, exactly one kind: `url` (HTTP on the host's loopback, 2xx means
    healthy), `tcp` (HOST:PORT accepts a connection) or `command` (argv run in the service's venv, exit 0)."""

    url: str = ""
    timeout_s: float = 2.0
    tcp: str = ""
    command: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        """What is probed, for reasons and messages."""
        return self.url or (f"tcp {self.tcp}" if self.tcp else "command " + " ".join(self.command))


@record
class SecretRef:
    """An env value: one key of a declared secret (`{secret: NAME/KEY}`); its value is known only on a host
    that can decrypt it, and only while applying."""

    name: str
    key: str

    def __str__(self) -> str:
        return f"{self.name}/{self.key}"


@record
class FileRef:
    """An env value: the path of a rendered file of the app (`{file: NAME}`)."""

    name: str


@record
class DataDir:
    """An env value: the app's data dir (`{data_dir: true}`), kept across deploys and rollbacks."""


EnvValue = Union[str, SecretRef, FileRef, DataDir]


@record
class SecretFile:
    """An age-encrypted dotenv file of the app, as committed (ciphertext only)."""

    name: str
    display: str                        # its path in the state repo, for messages
    ciphertext: bytes = field(repr=False, default=b"")


@record
class FileSpec:
    """A file the agent writes for the app: a Jinja2 template rendered on the host, or a byte-for-byte copy."""

    name: str
    display: str                        # the template's or source's path in the state repo
    template: str | None = None         # template text (rendered with host, app, services, secrets)
    source: bytes | None = field(default=None, repr=False)
    mode: int = 0o600
    uses_secrets: bool = False


class JobRun(StrEnum):
    BEFORE = "before"                   # in the new venv, before the environment's services restart
    AFTER = "after"                     # once the changed services are healthy and traffic has moved


@record
class Job:
    """A release task (a migration): runs when its inputs change, never on a no-op reconcile."""

    app: str
    name: str
    environment: str
    command: tuple[str, ...]
    env: tuple[tuple[str, EnvValue], ...] = ()
    run: JobRun = JobRun.BEFORE
    timeout_s: float = 300.0
    user: str | None = None


@record
class IndexCredentials:
    username: str
    password: SecretRef


@record
class Environment:
    """A virtualenv built from one hashed lockfile. `identity` names its content-addressed dir."""

    app: str
    name: str
    python: str
    lockfile: Path                      # absolute path inside the checkout
    lock_sha256: str
    requirements: tuple[tuple[str, str], ...]  # (canonical name, version), sorted
    find_links: tuple[Path, ...]
    installer: str
    options: tuple[str, ...]
    identity: str
    index_url: str | None = None        # a private index instead of PyPI (part of `options`, so of the identity)
    index_credentials: IndexCredentials | None = None


@record
class Service:
    """A supervisord program run from an environment's venv."""

    app: str
    name: str
    environment: str
    command: tuple[str, ...]            # argv[0] is a console script name inside the venv's bin/
    port: int | None = None
    env: tuple[tuple[str, EnvValue], ...] = ()
    user: str | None = None
    startsecs: int = 1
    stopwaitsecs: int = 10
    health: HealthCheck | None = None
    depends_on: tuple[str, ...] = ()    # services of the same app started (healthy) before this one
    processes: int = 1                  # supervisord numprocs
    priority: int | None = None         # supervisord's start order at boot, from depends_on (set by the loader)


@record
class Traffic:
    """One weighted frontend on the host's load balancer (acted on by the traffic drivers)."""

    listen: str
    strategy: str
    weights: tuple[tuple[str, int], ...]
    ab_variant: str | None = None       # strategy ab: the service that gets ab_percent of the buckets
    ab_percent: int = 0
    canary: "Canary | None" = None      # strategy canary with automatic steps


@record
class Canary:
    """Automatic canary: `service` gets steps[i]% of the traffic, advancing after `pause_s` while the
    agent's probes of it stay under `max_error_rate`; a failed gate aborts to 0%."""

    service: str
    steps: tuple[int, ...] = (5, 25, 50, 100)
    pause_s: float = 30.0
    max_error_rate: float = 0.05
    probes: int = 10                    # probes of the canary's health URL per reconcile
    analysis: "Gate | None" = None      # a Prometheus query per step (op "<=", threshold = `max`)


@record
class Gate:
    """A Prometheus instant query every sample of which must satisfy `op threshold` (e.g. < 0.05)."""

    prometheus: str                     # base URL, e.g. http://127.0.0.1:9090
    query: str
    op: str                             # < <= > >= == !=
    threshold: float
    on_no_data: str = "pause"           # pause | fail | pass
    timeout_s: float = 5.0


@record
class Wave:
    """Who is in the wave (a host selector, or a bucket percentage) and when it may start."""

    percent: int | None = None          # hosts whose bucket (0..99) is below percent
    selected: bool = False              # hosts-selector waves: whether THIS host matches (set by the loader)
    after_s: float = 0.0                # since the commit that last changed the app's directory
    gate: Gate | None = None


@record
class Rollout:
    waves: tuple[Wave, ...] = ()


@record
class Chaos:
    """Induced failure (acted on only when the agent allows chaos)."""

    kill_per_hour: float = 0.0
    disable_per_hour: float = 0.0
    disable_s: float = 30.0


@record
class App:
    name: str
    mode: str | None
    environments: tuple[Environment, ...]
    services: tuple[Service, ...]
    traffic: Traffic | None = None
    rollout: Rollout | None = None
    chaos: Chaos | None = None
    overrides: tuple[str, ...] = ()     # the overrides applied for this host, described
    secrets: tuple[SecretFile, ...] = ()
    files: tuple[FileSpec, ...] = ()
    jobs: tuple[Job, ...] = ()
    windows: tuple = ()                 # agent.core.windows.Window: when changes may restart or re-weight (§3b)


@record
class DesiredState:
    """What one host must run, for one revision of the state repo."""

    host: str
    apps: tuple[App, ...] = ()
    known_host: bool = True             # False: the host is not listed in fleet.yaml (the loader refuses such a
                                        # host since DESIGN §3d; other constructors may still say so)
    notes: tuple[str, ...] = ()         # what the loader and the fleet step decided (overrides, waves, chaos)
    environments: dict[str, Environment] = field(default_factory=dict, compare=False)
    services: dict[str, Service] = field(default_factory=dict, compare=False)
    decommission: bool = False          # fleet.yaml says `decommission: true` for this host: emptying it is meant
    groups: tuple[str, ...] = ()        # this host's groups and labels in fleet.yaml (templates see them)
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, host: str, apps: tuple[App, ...], known_host: bool = True, notes: tuple[str, ...] = (),
           decommission: bool = False, groups: tuple[str, ...] = (),
           labels: tuple[tuple[str, str], ...] = ()) -> "DesiredState":
        envs = {e.name: e for a in apps for e in a.environments}
        svcs = {s.name: s for a in apps for s in a.services}
        return cls(host=host, apps=apps, known_host=known_host, notes=notes, environments=envs, services=svcs,
                   decommission=decommission, groups=tuple(groups), labels=tuple(labels))

    def with_apps(self, apps: tuple[App, ...], notes: tuple[str, ...] | None = None) -> "DesiredState":
        """The same host and revision with other apps (staging, canaries): host, known_host and
        decommission are kept, which `of(...)` with positional arguments would drop."""
        return DesiredState.of(self.host, tuple(apps), self.known_host, self.notes if notes is None else tuple(notes),
                               self.decommission, self.groups, self.labels)

    def app_of(self, name: str) -> App | None:
        return next((a for a in self.apps if a.name == name), None)
