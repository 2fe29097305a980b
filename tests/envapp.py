"""`envapp`: a tiny service, job, worker and health check that tell a test what the agent gave them.

Why: the §3a end-to-end tests must see, from outside, what a process really received (its environment,
its argv, the content of the files its env points at), when it started, and how often a job ran. A wheel
built by `wheelfactory.make_wheel` (pure python, reproducible, ~1 ms) carries four console scripts:

- `envapp-server --port N [--healthz-status S] [--bind-delay D] [--no-bind]`: GET /healthz -> 200 "ok"
  (or S), GET / -> "envapp <version>", GET /env -> JSON {version, pid, argv, env, started_at, bound_at,
  cwd}, GET /read?var=NAME -> the bytes of the file whose path is $NAME (404 if unset). `--no-bind`: never
  listens (a service whose health gate cannot pass). Writes nothing to stdout/stderr but one start line
  without its environment, so supervisord's logs never hold a secret.
- `envapp-job [--exit N] [--sleep S] [--stderr-var NAME] [--record FILE] [--tag T]`: appends one JSON line
  {tag, pid, argv, env, cwd, time} to FILE (default `job-runs.jsonl` in its cwd, the app's data dir),
  created mode 0600 because it holds the env; then prints $NAME to stderr if asked, sleeps, exits N.
- `envapp-worker [--record FILE]`: appends {process, pid, started_at} (0600) to FILE if given, then sleeps
  until SIGTERM (exit 0).
- `envapp-check [--url URL] [--var NAME] [--exit N]`: a health command: exits N if given; else 0 when URL
  answers 2xx and $NAME (if given) is set; else 1 with a reason on stderr.
"""

from __future__ import annotations

from pathlib import Path

from wheelfactory import lock_line, make_wheel

__all__ = ["ENVAPP", "envapp_source", "make_envapp_wheel", "envapp_lock"]

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
    args = p.parse_args(argv)
    print("envapp " + VERSION + " pid " + str(os.getpid()) + " starting", file=sys.stderr, flush=True)
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
    p.add_argument("--record", default="job-runs.jsonl")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    _append_private(args.record, {{"tag": args.tag, "pid": os.getpid(), "argv": sys.argv, "env": dict(os.environ),
                                   "cwd": os.getcwd(), "time": time.time(), "version": VERSION}})
    print("envapp-job " + args.tag + " ran", flush=True)
    if args.stderr_var:
        print("the value of " + args.stderr_var + " is <" + os.environ.get(args.stderr_var, "") + ">",
              file=sys.stderr, flush=True)
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
