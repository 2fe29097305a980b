"""The example shop (examples/shop, desired-state-example/apps/shop) runs as its app.yaml says.

A real venv built with uv from main.lock and wheels/ (hashes required), the templates rendered with
the secret decrypted by the stock age CLI with the demo key, and the app's own commands run by hand
with the env app.yaml gives them: gunicorn (not healthy before the migration job), `shop-migrate`,
`django-admin shop_worker` (heartbeats, fulfils orders, exits 0 on SIGTERM). Only the port differs: a
free one instead of 8200. No secret value may appear in any output of the app.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from conftest import free_port
from shopfactory import (DEMO_IDENTITY, MAIN_LOCK, SHOP_APP, build_shop_wheel, build_venv, decrypt_dotenv,
                         encrypt_dotenv, lock_blocks, load_app, render_template, resolve_env, sha256_of,
                         template_context, write_shop_lock)

pytestmark = pytest.mark.timeout(900)
APP_PORT = 8200            # the port app.yaml gives shop-web; the tests run it on a free one instead
WAIT_S = 90                # generous bounds for a loaded 2-core machine


# --- helpers -------------------------------------------------------------------------------------------

class Deployment:
    """The shop laid out as the agent would: rendered files (0600), a data dir, env resolved from app.yaml."""

    def __init__(self, root: Path, bin_dir: Path):
        self.root, self.bin = root, bin_dir
        self.app = load_app()
        self.port = free_port()
        self.data = root / "data"
        self.files_dir = root / "files"
        self.logs = root / "logs"
        for d in (self.data, self.files_dir, self.logs, root / "home"):
            d.mkdir(parents=True)
        self.secrets = {name: decrypt_dotenv(SHOP_APP / path, DEMO_IDENTITY) for name, path in self.app["secrets"].items()}
        context = template_context(host="localhost", labels={"zone": "dev"}, data_dir=self.data,
                                   ports={"shop-web": self.port}, secrets=self.secrets)
        self.files = {}
        for name, spec in self.app["files"].items():
            target = self.files_dir / name
            if "template" in spec:
                target.write_text(render_template(SHOP_APP / spec["template"], context))
            else:
                target.write_bytes((SHOP_APP / spec["source"]).read_bytes())
            target.chmod(0o600)
            self.files[name] = target

    def _ported(self, text: str) -> str:
        return text.replace(f"127.0.0.1:{APP_PORT}", f"127.0.0.1:{self.port}")

    def argv(self, kind: str, name: str) -> list[str]:
        command = [self._ported(arg) for arg in self.app[kind][name]["command"]]
        return [str(self.bin / command[0]), *command[1:]]

    def env(self, kind: str, name: str, **extra: str) -> dict[str, str]:
        env = {"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
               "HOME": str(self.root / "home"), "LANG": "C.UTF-8"}
        resolved = resolve_env(self.app[kind][name].get("env", {}), files=self.files, data_dir=self.data,
                               secrets=self.secrets)
        env.update({key: self._ported(value) for key, value in resolved.items()}, **extra)
        return env

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def secret_values(self) -> list[str]:
        return [value for values in self.secrets.values() for value in values.values()]


class Procs:
    """Processes a test started, each in its own session: its whole group is stopped at teardown."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, env, cwd, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait(10)
            _signal_group(proc, signal.SIGKILL)   # leftovers of the group (gunicorn workers)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def wait_until(what: str, probe, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            result = probe()
        except OSError:
            result = None
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}):\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {WAIT_S} s\n{log.read_text() if log else ''}")
        time.sleep(0.1)


# --- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def venv_bin(tmp_path_factory):
    """One venv from the committed main.lock and wheels/ for the module (uv; PyPI or uv's cache)."""
    return build_venv(tmp_path_factory.mktemp("shop-venv") / "venv", MAIN_LOCK, SHOP_APP / "wheels")


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.stop_all()


@pytest.fixture
def shop(tmp_path, venv_bin):
    return Deployment(tmp_path / "shop", venv_bin)


# --- the committed artifacts ------------------------------------------------------------------------

def test_lock_pins_every_package_with_hashes_and_the_committed_wheel():
    blocks = lock_blocks(MAIN_LOCK.read_text())
    assert {"django", "gunicorn", "shop", "asgiref", "sqlparse"} <= set(blocks)
    for name, block in blocks.items():
        first = block.splitlines()[0]
        assert "==" in first and "--hash=sha256:" in block, block
    assert not [line for line in MAIN_LOCK.read_text().splitlines() if line.startswith("-")]
    wheels = sorted((SHOP_APP / "wheels").glob("shop-*.whl"))
    assert [w.name for w in wheels] == ["shop-1.0.0-py3-none-any.whl"]
    # exactly our wheel's hash: "shop" is a name on PyPI too
    assert blocks["shop"] == f"shop==1.0.0 \\\n    --hash=sha256:{sha256_of(wheels[0])}\n    # via relock.sh\n"


