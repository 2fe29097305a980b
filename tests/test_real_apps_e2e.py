"""Real apps on a real host (DESIGN §3a): jobs, files, depends_on, processes, the data dir, tcp/command health.

Everything real: a git state repo, `gitops-agent once`/`plan` as subprocesses, uv venvs from hashed locks,
the embedded supervisord. The app is `envapp` (tests/envapp.py): a service that answers its own env,
argv, start time and the files its env names; a job that records each run (and its env) in the app's
data dir; a worker; a health command. What is checked is what a user relies on:

- a `before` job that fails or times out changes nothing that serves; the app is reported failed with
  the job's name, exit code and stderr tail; another app of the same commit is applied;
- a job runs only when its inputs change; a file only a job uses restarts nothing;
- an `after` job's failure rolls the restarted services back;
- a file change restarts exactly the services that reference it, and plan says `file NAME changed`;
- depends_on orders starts (the dependent starts after the dependency is healthy) and a failing
  dependency blocks its dependents; `processes: 2` runs two processes;
- `{data_dir: true}` survives deploys, rollbacks and the app's removal;
- a hand edit or deletion of a rendered file is drift, healed;
- tcp and command health gates pass a good release and roll back a bad one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import free_port, git
from envapp import Site, app_doc, env_of, get, web

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.stop()


def pids(ports: dict[str, int]) -> dict[str, int]:
    return {name: env_of(port)["pid"] for name, port in ports.items()}


def lines_about(output: str, word: str) -> list[str]:
    return [line for line in output.splitlines() if word in line]


def job(command: list[str], **extra) -> dict:
    return {"environment": "main", "command": command, **extra}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- before jobs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["exit", "timeout"])
def test_a_failing_before_job_changes_nothing_that_serves_and_other_apps_go_on(site, how):
    pw, po, ps = free_port(), free_port(), free_port()

    def shop(command: list[str]) -> dict:
        env = {"SHOP_CONFIG": {"file": "settings.toml"}, "SHOP_DATA": {"data_dir": True}}
        doc = app_doc("shop", {"shop-web": web(pw, env=env), "shop-side": web(ps, environment="side")},
                      files={"settings.toml": {"template": "settings.toml.j2"}},
                      jobs={"migrate": job(command, env={**env, "WHY": "the table orders is locked"}, timeout_s=3)})
        doc["environments"]["side"] = {**doc["environments"]["main"], "lockfile": "side.lock"}
        return doc

    site.write("apps/shop/settings.toml.j2", "release = 'one'\n")
    site.app(shop(["envapp-job", "--tag", "one"]), "1.0.0")
    site.app(app_doc("other", {"other-web": web(po)}, env="other"), "1.0.0")
    good = site.commit("one")
    site.once()
    assert get(pw) == "envapp 1.0.0\n" and get(po) == "envapp 1.0.0\n"
    before = {"pid": env_of(pw)["pid"], "conf": site.conf("shop-web"), "link": os.readlink(site.root / "envs/main"),
              "config": get(pw, "/read?var=SHOP_CONFIG")}
    assert before["config"] == "release = 'one'\n"

    failing = (["envapp-job", "--tag", "two", "--stderr-var", "WHY", "--exit", "1"] if how == "exit"
               else ["envapp-job", "--tag", "two", "--stderr-var", "WHY", "--sleep", "120"])
    site.write("apps/shop/settings.toml.j2", "release = 'two'\n")
    site.app(shop(failing), "2.0.0")
    site.lock("other", "2.0.0", "other")
    bad = site.commit("two: a migration that fails")
    proc = site.once(expect=1)
    out = proc.stdout + proc.stderr

    # the shop's service: old venv, old config, old file, same process, still serving
    assert get(pw) == "envapp 1.0.0\n"
    now = {"pid": env_of(pw)["pid"], "conf": site.conf("shop-web"), "link": os.readlink(site.root / "envs/main"),
           "config": get(pw, "/read?var=SHOP_CONFIG")}
    assert now == before
    # the other app of the same commit is applied, and so is the shop's other environment (the job is main's)
    assert get(po) == "envapp 2.0.0\n"
    assert get(ps) == "envapp 2.0.0\n"
    # the job ran in the new venv and was reported: name, exit code or timeout, stderr tail
    runs = site.job_runs("shop")
    assert [r["tag"] for r in runs] == ["one", "two"] and runs[1]["version"] == "2.0.0"
    assert "[FAILED] run_job shop/migrate" in proc.stdout, out
    why = "exited 1" if how == "exit" else "timed out after 3s"
    assert why in out and "the value of WHY is <the table orders is locked>" in out, out
    st = site.status()
    assert st["result"] == "failed" and st["applied"]["sha"] == good and st["attempted"]["sha"] == bad
    job_state = st["resources"]["job:shop/migrate"]
    assert job_state["state"] == "failed" and "migrate" in job_state["message"] and why in job_state["message"]
    assert "the table orders is locked" in job_state["message"]
    assert "migrate" in st["last_error"] and why in st["last_error"]
    if how == "timeout":
        assert not alive(runs[1]["pid"]), "the timed-out job must be killed"
    # a later reconcile tries the job again (it has not succeeded with these inputs), still serving the old one
    site.once(expect=1)
    assert [r["tag"] for r in site.job_runs("shop")] == ["one", "two", "two"]
    assert env_of(pw)["pid"] == before["pid"] and get(pw) == "envapp 1.0.0\n"


def test_a_job_runs_only_when_its_inputs_change_and_a_job_only_file_restarts_nothing(site):
    pw = free_port()

    def shop(*server_args: str) -> dict:
        return app_doc("shop", {"shop-web": web(pw, *server_args, env={"SHOP_CONFIG": {"file": "settings.toml"}})},
                       files={"settings.toml": {"template": "settings.toml.j2"}, "job.conf": {"source": "job.conf"}},
                       jobs={"migrate": job(["envapp-job", "--tag", "m", "--get", f"http://127.0.0.1:{pw}/"],
                                            env={"JOB_CONF": {"file": "job.conf"}})})

    site.write("apps/shop/settings.toml.j2", "a = 1\n")
    site.write("apps/shop/job.conf", "batch = 10\n")
    site.app(shop(), "1.0.0")
    site.commit("one")
    site.once()
    assert len(site.job_runs("shop")) == 1
    pid = env_of(pw)["pid"]

    for _ in range(2):                                         # no-op reconciles: the job does not run
        assert "converged" in site.once().stdout
    site.plan(expect=0)
    assert len(site.job_runs("shop")) == 1

    site.app(shop("--healthz-status", "200"))                  # the service changes, not the job's inputs
    site.commit("service argv")
    site.once()
    assert len(site.job_runs("shop")) == 1
    pid2 = env_of(pw)["pid"]
    assert pid2 != pid

    site.write("apps/shop/job.conf", "batch = 20\n")          # a file only the job uses
    site.commit("job.conf")
    plan = site.plan()
    assert any("file job.conf changed" in line for line in lines_about(plan.stdout, "write_file")), plan.stdout
    assert any("inputs changed" in line for line in lines_about(plan.stdout, "run_job")), plan.stdout
    assert not lines_about(plan.stdout, "_program"), plan.stdout
    site.once()
    runs = site.job_runs("shop")
    assert len(runs) == 2 and Path(runs[1]["env"]["JOB_CONF"]).read_text() == "batch = 20\n"
    assert env_of(pw)["pid"] == pid2                            # restarted nothing

    site.lock("shop", "2.0.0")                                 # a new venv is a new input: runs again, in it
    site.commit("2.0.0")
    site.once()
    runs = site.job_runs("shop")
    assert len(runs) == 3 and runs[2]["version"] == "2.0.0"
    assert runs[2]["got"] == "envapp 1.0.0\n"                  # before the service moved to the new venv
    assert get(pw) == "envapp 2.0.0\n"


# --- after jobs --------------------------------------------------------------------------------------

def test_a_failing_after_job_rolls_the_restarted_services_back(site):
    pw, pc = free_port(), free_port()

    def shop(*smoke_args: str) -> dict:
        return app_doc("shop", {"shop-web": web(pw), "shop-admin": web(pc)},
                       jobs={"smoke": job(["envapp-job", "--tag", "smoke", "--get", f"http://127.0.0.1:{pw}/",
                                           *smoke_args], run="after")})

    site.app(shop(), "1.0.0")
    site.commit("one")
    site.once()
    before = pids({"shop-web": pw, "shop-admin": pc})
    link = os.readlink(site.root / "envs/main")
    assert [r["version"] for r in site.job_runs("shop")] == ["1.0.0"]

    site.app(shop("--stderr-var", "HOME", "--exit", "4"), "2.0.0")
    site.commit("two, whose smoke test fails")
    proc = site.once(expect=1)
    out = proc.stdout + proc.stderr
    runs = site.job_runs("shop")
    assert [r["version"] for r in runs] == ["1.0.0", "2.0.0"]    # ran in the new venv ...
    assert "[FAILED] run_job shop/smoke" in proc.stdout and "exited 4" in out, out
    assert "rolled back shop-web" in out and "rolled back shop-admin" in out, out
    assert get(pw) == "envapp 1.0.0\n" and get(pc) == "envapp 1.0.0\n"   # ... and both services are back
    after = pids({"shop-web": pw, "shop-admin": pc})
    assert all(after[n] != before[n] for n in after)            # they did run 2.0.0 in between
    assert runs[1]["got"] == "envapp 2.0.0\n"                    # it ran once shop-web served 2.0.0
    assert os.readlink(site.root / "envs/main") == link
    st = site.status()
    assert st["result"] == "failed" and st["resources"]["job:shop/smoke"]["state"] == "failed"


# --- files -------------------------------------------------------------------------------------------

def test_a_file_change_restarts_exactly_the_services_that_reference_it(site):
    ports = {"web-a": free_port(), "web-b": free_port(), "web-c": free_port()}
    doc = app_doc("shop", {"web-a": web(ports["web-a"], env={"SHOP_CONFIG": {"file": "settings.toml"}}),
                           "web-b": web(ports["web-b"], env={"GREETING": {"file": "greeting.txt"}}),
                           "web-c": web(ports["web-c"], env={"PLAIN": "x"})},
                  files={"settings.toml": {"template": "settings.toml.j2"}, "greeting.txt": {"source": "greeting.txt"}})
    site.write("apps/shop/settings.toml.j2", "port = {{ services['web-a'].port }}\nhost = '{{ host.name }}'\n")
    site.write("apps/shop/greeting.txt", "hello\n")
    site.app(doc, "1.0.0")
    site.commit("one")
    site.once()
    assert get(ports["web-a"], "/read?var=SHOP_CONFIG") == f"port = {ports['web-a']}\nhost = 'h1'\n"
    assert get(ports["web-b"], "/read?var=GREETING") == "hello\n"
    p1 = pids(ports)

    site.write("apps/shop/settings.toml.j2", "port = {{ services['web-a'].port }}\nhost = 'changed'\n")
    site.commit("settings")
    plan = site.plan()
    assert any("file settings.toml changed" in line for line in lines_about(plan.stdout, "write_file")), plan.stdout
    web_a = lines_about(plan.stdout, "write_program web-a")
    assert web_a and "file settings.toml changed" in web_a[0], plan.stdout
    assert not lines_about(plan.stdout, "web-b") and not lines_about(plan.stdout, "web-c"), plan.stdout
    site.once()
    p2 = pids(ports)
    assert p2["web-a"] != p1["web-a"] and p2["web-b"] == p1["web-b"] and p2["web-c"] == p1["web-c"]
    assert get(ports["web-a"], "/read?var=SHOP_CONFIG") == f"port = {ports['web-a']}\nhost = 'changed'\n"

    site.write("apps/shop/greeting.txt", "bonjour\n")
    site.commit("greeting")
    plan = site.plan()
    web_b = lines_about(plan.stdout, "write_program web-b")
    assert web_b and "file greeting.txt changed" in web_b[0], plan.stdout
    assert not lines_about(plan.stdout, "web-a") and not lines_about(plan.stdout, "web-c"), plan.stdout
    site.once()
    p3 = pids(ports)
    assert p3["web-b"] != p2["web-b"] and p3["web-a"] == p2["web-a"] and p3["web-c"] == p2["web-c"]
    assert get(ports["web-b"], "/read?var=GREETING") == "bonjour\n"
    assert "converged" in site.once().stdout and pids(ports) == p3
    versions = sorted(p.parent.name for p in (site.root / "apps/shop/files/.v").glob("*/*"))
    assert len(versions) == 2, versions                         # one version of each file is left


def test_a_file_change_is_converged_in_one_reconcile(site):
    pw = free_port()
    site.write("apps/shop/settings.toml.j2", "a = 1\n")
    site.app(app_doc("shop", {"shop-web": web(pw, env={"SHOP_CONFIG": {"file": "settings.toml"}})},
                     files={"settings.toml": {"template": "settings.toml.j2"}}), "1.0.0")
    site.commit("one")
    site.once()
    site.write("apps/shop/settings.toml.j2", "a = 2\n")
    site.commit("two")
    site.once()
    assert get(pw, "/read?var=SHOP_CONFIG") == "a = 2\n"
    plan = site.plan(expect=None)
    assert plan.returncode == 0, plan.stdout


def test_a_hand_edited_or_deleted_rendered_file_is_drift_and_healed(site):
    pw = free_port()
    doc = app_doc("shop", {"shop-web": web(pw, env={"SHOP_CONFIG": {"file": "settings.toml"},
                                                    "ROBOTS": {"file": "robots.txt"}})},
                  files={"settings.toml": {"template": "settings.toml.j2"},
                         "robots.txt": {"source": "robots.txt", "mode": "0644"}})
    site.write("apps/shop/settings.toml.j2", "debug = false\n")
    site.write("apps/shop/robots.txt", "User-agent: *\n")
    site.app(doc, "1.0.0")
    site.commit("one")
    site.once()
    link = site.root / "apps/shop/files/settings.toml"
    target = link.resolve()
    assert link.is_symlink() and target.read_text() == "debug = false\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    robots = (site.root / "apps/shop/files/robots.txt").resolve()
    assert stat.S_IMODE(robots.stat().st_mode) == 0o644 and robots.read_text() == "User-agent: *\n"
    site.plan(expect=0)

    target.write_text("debug = true\n")                        # a hand edit
    plan = site.plan()
    assert any("settings.toml differs on disk" in line for line in lines_about(plan.stdout, "write_file")), plan.stdout
    site.once()
    assert target.read_text() == "debug = false\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert get(pw, "/read?var=SHOP_CONFIG") == "debug = false\n"
    site.plan(expect=0)

    target.unlink()                                            # a deletion
    plan = site.plan()
    deleted = lines_about(plan.stdout, "write_file shop/settings.toml")
    assert deleted and "deleted" in deleted[0] and "changed" not in deleted[0], plan.stdout
    site.once()
    assert target.read_text() == "debug = false\n"

    robots.chmod(0o600)
    robots.write_text("Disallow: /\n")
    link.unlink()                                              # the files/<name> link, too
    plan = site.plan()
    assert lines_about(plan.stdout, "write_file shop/robots.txt") and lines_about(plan.stdout, "write_file shop/settings.toml")
    site.once()
    assert link.is_symlink() and link.resolve() == target and link.read_text() == "debug = false\n"
    assert robots.read_text() == "User-agent: *\n" and stat.S_IMODE(robots.stat().st_mode) == 0o644
    site.plan(expect=0)


# --- ordering and processes --------------------------------------------------------------------------

def test_depends_on_orders_starts_and_processes_run_several(site):
    pd, pa, pk = free_port(), free_port(), free_port()
    record = site.data("shop") / "workers.jsonl"
    doc = app_doc("shop", {
        # file order is the reverse of start order: the agent must sort them
        "worker": {"environment": "main", "command": ["envapp-worker", "--record", str(record)],
                   "env": {"SHOP_DATA": {"data_dir": True}}, "depends_on": ["api"], "processes": 2},
        "api": web(pa, depends_on=["db"]),
        "db": web(pd, "--bind-delay", "2"),
    })
    site.app(doc, "1.0.0")
    site.commit("one")
    site.once()
    db, api = env_of(pd), env_of(pa)
    assert api["started_at"] >= db["bound_at"], "api started before db was healthy"
    info = site.programs()
    members = {n: p for n, p in info.items() if n.startswith("worker:")}
    assert sorted(members) == ["worker:worker-0", "worker:worker-1"], info.keys()
    assert all(p["statename"] == "RUNNING" for p in members.values())
    assert len({p["pid"] for p in members.values()}) == 2
    workers = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(w["process"] for w in workers) == ["worker-0", "worker-1"]
    assert all(w["started_at"] >= api["bound_at"] for w in workers), "a worker started before api was healthy"
    priority = {n: int(next(line for line in site.conf(n).splitlines() if line.startswith("priority="))[9:])
                for n in ("db", "api", "worker")}
    assert priority["db"] < priority["api"] < priority["worker"], priority
    assert "converged" in site.once().stdout

    site.lock("shop", "2.0.0")                                 # all three restart: in dependency order again
    site.app(app_doc("keep", {"keep-web": web(pk)}, env="keep"), "1.0.0")
    site.commit("two")
    site.once()
    db2, api2 = env_of(pd), env_of(pa)
    assert db2["version"] == api2["version"] == "2.0.0"
    assert api2["started_at"] >= db2["bound_at"], "api restarted before the new db was healthy"
    workers = [json.loads(line) for line in record.read_text().splitlines()][2:]
    assert sorted(w["process"] for w in workers) == ["worker-0", "worker-1"]
    assert all(w["started_at"] >= api2["bound_at"] for w in workers), "a worker restarted before api was healthy"

    shutil.rmtree(site.repo.path / "apps/shop")                # removed: stopped in reverse order
    site.commit("remove shop")
    proc = site.once()
    removed = [line.split()[2].rstrip(":") for line in proc.stdout.splitlines() if "remove_program" in line]
    assert removed == ["worker", "api", "db"], proc.stdout


def test_a_failing_dependency_blocks_its_dependents(site):
    pd, pa, pd2, pa2 = (free_port() for _ in range(4))

    def shop(db_args: tuple[str, ...] = ()) -> dict:
        return app_doc("shop", {"db": web(pd, *db_args), "api": web(pa, depends_on=["db"])})

    site.app(shop(), "1.0.0")
    site.commit("one")
    site.once()
    api_pid = env_of(pa)["pid"]

    site.app(shop(("--healthz-status", "503")), "2.0.0")      # db 2.0.0 never turns healthy; api would move too
    site.app(app_doc("fresh", {"db2": web(pd2, "--healthz-status", "503"), "api2": web(pa2, depends_on=["db2"])},
                     env="fresh"), "1.0.0")
    site.commit("two: a broken db")
    proc = site.once("--health-wait", "4", expect=1)
    out = proc.stdout + proc.stderr
    assert "[FAILED] check_health db" in proc.stdout and "rolled back db" in out, out
    assert get(pd) == "envapp 1.0.0\n"                         # db rolled back
    assert get(pa) == "envapp 1.0.0\n" and env_of(pa)["pid"] == api_pid   # api not touched
    assert lines_about(proc.stdout, "[skipped] write_program api"), proc.stdout
    assert get(pa2) is None and "api2" not in site.programs()     # a new dependent is never started
    assert lines_about(proc.stdout, "[skipped] write_program api2"), proc.stdout


# --- the data dir ------------------------------------------------------------------------------------

def test_the_data_dir_survives_deploys_rollbacks_and_the_apps_removal(site):
    pw, pk = free_port(), free_port()

    def shop(*args: str) -> dict:
        return app_doc("shop", {"shop-web": web(pw, *args, env={"SHOP_DATA": {"data_dir": True}})},
                       jobs={"migrate": job(["envapp-job", "--tag", "m"])})

    site.app(shop(), "1.0.0")
    site.app(app_doc("keep", {"keep-web": web(pk)}, env="keep"), "1.0.0")
    one = site.commit("one")
    site.once()
    data = site.data("shop")
    assert env_of(pw)["env"]["SHOP_DATA"] == str(data)
    (data / "shop.sqlite3").write_bytes(b"SQLite format 3\0rows")
    (data / "uploads").mkdir()
    (data / "uploads" / "a.png").write_bytes(b"png")

    def kept() -> bool:
        return ((data / "shop.sqlite3").read_bytes() == b"SQLite format 3\0rows"
                and (data / "uploads" / "a.png").read_bytes() == b"png")

    site.lock("shop", "2.0.0")
    site.commit("two")
    site.once()
    assert get(pw) == "envapp 2.0.0\n" and kept()
    assert len(site.job_runs("shop")) == 2

    site.app(shop("--healthz-status", "500"), "3.0.0")          # fails its gate: rolled back to 2.0.0
    site.commit("three, broken")
    site.once("--health-wait", "4", expect=1)
    assert get(pw) == "envapp 2.0.0\n" and kept()

    git(site.repo.path, "revert", "--no-edit", "HEAD")          # back to two by a commit
    git(site.repo.path, "checkout", "-q", one, "--", "apps/shop")    # and then back to one
    site.commit("back to one")
    site.once()
    assert get(pw) == "envapp 1.0.0\n" and kept()
    assert stat.S_IMODE(data.stat().st_mode) == 0o750

    shutil.rmtree(site.repo.path / "apps/shop")                # the app leaves this host
    site.commit("remove shop")
    site.once()
    assert get(pw) is None and "shop-web" not in site.programs() and get(pk) == "envapp 1.0.0\n"
    assert kept(), "the data dir must outlive the app's removal"


# --- health gates ------------------------------------------------------------------------------------

def test_tcp_and_command_health_gates(site):
    pt, pc = free_port(), free_port()

    def shop(tcp_args: tuple[str, ...] = (), check: list[str] | None = None) -> dict:
        check = check or ["envapp-check", "--url", f"http://127.0.0.1:{pc}/healthz", "--var", "NEEDED"]
        return app_doc("shop", {"by-tcp": web(pt, *tcp_args, health="tcp"),
                                "by-command": web(pc, env={"NEEDED": "yes"},
                                                  health={"command": check, "timeout_s": 5})})

    site.app(shop(), "1.0.0")
    site.commit("one")
    proc = site.once()
    assert lines_about(proc.stdout, "[ok] check_health by-tcp") and lines_about(proc.stdout, "[ok] check_health by-command")
    assert get(pt) == "envapp 1.0.0\n" and get(pc) == "envapp 1.0.0\n"

    site.app(shop(("--no-bind",), ["envapp-check", "--exit", "7"]), "2.0.0")
    site.commit("two: neither passes its gate")
    proc = site.once("--health-wait", "4", expect=1)
    out = proc.stdout + proc.stderr
    assert "[FAILED] check_health by-tcp" in proc.stdout and "[FAILED] check_health by-command" in proc.stdout, out
    assert "exit 7" in out and "told to exit 7" in out, out
    assert "rolled back by-tcp" in out and "rolled back by-command" in out, out
    assert get(pt) == "envapp 1.0.0\n" and get(pc) == "envapp 1.0.0\n"

    # a command that needs the service's env: passes only because the agent gives it the service's env
    site.app(shop(check=["envapp-check", "--url", f"http://127.0.0.1:{pc}/healthz", "--var", "NEEDED"]), "2.0.0")
    site.commit("three: good again")
    site.once()
    assert get(pt) == "envapp 2.0.0\n" and get(pc) == "envapp 2.0.0\n"
