"""`envapp`: a tiny service, job, worker and health check that tell a test what the agent gave them.

Why: the §3a end-to-end tests must see, from outside, what a process really received (its environment,
its argv, the content of the files its env points at), when it started, and how often a job ran. A wheel
built by `wheelfactory.make_wheel` (pure python, reproducible, ~1 ms) carries four console scripts:

- `envapp-server --port N [--healthz-status S] [--bind-delay D] [--no-bind]`: GET /healthz -> 200 "ok"
  (or S), GET / -> "envapp <version>", GET /env -> JSON {version, pid, argv, env, started_at, bound_at,
  cwd}, GET /read?var=NAME -> the bytes of the file whose path is $NAME (404 if unset). `--no-bind`: never
  listens (a service whose health gate cannot pass). `--crash-print NAME [--crash-repr]`: prints $NAME to
  stderr (as `<value>`, or as repr() and JSON), then `--crash-pad N` dots, and exits 3 at once. Writes nothing to stdout/stderr but one start line
  without its environment, so supervisord's logs never hold a secret.
- `envapp-job [--exit N] [--sleep S] [--stderr-var NAME] [--record FILE] [--tag T] [--get URL]`: appends one
  JSON line {tag, pid, argv, env, cwd, time, version, got (the body of GET URL, or null)} to FILE (default `job-runs.jsonl` in its cwd, the app's data dir),
  created mode 0600 because it holds the env; then prints $NAME to stderr if asked (`<value>`, or with
  `--stderr-repr` its repr() and JSON, as a traceback or a JSON log line would show it) and `--stderr-pad N`
  dots after it, sleeps, exits N.
- `envapp-worker [--record FILE]`: appends {process, pid, started_at} (0600) to FILE if given, then sleeps
  until SIGTERM (exit 0).
- `envapp-check [--url URL] [--var NAME] [--exit N]`: a health command: exits N if given; else 0 when URL
  answers 2xx and $NAME (if given) is set; else 1 with a reason on stderr.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from wheelfactory import lock_line, make_wheel

__all__ = ["ENVAPP", "FLEET", "Site", "app_doc", "env_of", "envapp_lock", "envapp_source", "get", "make_envapp_wheel",
           "web"]

ENVAPP = "envapp"

_SOURCE = r'''"""envapp {version}: see tests/envapp.py."""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = {version!r}
STARTED_AT = time.time()
BOUND_AT = None


def _append_private(path, record):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    healthz_status = 200

    def _send(self, status, data, ctype="text/plain; charset=utf-8"):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/healthz":
            self._send(self.healthz_status, "ok\n" if self.healthz_status == 200 else "unhealthy\n")
        elif url.path == "/":
            self._send(200, "envapp " + VERSION + "\n")
        elif url.path == "/env":
            body = {{"version": VERSION, "pid": os.getpid(), "argv": sys.argv, "env": dict(os.environ),
                     "started_at": STARTED_AT, "bound_at": BOUND_AT, "cwd": os.getcwd()}}
            self._send(200, json.dumps(body), "application/json")
        elif url.path == "/read":
            name = dict(urllib.parse.parse_qsl(url.query)).get("var", "")
            path = os.environ.get(name)
            if not path:
                self._send(404, "unset\n")
                return
            try:
                with open(path, "rb") as fh:
                    self._send(200, fh.read(), "application/octet-stream")
            except OSError as exc:
                self._send(500, str(exc.strerror) + "\n")
        else:
            self._send(404, "not found\n")

    def log_message(self, format, *args):
        pass


class Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


def _until_term():
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    while not done.wait(0.2):
        pass


def server(argv=None):
    global BOUND_AT
    p = argparse.ArgumentParser(prog="envapp-server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--healthz-status", type=int, default=200)
    p.add_argument("--bind-delay", type=float, default=0.0)
    p.add_argument("--no-bind", action="store_true")
    p.add_argument("--crash-print", metavar="NAME", help="print $NAME to stderr and exit 3 at once")
    p.add_argument("--crash-repr", action="store_true", help="with --crash-print: print repr() and JSON of it")
    p.add_argument("--crash-pad", type=int, default=0, help="with --crash-print: then this many '.' to stderr")
    args = p.parse_args(argv)
    print("envapp " + VERSION + " pid " + str(os.getpid()) + " starting", file=sys.stderr, flush=True)
    if args.crash_print:
        value = os.environ.get(args.crash_print, "")
        shown = repr(value) + " " + json.dumps(value) if args.crash_repr else "<" + value + ">"
        print("config error: " + args.crash_print + " = " + shown, file=sys.stderr, flush=True)
        sys.stderr.write("." * args.crash_pad)
        sys.stderr.flush()
        return 3
    if args.no_bind:
        _until_term()
        return 0
    Handler.healthz_status = args.healthz_status
    time.sleep(args.bind_delay)
    srv = Server(("127.0.0.1", args.port), Handler)
    BOUND_AT = time.time()

    def stop(signum, frame):
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        srv.serve_forever(poll_interval=0.1)
    finally:
        srv.server_close()
    return 0


def job(argv=None):
    p = argparse.ArgumentParser(prog="envapp-job")
    p.add_argument("--exit", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--stderr-var")
    p.add_argument("--stderr-repr", action="store_true", help="print repr() and JSON of $NAME instead of <value>")
    p.add_argument("--stderr-pad", type=int, default=0, help="then print this many bytes of '.' to stderr")
    p.add_argument("--record", default="job-runs.jsonl")
    p.add_argument("--tag", default="")
    p.add_argument("--get", help="record the body of GET URL (None if nothing answers)")
    args = p.parse_args(argv)
    got = None
    if args.get:
        try:
            with urllib.request.urlopen(args.get, timeout=5) as resp:
                got = resp.read().decode("utf-8", "replace")
        except OSError:
            pass
    _append_private(args.record, {{"tag": args.tag, "pid": os.getpid(), "argv": sys.argv, "env": dict(os.environ),
                                   "cwd": os.getcwd(), "time": time.time(), "version": VERSION, "got": got}})
    print("envapp-job " + args.tag + " ran", flush=True)
    if args.stderr_var:
        value = os.environ.get(args.stderr_var, "")
        shown = repr(value) + " " + json.dumps(value) if args.stderr_repr else "<" + value + ">"
        print("the value of " + args.stderr_var + " is " + shown, file=sys.stderr, flush=True)
    if args.stderr_pad:
        sys.stderr.write("." * args.stderr_pad)
        sys.stderr.flush()
    time.sleep(args.sleep)
    return args.exit


def worker(argv=None):
    p = argparse.ArgumentParser(prog="envapp-worker")
    p.add_argument("--record")
    args = p.parse_args(argv)
    if args.record:
        _append_private(args.record, {{"process": os.environ.get("SUPERVISOR_PROCESS_NAME", ""),
                                       "pid": os.getpid(), "started_at": STARTED_AT}})
    _until_term()
    return 0


def check(argv=None):
    p = argparse.ArgumentParser(prog="envapp-check")
    p.add_argument("--url")
    p.add_argument("--var")
    p.add_argument("--exit", type=int)
    args = p.parse_args(argv)
    if args.exit is not None:
        print("envapp-check: told to exit " + str(args.exit), file=sys.stderr)
        return args.exit
    if args.var and not os.environ.get(args.var):
        print("envapp-check: $" + args.var + " is not set", file=sys.stderr)
        return 1
    if args.url:
        try:
            with urllib.request.urlopen(args.url, timeout=2) as resp:
                if not 200 <= resp.status < 300:
                    print("envapp-check: HTTP " + str(resp.status), file=sys.stderr)
                    return 1
        except OSError as exc:
            print("envapp-check: " + str(exc), file=sys.stderr)
            return 1
    return 0
'''


def envapp_source(version: str) -> str:
    """The module's source; the version is baked in, so each version's wheel has its own hash."""
    return _SOURCE.format(version=version)


def make_envapp_wheel(dest_dir: Path, version: str = "1.0.0") -> Path:
    return make_wheel(dest_dir, ENVAPP, version, {"envapp": envapp_source(version)}, console_scripts={
        "envapp-server": "envapp:server", "envapp-job": "envapp:job", "envapp-worker": "envapp:worker",
        "envapp-check": "envapp:check"})


def envapp_lock(dest_dir: Path, version: str = "1.0.0") -> str:
    """One hashed lock line for envapp `version` (its wheel written to `dest_dir`)."""
    return lock_line(make_envapp_wheel(dest_dir, version)) + "\n"


# --- a state repo of envapp apps and an agent root (for the §3a end-to-end tests) ---------------------

FLEET = "apiVersion: gitops-agent/v1\nkind: Fleet\nhosts:\n  h1: {groups: [web]}\n"


def web(port: int, *args: str, env: dict | None = None, health: object = "http", **extra) -> dict:
    """An envapp-server service on `port` (health: "http", "tcp", a dict, or None)."""
    spec: dict = {"environment": extra.pop("environment", "main"), "port": port,
                  "command": ["envapp-server", "--port", str(port), *args]}
    if env:
        spec["env"] = env
    if health == "http":
        spec["health"] = {"http": f"http://127.0.0.1:{port}/healthz", "timeout_s": 1}
    elif health == "tcp":
        spec["health"] = {"tcp": f"127.0.0.1:{port}"}
    elif isinstance(health, dict):
        spec["health"] = health
    spec.update(extra)
    return spec


def app_doc(name: str, services: dict, *, jobs: dict | None = None, files: dict | None = None,
            secrets: dict | None = None, env: str = "main") -> dict:
    """An App document with one uv environment `env` (environment names are host-wide: give each app its
    own), locked by `<env>.lock`; services and jobs that name no other environment get `env`."""
    doc: dict = {"apiVersion": "gitops-agent/v1", "kind": "App", "name": name, "hosts": {"groups": ["web"]},
                 "environments": {env: {"lockfile": f"{env}.lock", "find_links": ["../../wheelhouse"],
                                        "index": False, "installer": "uv"}}}
    if secrets:
        doc["secrets"] = secrets
    if files:
        doc["files"] = files
    if jobs:
        doc["jobs"] = {n: {**spec, "environment": env if spec.get("environment", "main") == "main"
                           else spec["environment"]} for n, spec in jobs.items()}
    doc["services"] = {n: {**spec, "environment": env if spec.get("environment", "main") == "main"
                           else spec["environment"]} for n, spec in services.items()}
    return doc


class Site:
    """A real git state repo (fleet: host h1) and an agent root; `stop()` stops its embedded supervisord."""

    def __init__(self, base: Path, *, identity: Path | None = None):
        from conftest import StateRepo

        self.base = Path(base)
        self.repo = StateRepo(self.base / "state")
        self.root = self.base / "root"
        self.identity = identity
        self.repo.write("fleet.yaml", FLEET)

    # state repo
    def write(self, rel: str, text: str) -> Path:
        path = self.repo.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def lock(self, app: str, version: str, env: str = "main") -> None:
        self.write(f"apps/{app}/{env}.lock", envapp_lock(self.repo.path / "wheelhouse", version))

    def app(self, doc: dict, version: str | None = None) -> None:
        """Write apps/<name>/app.yaml (and the locks of its environments at `version`, if given)."""
        if version is not None:
            for env in doc["environments"]:
                self.lock(doc["name"], version, env)
        self.write(f"apps/{doc['name']}/app.yaml", yaml.safe_dump(doc, sort_keys=False))

    def commit(self, message: str = "change") -> str:
        return self.repo.commit(message)

    # the agent
    def args(self, *extra: str) -> list[str]:
        ident = ["--age-identity", str(self.identity)] if self.identity else []
        return ["--repo", self.repo.url, "--host", "h1", "--root", str(self.root), "--health-wait", "20", *ident, *extra]

    def agent(self, command: str, *extra: str, expect: int | None = 0, timeout: float = 300):
        from conftest import run_agent

        proc = run_agent(command, *self.args(*extra), timeout=timeout)
        if expect is not None:
            assert proc.returncode == expect, f"{command} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def once(self, *extra: str, expect: int | None = 0):
        return self.agent("once", *extra, expect=expect)

    def plan(self, *extra: str, expect: int | None = 2):
        return self.agent("plan", *extra, expect=expect)

    def status(self) -> dict:
        return json.loads((self.root / "state/status.json").read_text())

    def programs(self) -> dict[str, dict]:
        from agent.drivers.supervisor import EmbeddedSupervisor

        return EmbeddedSupervisor(self.root).client(timeout=10).process_info()

    def conf(self, program: str) -> str:
        return (self.root / "supervisor/programs" / f"{program}.conf").read_text()

    def data(self, app: str) -> Path:
        return self.root / "apps" / app / "data"

    def job_runs(self, app: str, record: str = "job-runs.jsonl") -> list[dict]:
        path = self.data(app) / record
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def stop(self) -> None:
        from agent.drivers.supervisor import EmbeddedSupervisor

        EmbeddedSupervisor(self.root).stop()


def get(port: int, path: str = "/", timeout: float = 5.0) -> str | None:
    """The body of a 2xx answer from 127.0.0.1:`port`, or None if nothing answers well."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.read().decode("utf-8", "replace")
    except (OSError, urllib.error.HTTPError):
        return None


def env_of(port: int) -> dict:
    """What an envapp-server on `port` reports of itself (/env)."""
    body = get(port, "/env")
    assert body is not None, f"nothing answers /env on port {port}"
    return json.loads(body)
