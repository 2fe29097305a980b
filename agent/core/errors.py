"""Named error types. The type says what went wrong and whether a retry can help.

`Permanent` errors need a person (a bad revision, a refused root service); `Temporary`
errors may pass on their own (a network blip, a busy supervisord) and are retried with backoff.
"""

from __future__ import annotations

from agent.core._record import record

__all__ = [
    "AgentError",
    "Permanent",
    "Temporary",
    "Problem",
    "InvalidState",
    "SourceError",
    "BuildError",
    "InvalidVenvRef",
    "SupervisorError",
    "HealthCheckFailed",
    "ConfigError",
    "LockHeld",
]


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class Permanent(AgentError):
    """Retrying will not help until the input changes."""


class Temporary(AgentError):
    """May succeed on retry (after backoff)."""


@record
class Problem:
    """One validation finding: where (file, line, field) and what is wrong."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class InvalidState(Permanent, ValueError):
    """A revision of the state repo is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid state")


class ConfigError(Permanent, ValueError):
    """The agent's own configuration (CLI flags, env vars, config file) is wrong."""


class SourceError(Temporary):
    """Fetching or checking out the state repo failed."""


class BuildError(AgentError):
    """Building or verifying a virtualenv failed; the previous venv stays in use."""


class InvalidVenvRef(BuildError, Permanent, ValueError):
    """An environment name or venv identity that cannot be a path component under the root (it could
    leave it, or is not a content address). It comes from the revision or the plan, so a retry of the
    same input cannot help: a person must fix the name."""


class SupervisorError(AgentError):
    """supervisord refused or failed an operation (XML-RPC fault mapped to a sentence)."""

    def __init__(self, message: str, code: int | None = None):
        self.code = code
        super().__init__(message)


class HealthCheckFailed(AgentError):
    """A service did not become healthy within its timeout after a (re)start."""


class LockHeld(Permanent):
    """Another agent already holds the lock on this root."""
