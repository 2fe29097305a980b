"""The agent's own configuration: CLI flags > GITOPS_AGENT_* environment > --config YAML > defaults.

Every setting has one name (the field) and may be spelled like its command-line option in the config
file (`health-wait`) and the environment (GITOPS_AGENT_HEALTH_WAIT). Values are checked once, here, for
type and range, and an error names the flag, variable or file the bad value came from.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from agent.core._record import record
from agent.core.errors import ConfigError

__all__ = ["Settings", "build_settings", "default_installer", "ENV_PREFIX"]

ENV_PREFIX = "GITOPS_AGENT_"


@lru_cache(maxsize=1)
def default_installer() -> str:
    """uv whenever its binary runs here (the package depends on `uv`, which ships it), else pip.

    Asked once per process: a default, not a per-environment decision (an environment's `installer:`
    and `--installer` still choose). Changing it changes the venv identity of environments that do not
    say, so the first reconcile after an upgrade rebuilds them once."""
    from agent.drivers.venv import find_uv

    return "uv" if find_uv() else "pip"


@record
class Settings:
    repo: str | None = None
    ref: str = "main"
    path: str = ""                          # the state's subdir inside the repo (tiers: a dir per tier)
    host: str = socket.gethostname()
    root: Path = Path("/var/lib/gitops-agent")
    supervisor: str = "embedded"            # embedded | unix:///path/to/supervisor.sock
    retention: int = 3                      # venvs kept per environment
    installer: str = field(default_factory=default_installer)  # for environments that do not say: uv if it runs, else pip
    lb: str = "haproxy"                     # the load balancer for `traffic:`: haproxy | nginx (run under supervisord)
    lb_config: str | None = None            # drive a system LB instead: the config file it reads ...
    lb_reload: str | None = None            # ... and the command that reloads (or starts) it
    lb_metrics: str = "127.0.0.1:8405"      # HAProxy's Prometheus exporter (HOST:PORT, or "off"); DESIGN §5
    supervisor_web: str | None = None       # the embedded supervisord's web UI: HOST:PORT (or PORT: on 127.0.0.1)
    allow_root_services: bool = False
    health_wait_s: float = 30.0             # how long a (re)started service may take to become healthy
    listen: str = "127.0.0.1:9400"
    mode: str = "enforce"                   # enforce | warn (drift reported, not healed)
    apply_commits: bool = False             # in warn mode, still apply a new commit (intended change)
    poll_interval_s: float = 15.0
    refs_url: str | None = None             # poll this static info/refs (HTTP ETag, 304) instead of git ls-remote
    verify_signatures: bool = False         # apply only commits signed by a trusted key
    trusted_keys: str | None = None         # OpenPGP public keyring file (armored or binary)
    allowed_signers: str | None = None      # SSH allowed-signers file (gpg.ssh.allowedSignersFile)
    require_fast_forward: bool = False      # refuse a tracked ref whose history was rewritten
    age_identity: str | None = None         # age identity file(s) (`:`-separated) that decrypt the apps' secrets
    allow_chaos: bool = False               # act on apps' `chaos:` blocks (otherwise they are ignored, with a note)
    splay: float = 0.0                      # the daemon's first poll waits a random 0..splay seconds
    webhook_secret_file: str | None = None  # `run`: POST /hooks/git signed with this secret triggers a fetch
    ignore_windows: bool = False            # apply outside release windows (an emergency fix)
    notify: str | None = None               # Apprise URLs (whitespace-separated) that get the agent's events
    log_format: str = "text"                # text | json
    log_level: str = "INFO"

    @property
    def age_identities(self) -> tuple[Path, ...]:
        return tuple(Path(p).expanduser() for p in (self.age_identity or "").split(os.pathsep) if p)

    @property
    def supervisor_web_address(self) -> str | None:
        """--supervisor-web as HOST:PORT, loopback when only a port is given."""
        if not self.supervisor_web:
            return None
        return self.supervisor_web if ":" in self.supervisor_web else f"127.0.0.1:{self.supervisor_web}"

    @property
    def lb_metrics_address(self) -> str | None:
        """--lb-metrics, "off" as None."""
        return None if self.lb_metrics == "off" else self.lb_metrics

    def check(self, sources: Mapping[str, str] | None = None) -> "Settings":
        """Raise one ConfigError naming every bad value (and where it came from, given `sources`)."""
        problems = _problems(self)
        if problems:
            sources = sources or {}
            lines = [f"{_origin(name, sources.get(name))}: {text}" for name, text in problems]
            raise ConfigError(lines[0] if len(lines) == 1 else "invalid settings:\n  " + "\n  ".join(lines))
        return self


_TYPES = {f.name: f.type for f in fields(Settings)}
# Settings whose command-line option is not the field's name: the option's name works as a key in the
# config file and as GITOPS_AGENT_<NAME> too (GITOPS_AGENT_HEALTH_WAIT), as the CLI help promises.
_OPTION = {"health_wait_s": "health_wait", "poll_interval_s": "poll_interval"}
_ALIAS = {option: name for name, option in _OPTION.items()}
# Allowed ranges of the numeric settings: (low, low allowed?, high, unit). A value outside is refused
# at start, not met later as a gate that always fails (health wait 0) or a loop that spins (poll 0).
_RANGES: dict[str, tuple[float, bool, float, str]] = {
    "retention": (1, True, 100, "venvs"),
    "health_wait_s": (0, False, 3600, "seconds"),
    "poll_interval_s": (0, False, 86400, "seconds"),
    "splay": (0, True, 86400, "seconds"),
}
_CHOICES = {
    "mode": ("enforce", "warn"),
    "lb": ("haproxy", "nginx"),
    "installer": ("pip", "uv"),
    "log_format": ("text", "json"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
}
_KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "a yes/no value", "Path": "a path"}


def _range_text(low: float, low_ok: bool, high: float, unit: str) -> str:
    return f"{'at least' if low_ok else 'more than'} {low:g} and at most {high:g} {unit}"


def _problems(s: Settings) -> list[tuple[str, str]]:
    """(setting, what is wrong) for every bad value: all of them, not just the first."""
    found: list[tuple[str, str]] = []
    for name, (low, low_ok, high, unit) in _RANGES.items():
        value = getattr(s, name)
        inside = math.isfinite(value) and (value >= low if low_ok else value > low) and value <= high
        if not inside:
            found.append((name, f"{value:g} is out of range: it must be {_range_text(low, low_ok, high, unit)}"))
    for name, allowed in _CHOICES.items():
        value = getattr(s, name)
        if (value.upper() if name == "log_level" else value) not in allowed:
            found.append((name, f"must be {' or '.join(allowed)}, not {value!r}"))
    if s.supervisor != "embedded" and not s.supervisor.startswith("unix://"):
        found.append(("supervisor", f"must be 'embedded' or unix:///path/to.sock, not {s.supervisor!r}"))
    if s.refs_url and not s.refs_url.startswith(("http://", "https://")):
        found.append(("refs_url", "must be an http:// or https:// URL of the repo's info/refs"))
    if s.path and (os.path.isabs(s.path) or ".." in Path(s.path).parts):
        found.append(("path", f"{s.path!r} must be a relative subdirectory of the repo"))
    for identity in s.age_identities:
        if not identity.is_file():
            found.append(("age_identity", f"{str(identity)!r} is not a file (an age identity file, e.g. made by age-keygen)"))
    _host, sep, port = s.listen.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        found.append(("listen", f"must be HOST:PORT with a port from 1 to 65535, not {s.listen!r}"))
    if s.supervisor_web:
        _host, _sep, port = s.supervisor_web.rpartition(":")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            found.append(("supervisor_web", f"must be HOST:PORT or PORT (on 127.0.0.1), not {s.supervisor_web!r}"))
        elif s.supervisor != "embedded":
            found.append(("supervisor_web", "is for the embedded supervisord: an existing one has its own config"))
    if s.lb_metrics != "off":
        _host, sep, port = s.lb_metrics.rpartition(":")
        if not sep or not _host or not port.isdigit() or not 1 <= int(port) <= 65535:
            found.append(("lb_metrics", f"must be HOST:PORT with a port from 1 to 65535, or off, not {s.lb_metrics!r}"))
    return found


def _origin(name: str, source: str | None) -> str:
    """How a person finds the value: the flag, the variable or the config file it came from."""
    if source is None or source == "flag":
        return "--" + _OPTION.get(name, name).replace("_", "-")
    return source


def _coerce(name: str, value: Any, source: str) -> Any:
    """A value of the setting's type, from a flag, a variable (always text) or YAML (any type)."""
    kind = _TYPES[name]
    base = kind.replace(" | None", "")
    if value is None and kind != base:
        return None
    converted = _converted(base, value)
    if converted is None:
        hint = {"bool": " (true/false, yes/no, on/off, 1/0)"}.get(base, "")
        if base in ("str", "Path") and isinstance(value, (int, float, bool)):
            hint = f" but YAML read it as {type(value).__name__}: quote it"   # ref: 1.10 would be 1.1
        raise ConfigError(f"{_origin(name, source)}: {value!r} is not {_KIND_WORDS.get(base, 'a string')}{hint}")
    return converted


