"""Fleet poll benchmark: many simulated agents doing the agent's no-op poll (`git ls-remote` of the tracked
ref, protocol v2 ref-prefix) against ONE `git daemon` on 127.0.0.1.

The server is `git daemon --inetd`, one per connection, behind a tiny accept loop that waits for each with
`os.wait4`: the rusage is exactly the server-side CPU of that poll (git daemon + the upload-pack it runs; a
standalone `git daemon` does not accumulate its children's CPU in /proc, so it cannot be measured from outside).
With nginx installed it then measures the same agents polling the repo's static `info/refs` (written by
`git update-server-info`) with If-None-Match, as `--refs-url` does (nginx answers 304 Not Modified).
Reports the server's CPU per poll and per-poll latency, for a burst (every agent at the same second: no splay) and for polls
spread over the interval (splay). Usage:

    python bench/bench_fleet_poll.py [--agents 200] [--rounds 5] [--interval 15] [--concurrency 32] [--refs 50]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# isort: split
from conftest import StateRepo, git


class InetdServer:
    """Accepts on 127.0.0.1 and runs `git daemon --inetd` per connection; sums each one's CPU (os.wait4)."""

    def __init__(self, base: Path):
        import socket

        self.base = base
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.cpu = 0.0
        self.lock = threading.Lock()
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        with conn:
            proc = subprocess.Popen(["git", "daemon", "--inetd", "--export-all", f"--base-path={self.base}",
                                     str(self.base)], stdin=conn.fileno(), stdout=conn.fileno(),
                                    stderr=subprocess.DEVNULL)
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = 0
        with self.lock:
            self.cpu += usage.ru_utime + usage.ru_stime

    def stop(self) -> None:
        self.stopping = True
        self.sock.close()


def cpu_s(server: InetdServer) -> float:
    with server.lock:
        return server.cpu


def make_repo(base: Path, refs: int) -> None:
    work = StateRepo(base / "work")
    for i in range(20):
        work.write(f"f{i}.yaml", f"value: {i}\n" * 50)
    work.commit("state")
    for i in range(refs):                      # other branches/tags a real state repo accumulates
        git(work.path, "tag", f"release-{i}")
    git(base, "clone", "-q", "--bare", str(work.path), str(base / "state.git"))


def poll(url: str) -> float:
    started = time.perf_counter()
    subprocess.run(["git", "ls-remote", url, "refs/heads/main", "refs/tags/main"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "GIT_PROTOCOL": "version=2"})
    return time.perf_counter() - started


def run(url: str, pid: InetdServer, agents: int, rounds: int, interval: float, concurrency: int, spread: bool) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    cpu0, wall0 = cpu_s(pid), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for r in range(rounds):
            start = time.perf_counter()
            offsets = sorted(random.uniform(0, interval) if spread else 0.0 for _ in range(agents))

            def one(offset: float) -> None:
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                lat = poll(url)
                with lock:
                    latencies.append(lat)

            list(pool.map(one, offsets))
            if not spread and r + 1 < rounds:
                time.sleep(max(0.0, start + interval - time.perf_counter()) if interval < 2 else 0.2)
    cpu = cpu_s(pid) - cpu0
    wall = time.perf_counter() - wall0
    latencies.sort()
    n = len(latencies)
    return {"polls": n, "server_cpu_ms_per_poll": 1000 * cpu / n, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (n - 1))], "max_ms": 1000 * latencies[-1],
            "server_cpu_s": cpu, "wall_s": wall}


