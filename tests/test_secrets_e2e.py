"""A secret value end to end (DESIGN §3a "Secrets"): real age CLI, real git state repo, real supervisord, uv.

One value full of what parsers split or expand (`%`, `,`, quotes, `=`, spaces at both ends, `$HOME`,
`%(here)s`, `%(ENV_HOME)s`, `;#`, a backslash) is encrypted with the stock `age` CLI. It must reach a service's
process and a job's process byte for byte (the service answers its own os.environ on /env; the job records
its env in a 0600 file in the data dir), and appear nowhere else: not in any output of `once`, `plan`,
`facts`, `status` or `validate` (text and JSON, `--log-level DEBUG`, `--log-format json`), status.json, the
daemon's /metrics, status page and log, supervisord's log and program files, argv, any file under the agent
root that is not mode 0600, or a failing job's output kept in status (shown as ***). A new value says
`secret django/SECRET_KEY changed` and restarts exactly the services that use that key.

The value carries two plain tokens (one near each end): a leak in any form (JSON-escaped, quoted, cut by a
parser) still shows at least one of them, so the checks look for the tokens as well as the whole value.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import urllib.request
from pathlib import Path

import pytest
from conftest import StateRepo, free_port, git, run_agent
from daemon_helpers import http_get, start_daemon, wait_until
from envapp import envapp_lock
from reliability._support import metric
from shopfactory import encrypt_dotenv

pytestmark = pytest.mark.timeout(600)

T1, T2 = "Qz7kSECRETstart", "Wx4pSECRETend"
SECRET = f' {T1}%a,b"c\'d=e f $HOME %(here)s %(ENV_HOME)s %% ;#x \\n {{{{ 7*7 }}}} {T2} '
T3, T4 = "Hn2vROTATEDstart", "Jm8cROTATEDend"
ROTATED = f'{T3} ,=" %(here)s $PATH; {T4}'
T5 = "Lp3rOTHERtoken"
OTHER = f"other {T5} value, with=equals"
T6 = "Vb9sTHIRDtoken"
THIRD = f"third {T6}%"

FLEET = "apiVersion: gitops-agent/v1\nkind: Fleet\nhosts:\n  h1: {groups: [web]}\n"
TEMPLATE = 'secret_key = "{{ secrets.django.SECRET_KEY }}"\nport = {{ services["web-a"].port }}\n'


def app_yaml(ports: dict[str, int], job: str = "[envapp-job, --tag, migrate]", web_a_args: str = "") -> str:
    def web(name: str, env: str) -> str:
        p = ports[name]
        extra = web_a_args if name == "web-a" else ""
        return (f"  {name}:\n    environment: main\n    port: {p}\n    command: [envapp-server, --port, \"{p}\"{extra}]\n"
                f"    env: {env}\n    health: {{http: \"http://127.0.0.1:{p}/healthz\"}}\n")

    return (
        "apiVersion: gitops-agent/v1\nkind: App\nname: shop\nhosts: {groups: [web]}\n"
        "environments:\n  main: {lockfile: main.lock, find_links: [../../wheelhouse], index: false, installer: uv}\n"
        "secrets:\n  django: django.env.age\n"
        "files:\n  settings.toml: {template: settings.toml.j2}\n"
        "jobs:\n  migrate:\n    environment: main\n"
        f"    command: {job}\n"
        "    env: {SECRET_KEY: {secret: django/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}, THIRD: {secret: django/THIRD}}\n"
        "services:\n"
        + web("web-a", "{SECRET_KEY: {secret: django/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}, PLAIN: plain}")
        + web("web-b", "{OTHER_KEY: {secret: django/OTHER}}")
        + web("web-c", "{PLAIN: plain}")
    )


class Host:
    """A state repo, an age identity and an agent root converged on the `shop` app."""

    def __init__(self, base: Path):
        self.base = base
        self.repo = StateRepo(base / "state")
        self.root = base / "root"
        self.keys = base / "keys"
        self.ports = {n: free_port() for n in ("web-a", "web-b", "web-c")}
        self.values = {"SECRET_KEY": SECRET, "OTHER": OTHER, "THIRD": THIRD}
        self.identity = encrypt_dotenv(self.values, self.secret_path, self.keys)
        self.repo.write("fleet.yaml", FLEET)
        self.repo.write("apps/shop/main.lock", envapp_lock(self.repo.path / "wheelhouse"))
        self.repo.write("apps/shop/settings.toml.j2", TEMPLATE)
        self.repo.write("apps/shop/app.yaml", app_yaml(self.ports))
        self.good = self.repo.commit("shop with secrets")

    @property
    def secret_path(self) -> Path:
        return self.repo.path / "apps/shop/django.env.age"

    def encrypt(self, values: dict[str, str]) -> None:
        self.values = dict(values)
        self.secret_path.unlink()
        encrypt_dotenv(values, self.secret_path, identity=self.identity)

    def args(self, *extra: str) -> list[str]:
        return ["--repo", self.repo.url, "--host", "h1", "--root", str(self.root), "--age-identity", str(self.identity),
                "--health-wait", "30", *extra]

    def agent(self, command: str, *extra: str, expect: int | None = 0):
        proc = run_agent(command, *self.args(*extra))
        if expect is not None:
            assert proc.returncode == expect, f"{command} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def env_of(self, service: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[service]}/env", timeout=5) as resp:
            return json.loads(resp.read())

    def read_via(self, service: str, var: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[service]}/read?var={var}", timeout=5) as resp:
            return resp.read()

    def job_runs(self) -> list[dict]:
        path = self.root / "apps/shop/data/job-runs.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def pids(self) -> dict[str, int]:
        return {name: self.env_of(name)["pid"] for name in self.ports}

    def status_json(self) -> dict:
        return json.loads((self.root / "state/status.json").read_text())

    def secrets(self) -> tuple[str, ...]:
        """Every value that must stay hidden, plus its tokens, plus the values of earlier commits."""
        return (SECRET, ROTATED, OTHER, THIRD, json.dumps(SECRET)[1:-1], T1, T2, T3, T4, T5, T6)


def leaks(text: str | bytes, needles) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [n for n in needles if n in text]


def assert_hidden(where: str, text: str | bytes, needles) -> None:
    found = leaks(text, needles)
    assert not found, f"secret material {found} found in {where}"


def files_not_private(root: Path):
    """(path, bytes) of every regular file under `root` whose mode is not 0600 (symlinks skipped)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != 0o600:
                yield path, path.read_bytes()


