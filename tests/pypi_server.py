"""A real private package index for tests: `pypiserver` on 127.0.0.1 with htpasswd auth on every action.

Why real: pip and uv each have their own auth code (URL userinfo, named-index variables, retries after a
401); only a real index shows what they send and how they fail. `-a download,list,update` makes every
page and wheel need credentials, as on a company index. pypiserver answers 401 without credentials and
403 with wrong ones.

Use: `from pypi_server import pypi_server` in a test module (registers the fixture), or call
`start_pypi_server(request, workdir, users)` for a server of your own. Put wheels into `.packages`
(tests/wheelfactory.py makes them); the `simple-dir` backend rescans it on every request.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from passlib.apache import HtpasswdFile

try:  # tests/ on sys.path (conftest, or pytest's rootdir-less import mode)
    from conftest import free_port, stop_process
except ImportError:  # pragma: no cover - tests/ made a package
    from tests.conftest import free_port, stop_process

__all__ = ["PypiServer", "start_pypi_server", "pypi_server", "NASTY_PASSWORD_CHARS"]

# Everything that breaks a URL or a naive parser: percent, at, colon, slash, double quote, spaces.
NASTY_PASSWORD_CHARS = '%@:/" %41 '


@dataclass(frozen=True)
class PypiServer:
    """A running index: `url` is its PEP 503 root (`http://127.0.0.1:PORT/simple/`), credentials of its
    first user, every user, and the directory it serves."""

    url: str
    username: str
    password: str = field(repr=False)
    packages: Path = field(default=Path())
    users: dict[str, str] = field(default_factory=dict, repr=False)
    log: Path = field(default=Path())


def start_pypi_server(request: pytest.FixtureRequest, workdir: Path, users: dict[str, str]) -> PypiServer:
    """Start pypiserver serving `<workdir>/packages` to `users` (name -> password); stopped by a finalizer
    of `request` even if the start fails. Returns once it answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    packages = workdir / "packages"
    packages.mkdir(exist_ok=True)
    htpasswd = HtpasswdFile(str(workdir / "htpasswd"), new=True)
    for name, password in users.items():
        htpasswd.set_password(name, password)
    htpasswd.save()
    port = free_port()
    log = workdir / "pypiserver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pypiserver", "run", "--host", "127.0.0.1", "--port", str(port),
             "--passwords", str(workdir / "htpasswd"), "--authenticate", "download,list,update",
             "--disable-fallback", "--backend", "simple-dir", "--health-endpoint", "/health", str(packages)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    request.addfinalizer(lambda: stop_process(proc))
    deadline = time.monotonic() + 60          # generous: a loaded 2-core machine imports slowly
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except (OSError, urllib.error.URLError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pypiserver on port {port} did not start (exit {proc.poll()}):\n"
                               f"{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    username, password = next(iter(users.items()))
    return PypiServer(f"http://127.0.0.1:{port}/simple/", username, password, packages, dict(users), log)


@pytest.fixture(scope="module")
def pypi_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PypiServer:
    """One index per test module. Its first user `deploy` has a password made of NASTY_PASSWORD_CHARS
    around a random part (so a search for it finds only real leaks); `reader` has a plain one."""
    token = secrets.token_hex(8)
    users = {"deploy": f"{NASTY_PASSWORD_CHARS}{token}{NASTY_PASSWORD_CHARS}",
             "reader": f"plain{secrets.token_hex(8)}"}
    return start_pypi_server(request, tmp_path_factory.mktemp("pypi"), users)