NGINX_CONF = """\
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""


class NginxServer:
    """nginx in one process (master_process off) serving the bare repo's info/refs (git update-server-info):
    its /proc utime+stime is the server-side CPU of the HTTP polls."""

    def __init__(self, base: Path):
        import socket

        git(base / "state.git", "update-server-info")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = base / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=base, port=self.port, root=base))
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(base)], stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/state.git/info/refs"

    def cpu(self) -> float:
        fields_ = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def http_poll(url: str, etags: dict, agent: int) -> float:
    """One agent's poll as agent.drivers.refs_http.RefsPoller does it: GET with the agent's last ETag."""
    import urllib.error
    import urllib.request

    started = time.perf_counter()
    req = urllib.request.Request(url, headers={"Cache-Control": "no-cache"})
    if etags.get(agent):
        req.add_header("If-None-Match", etags[agent])
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
            etags[agent] = resp.headers.get("ETag")
    except urllib.error.HTTPError as exc:
        if exc.code != 304:
            raise
    return time.perf_counter() - started


def run_http(server: NginxServer, agents: int, rounds: int, interval: float, concurrency: int, spread: bool) -> dict:
    """`run` for the HTTP conditional poll; the first round (every agent's 200) is a warm-up, not counted."""
    etags: dict[int, str] = {}
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda a: http_poll(server.url, etags, a), range(agents)))
    latencies: list[float] = []
    lock = threading.Lock()
    cpu0, wall0 = server.cpu(), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            offsets = [(a, random.uniform(0, interval) if spread else 0.0) for a in range(agents)]

            def one(item) -> None:
                agent, offset = item
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                lat = http_poll(server.url, etags, agent)
                with lock:
                    latencies.append(lat)

            list(pool.map(one, offsets))
    cpu = server.cpu() - cpu0
    latencies.sort()
    n = len(latencies)
    return {"polls": n, "server_cpu_ms_per_poll": 1000 * cpu / n, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (n - 1))], "p99_ms": 1000 * latencies[int(0.99 * (n - 1))],
            "max_ms": 1000 * latencies[-1], "server_cpu_s": cpu, "wall_s": time.perf_counter() - wall0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--interval", type=float, default=15.0, help="poll interval for the spread run (s)")
    ap.add_argument("--concurrency", type=int, default=32, help="max polls in flight (client threads)")
    ap.add_argument("--refs", type=int, default=50)
    ap.add_argument("--http", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the HTTP conditional poll of a static info/refs (nginx; issue 17)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_repo(base, args.refs)
        daemon = InetdServer(base)
        url = f"git://127.0.0.1:{daemon.port}/state.git"
        try:
            for _ in range(50):
                try:
                    poll(url)
                    break
                except subprocess.CalledProcessError:
                    time.sleep(0.1)
            print(f"{args.agents} agents x {args.rounds} rounds, one git daemon on loopback, {os.cpu_count()} CPUs, "
                  f"{args.refs} tags in the repo")
            for name, spread in (("burst (no splay)", False), (f"spread over {args.interval:g}s (splay)", True)):
                r = run(url, daemon, args.agents, args.rounds, args.interval, args.concurrency, spread)
                print(f"{name:>28}: {r['polls']} polls, server CPU {r['server_cpu_ms_per_poll']:.2f} ms/poll "
                      f"({r['server_cpu_s']:.2f} s in {r['wall_s']:.1f} s), latency p50 {r['p50_ms']:.1f} ms, "
                      f"p95 {r['p95_ms']:.1f} ms, max {r['max_ms']:.1f} ms")
        finally:
            daemon.stop()
        if args.http and shutil.which("nginx"):
            server = NginxServer(base)
            try:
                for _ in range(50):
                    try:
                        http_poll(server.url, {}, -1)
                        break
                    except OSError:
                        time.sleep(0.1)
                print(f"HTTP conditional poll (If-None-Match -> 304) of info/refs served by nginx (one process): "
                      f"{args.agents} agents x {args.rounds} rounds")
                for name, spread in (("burst (no splay)", False), (f"spread over {args.interval:g}s (splay)", True)):
                    r = run_http(server, args.agents, args.rounds, args.interval, args.concurrency, spread)
                    agents_per_core = args.interval / (r["server_cpu_ms_per_poll"] / 1000) if r["server_cpu_s"] else float("inf")
                    print(f"{name:>28}: {r['polls']} polls, server CPU {r['server_cpu_ms_per_poll']:.3f} ms/poll "
                          f"({r['server_cpu_s']:.2f} s in {r['wall_s']:.1f} s; ~{agents_per_core:,.0f} agents per core "
                          f"at {args.interval:g} s), latency p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                          f"max {r['max_ms']:.1f} ms")
            finally:
                server.stop()


if __name__ == "__main__":
    main()