def private_files_holding(root: Path, needle: str) -> list[Path]:
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            if needle.encode() in path.read_bytes():
                found.append(path)
    return found


def assert_root_hides(host: Host) -> None:
    needles = host.secrets()
    for path, data in files_not_private(host.root):
        assert_hidden(f"{path} (mode {stat.S_IMODE(path.stat().st_mode):04o})", data, needles)
    sup = host.root / "supervisor"
    for path in [*sup.glob("*.conf"), *(sup / "programs").glob("*.conf"), *(host.root / "logs").glob("supervisord*")]:
        assert_hidden(str(path), path.read_bytes(), needles)
    assert_hidden("status.json", (host.root / "state/status.json").read_bytes(), needles)


@contextlib.contextmanager
def deployed(base: Path):
    h = Host(base)
    try:
        h.first_once = h.agent("once", "--log-level", "DEBUG", "--log-format", "json")
        yield h
    finally:
        from agent.drivers.supervisor import EmbeddedSupervisor

        EmbeddedSupervisor(h.root).stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The host the ordered tests below share (deploying costs ~10 s)."""
    with deployed(tmp_path_factory.mktemp("secrets")) as h:
        yield h


@pytest.fixture
def own_host(tmp_path):
    """A host of its own, for a test whose failure would leave secret material in status.json (its events
    are kept) and so spoil the shared host's later checks."""
    with deployed(tmp_path) as h:
        yield h


def test_the_value_reaches_the_service_and_the_job_byte_for_byte(host):
    env = host.env_of("web-a")
    assert env["env"]["SECRET_KEY"] == SECRET
    assert env["env"]["PLAIN"] == "plain"
    assert host.env_of("web-b")["env"]["OTHER_KEY"] == OTHER
    assert "SECRET_KEY" not in host.env_of("web-b")["env"] and "SECRET_KEY" not in host.env_of("web-c")["env"]
    # the rendered template, read by the service through the path its env names (a 0600 file)
    expected = f'secret_key = "{SECRET}"\nport = {host.ports["web-a"]}\n'.encode()
    assert host.read_via("web-a", "SHOP_CONFIG") == expected
    config = Path(env["env"]["SHOP_CONFIG"])
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # never in argv: the service's own, and what /proc shows of it
    assert_hidden("web-a argv", json.dumps(env["argv"]), host.secrets())
    assert_hidden("web-a cmdline", Path(f"/proc/{env['pid']}/cmdline").read_bytes(), host.secrets())

    runs = host.job_runs()
    assert len(runs) == 1 and runs[0]["tag"] == "migrate"
    assert runs[0]["env"]["SECRET_KEY"] == SECRET and runs[0]["env"]["THIRD"] == THIRD
    assert Path(runs[0]["env"]["SHOP_CONFIG"]).read_bytes() == expected
    assert runs[0]["cwd"] == str(host.root / "apps/shop/data")
    assert_hidden("job argv", json.dumps(runs[0]["argv"]), host.secrets())


