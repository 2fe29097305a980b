"""The load balancer the agent drives (HAProxy by default, or nginx), behind one small interface.

The planner only calls the pure parts (`fingerprint`, `program_text`, `drift`); the executor calls
`apply` and `wait_live`; facts come from `facts()`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from agent.core.errors import ConfigError
from agent.core.render.lb import Frontend
from agent.core.render.supervisor import render_program

__all__ = ["LoadBalancer", "LB_KINDS"]

LB_KINDS = ("haproxy", "nginx")


class LoadBalancer:
    """`config` + `reload`: drive a system load balancer (its config file, e.g. /etc/haproxy/haproxy.cfg,
    and the command that reloads or starts it, e.g. `systemctl reload-or-restart haproxy`) instead of
    running one under the agent's supervisord."""

    # the drivers' PROGRAM_NAME and config paths, known here without importing them (a no-op without
    # traffic must not pay for the driver modules); `driver` checks they agree.
    _PROGRAMS = {"haproxy": "gitops-lb-haproxy", "nginx": "gitops-lb-nginx"}
    _CONFIGS = {"haproxy": "lb/haproxy.cfg", "nginx": "lb/nginx/nginx.conf"}

    def __init__(self, kind: str, root: Path, binary: str | None = None, config: str | None = None,
                 reload: str | None = None, metrics: str | None = None):
        if kind not in LB_KINDS:
            raise ConfigError(f"lb must be one of {', '.join(LB_KINDS)}, not {kind!r}")
        if config is not None and not reload:
            raise ConfigError("--lb-config (a system load balancer) needs --lb-reload COMMAND")
        self.kind, self.root, self.binary = kind, Path(root), binary
        self.program_name = self._PROGRAMS[kind]
        self.managed = config is None
        self.config_path = Path(config) if config else self.root / self._CONFIGS[kind]
        self._reload_argv = None
        if reload:     # a system load balancer: the only use of shlex, not imported by every command
            import shlex

            self._reload_argv = shlex.split(reload)
        self.metrics = metrics if kind == "haproxy" else None   # nginx has no built-in Prometheus exporter
        self._driver = None

    @property
    def driver(self):
        if self._driver is None:
            if self.kind == "haproxy":
                from agent.drivers.haproxy import PROGRAM_NAME, HAProxyDriver

                driver = HAProxyDriver(self.root, haproxy_bin=self.binary or shutil.which("haproxy") or "haproxy",
                                       metrics=self.metrics)
            else:
                from agent.drivers.nginx import PROGRAM_NAME, NginxDriver

                driver = NginxDriver(self.root, nginx_bin=self.binary or shutil.which("nginx") or "nginx")
            assert PROGRAM_NAME == self.program_name
            if self.managed:
                assert driver.config_path == self.config_path
            else:
                driver.config_path = self.config_path
                argv = self._reload_argv
                driver.reload = lambda: _run_reload(argv)
            self._driver = driver
        return self._driver

    # -- pure ---------------------------------------------------------------------------------

    def program_text(self) -> str:
        return "; managed by gitops-agent: the load balancer\n" + render_program(self.driver.program_spec())

    def fingerprint(self, frontends: tuple[Frontend, ...]) -> str:
        """What must be live apart from weights: HAProxy's topology hash, nginx's config version."""
        if self.kind == "haproxy":
            return self.driver.topology(frontends)
        return self.driver.version_of(frontends)

    def drift(self, frontends: tuple[Frontend, ...], facts: dict | None) -> str:
        """Why the live load balancer differs from `frontends` ('' when it matches)."""
        from agent.drivers.haproxy import weights_of

        if not facts or not facts.get("running"):
            return f"{self.kind} is not running" + (f" ({facts['error']})" if facts and facts.get("error") else "")
        live = facts.get("topology") if self.kind == "haproxy" else facts.get("version")
        if self.kind == "nginx" and facts.get("edited"):
            return "the nginx config was edited by hand"
        if live != self.fingerprint(frontends):
            return "frontends or backends changed (config must be reloaded)"
        want, have = weights_of(frontends), facts.get("weights") or {}
        if want != have:
            diffs = [f"{fe}/{be} {have.get(fe, {}).get(be)}->{w}" for fe, bes in sorted(want.items())
                     for be, w in sorted(bes.items()) if have.get(fe, {}).get(be) != w]
            return "weights differ: " + ", ".join(diffs)
        return ""

    # -- side effects ---------------------------------------------------------------------------

    def has_config(self) -> bool:
        return self.config_path.exists()

    def facts(self) -> dict:
        return self.driver.facts()

    def apply(self, frontends: tuple[Frontend, ...], up: tuple[str, ...] = ()) -> str:
        """`up`: "frontend/backend" servers whose health the agent just checked (HAProxy only)."""
        applied = self.driver.apply(frontends, up=up) if up else self.driver.apply(frontends)
        if applied.action == "written":
            if self.managed:   # its supervisord program is started next, then verified live
                return f"{self.kind} config written; {self.kind} starts next"
            self.driver.reload()   # a system LB that is down: start it, prove it
            self.driver.wait_live(frontends)
            return f"{self.kind} (system) started with the desired frontends"
        changed = ", ".join(f"{fe}/{be} {old}->{new}" for fe, be, old, new in applied.changed)
        return f"{self.kind} {applied.action}" + (f": {changed}" if changed else "") + (f" ({applied.detail})" if applied.detail else "")

    def wait_live(self, frontends: tuple[Frontend, ...]) -> str:
        self.driver.wait_live(frontends)
        return f"{self.kind} serves the desired frontends"


def _run_reload(argv: list[str]) -> None:
    from agent.drivers.haproxy import LBError

    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise LBError(f"reload command {argv[0]} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}")
