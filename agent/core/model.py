"""The desired state of one host, as frozen values built from a validated revision.

Everything here is plain data: the planner compares it with facts without touching the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HealthCheck", "Environment", "Service", "Traffic", "Canary", "Gate", "Wave", "Rollout", "Chaos", "App",
           "DesiredState"]


@dataclass(frozen=True)
class HealthCheck:
    """An HTTP probe on the host's loopback; 2xx means healthy."""

    url: str
    timeout_s: float = 2.0


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Service:
    """A supervisord program run from an environment's venv."""

    app: str
    name: str
    environment: str
    command: tuple[str, ...]            # argv[0] is a console script name inside the venv's bin/
    port: int | None = None
    env: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    startsecs: int = 1
    stopwaitsecs: int = 10
    health: HealthCheck | None = None


@dataclass(frozen=True)
class Traffic:
    """One weighted frontend on the host's load balancer (acted on by the traffic drivers)."""

    listen: str
    strategy: str
    weights: tuple[tuple[str, int], ...]
    ab_variant: str | None = None       # strategy ab: the service that gets ab_percent of the buckets
    ab_percent: int = 0
    canary: "Canary | None" = None      # strategy canary with automatic steps


@dataclass(frozen=True)
class Canary:
    """Automatic canary: `service` gets steps[i]% of the traffic, advancing after `pause_s` while the
    agent's probes of it stay under `max_error_rate`; a failed gate aborts to 0%."""

    service: str
    steps: tuple[int, ...] = (5, 25, 50, 100)
    pause_s: float = 30.0
    max_error_rate: float = 0.05
    probes: int = 10                    # probes of the canary's health URL per reconcile
    analysis: "Gate | None" = None      # a Prometheus query per step (op "<=", threshold = `max`)


@dataclass(frozen=True)
class Gate:
    """A Prometheus instant query every sample of which must satisfy `op threshold` (e.g. < 0.05)."""

    prometheus: str                     # base URL, e.g. http://127.0.0.1:9090
    query: str
    op: str                             # < <= > >= == !=
    threshold: float
    on_no_data: str = "pause"           # pause | fail | pass
    timeout_s: float = 5.0


@dataclass(frozen=True)
class Wave:
    """Who is in the wave (a host selector, or a bucket percentage) and when it may start."""

    percent: int | None = None          # hosts whose bucket (0..99) is below percent
    selected: bool = False              # hosts-selector waves: whether THIS host matches (set by the loader)
    after_s: float = 0.0                # since the commit that last changed the app's directory
    gate: Gate | None = None


@dataclass(frozen=True)
class Rollout:
    waves: tuple[Wave, ...] = ()


@dataclass(frozen=True)
class Chaos:
    """Induced failure (acted on only when the agent allows chaos)."""

    kill_per_hour: float = 0.0
    disable_per_hour: float = 0.0
    disable_s: float = 30.0


@dataclass(frozen=True)
class App:
    name: str
    mode: str | None
    environments: tuple[Environment, ...]
    services: tuple[Service, ...]
    traffic: Traffic | None = None
    rollout: Rollout | None = None
    chaos: Chaos | None = None
    overrides: tuple[str, ...] = ()     # the overrides applied for this host, described


@dataclass(frozen=True)
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

    @classmethod
    def of(cls, host: str, apps: tuple[App, ...], known_host: bool = True, notes: tuple[str, ...] = (),
           decommission: bool = False) -> "DesiredState":
        envs = {e.name: e for a in apps for e in a.environments}
        svcs = {s.name: s for a in apps for s in a.services}
        return cls(host=host, apps=apps, known_host=known_host, notes=notes, environments=envs, services=svcs,
                   decommission=decommission)

    def with_apps(self, apps: tuple[App, ...], notes: tuple[str, ...] | None = None) -> "DesiredState":
        """The same host and revision with other apps (staging, canaries): host, known_host and
        decommission are kept, which `of(...)` with positional arguments would drop."""
        return DesiredState.of(self.host, tuple(apps), self.known_host, self.notes if notes is None else tuple(notes),
                               self.decommission)
