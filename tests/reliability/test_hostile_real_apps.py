"""Hostile revisions of a real app (DESIGN §3a), each driven through the real `gitops-agent once` on a
converged host that runs it: secrets (age), templates, jobs, depends_on, processes.

The good revision runs `shop`: a service with a secret (decrypted by the stock age CLI), a Jinja2 settings
template, a plain source file, a before job, and a worker with `depends_on` and `processes: 2`. Every
hostile revision also carries one *valid* change (main.lock bumped to envapp 2.0.0), so a half-applied
revision would show. Each must be refused whole, with an error naming the file and line (or the file,
for a secret that cannot be decrypted), and nothing may change on the host: same pids, still serving
1.0.0, same program files, venv link, rendered files and secret env files, no job run, status keeping
the good sha. `gitops-agent validate` (no age identity: the state repo's CI) refuses every case but those
only decryption can tell (a wrong key, a tampered file, a key the secret does not have).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import StateRepo, free_port, git, run_agent
from envapp import envapp_lock
from shopfactory import encrypt_dotenv, new_identity, recipient_of

from reliability._support import agent_args, get_text, settled_programs, status

pytestmark = pytest.mark.timeout(900)

PORT = free_port()
SECRET = 'k3y%(here)s "quoted", =, $HOME ;#'
APP_FILE = "apps/shop/app.yaml"
TEMPLATE_FILE = "apps/shop/settings.toml.j2"

FLEET = """\
apiVersion: gitops-agent/v1
kind: Fleet
hosts:
  h1: {groups: [web]}
"""

APP = f"""\
apiVersion: gitops-agent/v1
kind: App
name: shop
hosts: {{groups: [web]}}
environments:
  main: {{lockfile: main.lock, find_links: [../../wheelhouse], index: false, installer: uv}}
secrets:
  django: django.env.age
files:
  settings.toml: {{template: settings.toml.j2}}
  robots.txt: {{source: robots.txt}}
jobs:
  migrate:
    environment: main
    command: [envapp-job, --tag, migrate]
    env: {{SECRET_KEY: {{secret: django/SECRET_KEY}}, SHOP_CONFIG: {{file: settings.toml}}}}
services:
  shop-web:
    environment: main
    port: {PORT}
    command: [envapp-server, --port, "{PORT}"]
    env: {{SECRET_KEY: {{secret: django/SECRET_KEY}}, SHOP_CONFIG: {{file: settings.toml}}, SHOP_DATA: {{data_dir: true}}}}
    health: {{http: "http://127.0.0.1:{PORT}/healthz", timeout_s: 1}}
  shop-worker:
    environment: main
    command: [envapp-worker]
    env: {{SHOP_CONFIG: {{file: settings.toml}}}}
    depends_on: [shop-web]
    processes: 2