def test_the_value_appears_in_no_output_status_or_world_readable_file(host):
    needles = host.secrets()
    first = host.first_once
    assert_hidden("first `once --log-level DEBUG --log-format json`", first.stdout + first.stderr, needles)
    outputs = {}
    # without the memo of the last decryption, the first `once` below decrypts again (its DEBUG log says so);
    # the later ones plan from the memo's digests (tests/test_secrets_memo.py)
    (host.root / "state/materials.memo").unlink()
    log_flags = {"text": ("--log-level", "DEBUG"), "json": ("--log-level", "DEBUG", "--log-format", "json")}
    for fmt, flags in log_flags.items():
        outputs[f"once ({fmt})"] = host.agent("once", *flags)
        outputs[f"once --json ({fmt})"] = host.agent("once", "--json", *flags)
        outputs[f"plan ({fmt})"] = host.agent("plan", *flags)
        outputs[f"plan --json ({fmt})"] = host.agent("plan", "--json", *flags)
        outputs[f"facts ({fmt})"] = host.agent("facts", *flags)
        outputs[f"facts --json ({fmt})"] = host.agent("facts", "--json", *flags)
        outputs[f"status ({fmt})"] = host.agent("status", *flags)
        outputs[f"status --json ({fmt})"] = host.agent("status", "--json", *flags)
    outputs["validate"] = run_agent("validate", str(host.repo.path))
    outputs["validate --json"] = run_agent("validate", "--json", str(host.repo.path))
    assert outputs["validate"].returncode == 0, outputs["validate"].stdout + outputs["validate"].stderr
    for what, proc in outputs.items():
        assert_hidden(f"`{what}` stdout", proc.stdout, needles)
        assert_hidden(f"`{what}` stderr", proc.stderr, needles)
    assert "converged" in outputs["once (text)"].stdout
    assert json.loads(outputs["plan --json (json)"].stdout)["plan"]["converged"] is True
    # the DEBUG logs did say something (the checks above read real log output)
    assert "decrypting apps/shop/django.env.age" in outputs["once (text)"].stderr
    assert len(host.job_runs()) == 1                  # a no-op reconcile never runs the job
    assert_root_hides(host)
    # where the value does live on disk: only in files of mode 0600
    holders = private_files_holding(host.root, T1)
    assert holders, "the secret env file and rendered template should hold the value"
    for path in holders:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_failing_job_that_prints_the_value_shows_stars(host):
    before = host.pids()
    host.repo.write("apps/shop/app.yaml", app_yaml(host.ports, "[envapp-job, --tag, leaky, --stderr-var, SECRET_KEY, --exit, \"3\"]"))
    bad = host.repo.commit("a job that prints the secret and fails")
    proc = host.agent("once", "--log-level", "DEBUG", expect=1)
    out = proc.stdout + proc.stderr
    assert "run_job shop/migrate" in proc.stdout and "exited 3" in out, out
    assert "the value of SECRET_KEY is <***>" in out, out
    assert_hidden("failed `once`", out, host.secrets())
    st = host.status_json()
    assert st["attempted"]["sha"] == bad and st["applied"]["sha"] == host.good and st["result"] == "failed"
    assert "<***>" in st["last_error"] and "exited 3" in st["last_error"]
    assert "<***>" in st["resources"]["job:shop/migrate"]["message"]
    status_text = host.agent("status", "--json").stdout + host.agent("status").stdout
    assert "<***>" in status_text
    assert_hidden("status after a failed job", status_text, host.secrets())
    assert_root_hides(host)
    err_log = host.root / "logs/job-shop-migrate.err.log"
    assert T1 in err_log.read_text() and stat.S_IMODE(err_log.stat().st_mode) == 0o600
    assert host.pids() == before                       # a failed before-job changes nothing that serves

    git(host.repo.path, "revert", "--no-edit", "HEAD")
    host.repo.commit("revert the leaky job")
    runs = len(host.job_runs())
    host.agent("once")
    assert len(host.job_runs()) == runs                 # its inputs are those of its last successful run again
    assert host.pids() == before


