"""The agent's own configuration: CLI flags > GITOPS_AGENT_* environment > --config YAML > defaults."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from agent.core.errors import ConfigError

__all__ = ["Settings", "build_settings", "ENV_PREFIX"]

ENV_PREFIX = "GITOPS_AGENT_"


@dataclass(frozen=True)
class Settings:
    repo: str | None = None
    ref: str = "main"
    path: str = ""                          # the state's subdir inside the repo (tiers: a dir per tier)
    host: str = socket.gethostname()
    root: Path = Path("/var/lib/gitops-agent")
    supervisor: str = "embedded"            # embedded | unix:///path/to/supervisor.sock
    retention: int = 3                      # venvs kept per environment
    installer: str = "pip"                  # default for environments that do not say
    lb: str = "haproxy"                     # the load balancer for `traffic:`: haproxy | nginx (run under supervisord)
    lb_config: str | None = None            # drive a system LB instead: the config file it reads ...
    lb_reload: str | None = None            # ... and the command that reloads (or starts) it
    allow_root_services: bool = False
    health_wait_s: float = 30.0             # how long a (re)started service may take to become healthy
    listen: str = "127.0.0.1:9400"
    mode: str = "enforce"                   # enforce | warn (drift reported, not healed)
    apply_commits: bool = False             # in warn mode, still apply a new commit (intended change)
    poll_interval_s: float = 15.0
    verify_signatures: bool = False         # apply only commits signed by a trusted key
    trusted_keys: str | None = None         # OpenPGP public keyring file (armored or binary)
    allowed_signers: str | None = None      # SSH allowed-signers file (gpg.ssh.allowedSignersFile)
    require_fast_forward: bool = False      # refuse a tracked ref whose history was rewritten
    allow_chaos: bool = False               # act on apps' `chaos:` blocks (otherwise they are ignored, with a note)
    splay: float = 0.0                      # the daemon's first poll waits a random 0..splay seconds
    log_format: str = "text"                # text | json
    log_level: str = "INFO"

    def check(self) -> "Settings":
        if self.mode not in ("enforce", "warn"):
            raise ConfigError(f"mode must be enforce or warn, not {self.mode!r}")
        if self.lb not in ("haproxy", "nginx"):
            raise ConfigError(f"lb must be haproxy or nginx, not {self.lb!r}")
        if self.installer not in ("pip", "uv"):
            raise ConfigError(f"installer must be pip or uv, not {self.installer!r}")
        if self.supervisor != "embedded" and not self.supervisor.startswith("unix://"):
            raise ConfigError(f"supervisor must be 'embedded' or unix:///path/to.sock, not {self.supervisor!r}")
        if self.splay < 0:
            raise ConfigError(f"splay must be 0 or more seconds, not {self.splay:g}")
        if self.retention < 1:
            raise ConfigError("retention must be at least 1")
        if self.path and (os.path.isabs(self.path) or ".." in Path(self.path).parts):
            raise ConfigError(f"path {self.path!r} must be a relative subdirectory of the repo")
        return self


_TYPES = {f.name: f.type for f in fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    kind = _TYPES[name]
    try:
        if kind == "Path":
            return Path(value).expanduser()
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        return str(value) if value is not None else None
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {kind}") from None


def _from_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping")
    unknown = sorted(set(k.replace("-", "_") for k in data) - set(_TYPES))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_settings(cli: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Settings:
    """Merge the sources; a value None in `cli` means "not given"."""
    merged: dict[str, Any] = {}
    config = cli.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    if config:
        merged.update(_from_file(Path(config)))
    for name in _TYPES:
        if ENV_PREFIX + name.upper() in environ:
            merged[name] = environ[ENV_PREFIX + name.upper()]
    for name, value in cli.items():
        if name in _TYPES and value is not None:
            merged[name] = value
    values = {k: _coerce(k, v) for k, v in merged.items()}
    settings = replace(Settings(), **values)
    return replace(settings, root=Path(os.path.abspath(settings.root))).check()
