"""Run a release job (a migration) to completion: in its venv, as its user, in the app's data dir, with its
env passed in-process (secret values never on a command line or in a config), output to private log files,
killed with its whole process group when it outlives its timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from agent.core._record import record
from agent.core.errors import Temporary
from agent.core.redact import whole_lines_tail

__all__ = ["JobFailed", "JobRun", "run_job"]

_KILL_GRACE_S = 5.0
_TAIL_BYTES = 2000


class JobFailed(Temporary):
    """A job exited non-zero, timed out or could not start. Temporary: the next reconcile tries again after a
    backoff (a database that was down may be back); nothing of its environment switched meanwhile."""


@record
class JobRun:
    exit_code: int
    seconds: float
    stderr_tail: str


def _tail(path: Path, nbytes: int = _TAIL_BYTES) -> str:
    """The end of a job's stderr, in whole lines (a line cut at its start could begin inside a secret value)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - nbytes))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return whole_lines_tail(text, nbytes, capped=size > nbytes)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_job(name: str, command: tuple[str, ...], *, cwd: Path, env: dict[str, str], logs: Path, timeout_s: float,
            user: str | None = None) -> JobRun:
    """Run `command` to its end. Its stdout and stderr go to `<logs>/job-<name>.{out,err}.log` (0600, replaced
    each run). JobFailed names the exit code or timeout with the stderr tail (the caller redacts secrets)."""
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True, mode=0o750)
    base = f"job-{name.replace('/', '-')}"
    out_path, err_path = logs / f"{base}.out.log", logs / f"{base}.err.log"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    out_fd, err_fd = os.open(out_path, flags, 0o600), os.open(err_path, flags, 0o600)
    started = time.monotonic()
    try:
        os.fchmod(out_fd, 0o600)
        os.fchmod(err_fd, 0o600)
        try:
            proc = subprocess.Popen(list(command), cwd=cwd, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                    stdout=out_fd, stderr=err_fd, start_new_session=True, user=user)
        except OSError as exc:
            raise JobFailed(f"job {name} could not start {command[0]}: {exc.strerror or exc}") from None
    finally:
        os.close(out_fd)
        os.close(err_fd)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        tail = _tail(err_path)
        raise JobFailed(f"job {name} timed out after {timeout_s:g}s and was killed"
                        + (f"; stderr tail:\n{tail}" if tail else "")) from None
    finally:
        if proc.poll() is None:      # interrupted (the agent is stopping): leave nothing behind
            _kill_group(proc)
    seconds = time.monotonic() - started
    tail = _tail(err_path)
    if code != 0:
        raise JobFailed(f"job {name} exited {code} after {seconds:.1f}s" + (f"; stderr tail:\n{tail}" if tail else "")
                        + f" (full output: {err_path})")
    return JobRun(code, seconds, tail)
