"""Requests lost while the load balancer's weights flip, through the real HAProxy and nginx drivers.

    python bench/bench_lb_switch.py [--flips N] [--threads T] [--pause S] [--drivers haproxy,nginx]

For each driver: an embedded supervisord in a temp root runs the load balancer (as the agent would),
in front of two tiny keep-alive HTTP backends. While `driver.apply()` flips the weights 90/10 <-> 10/90
N times, two bounded loads run at once: T threads each reusing one HTTP/1.1 connection (keep-alive,
no retry: a request on a connection the LB closed counts as a failure, then the thread reconnects),
and T threads opening a new connection per request. Prints requests, failures, flips, and how long
an apply took (the time from the agent deciding a weight to the LB serving it).

DESIGN §7 expectations: HAProxy (runtime API, no reload) 0 failures in both loads; nginx (a reload per
flip) 0 failures for new connections, ~9 lost keep-alive requests per reload.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

# isort: split
from agent.core.render.lb import Backend, Frontend
from agent.core.render.supervisor import render_program
from agent.drivers.haproxy import HAProxyDriver
from agent.drivers.nginx import NginxDriver
from agent.drivers.supervisor import EmbeddedSupervisor, write_program_file
from conftest import free_port, stop_process
from daemon_helpers import wait_until

BACKEND = TESTS / "lb_backend.py"   # answers its own name


def wait_port(port: int, timeout: float = 10.0) -> None:
    wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.2).close() or True, timeout,
               f"the backend on port {port}")


class Load:
    """`threads` workers until stopped (or `max_seconds`): keep-alive (one reused connection) or not."""

    def __init__(self, port: int, threads: int, keep_alive: bool, max_seconds: float):
        self.port, self.keep_alive, self.max_seconds = port, keep_alive, max_seconds
        self.ok = self.failed = 0
        self.errors: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.max_seconds + 10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn = None
        while not self._stop.is_set() and time.monotonic() < deadline:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                good, why = resp.status == 200, f"HTTP {resp.status}"
            except (OSError, http.client.HTTPException) as err:
                good, why = False, type(err).__name__
                conn.close()
                conn = None
            if not self.keep_alive and conn is not None:
                conn.close()
                conn = None
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.errors[why] = self.errors.get(why, 0) + 1
        if conn is not None:
            conn.close()


def run_driver(kind: str, binary: str, flips: int, threads: int, pause: float) -> None:
    with tempfile.TemporaryDirectory(prefix="lbb") as tmp:
        tmp_path = Path(tmp)
        procs, addrs = [], {}
        sup = EmbeddedSupervisor(tmp_path / "r")
        try:
            for name in ("blue", "green"):
                port = free_port()
                procs.append(subprocess.Popen([sys.executable, str(BACKEND), name, str(port)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                addrs[name] = f"127.0.0.1:{port}"
                wait_port(port)
            listen_port = free_port()

            def frontends(blue: int, green: int):
                return (Frontend("app", f"127.0.0.1:{listen_port}", (Backend("blue", addrs["blue"], blue),
                                                                     Backend("green", addrs["green"], green))),)

            driver = HAProxyDriver(sup.root, haproxy_bin=binary) if kind == "haproxy" else NginxDriver(sup.root, nginx_bin=binary)
            driver.apply(frontends(90, 10))
            client = sup.ensure_running()
            spec = driver.program_spec()
            write_program_file(sup.include_dir, spec.name, render_program(spec))
            client.update([spec.name])
            client.start(spec.name)
            driver.wait_live(frontends(90, 10))

            budget = flips * (pause + 1.0) + 30
            loads = {"keep-alive": Load(listen_port, threads, True, budget),
                     "new-conn": Load(listen_port, threads, False, budget)}
            for load in loads.values():
                load.start()
            time.sleep(pause)
            applies, actions = [], {}
            for i in range(flips):
                blue, green = (10, 90) if i % 2 == 0 else (90, 10)
                started = time.perf_counter()
                applied = driver.apply(frontends(blue, green))
                applies.append((time.perf_counter() - started) * 1000)
                actions[applied.action] = actions.get(applied.action, 0) + 1
                time.sleep(pause)
            for load in loads.values():
                load.stop()
            print(f"{kind} ({binary}): {flips} flips ({', '.join(f'{n} {a}' for a, n in actions.items())}); "
                  f"apply median {statistics.median(applies):.1f} ms, max {max(applies):.1f} ms")
            idle = []
            for i in range(10):
                started = time.perf_counter()
                driver.apply(frontends(*((10, 90) if i % 2 == 0 else (90, 10))))
                idle.append((time.perf_counter() - started) * 1000)
            print(f"  apply without load: median {statistics.median(idle):.1f} ms over 10 flips")
            for name, load in loads.items():
                per = load.failed / flips if flips else 0
                print(f"  {name:10s} {threads} threads: {load.ok + load.failed:7d} requests, {load.failed:4d} failed "
                      f"({per:.1f} per flip) {load.errors or ''}")
        finally:
            try:
                sup.stop()
            finally:
                for p in procs:
                    stop_process(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flips", type=int, default=30)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of load between flips")
    parser.add_argument("--drivers", default="haproxy,nginx")
    args = parser.parse_args()
    for kind in args.drivers.split(","):
        binary = shutil.which(kind) or shutil.which(kind, path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            print(f"{kind}: binary not installed, skipped")
            continue
        run_driver(kind, binary, args.flips, args.threads, args.pause)


if __name__ == "__main__":
    main()
