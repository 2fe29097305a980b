"""The agent as a package: `python -m build` makes an sdist and a wheel that pass `twine check`; the wheel,
installed NON-editable into a fresh venv (no PYTHONPATH, run from outside the checkout), runs every
command and finds every file it reads (schemas, deploy assets) inside itself; the version comes from one
place (agent/__init__.py) and is what `--version`, the wheel's metadata and `gitops_agent_build_info` say.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from agent import __version__
from agent_wheel import REPO, build_dists, clean_env, install_into_venv
from conftest import free_port, stop_process
from daemon_helpers import http_get, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """bin dir of a fresh venv holding the wheel built from this checkout."""
    _sdist, wheel = build_dists()
    return install_into_venv(wheel, tmp_path_factory.mktemp("venv") / "agent")


def _cli(bindir: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(bindir / "gitops-agent"), *args], capture_output=True, text=True, cwd=cwd,
                          env=clean_env(), timeout=timeout)


def test_version_has_one_source():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", __version__)


def test_sdist_and_wheel_pass_twine_check():
    sdist, wheel = build_dists()
    assert wheel.name == f"gitops_agent-{__version__}-py3-none-any.whl"
    assert sdist.name == f"gitops_agent-{__version__}.tar.gz"
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wheel_holds_every_package_and_asset():
    _sdist, wheel = build_dists()
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "agent").rglob("__init__.py")}
    missing = {pkg for pkg in packages if f"{pkg}/__init__.py" not in names}
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml): {sorted(missing)}"
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "agent").rglob("*.py")}
    assert modules <= names
    for schema in (REPO / "schemas").glob("*.json"):
        assert f"agent/schemas/{schema.name}" in names
    for asset in ("systemd/gitops-agent.service", "supervisor/gitops-agent.conf", "prometheus/alerts.yml",
                  "grafana/gitops-agent.json"):
        assert f"agent/deploy/{asset}" in names
    meta = zipfile.ZipFile(wheel).read(f"gitops_agent-{__version__}.dist-info/entry_points.txt").decode()
    assert "gitops-agent = agent.cli:console" in meta


def test_installed_wheel_runs_every_command(installed, tmp_path, state_repo):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    where = subprocess.run([str(installed / "python"), "-c", "import agent; print(agent.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, env=clean_env(), check=True).stdout
    assert str(installed.parent) in where and str(REPO) not in where        # the installed copy, not ours

    version = _cli(installed, "--version", cwd=elsewhere)
    assert version.returncode == 0 and version.stdout.strip() == f"gitops-agent {__version__}"

    valid = _cli(installed, "validate", str(REPO / "desired-state-example"), cwd=elsewhere)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    bad = tmp_path / "bad"
    (bad / "apps").mkdir(parents=True)
    (bad / "fleet.yaml").write_text("apiVersion: gitops-agent/v1\nkind: Fleet\nhosts: {h1: {colour: red}}\n")
    invalid = _cli(installed, "validate", str(bad), "--json", cwd=elsewhere)
    assert invalid.returncode == 1 and "colour" in invalid.stdout        # the packaged schema was read

    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    sha = state_repo.commit("one service")
    root = tmp_path / "root"
    common = ("--repo", state_repo.url, "--host", "h1", "--root", str(root))
    try:
        plan = _cli(installed, "plan", *common, cwd=elsewhere)
        assert plan.returncode == 2, plan.stdout + plan.stderr          # drift: everything to create
        assert "demo-web" in plan.stdout
        once = _cli(installed, "once", *common, "--health-wait", "60", cwd=elsewhere)
        assert once.returncode == 0, once.stdout + once.stderr
        assert http_get(f"http://127.0.0.1:{port}/")[0] == 200
        assert _cli(installed, "plan", *common, cwd=elsewhere).returncode == 0
        status = json.loads(_cli(installed, "status", "--json", *common, cwd=elsewhere).stdout)
        assert status["applied"]["sha"] == sha
        facts = json.loads(_cli(installed, "facts", "--json", *common, cwd=elsewhere).stdout)
        assert "demo-web" in facts["programs"]

        listen = free_port()
        log = open(tmp_path / "run.log", "wb")
        daemon = subprocess.Popen([str(installed / "gitops-agent"), "run", *common, "--listen", f"127.0.0.1:{listen}"],
                                  cwd=elsewhere, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            text = wait_until(lambda: http_get(f"http://127.0.0.1:{listen}/metrics")[1], 60, "/metrics",
                              log=tmp_path / "run.log", step=0.1)
            assert f'gitops_agent_build_info{{version="{__version__}"}} 1.0' in text
            assert http_get(f"http://127.0.0.1:{listen}/healthz")[0] == 200
        finally:
            stop_process(daemon, timeout=60)
            log.close()
        assert daemon.returncode == 0
    finally:
        down = _cli(installed, "down", "--root", str(root), cwd=elsewhere)
        assert down.returncode == 0, down.stderr
    assert not _answers(port)                   # `down` from the venv stopped its supervisord and the service


def _answers(port: int) -> bool:
    try:
        http_get(f"http://127.0.0.1:{port}/", timeout=1)
        return True
    except OSError:
        return False


def test_build_info_metric_names_the_running_version():
    from prometheus_client import generate_latest

    from agent.service.metrics import Recorder

    text = generate_latest(Recorder().registry).decode()
    assert f'gitops_agent_build_info{{version="{__version__}"}} 1.0' in text
