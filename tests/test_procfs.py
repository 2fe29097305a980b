"""agent.drivers._procfs against real processes: who holds a port's listener, and when a process
catches a signal. No mocks: the listeners are python processes on 127.0.0.1 / ::1, killed afterwards."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys

import pytest

from agent.drivers import _procfs
from agent.drivers._procfs import (Listener, catches_signal, children, holds_listener, holds_url_listener,
                                   listener_pids, listeners, process_tree)
from conftest import free_port

pytestmark = pytest.mark.timeout(60)

TREE = """
import os, socket, subprocess, sys, time
depth, host = int(sys.argv[1]), sys.argv[2]
if depth:   # a parent that does not listen itself: a descendant does
    child = subprocess.Popen([sys.executable, __file__, str(depth - 1), host], stdout=subprocess.PIPE, text=True)
    print(child.stdout.readline().strip(), flush=True)
    child.wait()
elif host == "-":   # never listens
    print(os.getpid(), 0, flush=True)
    time.sleep(60)
else:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0))
    s.listen()
    print(os.getpid(), s.getsockname()[1], flush=True)
    time.sleep(60)
"""


@pytest.fixture
def spawn(tmp_path):
    """spawn(depth, host) -> (root pid, pid of the listening descendant, its port); whole trees killed after."""
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    procs: list[subprocess.Popen] = []

    def _spawn(depth: int, host: str) -> tuple[int, int, int]:
        proc = subprocess.Popen([sys.executable, str(script), str(depth), host], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        procs.append(proc)
        pid, port = proc.stdout.readline().split()
        return proc.pid, int(pid), int(port)

    yield _spawn
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_a_process_holds_the_port_it_listens_on(spawn):
    root, listener, port = spawn(0, "127.0.0.1")
    assert listener == root
    assert holds_listener(root, port)
    assert listener_pids(port) == {root}
    assert not holds_listener(root, free_port())


def test_a_grandchild_listener_counts_for_its_ancestors(spawn):
    root, listener, port = spawn(2, "127.0.0.1")
    assert listener != root and len(process_tree(root)) == 3
    assert listener_pids(port) == {listener}     # the socket is the grandchild's alone
    assert holds_listener(root, port)
    assert holds_listener(next(iter(children(root))), port)
    assert holds_listener(listener, port)


def test_the_children_files_and_the_full_scan_see_the_same_tree(spawn, monkeypatch):
    """process_tree walks /proc/<pid>/task/<tid>/children where the kernel has them; without them it reads
    every process's stat: both give the same descendants."""
    root, listener, _ = spawn(2, "127.0.0.1")
    walked = process_tree(root)
    monkeypatch.setattr(_procfs, "_HAS_CHILDREN_FILES", False)
    assert process_tree(root) == walked and listener in walked and len(walked) == 3


def test_another_process_answering_the_port_does_not_count(spawn):
    """Issue 12 item 4: a service whose port another process already serves passed its health gate on
    the other process's answer. The port answers, yet the service's tree holds no listener there."""
    service, _, _ = spawn(1, "-")
    other, _, taken = spawn(0, "127.0.0.1")
    unrelated, _, elsewhere = spawn(0, "127.0.0.1")
    socket.create_connection(("127.0.0.1", taken), timeout=5).close()   # someone answers
    assert not holds_listener(service, taken)
    assert not holds_listener(service, elsewhere)
    assert holds_listener(other, taken) and not holds_listener(other, elsewhere)
    assert listener_pids(taken) == {other} and listener_pids(elsewhere) == {unrelated}
    assert not holds_url_listener(service, f"http://127.0.0.1:{taken}/healthz")
    assert holds_url_listener(other, f"http://localhost:{taken}/healthz")


