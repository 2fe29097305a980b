"""Hand-made pure-python wheels for tests: no build backend, ~1 ms, byte-for-byte reproducible.

Why by hand: tests need real wheels that pip and uv install from a local find-links directory, with
a sha256 that stays the same from run to run so a hashed lockfile can be written next to them. A build
backend would be slow and stamp the current time into the zip; here every zip entry carries a fixed
timestamp and fixed permissions, so the same inputs always give the same bytes.

`http_app_module` / `make_http_app_wheel` give a tiny but well-behaved HTTP service (a console script
taking `--port`) for tests that run real programs under supervisord behind a load balancer.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_name

__all__ = ["make_wheel", "lock_line", "wheel_filename", "http_app_module", "make_http_app_wheel"]

_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # any fixed date >= 1980 (zip's epoch) keeps the hash stable
_FILE_MODE = 0o644 << 16
_SCRIPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _escaped(name: str) -> str:
    """Wheel file names and .dist-info dirs use the normalized name with '-' replaced (PEP 491/503)."""
    return canonicalize_name(name).replace("-", "_")


def wheel_filename(name: str, version: str) -> str:
    """The file name pip/uv expect for a pure-python, any-platform wheel."""
    return f"{_escaped(name)}-{version}-py3-none-any.whl"


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _metadata(name: str, version: str, requires: list[str]) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", "Summary: test wheel"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    return "\n".join(lines) + "\n\n"


def _entry_points(console_scripts: dict[str, str]) -> str:
    for script, target in console_scripts.items():
        if not _SCRIPT_NAME.match(script) or not _ENTRY_POINT.match(target):
            raise ValueError(f"bad console script {script!r} = {target!r} (want 'name = module:function')")
    body = "".join(f"{script} = {target}\n" for script, target in sorted(console_scripts.items()))
    return f"[console_scripts]\n{body}" if body else ""


def _module_path(module: str) -> str:
    """'pkg.sub' -> 'pkg/sub.py'; a path ending in .py is taken as is (e.g. 'pkg/__init__.py')."""
    return module if module.endswith(".py") else module.replace(".", "/") + ".py"


def make_wheel(
    dest_dir: Path,
    name: str,
    version: str,
    modules: dict[str, str],
    console_scripts: dict[str, str] | None = None,
    requires: list[str] | None = None,
) -> Path:
    """Write `<dest_dir>/<name>-<version>-py3-none-any.whl` and return its path.

    `modules` maps a module name ('app', 'pkg.mod') or a relative .py path to its source. Packages need
    their `__init__` listed explicitly, as in a real wheel. `console_scripts` maps script -> 'mod:func'.
    """
    dist_info = f"{_escaped(name)}-{version}.dist-info"
    files: dict[str, bytes] = {_module_path(m): src.encode() for m, src in sorted(modules.items())}
    files[f"{dist_info}/METADATA"] = _metadata(name, version, list(requires or ())).encode()
    files[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: gitops-agent-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n\n"
    ).encode()
    entry_points = _entry_points(dict(console_scripts or {}))
    if entry_points:
        files[f"{dist_info}/entry_points.txt"] = entry_points.encode()
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / wheel_filename(name, version)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            info = zipfile.ZipInfo(path, date_time=_ZIP_DATE)
            info.external_attr = _FILE_MODE
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return target


def lock_line(wheel_path: Path) -> str:
    """'name==version --hash=sha256:<hex>' for one wheel, as a hashed lockfile line."""
    wheel_path = Path(wheel_path)
    dist, version = wheel_path.name.split("-")[:2]
    digest = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
    return f"{canonicalize_name(dist)}=={version} --hash=sha256:{digest}"


_HTTP_APP_TEMPLATE = '''\
"""Tiny HTTP service for tests: GET /healthz -> 200 "ok", GET / -> "<name> <version>"."""

import argparse
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = {name!r}
VERSION = {version!r}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so load tests can reuse connections
    # TCP_NODELAY: headers and body are two writes; with Nagle + delayed ACK each keep-alive
    # request would wait ~40 ms for the body.
    disable_nagle_algorithm = True
    healthz_status = 200
    root_status = 200

    def _send(self, status, body, head=False):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-App-Version", VERSION)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _route(self, head):
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            status = self.healthz_status
            self._send(status, "ok\\n" if status == 200 else "unhealthy\\n", head)
        elif path == "/":
            self._send(self.root_status, f"{{NAME}} {{VERSION}}\\n", head)
        elif path == "/version":
            self._send(200, f"{{VERSION}}\\n", head)
        else:
            self._send(404, "not found\\n", head)

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)

    def log_message(self, format, *args):  # quiet by default: supervisord logs stay small
        pass


class Server(ThreadingHTTPServer):
    allow_reuse_address = True  # a restart right after a stop must not fail with EADDRINUSE
    daemon_threads = True


def main(argv=None):
    parser = argparse.ArgumentParser(prog=NAME)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--healthz-status", type=int, default=200, help="answer /healthz with this status")
    parser.add_argument("--root-status", type=int, default=200, help="answer / with this status (a bad release)")
    parser.add_argument("--bind-delay", type=float, default=0.0, help="seconds to wait before binding the port")
    args = parser.parse_args(argv)
    Handler.healthz_status = args.healthz_status
    Handler.root_status = args.root_status
    time.sleep(args.bind_delay)
    server = Server((args.host, args.port), Handler)

    def stop(signum, frame):  # serve_forever must be stopped from another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{{NAME}} {{VERSION}} listening on {{args.host}}:{{args.port}}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def http_app_module(name: str, version: str) -> str:
    """Source of a tiny HTTP service module with `main()`, answering on 127.0.0.1:`--port`.

    GET /healthz -> 200 "ok" (or `--healthz-status N`), GET / -> "<name> <version>\\n", GET /version ->
    "<version>\\n", header X-App-Version on every answer. Keep-alive (HTTP/1.1), threaded, SO_REUSEADDR,
    clean exit 0 on SIGTERM/SIGINT. The version is baked into the source, so each version's wheel
    has its own hash.
    """
    return _HTTP_APP_TEMPLATE.format(name=name, version=version)


def make_http_app_wheel(dest_dir: Path, name: str = "demoapp", version: str = "1.0.0",
                        script: str | None = None) -> Path:
    """A wheel holding module `<name>_server` and console script `<script or name-server>` -> its main."""
    module = f"{_escaped(name)}_server"
    return make_wheel(dest_dir, name, version, {module: http_app_module(name, version)},
                      console_scripts={script or f"{canonicalize_name(name)}-server": f"{module}:main"})
