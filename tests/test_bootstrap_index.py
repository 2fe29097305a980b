"""`gitops-agent bootstrap` without `--wheel`: the target installs `gitops-agent==<this version>` from an index
(`--index-url`). The index is a real pypiserver on 127.0.0.1 serving the wheel built from this checkout and
every dependency it needs, fetched once per module from PyPI with `pip download` (pip's cache makes that
cheap after the first run); with `--index-url` pip/uv on the target see only that index, so the test shows
the whole install comes from it. The target is this machine through a real sshd (tests/sshd.py), as in
tests/test_bootstrap.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agent import __version__
from agent_wheel import build_dists, clean_env
from conftest import free_port, stop_process
from daemon_helpers import http_get
from test_bootstrap import bootstrap, sshd, target  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def open_index(tmp_path_factory):
    """An index without authentication (credentials in --index-url would travel in the target's command
    line: configure them on the target instead, see docs/bootstrap.md) holding the agent and its
    dependencies, as wheels for the target's Python (this machine's /usr/bin/python3)."""
    work = tmp_path_factory.mktemp("index")
    packages = work / "packages"
    packages.mkdir()
    wheel = build_dists()[1]
    shutil.copy(wheel, packages)
    target_py = subprocess.run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "--python-version",
                           target_py, "--dest", str(packages), str(wheel)],
                          capture_output=True, text=True, env=clean_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    log = work / "pypiserver.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "pypiserver", "run", "-v", "--host", "127.0.0.1", "--port", str(port),
                                   "--authenticate", ".", "--passwords", ".", "--disable-fallback",
                                   "--backend", "simple-dir", "--health-endpoint", "/health", str(packages)],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/simple/", log
    finally:
        stop_process(server)


def test_bootstrap_from_the_index(sshd, target, open_index, tmp_path):  # noqa: F811
    url, log = open_index
    prefix, _root = target
    listen = free_port()
    first = bootstrap(sshd, target, "--index-url", url, listen=listen)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[changed] agent venv: built" in first.stdout and f"(gitops-agent=={__version__})" in first.stdout, first.stdout
    assert http_get(f"http://127.0.0.1:{listen}/healthz")[0] == 200
    assert f'gitops_agent_build_info{{version="{__version__}"}} 1.0' in http_get(f"http://127.0.0.1:{listen}/metrics")[1]
    (venv,) = (prefix / "venvs").iterdir()
    installed = subprocess.run([venv / "bin" / "python", "-c", "import agent; print(agent.__file__)"],
                               capture_output=True, text=True, env=clean_env(), cwd=venv, check=True).stdout
    assert installed.startswith(str(venv))                         # installed, not this checkout
    served = log.read_text(errors="replace")
    assert "/simple/gitops-agent/" in served and "/packages/gitops_agent-" in served   # it came from this index
    assert json.loads((prefix / "bootstrap.json").read_text())["version"] == __version__

    again = bootstrap(sshd, target, "--index-url", url, listen=listen)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[changed]" not in again.stdout and "already built" in again.stdout, again.stdout