def test_a_crashing_service_that_prints_the_value_shows_stars(own_host):
    host = own_host
    pad = 500 - len(SECRET) // 2 - 2                   # the 500-character tail kept starts inside the value
    host.repo.write("apps/shop/app.yaml", app_yaml(
        host.ports, web_a_args=f", --crash-print, SECRET_KEY, --crash-pad, \"{pad}\""))
    host.repo.commit("web-a prints its secret and dies")
    proc = host.agent("once", "--log-level", "DEBUG", expect=1)
    out = proc.stdout + proc.stderr
    assert "[FAILED] check_health web-a" in out and "rolled back web-a" in out, out
    assert host.env_of("web-a")["env"]["SECRET_KEY"] == SECRET          # rolled back, serving
    assert_hidden("once with a crashing service", out, host.secrets())
    assert_root_hides(host)


def test_a_job_stderr_tail_that_cuts_the_value_leaks_no_fragment(own_host):
    host = own_host
    pad = 2000 - len(SECRET.encode()) // 2 - 2         # the 2000-byte tail window starts inside the value
    host.repo.write("apps/shop/app.yaml", app_yaml(
        host.ports, f"[envapp-job, --tag, chatty, --stderr-var, SECRET_KEY, --stderr-pad, \"{pad}\", --exit, \"3\"]"))
    host.repo.commit("a job that prints the secret, then a lot")
    proc = host.agent("once", expect=1)
    out = proc.stdout + proc.stderr
    assert "run_job shop/migrate" in out and "exited 3" in out, out
    assert_hidden("once with a chatty failing job", out, host.secrets())
    assert_hidden("status.json", (host.root / "state/status.json").read_text(), host.secrets())


def test_a_value_printed_as_repr_or_json_is_hidden_too(own_host):
    """A traceback shows repr(value), a JSON log line json.dumps(value): with a quote or a backslash in the
    value, these spellings differ from the value itself and must be hidden as well."""
    host = own_host
    host.repo.write("apps/shop/app.yaml", app_yaml(
        host.ports, "[envapp-job, --tag, leaky, --stderr-var, SECRET_KEY, --stderr-repr, --exit, \"3\"]"))
    host.repo.commit("a job that prints the secret's repr and fails")
    proc = host.agent("once", "--log-level", "DEBUG", expect=1)
    assert "the value of SECRET_KEY is" in proc.stdout + proc.stderr
    assert_hidden("once with a job printing repr/JSON", proc.stdout + proc.stderr, host.secrets())
    assert_hidden("status.json", (host.root / "state/status.json").read_text(), host.secrets())


def test_a_hand_edited_secret_env_file_or_launcher_is_drift_and_healed(host):
    env_dir = host.root / "apps/shop/env"
    files = sorted(env_dir.glob("*.env"))
    assert len(files) == 2 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(env_dir.stat().st_mode) == 0o700
    good = {f: f.read_bytes() for f in files}
    launcher = host.root / "bin/gitops-agent-exec"
    launcher_text = launcher.read_bytes()
    files[0].write_bytes(b"SECRET_KEY=guess\0")
    files[1].unlink()
    launcher.write_bytes(launcher_text + b"\nimport os; os.system('true')\n")
    plan = host.agent("plan", expect=2)
    assert_hidden("plan of a tampered secret env", plan.stdout + plan.stderr, host.secrets())
    assert "write_secret_env" in plan.stdout and "write_launcher" in plan.stdout, plan.stdout
    host.agent("once")
    assert {f: f.read_bytes() for f in files} == good and launcher.read_bytes() == launcher_text
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    host.agent("plan", expect=0)


def test_a_failed_before_job_keeps_the_old_secret_env_for_a_restart(host):
    """A rotated secret whose migration fails: nothing switches, and the old secret env file stays, so a service
    supervisord restarts (a crash) comes back with the old value, not exit 78 for a pruned file."""
    before = host.pids()
    values = dict(host.values)
    host.encrypt({**values, "SECRET_KEY": ROTATED})
    host.repo.write("apps/shop/app.yaml", app_yaml(host.ports, "[envapp-job, --tag, broken, --exit, \"2\"]"))
    host.repo.commit("rotate, with a failing migration")
    proc = host.agent("once", expect=1)
    assert "[FAILED] run_job shop/migrate" in proc.stdout, proc.stdout + proc.stderr
    assert host.pids() == before and host.env_of("web-a")["env"]["SECRET_KEY"] == SECRET
    os.kill(before["web-a"], 9)                          # supervisord restarts it (autorestart=unexpected)
    wait_until(lambda: _pid_or_none(host, "web-a") not in (None, before["web-a"]), 60, "web-a restarted")
    env = host.env_of("web-a")["env"]
    assert env["SECRET_KEY"] == SECRET and Path(env["SHOP_CONFIG"]).is_file()

    git(host.repo.path, "revert", "--no-edit", "HEAD")   # back to the good secret and job: nothing to run
    host.values = values
    runs = len(host.job_runs())
    host.agent("once")
    assert len(host.job_runs()) == runs
    host.agent("plan", expect=0)


