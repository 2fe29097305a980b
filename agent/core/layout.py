"""Where things live under the agent's root. Pure path arithmetic, shared by planner and drivers."""

from __future__ import annotations

from pathlib import Path

from agent.core._record import record

__all__ = ["Layout"]


@record
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

    @property
    def apps(self) -> Path:
        """Per-app dirs: rendered files, secret env files, and the app's data dir."""
        return self.root / "apps"

    def app_dir(self, app: str) -> Path:
        return self.apps / app

    def data(self, app: str) -> Path:
        """The app's data dir (DESIGN §3a): kept across deploys and rollbacks, never pruned."""
        return self.app_dir(app) / "data"

    def files(self, app: str) -> Path:
        """Rendered files: `files/<name>` is the current one (a symlink into `files/.v/`)."""
        return self.app_dir(app) / "files"

    def file_version(self, app: str, digest: str, name: str) -> Path:
        """One rendered content of a file, content-addressed: what programs and jobs are given, so a
        rollback to the previous program config also gets the previous file."""
        return self.files(app) / ".v" / digest / name

    def secret_env(self, app: str, digest: str) -> Path:
        """A service's secret environment (mode 0600), content-addressed like file versions."""
        return self.app_dir(app) / "env" / f"{digest}.env"

    @property
    def launcher(self) -> Path:
        """The small exec wrapper that puts a secret env file into a program's environment."""
        return self.root / "bin" / "gitops-agent-exec"

    @property
    def jobs(self) -> Path:
        """Per job: the inputs digest of its last successful run."""
        return self.state / "jobs"

    @property
    def inputs_key(self) -> Path:
        """The host's key for input digests (HMAC): a digest shown in plan or facts reveals no secret."""
        return self.state / "inputs.key"

    def venv(self, name: str, identity: str) -> Path:
        return self.venvs / f"{name}-{identity}"
