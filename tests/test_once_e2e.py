"""The user's flow end to end: real git, real venv + pip, real embedded supervisord, real HTTP service.

Each test drives the `gitops-agent` CLI as a user would and checks what the host really runs.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, git, run_agent

pytestmark = pytest.mark.timeout(300)


def get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def args(repo, root, *extra) -> list[str]:
    return ["--repo", repo.url, "--host", "h1", "--root", str(root), "--health-wait", "15", *extra]


def once(repo, root, *extra, expect: int = 0) -> subprocess.CompletedProcess:
    proc = run_agent("once", *args(repo, root, *extra))
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def plan_json(repo, root) -> tuple[int, dict]:
    proc = run_agent("plan", "--json", *args(repo, root))
    return proc.returncode, json.loads(proc.stdout)


def status(root) -> dict:
    return json.loads(run_agent("status", "--json", "--root", str(root), check=True).stdout)


def pid_of(root, name: str) -> int:
    facts = json.loads(run_agent("facts", "--json", "--root", str(root), check=True).stdout)
    return facts["programs"][name]["pid"]


def test_once_converges_then_plan_is_empty_and_down_stops_everything(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    sha = state_repo.commit("first")

    out = once(state_repo, agent_root).stdout
    assert "build_venv demo" in out and "result: applied" in out
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"

    # the service runs from the content-addressed venv the envs/ symlink points at
    link = agent_root / "envs" / "demo"
    assert link.is_symlink() and (link.resolve() / ".gitops-agent.json").is_file()
    conf_path = agent_root / "supervisor" / "programs" / "demo-web.conf"
    conf = conf_path.read_text()
    assert str(link.resolve() / "bin" / "demoapp-server") in conf
    # generated files are private: program files may carry secrets in their environment
    assert conf_path.stat().st_mode & 0o777 == 0o600
    assert (agent_root / "state" / "status.json").stat().st_mode & 0o777 == 0o600

    # embedded supervisord outlived `once`; a second run and plan see nothing to do
    code, plan = plan_json(state_repo, agent_root)
    assert (code, plan["plan"]["actions"]) == (0, []), plan
    assert "result: converged" in once(state_repo, agent_root).stdout

    st = status(agent_root)
    assert st["applied"]["sha"] == sha and st["last_error"] is None
    assert st["resources"]["program:demo-web"]["state"] == "ok"
    text = run_agent("status", "--root", str(agent_root), check=True).stdout
    assert sha in text and "program:demo-web" in text

    facts = json.loads(run_agent("facts", "--json", "--root", str(agent_root), check=True).stdout)
    assert facts["supervisor"] == "running"
    assert facts["venvs"]["demo"]["installed"] == [["demoapp", "1.0.0"]]
    assert facts["programs"]["demo-web"]["state"] in ("RUNNING", "STARTING")   # STARTING: gated, inside startsecs
    assert facts["programs"]["demo-web"]["gated_pid"] == facts["programs"]["demo-web"]["pid"]

    assert "stopped" in run_agent("down", "--root", str(agent_root), check=True).stdout
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{port}/", timeout=1)
    # state on disk kept: the next once brings it back without rebuilding
    out = once(state_repo, agent_root).stdout
    assert "build_venv" not in out and "ensure_supervisor" in out
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"


def test_lock_change_restarts_only_that_service_and_rollback_is_a_switch(state_repo, agent_root):
    a, b = free_port(), free_port()
    state_repo.app(services={"svc-a": {"port": a}})
    state_repo.lock("apps/demo/other.lock", "1.0.0")
    with open(state_repo.path / "apps/demo/app.yaml", "a") as fh:
        fh.write(f"  svc-b:\n    environment: other\n    port: {b}\n    command: [demoapp-server, --port, \"{b}\"]\n")
    text = (state_repo.path / "apps/demo/app.yaml").read_text().replace(
        "services:", "  other: {lockfile: other.lock, find_links: [../../wheelhouse], index: false}\nservices:")
    (state_repo.path / "apps/demo/app.yaml").write_text(text)
    state_repo.commit("two services")
    once(state_repo, agent_root)
    pid_a, pid_b = pid_of(agent_root, "svc-a"), pid_of(agent_root, "svc-b")
    old_venv = (agent_root / "envs" / "demo").resolve()

    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    state_repo.commit("demo 2.0.0")
    code, plan = plan_json(state_repo, agent_root)
    assert code == 2
    kinds = [(x["action"], x["key"]) for x in plan["plan"]["actions"]]
    assert ("build_venv", "venv:demo") in kinds and ("update_program", "program:svc-a") in kinds
    assert not any(k == "program:svc-b" for _, k in kinds), kinds
    assert all(x["reason"] for x in plan["plan"]["actions"])

    once(state_repo, agent_root)
    assert get(f"http://127.0.0.1:{a}/") == "demoapp 2.0.0\n"
    assert pid_of(agent_root, "svc-a") != pid_a
    assert pid_of(agent_root, "svc-b") == pid_b          # untouched program keeps its pid
    assert old_venv.is_dir()                             # previous venv kept for rollback

    git(state_repo.path, "revert", "--no-edit", "HEAD")
    out = once(state_repo, agent_root).stdout
    assert "build_venv" not in out and "switch_venv demo" in out, out
    assert get(f"http://127.0.0.1:{a}/") == "demoapp 1.0.0\n"
    assert (agent_root / "envs" / "demo").resolve() == old_venv


def test_invalid_revision_is_rejected_whole_and_last_good_keeps_running(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    good = state_repo.commit("good")
    once(state_repo, agent_root)

    # one valid change (a new version) and one invalid field in the same revision
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace("    port:", "    colour: red\n    port:"))
    bad = state_repo.commit("bad")

    proc = once(state_repo, agent_root, expect=1)
    assert "apps/demo/app.yaml:" in proc.stderr and "colour" in proc.stderr
    assert "build_venv" not in proc.stdout
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"
    st = status(agent_root)
    assert st["applied"]["sha"] == good and st["attempted"]["sha"] == bad
    assert "colour" in st["last_error"] and st["result"] == "invalid"
    assert good in run_agent("status", "--root", str(agent_root)).stdout

    # plan shows the invalid revision as an error (exit 1)
    assert run_agent("plan", *args(state_repo, agent_root)).returncode == 1

    # drift is still healed against the last good revision while the new one is invalid
    subprocess.run(["kill", str(pid_of(agent_root, "demo-web"))], check=True)
    (agent_root / "supervisor/programs/demo-web.conf").write_text("[program:demo-web]\ncommand=/bin/false\n")
    once(state_repo, agent_root, expect=1)
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"

    app.write_text(app.read_text().replace("    colour: red\n", ""))
    fixed = state_repo.commit("fixed")
    once(state_repo, agent_root)
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 2.0.0\n"
    assert status(agent_root)["applied"]["sha"] == fixed


def test_hand_changes_are_drift_and_once_heals_them(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit()
    once(state_repo, agent_root)
    conf = agent_root / "supervisor/programs/demo-web.conf"

    # 1. a hand-edited program file
    conf.write_text(conf.read_text().replace("startsecs=1", "startsecs=2"))
    code, plan = plan_json(state_repo, agent_root)
    assert code == 2 and plan["plan"]["actions"][0]["action"] == "write_program"
    assert "differs" in plan["plan"]["actions"][0]["reason"]
    once(state_repo, agent_root)
    assert plan_json(state_repo, agent_root)[0] == 0

    # 2. a program stopped by hand
    from agent.drivers.supervisor import EmbeddedSupervisor

    EmbeddedSupervisor(agent_root).client().stop("demo-web")
    code, plan = plan_json(state_repo, agent_root)
    assert code == 2 and plan["plan"]["actions"][0]["action"] == "start_program"
    once(state_repo, agent_root)
    assert get(f"http://127.0.0.1:{port}/healthz") == "ok\n"

    # 3. a package changed by hand inside the venv
    venv = (agent_root / "envs/demo").resolve()
    if json.loads((venv / ".gitops-agent.json").read_text())["installer"] == "uv":     # the default (issue 17)
        from agent.drivers.venv import find_uv

        subprocess.run([find_uv(), "pip", "uninstall", "-q", "--python", str(venv / "bin/python"), "demoapp"],
                       check=True, env={"PATH": "/usr/bin:/bin", "HOME": str(agent_root / "installer-home")})
    else:
        subprocess.run([str(venv / "bin/python"), "-m", "pip", "uninstall", "-y", "-q", "demoapp"], check=True)
    code, plan = plan_json(state_repo, agent_root)
    assert code == 2, plan
    repair = plan["plan"]["actions"][0]
    assert repair["action"] == "repair_venv" and "-demoapp==1.0.0" in repair["reason"]
    old_pid = pid_of(agent_root, "demo-web")
    once(state_repo, agent_root)
    assert plan_json(state_repo, agent_root)[0] == 0
    assert pid_of(agent_root, "demo-web") != old_pid     # restarted onto the repaired venv

    # 4. a deleted program file
    conf.unlink()
    assert plan_json(state_repo, agent_root)[0] == 2
    once(state_repo, agent_root)
    assert conf.is_file() and get(f"http://127.0.0.1:{port}/healthz") == "ok\n"


def test_failed_build_leaves_running_service_untouched(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit()
    once(state_repo, agent_root)
    pid = pid_of(agent_root, "demo-web")
    conf_before = (agent_root / "supervisor/programs/demo-web.conf").read_text()

    # a lock whose hash does not match the wheel in the wheelhouse
    state_repo.wheel("2.0.0")
    lock = state_repo.path / "apps/demo/demo.lock"
    lock.write_text("demoapp==2.0.0 --hash=sha256:" + "0" * 64 + "\n")
    state_repo.commit("bad hash")
    proc = once(state_repo, agent_root, expect=1)
    assert "build_venv demo" in proc.stdout and "FAILED" in proc.stdout
    assert "hash" in (proc.stdout + proc.stderr).lower()
    assert pid_of(agent_root, "demo-web") == pid
    assert (agent_root / "supervisor/programs/demo-web.conf").read_text() == conf_before
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"
    assert not [p for p in (agent_root / "venvs").iterdir() if not (p / ".gitops-agent.json").exists()]
    st = status(agent_root)
    assert st["result"] == "failed" and st["resources"]["venv:demo"]["state"] == "failed"


def test_failed_health_check_rolls_the_service_back(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit()
    once(state_repo, agent_root)

    # the new revision points the health check at a path that answers 404
    app = state_repo.path / "apps/demo/app.yaml"
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    app.write_text(app.read_text().replace("/healthz", "/missing"))
    state_repo.commit("unhealthy")
    proc = run_agent("once", *args(state_repo, agent_root)[:-2], "--health-wait", "2")
    assert proc.returncode == 1, proc.stdout
    assert "check_health" in proc.stdout and "rolled back demo-web: its previous config" in proc.stdout
    assert ", running)" in proc.stdout, proc.stdout      # once returns after the old version runs again
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"


def test_independent_services_go_on_when_one_fails(state_repo, agent_root):
    good_port, bad_port = free_port(), free_port()
    state_repo.app(services={"good": {"port": good_port}})
    state_repo.write("apps/broken/app.yaml", f"""\
        apiVersion: gitops-agent/v1
        kind: App
        name: broken
        environments:
          brokenenv: {{lockfile: broken.lock, find_links: [../../wheelhouse], index: false}}
        services:
          bad:
            environment: brokenenv
            port: {bad_port}
            command: [demoapp-server, --port, "{bad_port}"]
        """)
    state_repo.wheel("3.0.0")
    state_repo.write("apps/broken/broken.lock", "demoapp==3.0.0 --hash=sha256:" + "1" * 64 + "\n")
    state_repo.commit()
    proc = once(state_repo, agent_root, expect=1)
    assert get(f"http://127.0.0.1:{good_port}/") == "demoapp 1.0.0\n"
    assert "[skipped] write_program bad" in proc.stdout
    st = status(agent_root)
    assert st["resources"]["venv:brokenenv"]["state"] == "failed"
    assert st["resources"]["program:good"]["state"] == "ok"


def test_removed_app_is_pruned_and_retention_keeps_n(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port, "health": False}})
    state_repo.commit()
    for version in ("2.0.0", "3.0.0", "4.0.0"):
        once(state_repo, agent_root)
        state_repo.lock("apps/demo/demo.lock", version)
        state_repo.commit(version)
    once(state_repo, agent_root, "--retention", "2")
    assert len(list((agent_root / "venvs").iterdir())) == 2
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 4.0.0\n"

    git(state_repo.path, "rm", "-r", "-q", "apps/demo")
    state_repo.commit("remove app")
    # the host's last app: held until fleet.yaml says the host is decommissioned (DESIGN 3d)
    held = once(state_repo, agent_root, expect=1)
    assert "decommission: true" in held.stderr and get(f"http://127.0.0.1:{port}/") == "demoapp 4.0.0\n"
    fleet = (state_repo.path / "fleet.yaml").read_text()
    state_repo.write("fleet.yaml", fleet.replace("h1: {groups: [web]}", "h1: {groups: [web], decommission: true}"))
    state_repo.commit("decommission h1")
    out = once(state_repo, agent_root).stdout
    assert "remove_program demo-web" in out and "remove_environment demo" in out
    assert not (agent_root / "supervisor/programs/demo-web.conf").exists()
    assert not (agent_root / "envs/demo").exists() and not list((agent_root / "venvs").iterdir())
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{port}/", timeout=1)


def test_interrupted_build_is_discarded_and_rebuilt(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port, "health": False}})
    state_repo.commit()
    code, plan = plan_json(state_repo, agent_root)
    build = next(a for a in plan["plan"]["actions"] if a["action"] == "build_venv")
    identity = build["reason"].split("build demo-")[1].split()[0]
    half = agent_root / "venvs" / f"demo-{identity}"
    (half / "bin").mkdir(parents=True)          # what a build killed half-way leaves: no marker
    (half / "bin" / "junk").write_text("x")
    code, plan = plan_json(state_repo, agent_root)
    assert "interrupted build" in plan["plan"]["actions"][1]["reason"] or any(
        "interrupted" in a["reason"] for a in plan["plan"]["actions"])
    once(state_repo, agent_root)
    assert not (half / "bin" / "junk").exists() and (half / ".gitops-agent.json").is_file()


def test_tracks_a_tag_and_a_commit(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port, "health": False}})
    first = state_repo.commit("v1")
    git(state_repo.path, "tag", "-a", "release-1", "-m", "release 1")
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    state_repo.commit("v2 on main")
    once(state_repo, agent_root, "--ref", "release-1")
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"
    assert status(agent_root)["applied"]["sha"] == first
    once(state_repo, agent_root, "--ref", "main")
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 2.0.0\n"
    once(state_repo, agent_root, "--ref", first[:10])
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"


def test_validate_command_reports_every_problem(state_repo):
    state_repo.app(services={"demo-web": {"port": 8080}})
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace("port: 8080", "port: 99999").replace("environment: demo", "environment: nope"))
    proc = run_agent("validate", str(state_repo.path))
    assert proc.returncode == 1
    assert "apps/demo/app.yaml:9: services.demo-web.environment" in proc.stdout, proc.stdout
    assert "apps/demo/app.yaml:10: services.demo-web.port" in proc.stdout, proc.stdout
    data = json.loads(run_agent("validate", "--json", str(state_repo.path)).stdout)
    assert data["valid"] is False and len(data["problems"]) >= 2
    example = Path(__file__).resolve().parent.parent / "desired-state-example"
    assert run_agent("validate", str(example)).returncode == 0


def test_warn_mode_reports_drift_without_healing_and_apply_commits(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    state_repo.commit()
    once(state_repo, agent_root)
    from agent.drivers.supervisor import EmbeddedSupervisor

    EmbeddedSupervisor(agent_root).client().stop("demo-web")
    proc = once(state_repo, agent_root, "--mode", "warn", expect=2)
    assert "drift, not applied" in proc.stdout and "start_program demo-web" in proc.stdout
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{port}/", timeout=1)

    # a new commit is intended change: applied in warn mode only with --apply-commits
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    state_repo.commit("2.0.0")
    once(state_repo, agent_root, "--mode", "warn", expect=2)
    assert "build_venv" not in run_agent("status", "--root", str(agent_root)).stdout
    once(state_repo, agent_root, "--mode", "warn", "--apply-commits")
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 2.0.0\n"

    # per-app mode in app.yaml overrides the agent's enforce mode
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace("hosts: {groups: [web]}", "hosts: {groups: [web]}\nmode: warn"))
    state_repo.commit("app in warn mode")
    once(state_repo, agent_root)
    EmbeddedSupervisor(agent_root).client().stop("demo-web")
    once(state_repo, agent_root, expect=2)


def test_uv_installer_when_the_state_asks_for_it(state_repo, agent_root):
    from agent.drivers.venv import find_uv

    if find_uv() is None:
        pytest.skip("uv is not installed (pip install uv)")
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port}})
    app = state_repo.path / "apps/demo/app.yaml"
    app.write_text(app.read_text().replace("index: false}", "index: false, installer: uv}"))
    state_repo.commit("uv")
    once(state_repo, agent_root)
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"
    marker = json.loads(((agent_root / "envs/demo").resolve() / ".gitops-agent.json").read_text())
    assert marker["installer"] == "uv"
    assert plan_json(state_repo, agent_root)[0] == 0
