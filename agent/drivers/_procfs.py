"""What /proc says about processes: a load balancer's master and workers, who still accepts, and
which process tree holds a port's listener.

Why: after a reload, the new worker answers its control socket a moment before the old workers stop
accepting (measured: HAProxy 2.6 old workers kept their listening socket ~1.4 ms after the new worker
answered `show info`, in 3 of 20 reloads). A request in that window is served with the old config, so a
driver that calls a reload done must also wait for the old workers to let go of their listeners.
Linux-only; without /proc every answer is "nothing", and the drivers then skip that wait.

Why signal dispositions: HAProxy's master (-W) discards a SIGUSR2 that arrives while it starts or
re-executes after a reload (it has SIGUSR2 blocked, then sets it to SIG_IGN, which drops a pending
one, and only catches it once its loop runs), and its new worker answers the stats socket before that.
So a reload is sent only once /proc says the master catches SIGUSR2 and does not block it.

Why listener ownership: a health check that connects to a port only proves that *someone* answers
there. A service that binds late (or never) to a port another process already serves passed its gate
on the other process's answer; `holds_listener` says whether the service's own process tree listens.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

from agent.core._record import record

__all__ = [
    "master_pid",
    "children",
    "process_tree",
    "Listener",
    "listeners",
    "listening_inodes",
    "listening_pids",
    "listener_pids",
    "holds_listener",
    "holds_url_listener",
    "wait_retired",
    "catches_signal",
    "wait_catches_signal",
]

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_TCP_LISTEN = "0A"


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


def wait_master_pid(pid_path: Path, program: bytes, *, timeout: float, poll: float) -> int | None:
    """`master_pid`, polled until it answers or `timeout` passes.

    A master re-executing itself (HAProxy's reload) shows an empty /proc/<pid>/cmdline for about a
    millisecond while execve swaps its image: read at that moment, a live master looked gone.
    """
    deadline = time.monotonic() + timeout
    while (pid := master_pid(pid_path, program)) is None and time.monotonic() < deadline:
        time.sleep(poll)
    return pid


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (empty without /proc): one scan serves every question."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1:
            out[int(stat.parent.name)] = int(fields[1])
    return out


def children(parent: int | None) -> set[int]:
    """Pids whose parent is `parent` (empty without /proc or parent)."""
    if parent is None:
        return set()
    return {pid for pid, ppid in _parents().items() if ppid == parent}


def process_tree(root: int) -> set[int]:
    """`root` and all its descendants (a process that daemonized away from `root` is not among them).

    Walked down through each thread's `children` file (a few reads for a service's tree) where the kernel
    has them (CONFIG_PROC_CHILDREN), instead of reading every process's `stat` (a health gate's ~300 reads
    on a busy host). A child forked while the walk reads may be missed, as with any /proc scan: callers that
    wait poll again."""
    if _HAS_CHILDREN_FILES:
        kids_of = _children_files
    else:
        kids: dict[int, list[int]] = {}
        for pid, ppid in _parents().items():
            kids.setdefault(ppid, []).append(pid)
        kids_of = lambda pid: kids.get(pid, ())   # noqa: E731
    out, todo = {root}, [root]
    while todo:
        for kid in kids_of(todo.pop()):
            if kid not in out:
                out.add(kid)
                todo.append(kid)
    return out


_HAS_CHILDREN_FILES = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _children_files(pid: int) -> list[int]:
    """The children of every thread of `pid`, from /proc/<pid>/task/<tid>/children."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                kids += map(int, fh.read().split())
        except OSError:
            continue
    return kids


@record
class Listener:
    """A TCP socket in LISTEN state, as /proc/net/tcp{,6} lists it."""

    inode: str
    ip: _IP
    port: int

    def accepts(self, host: _IP | None) -> bool:
        """Whether a connection to `host`:port reaches this socket (None: any host).

        A wildcard IPv6 socket (`::`) counts for IPv4 too: Linux's default (net.ipv6.bindv6only=0) is
        dual-stack, and /proc does not show a socket's IPV6_V6ONLY.
        """
        if host is None or self.ip == host or self.ip.is_unspecified and self.ip.version == host.version:
            return True
        if self.ip.version == 6 and host.version == 4:
            return self.ip == ipaddress.IPv6Address("::") or self.ip.ipv4_mapped == host
        if self.ip.version == 4 and host.version == 6:
            return host.ipv4_mapped is not None and (self.ip == host.ipv4_mapped or self.ip.is_unspecified)
        return False


def _address(hexaddr: str) -> _IP:
    """/proc/net/tcp{,6} `local_address` IP: 32-bit words in host (little-endian) byte order."""
    raw = b"".join(bytes.fromhex(hexaddr[i:i + 8])[::-1] for i in range(0, len(hexaddr), 8))
    return ipaddress.ip_address(raw)