def test_build_script_reproduces_the_committed_wheel_and_prints_its_hash(tmp_path):
    committed = SHOP_APP / "wheels" / "shop-1.0.0-py3-none-any.whl"
    proc = subprocess.run([sys.executable, str(SHOP_APP.parents[2] / "examples/shop/build.py"),
                           "--version", "1.0.0", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    built = tmp_path / committed.name
    assert proc.stdout == f"{sha256_of(built)}  {built}\n"
    assert built.read_bytes() == committed.read_bytes()


def test_the_secret_decrypts_with_the_demo_key_and_keeps_its_bytes():
    values = decrypt_dotenv(SHOP_APP / "django.env.age", DEMO_IDENTITY)
    assert set(values) == {"SECRET_KEY", "ORDERS_API_TOKEN"}
    # a value that breaks naive parsers (supervisord's environment=, %-interpolation, shell words)
    assert values["SECRET_KEY"].endswith('-%(x)s,"q"=1 z') and len(values["SECRET_KEY"]) > 50
    assert DEMO_IDENTITY.read_text().startswith("# DEMO KEY, NEVER FOR REAL USE")


def test_templates_render_in_the_sandbox_to_valid_config(tmp_path):
    secrets = {"django": {"SECRET_KEY": "k", "ORDERS_API_TOKEN": 'a"b\\c %(x)s,=\t<z>\'é'}}
    context = template_context(host="web-2", labels={"zone": "b"}, data_dir=tmp_path, ports={"shop-web": 8200},
                               secrets=secrets)
    settings = tomllib.loads(render_template(SHOP_APP / "settings.toml.j2", context))
    assert settings["orders"]["api_token"] == secrets["django"]["ORDERS_API_TOKEN"]
    assert settings["shop"] == {"title": "Demo shop", "host": "web-2", "public_url": "http://127.0.0.1:8200"}
    assert settings["worker"]["interval_s"] > 0
    greeting = render_template(SHOP_APP / "greeting.txt.j2", context)
    assert greeting.startswith("Welcome to the shop on web-2 (zone b).")
    assert "(zone" not in render_template(SHOP_APP / "greeting.txt.j2", {**context, "host": {"name": "h", "groups": [], "labels": {}}})


# --- running it -----------------------------------------------------------------------------------------

def test_web_is_unhealthy_until_migrated_then_serves_and_the_worker_beats(shop, procs):
    web_log = shop.logs / "shop-web.log"
    web = procs.start(shop.argv("services", "shop-web"), shop.env("services", "shop-web"), shop.data, web_log)
    status, _, body = wait_until("gunicorn answers", lambda: http(shop.url("/healthz")), web, web_log)
    assert status == 503 and "not migrated: shop.0001_initial" in body
    assert http(shop.url("/"))[0] == 503

    migrate = subprocess.run(shop.argv("jobs", "migrate"), env=shop.env("jobs", "migrate"), cwd=shop.data,
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert "Applying shop.0001_initial... OK" in migrate.stdout
    assert (shop.data / "shop.sqlite3").is_file()

    status, _, body = http(shop.url("/healthz"))
    assert (status, body) == (200, "ok\n")
    status, headers, body = http(shop.url("/version"))
    assert status == 200 and json.loads(body) == {"app": "shop", "version": "1.0.0"}
    assert headers["X-Shop-Version"] == "1.0.0"

    token = shop.secrets["django"]["ORDERS_API_TOKEN"]
    order = json.dumps({"item": "<script>alert(1)</script>"}).encode()
    assert http(shop.url("/orders"), order, {"Authorization": "Bearer wrong"})[0] == 401
    assert http(shop.url("/orders"), order)[0] == 401
    status, _, body = http(shop.url("/orders"), order, {"Authorization": f"Bearer {token}"})
    assert status == 201 and json.loads(body)["id"] == 1

    status, _, page = http(shop.url("/"))
    assert status == 200
    assert "Welcome to the shop on localhost (zone dev)." in page          # the rendered greeting file
    assert '<span id="version">1.0.0</span>' in page and '<strong id="orders">1</strong>' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert '<strong id="fulfilled">0</strong>' in page

    # the worker, as supervisord would start process 0 of 2: beats, fulfils the order, asks the web
    worker_log = shop.logs / "shop-worker-0.log"
    worker = procs.start(shop.argv("services", "shop-worker"),
                         shop.env("services", "shop-worker", SUPERVISOR_PROCESS_NAME="shop-worker-0"),
                         shop.data, worker_log)
    heartbeat = shop.data / "heartbeats" / "shop-worker-0.json"

    def beats(n):
        return lambda: heartbeat.is_file() and json.loads(heartbeat.read_text())["beats"] >= n

    wait_until("the worker's first beat", beats(1), worker, worker_log)
    record = json.loads(heartbeat.read_text())
    assert record["process"] == "shop-worker-0" and record["pid"] == worker.pid and record["version"] == "1.0.0"
    assert record["db"] == "ok" and record["fulfilled"] == 1 and record["web"] == 200
    wait_until("the worker's second beat", beats(2), worker, worker_log)
    assert '<strong id="fulfilled">1</strong>' in http(shop.url("/"))[2]
    assert "(fulfilled by shop-worker-0)" in http(shop.url("/"))[2]

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker_log.read_text()
    assert "stopped after" in worker_log.read_text()

    web.send_signal(signal.SIGTERM)
    assert web.wait(60) == 0, web_log.read_text()
    outputs = [web_log.read_text(), worker_log.read_text(), migrate.stdout, migrate.stderr]
    for secret in shop.secret_values():
        assert not [o for o in outputs if secret in o], "a secret value appears in the app's output"


def test_worker_waits_for_the_database_and_stops_on_sigterm(shop, procs):
    """Before the migration the worker says so in its heartbeat and keeps going; SIGTERM ends it (exit 0)."""
    log = shop.logs / "worker.log"
    env = shop.env("services", "shop-worker")
    worker = procs.start([*shop.argv("services", "shop-worker"), "--interval", "0.2"], env, shop.data, log)
    heartbeat_dir = shop.data / "heartbeats"

    def record():
        files = list(heartbeat_dir.glob("pid-*.json")) if heartbeat_dir.is_dir() else []
        return files and json.loads(files[0].read_text())

    first = wait_until("a heartbeat", lambda: (r := record()) and r["beats"] >= 2 and r, worker, log)
    assert first["db"] == "not migrated: shop.0001_initial" and first["web"] == "unreachable"
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0, log.read_text()


def test_configuration_errors_name_the_problem_never_a_value(shop):
    env = shop.env("jobs", "migrate")
    no_key = {k: v for k, v in env.items() if k != "SECRET_KEY"}
    proc = subprocess.run(shop.argv("jobs", "migrate"), env=no_key, cwd=shop.data, capture_output=True, text=True)
    assert proc.returncode == 2 and "SECRET_KEY is not set" in proc.stderr and "Traceback" not in proc.stderr

    broken = shop.root / "broken.toml"
    broken.write_text('[orders]\napi_token = "hunter2-s3cret\n')
    proc = subprocess.run(shop.argv("jobs", "migrate"), env={**env, "SHOP_CONFIG": str(broken)}, cwd=shop.data,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"SHOP_CONFIG {broken}: not valid TOML" in proc.stderr and "line 2" in proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr
    assert env["SECRET_KEY"] not in proc.stdout + proc.stderr


def test_shopfactory_builds_a_second_release_its_lock_and_a_secret(tmp_path):
    wheels = tmp_path / "wheels"
    wheel = build_shop_wheel("1.1.0", wheels)
    assert wheel.name == "shop-1.1.0-py3-none-any.whl"
    lock = write_shop_lock(tmp_path / "main.lock", wheel)
    blocks, committed = lock_blocks(lock.read_text()), lock_blocks(MAIN_LOCK.read_text())
    assert blocks["shop"] == f"shop==1.1.0 \\\n    --hash=sha256:{sha256_of(wheel)}\n"
    assert {k: v for k, v in blocks.items() if k != "shop"} == {k: v for k, v in committed.items() if k != "shop"}

    bin_dir = build_venv(tmp_path / "venv", lock, wheels)
    proc = subprocess.run([str(bin_dir / "python"), "-c", "import shop, django; print(shop.__version__, django.__version__)"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split()[0] == "1.1.0"

    values = {"SECRET_KEY": 'x%(y)s,"q"=1 z', "EMPTY": "", "EQ": "a=b=c"}
    identity = encrypt_dotenv(values, tmp_path / "state" / "django.env.age", tmp_path / "keys")
    assert identity.parent == tmp_path / "keys" and identity.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state" / "django.env.age").read_text().startswith("-----BEGIN AGE ENCRYPTED FILE-----")
    assert decrypt_dotenv(tmp_path / "state" / "django.env.age", identity) == values
    with pytest.raises(subprocess.CalledProcessError):
        decrypt_dotenv(tmp_path / "state" / "django.env.age", DEMO_IDENTITY)