@pytest.mark.parametrize("bind, reached", [
    ("127.0.0.1", {"127.0.0.1": True, "::1": False, "localhost": True, None: True}),
    ("::1", {"127.0.0.1": False, "[::1]": True, "localhost": True, None: True}),
    ("::ffff:127.0.0.1", {"127.0.0.1": True, "::1": False, None: True}),   # IPv4-mapped, in /proc/net/tcp6
])
def test_ipv4_and_ipv6_listeners(spawn, bind, reached):
    root, _, port = spawn(1, bind)
    for host, want in reached.items():
        assert holds_listener(root, port, host) is want, host
    [sock] = [s for s in listeners() if s.port == port]
    assert sock.ip == ipaddress.ip_address(bind)


@pytest.mark.parametrize("bound, host, want", [
    ("0.0.0.0", "127.0.0.1", True),
    ("0.0.0.0", "::1", False),
    ("::", "::1", True),
    ("::", "127.0.0.1", True),          # dual-stack (net.ipv6.bindv6only=0, Linux's default)
    ("127.0.0.2", "127.0.0.1", False),
    ("127.0.0.1", "::ffff:127.0.0.1", True),
    ("0.0.0.0", "::ffff:127.0.0.1", True),
    ("::1", None, True),
])
def test_wildcard_binds_reach_every_address_of_their_family(bound, host, want):
    """Table-driven (wildcard listeners would expose the test host beyond 127.0.0.1)."""
    sock = Listener("1", ipaddress.ip_address(bound), 80)
    assert sock.accepts(None if host is None else ipaddress.ip_address(host)) is want


def test_a_host_name_is_refused_not_looked_up(spawn):
    root, _, port = spawn(0, "127.0.0.1")
    with pytest.raises(ValueError):
        holds_listener(root, port, "example.org")
    with pytest.raises(ValueError):
        holds_url_listener(root, f"tcp://127.0.0.1:{port}")
    assert holds_url_listener(root, f"http://127.0.0.1:{port}")
    assert not holds_url_listener(root, "http://[::1]/")    # port 80


def test_a_process_that_is_gone_holds_nothing(spawn):
    _, _, port = spawn(0, "127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not holds_listener(proc.pid, port)
    assert catches_signal(proc.pid, signal.SIGUSR2) is None


def test_catches_signal_follows_the_disposition():
    code = ("import signal, sys, time\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2}); print('blocked', flush=True); sys.stdin.readline()\n"
            "signal.signal(signal.SIGUSR2, lambda *_: None); print('caught, blocked', flush=True); sys.stdin.readline()\n"
            "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2}); print('caught', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        seen = []
        for _ in range(3):
            seen.append((proc.stdout.readline().strip(), catches_signal(proc.pid, signal.SIGUSR2)))
            proc.stdin.write("\n")
            proc.stdin.flush()
        assert seen == [("blocked", False), ("caught, blocked", False), ("caught", True)]
        assert catches_signal(proc.pid, signal.SIGHUP) is False   # default action
    finally:
        proc.kill()
        proc.wait()


def test_netlink_and_proc_net_tcp_list_the_same_listeners() -> None:
    """`listeners()` asks sock_diag (netlink); /proc/net/tcp{,6} is the fallback. Both name the same sockets,
    IPv4 and IPv6, by inode, address and port, and neither lists a socket that is not listening."""
    opened = []
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"), (socket.AF_INET6, "::")):
            s = socket.socket(family)
            opened.append(s)
            s.bind((host, 0))
            s.listen()
        idle = socket.socket()
        opened.append(idle)
        idle.bind(("127.0.0.1", 0))            # bound, never listening
        by_diag = {(x.inode, x.ip, x.port) for x in _procfs._diag_listeners()}
        by_proc = {(x.inode, x.ip, x.port) for x in _procfs._proc_listeners()}
        assert by_diag == by_proc
        ours = {(ipaddress.ip_address(s.getsockname()[0]), s.getsockname()[1]) for s in opened[:3]}
        assert ours <= {(ip, port) for _, ip, port in by_diag}
        assert idle.getsockname()[1] not in {port for _, _, port in by_diag}
        assert {(x.inode, x.ip, x.port) for x in listeners()} == by_diag
    finally:
        for s in opened:
            s.close()