"""

TEMPLATE = """\
# shop settings
port = {{ services["shop-web"].port }}
secret_key = "{{ secrets.django.SECRET_KEY }}"
host = "{{ host.name }}"
"""


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line of `text` holding `needle`."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@dataclass(frozen=True)
class Ctx:
    repo: StateRepo
    identity: Path          # this host's age identity
    stranger: Path          # another identity: a secret encrypted only to it cannot be read here
    outside: Path           # a directory outside the state repo

    def write(self, rel: str, text: str | bytes) -> None:
        path = self.repo.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    def app(self, old: str, new: str) -> None:
        """Edit app.yaml by replacing one exact piece of the good text."""
        text = (self.repo.path / APP_FILE).read_text()
        assert old in text, old
        self.write(APP_FILE, text.replace(old, new, 1))

    def template(self, text: str) -> None:
        self.write(TEMPLATE_FILE, text)

    def symlink(self, rel: str, target: Path) -> None:
        path = self.repo.path / rel
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target)

    def encrypt(self, values: dict[str, str], *, to: Path | None = None) -> None:
        dest = self.repo.path / "apps/shop/django.env.age"
        dest.unlink()
        encrypt_dotenv(values, dest, identity=to or self.identity)

    def encrypt_raw(self, plaintext: str) -> None:
        """A secret file whose plaintext is not KEY=value lines (only a host, decrypting, can tell)."""
        dest = self.repo.path / "apps/shop/django.env.age"
        dest.unlink()
        subprocess.run(["age", "-a", "-r", recipient_of(self.identity), "-o", str(dest)], input=plaintext.encode(),
                       check=True, capture_output=True)


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Ctx], None]
    expect: Callable[[], tuple[str, ...]] | tuple[str, ...]   # substrings of the error: the file:line first
    validate: bool = True           # `validate` (no identity) must refuse it too

    def expected(self) -> tuple[str, ...]:
        return self.expect() if callable(self.expect) else self.expect


def _app_line(needle: str) -> str:
    return f"{APP_FILE}:{line_of(APP, needle)}"


def _template_with(line2: str) -> str:
    """The good template with its second line replaced."""
    lines = TEMPLATE.splitlines(keepends=True)
    lines[1] = line2 + "\n"
    return "".join(lines)


def _tamper(ctx: Ctx) -> None:
    path = ctx.repo.path / "apps/shop/django.env.age"
    lines = path.read_text().splitlines(keepends=True)
    body = lines[1]
    lines[1] = ("A" if body[0] != "A" else "B") + body[1:]        # one base64 character of the armored body
    path.write_text("".join(lines))


CASES = [
    # templates: syntax, undefined names, the sandbox
    Case("template-syntax-error", lambda c: c.template(_template_with("port = {{ services[ }}")),
         (f"{TEMPLATE_FILE}:2", "files.settings.toml")),
    Case("template-unclosed-block", lambda c: c.template(TEMPLATE + "{% if host.name %}\nx\n"),
         (f"{TEMPLATE_FILE}:", "files.settings.toml")),
    Case("template-undefined-name", lambda c: c.template(_template_with("port = {{ nope }}")),
         (f"{TEMPLATE_FILE}:2", "'nope' is undefined")),
    Case("template-undefined-attribute", lambda c: c.template(_template_with("port = {{ services['shop-web'].prot }}")),
         (f"{TEMPLATE_FILE}:2", "'prot'")),
    Case("template-undeclared-secret", lambda c: c.template(_template_with("x = {{ secrets.nope.KEY }}")),
         (f"{TEMPLATE_FILE}:2", "no secret 'nope' is declared")),
    Case("template-sandbox-mro", lambda c: c.template(_template_with("x = {{ ''.__class__.__mro__ }}")),
         (f"{TEMPLATE_FILE}:2", "not allowed in the sandbox")),
    Case("template-sandbox-subclasses",
         lambda c: c.template(_template_with("x = {{ ''.__class__.__mro__[1].__subclasses__() }}")),
         (f"{TEMPLATE_FILE}:2", "sandbox")),
    Case("template-sandbox-globals-popen",
         lambda c: c.template(_template_with("x = {{ cycler.__init__.__globals__.os.popen('touch /tmp/pwned').read() }}")),
         (f"{TEMPLATE_FILE}:2", "sandbox")),
    Case("template-sandbox-format-attr",
         lambda c: c.template(_template_with("x = {{ '{0.__class__.__mro__}'.format('') }}")),
         (f"{TEMPLATE_FILE}:2",)),
    Case("template-include-etc-passwd", lambda c: c.template(_template_with("{% include '/etc/passwd' %}")),
         (f"{TEMPLATE_FILE}:2", "include")),
    Case("template-output-bomb", lambda c: c.template(_template_with("x = {{ 'a' * 100000000 }}")),
         (f"{TEMPLATE_FILE}:2", "limit")),
    Case("template-whole-secret-printed", lambda c: c.template(_template_with("x = {{ secrets.django }}")),
         (f"{TEMPLATE_FILE}:2", "whole secret")),
    # secrets
    Case("secret-wrong-key", lambda c: c.encrypt({"SECRET_KEY": SECRET}, to=c.stranger),
         ("apps/shop/django.env.age", "cannot be decrypted"), validate=False),
    Case("secret-tampered", _tamper, ("apps/shop/django.env.age", "cannot be decrypted"), validate=False),
    Case("secret-plaintext-committed", lambda c: c.write("apps/shop/django.env.age", f"SECRET_KEY={SECRET}\n"),
         (_app_line("django: django.env.age"), "not an age-encrypted file")),
    Case("secret-unknown-key", lambda c: c.app("{secret: django/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}, SHOP_DATA",
                                               "{secret: django/NOPE}, SHOP_CONFIG: {file: settings.toml}, SHOP_DATA"),
         ("apps/shop/django.env.age", "has no key 'NOPE'"), validate=False),
    Case("secret-unknown-key-in-template", lambda c: c.template(_template_with("x = {{ secrets.django.NOPE }}")),
         (f"{TEMPLATE_FILE}:2", "has no key 'NOPE'"), validate=False),
    Case("secret-undeclared-name", lambda c: c.app("SECRET_KEY: {secret: django/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}, SHOP_DATA",
                                                   "SECRET_KEY: {secret: nope/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}, SHOP_DATA"),
         (_app_line("SHOP_DATA: {data_dir: true}"), "secret 'nope' is not declared")),
    Case("secret-undeclared-name-in-job", lambda c: c.app("{secret: django/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}}\n",
                                                          "{secret: djnago/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}}\n"),
         (_app_line("    env: {SECRET_KEY: {secret: django/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}}"),
          "secret 'djnago' is not declared")),
    Case("secret-ref-without-key", lambda c: c.app("SHOP_DATA: {data_dir: true}}", "SHOP_DATA: {secret: django}}"),
         (_app_line("SHOP_DATA: {data_dir: true}"), "services.shop-web.env.SHOP_DATA")),
    Case("index-password-undeclared-secret",
         lambda c: c.app("index: false, installer: uv}",
                         "installer: uv, index_url: \"http://127.0.0.1:9/simple\", "
                         "index_credentials: {username: deploy, password: {secret: pypi/PASSWORD}}}"),
         (_app_line("  main: {lockfile"), "secret 'pypi' is not declared")),
    Case("secret-env-reserved-name", lambda c: c.app("SECRET_KEY: {secret: django/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}, SHOP_DATA",
                                                     "SUPERVISOR_SECRET: {secret: django/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}, SHOP_DATA"),
         (_app_line("SHOP_DATA: {data_dir: true}"), "SUPERVISOR_SECRET")),
    Case("secret-env-marker-name", lambda c: c.app("SECRET_KEY: {secret: django/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}, SHOP_DATA",
                                                   "GITOPS_AGENT_PROGRAM: {secret: django/SECRET_KEY}, SHOP_CONFIG: {file: settings.toml}, SHOP_DATA"),
         (_app_line("SHOP_DATA: {data_dir: true}"), "GITOPS_AGENT_PROGRAM")),
    Case("secret-file-missing", lambda c: (c.repo.path / "apps/shop/django.env.age").unlink(),
         (_app_line("django: django.env.age"), "does not exist")),
    Case("secret-not-dotenv", lambda c: c.encrypt_raw("just some text without equals\n"),
         ("apps/shop/django.env.age", "not a dotenv file"), validate=False),
    # files
    Case("file-undeclared-name", lambda c: c.app("env: {SHOP_CONFIG: {file: settings.toml}}\n    depends_on",
                                                 "env: {SHOP_CONFIG: {file: setings.toml}}\n    depends_on"),
         (_app_line("    env: {SHOP_CONFIG: {file: settings.toml}}"), "file 'setings.toml' is not declared")),
    Case("file-template-missing", lambda c: (c.repo.path / TEMPLATE_FILE).unlink(),
         (_app_line("settings.toml: {template:"), "does not exist")),
    Case("file-template-escapes-repo", lambda c: c.app("{template: settings.toml.j2}", "{template: ../../../../../etc/passwd}"),
         (_app_line("settings.toml: {template:"), "escapes the state repo")),
    Case("file-template-absolute", lambda c: c.app("{template: settings.toml.j2}", "{template: /etc/passwd}"),
         (_app_line("settings.toml: {template:"), "escapes the state repo")),
    Case("file-source-escapes-repo", lambda c: c.app("{source: robots.txt}", "{source: ../../../etc/passwd}"),
         (_app_line("robots.txt: {source:"), "escapes the state repo")),
    Case("secret-path-escapes-repo", lambda c: c.app("django: django.env.age", "django: ../../../../etc/passwd"),
         (_app_line("django: django.env.age"), "escapes the state repo")),
    Case("file-template-symlink-out", lambda c: c.symlink(TEMPLATE_FILE, c.outside / "settings.toml.j2"),
         (_app_line("settings.toml: {template:"), "escapes the state repo")),
    Case("file-source-symlink-etc-passwd", lambda c: c.symlink("apps/shop/robots.txt", Path("/etc/passwd")),
         (_app_line("robots.txt: {source:"), "escapes the state repo")),
    Case("secret-symlink-out", lambda c: c.symlink("apps/shop/django.env.age", c.outside / "django.env.age"),
         (_app_line("django: django.env.age"), "escapes the state repo")),
    Case("file-template-via-dir-symlink", lambda c: (c.symlink("apps/shop/conf", Path("/etc")),
                                                     c.app("{template: settings.toml.j2}", "{template: conf/passwd}")),
         (_app_line("settings.toml: {template:"), "escapes the state repo")),
    Case("file-template-not-utf8", lambda c: c.write(TEMPLATE_FILE, b"port = \xff\xfe\n"),
         (TEMPLATE_FILE, "UTF-8")),
    Case("template-mode-0644-with-secrets", lambda c: c.app("{template: settings.toml.j2}",
                                                            "{template: settings.toml.j2, mode: \"0644\"}"),
         (_app_line("settings.toml: {template:"), "mode 0644")),
    Case("template-mode-0604-with-secrets", lambda c: c.app("{template: settings.toml.j2}",
                                                            "{template: settings.toml.j2, mode: \"604\"}"),
         (_app_line("settings.toml: {template:"), "0604")),
    # ordering and processes
    Case("depends-on-cycle", lambda c: c.app("  shop-web:\n    environment: main\n",
                                             "  shop-web:\n    environment: main\n    depends_on: [shop-worker]\n"),
         (APP_FILE + ":", "cycle")),
    Case("depends-on-self", lambda c: c.app("depends_on: [shop-web]", "depends_on: [shop-worker]"),
         (_app_line("depends_on: [shop-web]"), "cannot depend on itself")),
    Case("depends-on-unknown", lambda c: c.app("depends_on: [shop-web]", "depends_on: [shop-db]"),
         (_app_line("depends_on: [shop-web]"), "'shop-db'")),
    Case("processes-with-port", lambda c: c.app("    command: [envapp-worker]\n",
                                                f"    command: [envapp-worker]\n    port: {free_port()}\n"),
         (f"{APP_FILE}:{line_of(APP, 'processes: 2') + 1}", "processes: 2 cannot share port")),
    Case("processes-too-many", lambda c: c.app("processes: 2", "processes: 65"),
         (_app_line("processes: 2"), "processes")),
    # jobs
    Case("job-unknown-environment", lambda c: c.app("  migrate:\n    environment: main", "  migrate:\n    environment: mian"),
         (f"{APP_FILE}:{line_of(APP, '  migrate:') + 1}", "'mian'")),
    Case("job-run-bogus", lambda c: c.app("    command: [envapp-job, --tag, migrate]\n",
                                          "    command: [envapp-job, --tag, migrate]\n    run: during\n"),
         (APP_FILE + ":", "run")),
    Case("job-as-root", lambda c: c.app("    command: [envapp-job, --tag, migrate]\n",
                                        "    command: [envapp-job, --tag, migrate]\n    user: root\n"),
         (APP_FILE + ":", "root")),
]


def test_corpus_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    print(f"\nhostile real-app corpus: {len(CASES)} revisions")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A converged host running shop 1.0.0; `good` is its revision."""
    base = tmp_path_factory.mktemp("hostile-apps")
    repo = StateRepo(base / "state")
    root = base / "root"
    keys = base / "keys"
    identity = new_identity(keys, "host")
    stranger = new_identity(keys, "stranger")
    outside = base / "outside"
    outside.mkdir()
    repo.write("fleet.yaml", FLEET)
    repo.write(APP_FILE, APP)
    repo.write(TEMPLATE_FILE, TEMPLATE)
    repo.write("apps/shop/robots.txt", "User-agent: *\n")
    envapp_lock(repo.path / "wheelhouse", "2.0.0")                 # committed, so every case can lock it
    repo.write("apps/shop/main.lock", envapp_lock(repo.path / "wheelhouse", "1.0.0"))
    encrypt_dotenv({"SECRET_KEY": SECRET}, repo.path / "apps/shop/django.env.age", identity=identity)
    good = repo.commit("good")
    shutil.copy(repo.path / TEMPLATE_FILE, outside / "settings.toml.j2")
    shutil.copy(repo.path / "apps/shop/django.env.age", outside / "django.env.age")
    ctx = Ctx(repo, identity, stranger, outside)
    try:
        proc = run_agent("once", *agent_args(repo.url, root, "--age-identity", str(identity)))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        before = snapshot(root)
        assert before["served"] == "envapp 1.0.0\n"
        yield repo, root, good, ctx, before
    finally:
        from agent.drivers.supervisor import EmbeddedSupervisor

        EmbeddedSupervisor(root).stop()


