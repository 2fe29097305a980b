"""Observed facts of a host, as plain data: the planner's other input. Gathering them is
`agent.service.facts.collect`; nothing here decides anything or touches the host."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, field

from agent.core._enum import StrEnum
from agent.core._record import record

__all__ = ["ProcessState", "VenvFact", "ProgramFact", "Facts", "text_digest"]


class ProcessState(StrEnum):
    """supervisord's process states (its `statename`), listed once; the groups below are what the agent
    decides with."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"
    UNKNOWN = "UNKNOWN"


DOWN_STATES = frozenset({ProcessState.STOPPED, ProcessState.EXITED, ProcessState.FATAL, ProcessState.BACKOFF})
"""Not running and not about to: a program in one of these will not turn healthy by waiting."""
STARTABLE_STATES = frozenset({ProcessState.STOPPED, ProcessState.EXITED, ProcessState.FATAL})
"""Stopped for good: `startProcess` is what brings it back (BACKOFF is supervisord still retrying)."""


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@record
class VenvFact:
    name: str
    current: str | None                       # identity envs/<name> points to (None: no symlink)
    complete: tuple[str, ...] = ()            # identities built and verified (marker present), newest first
    incomplete: tuple[str, ...] = ()          # dirs without marker: interrupted builds
    installed: tuple[tuple[str, str], ...] | None = None   # distributions in the current venv


@record
class ProgramFact:
    name: str
    file_text: str | None                     # our include file, None when missing
    state: str | None = None                  # supervisord statename; None: not loaded
    pid: int | None = None
    pending: str | None = None                # file on disk not yet applied: added / changed / removed
    spawnerr: str = ""
    verified: str | None = None               # sha256 of the config whose health gate last passed
    gated_pid: int | None = None              # the pid that passed it: another pid now means it exited since
    daemonized: str = ""                      # why it cannot be supervised (it forked away and exited), if so


@record
class Facts:
    supervisor: str                           # "running", "stopped" or "unreachable: <why>"
    venvs: dict[str, VenvFact] = field(default_factory=dict)
    programs: dict[str, ProgramFact] = field(default_factory=dict)
    traffic: dict | None = None               # the load balancer's own view: running, topology/version, weights
    files: dict[str, str] = field(default_factory=dict)   # path -> keyed digest of its content: apps' rendered
                                                          # files and secret env files, and the launcher
    links: dict[str, str] = field(default_factory=dict)   # apps' files/<name> -> where the symlink points
    jobs: dict[str, str] = field(default_factory=dict)    # "app/job" -> inputs digest of its last successful run
    data_dirs: frozenset[str] = frozenset()               # apps' data dirs that exist

    def to_json(self) -> dict:
        return {
            "supervisor": self.supervisor,
            "venvs": {k: asdict(v) for k, v in sorted(self.venvs.items())},
            "programs": {k: asdict(v) for k, v in sorted(self.programs.items())},
            "traffic": self.traffic,
            "files": dict(sorted(self.files.items())),
            "jobs": dict(sorted(self.jobs.items())),
        }
