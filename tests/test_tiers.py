"""Tiers from one state repo, with real git, venvs and supervisord: a directory per tier (--path) sharing one
wheelhouse, and a branch per tier (--ref). Promotion is a commit (copy the app's dir to the next tier) or a
merge; a change reaches a tier's hosts only when it is in that tier."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.core.load import LoadOptions, load_desired
from conftest import REPO_ROOT, free_port, git, run_agent, served_version

pytestmark = pytest.mark.timeout(300)


def _installer() -> str:
    from agent.drivers.venv import find_uv

    return "uv" if find_uv() else "pip"


@pytest.fixture
def roots(tmp_path):
    made = {t: tmp_path / t[:4] for t in ("staging", "production")}   # short: supervisord socket path limit
    yield made
    from agent.drivers.supervisor import EmbeddedSupervisor

    for root in made.values():
        EmbeddedSupervisor(root).stop()


def tier(repo, name: str, host: str, port: int, version: str, wheelhouse: str) -> None:
    repo.write(f"tiers/{name}/fleet.yaml", f"apiVersion: gitops-agent/v1\nkind: Fleet\nhosts:\n  {host}: {{groups: [web]}}\n")
    repo.lock(f"tiers/{name}/apps/demo/demo.lock", version)
    repo.write(f"tiers/{name}/apps/demo/app.yaml", f"""\
        apiVersion: gitops-agent/v1
        kind: App
        name: demo
        hosts: {{groups: [web]}}
        environments:
          demo: {{lockfile: demo.lock, find_links: [{wheelhouse}], index: false, installer: {_installer()}}}
        services:
          demo-web:
            environment: demo
            port: {port}
            command: [demoapp-server, --port, "{port}"]
            health: {{http: "http://127.0.0.1:{port}/healthz", timeout_s: 1}}
        """)


def test_directory_per_tier_promotion_by_commit(state_repo, roots):
    ports = {"staging": free_port(), "production": free_port()}
    hosts = {"staging": "stage-1", "production": "prod-1"}
    for t in ports:
        tier(state_repo, t, hosts[t], ports[t], "1.0.0", "../../../../wheelhouse")   # one wheelhouse at the repo root
    state_repo.commit("both tiers at 1.0.0")

    def once(t: str) -> None:
        proc = run_agent("once", "--repo", state_repo.url, "--path", f"tiers/{t}", "--host", hosts[t],
                         "--root", str(roots[t]), "--health-wait", "15")
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def both() -> dict:
        for t in ports:
            once(t)
        return {t: served_version(ports[t]) for t in ports}

    assert both() == {"staging": "1.0.0", "production": "1.0.0"}
    state_repo.lock("tiers/staging/apps/demo/demo.lock", "2.0.0")       # a change lands in staging only
    state_repo.commit("staging: demo 2.0.0")
    assert both() == {"staging": "2.0.0", "production": "1.0.0"}
    # promotion: one commit copying the app's directory from staging to production
    prod = state_repo.path / "tiers/production/apps/demo"
    shutil.copy(state_repo.path / "tiers/staging/apps/demo/demo.lock", prod / "demo.lock")
    state_repo.commit("promote demo 2.0.0 to production")
    assert both() == {"staging": "2.0.0", "production": "2.0.0"}


def test_branch_per_tier_promotion_by_merge(state_repo, roots):
    port = {"staging": free_port(), "production": free_port()}
    hosts = {"staging": "stage-1", "production": "prod-1"}
    for t in port:   # two hosts on one machine here: each tier's dir gives its host a port of its own
        tier(state_repo, t, hosts[t], port[t], "1.0.0", "../../../../wheelhouse")
    state_repo.commit("1.0.0")
    for b in port:
        git(state_repo.path, "branch", b)

    def once(t: str) -> None:
        proc = run_agent("once", "--repo", state_repo.url, "--ref", t, "--path", f"tiers/{t}", "--host", hosts[t],
                         "--root", str(roots[t]), "--health-wait", "15")
        assert proc.returncode == 0, proc.stdout + proc.stderr

    for t in port:
        once(t)
    assert {t: served_version(port[t]) for t in port} == {"staging": "1.0.0", "production": "1.0.0"}
    git(state_repo.path, "checkout", "-q", "staging")
    for t in port:
        state_repo.lock(f"tiers/{t}/apps/demo/demo.lock", "2.0.0")
    state_repo.commit("2.0.0 on the staging branch")
    for t in port:
        once(t)
    assert {t: served_version(port[t]) for t in port} == {"staging": "2.0.0", "production": "1.0.0"}
    git(state_repo.path, "checkout", "-q", "production")
    git(state_repo.path, "merge", "-q", "--ff-only", "staging")             # promotion = a merge
    git(state_repo.path, "checkout", "-q", "main")
    for t in port:
        once(t)
    assert {t: served_version(port[t]) for t in port} == {"staging": "2.0.0", "production": "2.0.0"}


def test_examples_tiers_load_with_a_shared_wheelhouse():
    base = REPO_ROOT / "examples/tiers"
    staging = load_desired(base / "tiers/staging", "stage-1", LoadOptions(boundary=base))
    production = load_desired(base / "tiers/production", "prod-1", LoadOptions(boundary=base))
    assert dict(staging.environments["stable"].requirements)["mandelbrot"] == "1.1.0"
    assert dict(production.environments["stable"].requirements)["mandelbrot"] == "1.0.0"
    assert production.apps[0].rollout.waves[0].selected          # prod-1 is the canary
    assert Path(staging.environments["stable"].find_links[0]) == (base / "wheelhouse").resolve()
