"""Where things live under the agent's root. Pure path arithmetic, shared by planner and drivers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def venvs(self) -> Path:
        return self.root / "venvs"

    @property
    def envs(self) -> Path:
        return self.root / "envs"

    @property
    def supervisor_dir(self) -> Path:
        return self.root / "supervisor"

    @property
    def programs(self) -> Path:
        """The include dir supervisord reads program files from (*.conf)."""
        return self.supervisor_dir / "programs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def status_file(self) -> Path:
        return self.state / "status.json"

    @property
    def verified(self) -> Path:
        """Per program: sha256 of the config whose health gate passed (a gate is never skipped by a crash)."""
        return self.state / "verified"

    @property
    def lock_file(self) -> Path:
        return self.root / "agent.lock"

    def venv(self, name: str, identity: str) -> Path:
        return self.venvs / f"{name}-{identity}"