def _converted(base: str, value: Any) -> Any:
    """`value` as a `base` ("int", "float", "bool", "Path", "str"), or None if it is not one."""
    if base == "bool":
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if isinstance(value, str) else None
        return True if word in ("1", "true", "yes", "on") else False if word in ("0", "false", "no", "off", "") else None
    if base in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return None
        try:
            number = float(value)
        except ValueError:
            return None
        if base == "float":
            return number
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return None
        return int(number) if number.is_integer() else None
    if not isinstance(value, str):
        return None
    return Path(value).expanduser() if base == "Path" else value


def _canonical_keys(items: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Keys as field names ('health-wait' -> health_wait_s); two spellings of one setting are an error."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in items.items():
        name = str(key).replace("-", "_")
        name = _ALIAS.get(name, name)
        if name in spelled:
            raise ConfigError(f"{where}: {spelled[name]!r} and {key!r} both set {name}: keep one")
        spelled[name] = str(key)
        out[name] = value
    return out


def _from_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of setting: value")
    values = _canonical_keys(data, f"config file {path}")
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        known = ", ".join(sorted(_OPTION.get(n, n) for n in _TYPES))
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)} (known: {known})")
    return values


def build_settings(cli: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Settings:
    """Merge the sources, highest first: flags > GITOPS_AGENT_* > --config file > defaults.

    A value None in `cli` means "not given". Errors name the flag, variable or file a bad value came from.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config = cli.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    if config:
        for name, value in _from_file(Path(config)).items():
            merged[name], sources[name] = value, f"{name} in config file {config}"
    from_env: dict[str, str] = {}
    for name in _TYPES:
        for key in {ENV_PREFIX + name.upper(), ENV_PREFIX + _OPTION.get(name, name).upper()}:
            if key in environ:
                if name in from_env:
                    raise ConfigError(f"{from_env[name]} and {key} both set {name}: keep one")
                from_env[name] = key
                merged[name], sources[name] = environ[key], key
    for name, value in cli.items():
        if name in _TYPES and value is not None:
            merged[name], sources[name] = value, "flag"
    values = {k: _coerce(k, v, sources[k]) for k, v in merged.items()}
    settings = replace(Settings(), **values)
    settings = replace(settings, root=Path(os.path.abspath(settings.root)))
    return settings.check(sources)