def listeners() -> list[Listener]:
    """Every TCP socket in LISTEN state (IPv4 and IPv6); empty without /proc.

    Asked of the kernel's socket diagnostics (netlink, what `ss -lt` uses): reading /proc/net/tcp walks the
    whole connection hash table whatever is in it, 5 ms per file on a host with 262,144 buckets (measured
    here), twice per health gate on the path of every release and rollback; the netlink dump of listeners
    alone takes microseconds. /proc/net/tcp{,6} where netlink sockets are refused (a seccomp sandbox)."""
    try:
        return _diag_listeners()
    except OSError:
        return _proc_listeners()


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): one dump request per address family, LISTEN state only
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLMSG_ERROR, _NLMSG_DONE = 4, 20, 2, 3
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_TCPF_LISTEN = 1 << 10
_NLMSG_HEADER = "=IHHII"            # length, type, flags, sequence, port id
_DIAG_REQUEST = "=BBBBI48x"         # family, protocol, extensions, pad, states, socket id (any)
_DIAG_MESSAGE = "=BBBB2s2s16s16sIQIIIII"   # family, state, timer, retrans, id (sport, dport, src, dst, if,
#                                            cookie), expires, rqueue, wqueue, uid, inode


def _diag_listeners() -> list[Listener]:
    import socket
    import struct

    out: list[Listener] = []
    header, message = struct.calcsize(_NLMSG_HEADER), struct.calcsize(_DIAG_MESSAGE)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            body = struct.pack(_DIAG_REQUEST, family, socket.IPPROTO_TCP, 0, 0, _TCPF_LISTEN)
            sock.send(struct.pack(_NLMSG_HEADER, header + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP,
                                  seq, 0) + body)
            done = False
            while not done:
                data, offset = sock.recv(65536), 0
                while offset + header <= len(data):
                    length, kind, _, _, _ = struct.unpack_from(_NLMSG_HEADER, data, offset)
                    if kind == _NLMSG_ERROR:
                        errno = -struct.unpack_from("=i", data, offset + header)[0]
                        raise OSError(errno, "sock_diag refused the dump")
                    if kind == _NLMSG_DONE or length < header:
                        done = True
                        break
                    if kind == _SOCK_DIAG_BY_FAMILY and length >= header + message:
                        fields = struct.unpack_from(_DIAG_MESSAGE, data, offset + header)
                        raw = fields[6][:4] if fields[0] == socket.AF_INET else fields[6]
                        out.append(Listener(inode=str(fields[-1]), ip=ipaddress.ip_address(raw),
                                            port=int.from_bytes(fields[4], "big")))
                    offset += (length + 3) & ~3
    return out


def _proc_listeners() -> list[Listener]:
    out: list[Listener] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _TCP_LISTEN:
                addr, _, port = fields[1].rpartition(":")
                out.append(Listener(inode=fields[9], ip=_address(addr), port=int(port, 16)))
    return out


def listening_inodes() -> set[str]:
    """Socket inodes of every TCP socket in LISTEN state (IPv4 and IPv6)."""
    return {sock.inode for sock in listeners()}


def _holds_any(pid: int, inodes: set[str]) -> bool:
    """True while process `pid` has a file descriptor on one of the socket `inodes`."""
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
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def listening_pids(pids: Iterable[int], listening: set[str] | None = None) -> list[int]:
    """The pids among `pids` that still hold a listening TCP socket, i.e. can still accept.

    `listening` (from `listening_inodes()`) can be read once and reused while waiting for old workers
    to close theirs: /proc/net/tcp lists every connection of the host, so it is not re-read per poll.
    """
    if listening is None:
        listening = listening_inodes()
    return sorted(pid for pid in pids if _holds_any(pid, listening))


def _hosts(host: str | None) -> tuple[_IP | None, ...]:
    """The addresses a connection to `host` may go to: an IP literal (brackets allowed, as in a URL),
    `localhost` (127.0.0.1 or ::1, as the health-check schema and the conflicts check read it), or
    None for any. Raises ValueError for anything else (no name lookups here)."""
    if host is None:
        return (None,)
    if host.lower() == "localhost":
        return ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    return (ipaddress.ip_address(host.removeprefix("[").removesuffix("]")),)


def listener_pids(port: int, host: str | None = "127.0.0.1", among: Iterable[int] | None = None) -> set[int]:
    """Pids holding a LISTEN socket that a connection to `host`:`port` reaches: bound to `host`
    itself, to a wildcard (0.0.0.0, ::) or to `host` IPv4-mapped. `host`: see `_hosts`; `among`
    limits the search to those pids (default: every process /proc lets us read)."""
    wants = _hosts(host)
    inodes = {sock.inode for sock in listeners() if sock.port == port and any(map(sock.accepts, wants))}
    if not inodes:
        return set()
    if among is None:
        among = (int(p.name) for p in Path("/proc").glob("[0-9]*"))
    return {pid for pid in among if _holds_any(pid, inodes)}


def holds_listener(root_pid: int, port: int, host: str | None = "127.0.0.1") -> bool | None:
    """True when `root_pid` or one of its descendants holds a LISTEN socket that a connection to
    `host`:`port` reaches: the service itself answers, not some other process on that port. None when
    /proc cannot tell (no /proc/net/tcp): a caller then skips the check rather than fail on it.
    `host`: an IP literal, `localhost` or None (see `_hosts`)."""
    if not os.path.exists("/proc/net/tcp"):
        _hosts(host)     # the same ValueError for a bad host, with or without /proc
        return None
    return bool(listener_pids(port, host, among=process_tree(root_pid)))


def holds_url_listener(root_pid: int, url: str) -> bool | None:
    """`holds_listener` for the host and port of an http(s) health-check URL (80/443 by default)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return holds_listener(root_pid, port, parts.hostname)


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