def _tree(path: Path) -> dict[str, str]:
    """Every entry under `path`: a file's bytes' hash and mode, a symlink's target."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = f"{oct(p.stat().st_mode & 0o777)} {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"
    return out


def snapshot(root: Path) -> dict:
    info = settled_programs(root)
    return {
        "programs": {name: (p["pid"], p["statename"]) for name, p in info.items()},
        "served": get_text(f"http://127.0.0.1:{PORT}/"),
        "confs": {p.name: p.read_text() for p in sorted((root / "supervisor/programs").glob("*.conf"))},
        "link": os.readlink(root / "envs/main"),
        "venvs": sorted(os.listdir(root / "venvs")),
        "apps": _tree(root / "apps"),
        "jobs": _tree(root / "state/jobs"),
    }


def once_in_process(repo: StateRepo, root: Path, identity: Path) -> tuple[int, str, str]:
    """`gitops-agent once` through the real CLI entry point, in this process (as test_hostile_state does)."""
    from agent.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["once", *agent_args(repo.url, root, "--age-identity", str(identity))])
    return code, out.getvalue(), err.getvalue()


def reset_to(repo: StateRepo, sha: str) -> None:
    git(repo.path, "reset", "-q", "--hard", sha)
    git(repo.path, "clean", "-qfdx")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_revision_is_refused_whole_and_the_last_good_keeps_running(host, case):
    repo, root, good, ctx, before = host
    reset_to(repo, good)
    repo.write("apps/shop/main.lock", envapp_lock(repo.path / "wheelhouse", "2.0.0"))   # the valid part
    case.mutate(ctx)
    bad = repo.commit(case.id)

    code, stdout, stderr = once_in_process(repo, root, ctx.identity)
    print(stderr[stderr.find("error:"):])
    assert code == 1, stdout + stderr
    for needle in case.expected():
        assert needle in stderr, f"{needle!r} not in the error:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert "is invalid" in stderr and "keeping the last good revision" in stderr, stderr
    assert "build_venv" not in stdout and "run_job" not in stdout and "update_program" not in stdout, stdout
    assert SECRET not in stdout + stderr and "k3y" not in stdout + stderr

    assert snapshot(root) == before                      # nothing applied, nothing restarted, no file written
    st = status(root)
    assert st["applied"]["sha"] == good and st["attempted"]["sha"] == bad
    assert st["result"] == "invalid" and case.expected()[0] in st["last_error"]
    assert "k3y" not in json.dumps(st)
    assert not Path("/tmp/pwned").exists()

    proc = run_agent("validate", "--json", str(repo.path))
    if case.validate:
        assert proc.returncode == 1, f"validate passed {case.id}:\n{proc.stdout}{proc.stderr}"
        text = "\n".join(f"{p['file']}:{p['line']}: {p['field']}: {p['message']}" for p in json.loads(proc.stdout)["problems"])
        assert case.expected()[0].split(":")[0] in text, text
    else:
        assert proc.returncode == 0, f"validate (no identity) cannot tell {case.id}, yet:\n{proc.stdout}{proc.stderr}"


def test_the_good_revision_converges_again(host):
    """After the corpus, the good revision (as a new commit) is a no-op: nothing of it was damaged."""
    repo, root, good, ctx, before = host
    reset_to(repo, good)
    repo.commit("good again")
    proc = run_agent("once", *agent_args(repo.url, root, "--age-identity", str(ctx.identity)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert snapshot(root)["programs"] == before["programs"]