def _pid_or_none(host: Host, service: str) -> int | None:
    try:
        return host.env_of(service)["pid"]
    except OSError:
        return None


def test_a_new_value_says_which_secret_changed_and_restarts_only_its_users(host):
    before = host.pids()
    runs = len(host.job_runs())
    host.encrypt({**host.values, "SECRET_KEY": ROTATED})
    host.repo.commit("rotate SECRET_KEY")
    plan = host.agent("plan", expect=2)
    assert_hidden("plan after rotation", plan.stdout + plan.stderr, host.secrets())
    lines = plan.stdout.splitlines()
    web_a = [line for line in lines if "web-a" in line and "write_program" in line]
    assert web_a and "secret django/SECRET_KEY changed" in web_a[0], plan.stdout
    assert not any("web-b" in line or "web-c" in line for line in lines), plan.stdout
    plan_json = host.agent("plan", "--json", expect=2)
    assert_hidden("plan --json after rotation", plan_json.stdout + plan_json.stderr, host.secrets())
    assert "secret django/SECRET_KEY changed" in plan_json.stdout

    proc = host.agent("once", "--log-level", "DEBUG")
    assert_hidden("once after rotation", proc.stdout + proc.stderr, host.secrets())
    after = host.pids()
    assert after["web-a"] != before["web-a"]
    assert after["web-b"] == before["web-b"] and after["web-c"] == before["web-c"]
    assert host.env_of("web-a")["env"]["SECRET_KEY"] == ROTATED
    assert host.env_of("web-b")["env"]["OTHER_KEY"] == OTHER
    runs_now = host.job_runs()
    assert len(runs_now) == runs + 1 and runs_now[-1]["env"]["SECRET_KEY"] == ROTATED
    assert_root_hides(host)

    # a key only web-b uses: web-b alone restarts
    host.encrypt({**host.values, "OTHER": OTHER + "2"})
    host.repo.commit("rotate OTHER")
    plan = host.agent("plan", expect=2)
    assert "secret django/OTHER changed" in plan.stdout and "web-a" not in plan.stdout, plan.stdout
    host.agent("once")
    final = host.pids()
    assert final["web-b"] != after["web-b"]
    assert final["web-a"] == after["web-a"] and final["web-c"] == after["web-c"]
    assert host.env_of("web-b")["env"]["OTHER_KEY"] == OTHER + "2"
    assert len(host.job_runs()) == runs + 1             # the job does not use OTHER: it does not run


def test_the_daemon_hides_the_value_in_metrics_pages_and_logs(host, request, tmp_path):
    before = host.pids()
    host.encrypt({**host.values, "THIRD": THIRD + "!"})   # only the job uses THIRD: it runs, nothing restarts
    sha = host.repo.commit("rotate THIRD")
    runs = len(host.job_runs())
    daemon = start_daemon(request, host.repo.url, host.root, tmp_path, "--age-identity", str(host.identity),
                          "--log-level", "DEBUG", "--log-format", "json", poll=1.0)
    daemon.wait_healthy()
    daemon.wait_value("gitops_agent_applied_revision_info", lambda v: v == 1, 120, "the new revision applied",
                      revision=sha)
    wait_until(lambda: len(host.job_runs()) == runs + 1, 60, "the job's run")
    # the status page and its JSON (DESIGN §5) where this build serves them; /metrics always
    pages = {path: http_get(daemon.base + path, timeout=10) for path in ("/metrics", "/", "/api/status")}
    code = daemon.stop()
    assert code == 0, daemon.log_text()[-3000:]
    assert host.job_runs()[-1]["env"]["THIRD"] == THIRD + "!"
    assert host.pids() == before
    needles = (*host.secrets(), THIRD + "!")
    assert pages["/metrics"][0] == 200
    for path, (status, body) in pages.items():
        assert_hidden(f"daemon {path}", body, needles)
    host.daemon_metrics = pages["/metrics"][1]
    log = daemon.log_text()
    assert "decrypting apps/shop/django.env.age" in log
    assert_hidden("daemon log (DEBUG, json)", log, needles)
    assert_root_hides(host)


def test_the_daemon_counted_the_job_run(host):
    """DESIGN §5: gitops_agent_job_runs_total{app, job, result}."""
    text = getattr(host, "daemon_metrics", None)
    if text is None:
        pytest.skip("the daemon test did not run")
    assert metric(text, "gitops_agent_job_runs_total", {"app": "shop", "job": "migrate", "result": "succeeded"}) >= 1
