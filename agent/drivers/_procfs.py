"""What /proc says about a load balancer's processes: its master, its workers, who still accepts.

Why: after a reload, the new worker answers its control socket a moment before the old workers stop
accepting (measured: HAProxy 2.6 old workers kept their listening socket ~1.4 ms after the new worker
answered `show info`, in 3 of 20 reloads). A request in that window is served with the old config, so a
driver that calls a reload done must also wait for the old workers to let go of their listeners.
Linux-only; without /proc every answer is "nothing", and the drivers then skip that wait.

Why signal dispositions: HAProxy's master (-W) discards a SIGUSR2 that arrives while it starts or
re-executes after a reload (it has SIGUSR2 blocked, then sets it to SIG_IGN, which drops a pending
one, and only catches it once its loop runs), and its new worker answers the stats socket before that.
So a reload is sent only once /proc says the master catches SIGUSR2 and does not block it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["master_pid", "children", "listening_inodes", "holds_listener", "listening_pids", "wait_retired", "catches_signal",
           "wait_catches_signal"]


def master_pid(pid_path: Path, program: bytes) -> int | None:
    """The pid in `pid_path` if it is alive and its command line names `program`."""
    try:
        pid = int(pid_path.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    return pid if program in cmdline else None


def children(parent: int | None) -> set[int]:
    """Pids whose parent is `parent` (empty without /proc or parent)."""
    if parent is None:
        return set()
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(parent):
            out.add(int(stat.parent.name))
    return out


def listening_inodes() -> set[str]:
    """Socket inodes of every TCP socket in LISTEN state (IPv4 and IPv6)."""
    out: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                out.add(fields[9])
    return out


def holds_listener(pid: int, listening: set[str]) -> bool:
    """True while process `pid` has a file descriptor on one of the `listening` socket inodes."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening:
            return True
    return False


def listening_pids(pids: Iterable[int], listening: set[str] | None = None) -> list[int]:
    """The pids among `pids` that still hold a listening TCP socket, i.e. can still accept.

    `listening` (from `listening_inodes()`) can be read once and reused while waiting for old workers
    to close theirs: /proc/net/tcp lists every connection of the host, so it is not re-read per poll.
    """
    if listening is None:
        listening = listening_inodes()
    return sorted(pid for pid in pids if holds_listener(pid, listening))


def wait_retired(old: set[int], accepting: Callable[[Iterable[int]], list[int]], *, timeout: float,
                 poll: float) -> list[int]:
    """Poll until no pid of `old` is `accepting`; returns those still accepting at `timeout` ([]: all retired)."""
    deadline = time.monotonic() + timeout
    while True:
        still = accepting(old)
        if not still or time.monotonic() >= deadline:
            return still
        time.sleep(poll)


def catches_signal(pid: int, signum: int) -> bool | None:
    """True when process `pid` has a handler for `signum` and does not block it (a signal sent now
    reaches that handler); False while it ignores, blocks or leaves it at the default action; None
    when /proc cannot tell (no /proc, or no such process)."""
    masks = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("SigBlk", "SigCgt"):
                masks[key] = int(value, 16)
    except (OSError, ValueError):
        return None
    if len(masks) != 2:
        return None
    bit = 1 << (signum - 1)
    return bool(masks["SigCgt"] & bit) and not masks["SigBlk"] & bit


def wait_catches_signal(pid: int, signum: int, *, timeout: float, poll: float) -> bool:
    """Poll until `catches_signal(pid, signum)` is not False; False if it still is at `timeout`."""
    deadline = time.monotonic() + timeout
    while catches_signal(pid, signum) is False:
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True
