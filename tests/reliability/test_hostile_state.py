"""A corpus of hostile state repos, each driven through the real `gitops-agent once` on a converged host.

Every hostile revision also carries one *valid* change (demo.lock bumped to 2.0.0), so a half-applied
revision would show: the service would restart onto 2.0.0. For each case the revision must be rejected
whole with an error naming the file and the field, and nothing may change on the host: the service
keeps its pid and keeps serving 1.0.0, its program file and venv stay, no venv is built, and status
keeps the last good sha (and records the rejected one as attempted, result `invalid`).

A lockfile whose hash is well-formed but wrong cannot be caught by reading the repo: it fails at the
build, and there the old venv must be kept and the service left untouched (`test_wrong_hash_fails_at_build`).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import StateRepo, free_port, git
from reliability._support import agent_args, get_text, once, settled_programs, status
from wheelfactory import lock_line

pytestmark = pytest.mark.timeout(600)

PORT = free_port()

FLEET = """\
apiVersion: gitops-agent/v1
kind: Fleet
hosts:
  h1: {groups: [web]}
"""

APP = f"""\
apiVersion: gitops-agent/v1
kind: App
name: demo
hosts: {{groups: [web]}}
environments:
  demo: {{lockfile: demo.lock, find_links: [../../wheelhouse], index: false}}
services:
  demo-web:
    environment: demo
    port: {PORT}
    command: [demoapp-server, --port, "{PORT}"]
    health: {{http: "http://127.0.0.1:{PORT}/healthz", timeout_s: 1}}
"""

APP_FILE = "apps/demo/app.yaml"

BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@dataclass(frozen=True)
class Ctx:
    repo: StateRepo
    outside: Path           # a directory outside the state repo holding *valid* copies of its files

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

    def service(self, extra: str) -> None:
        """Add lines (already indented by 4) to the demo-web service."""
        self.app("    environment: demo\n", "    environment: demo\n" + textwrap.indent(textwrap.dedent(extra), "    "))

    def symlink(self, rel: str, target: Path) -> None:
        path = self.repo.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        path.symlink_to(target)

    def lock(self, text: str) -> None:
        self.write("apps/demo/demo.lock", text)


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Ctx], None]
    expect: tuple[str, ...]          # substrings of the error: the file, the field, the reason


def _line2(ctx: Ctx) -> str:
    """A valid hashed lock line for demoapp 2.0.0."""
    return lock_line(ctx.repo.wheel("2.0.0"))


def _hash_of(ctx: Ctx) -> str:
    return lock_line(ctx.repo.wheel("2.0.0")).split("--hash=")[1]


CASES: list[Case] = [
    # --- YAML itself ------------------------------------------------------------------------------
    Case("yaml-bomb-app", lambda c: c.write(APP_FILE, APP + BOMB), (APP_FILE, "alias bomb")),
    Case("yaml-bomb-fleet", lambda c: c.write("fleet.yaml", FLEET + BOMB), ("fleet.yaml", "alias bomb")),
    Case("huge-app-yaml", lambda c: c.write(APP_FILE, APP + "# " + "x" * (1024 * 1024 + 10) + "\n"),
         (APP_FILE, "more than the limit")),
    Case("huge-fleet-yaml", lambda c: c.write("fleet.yaml", FLEET + "#" * (2 * 1024 * 1024) + "\n"),
         ("fleet.yaml", "more than the limit")),
    Case("duplicate-key-port", lambda c: c.service(f"port: {PORT + 1}\n"),
         (APP_FILE, "services.demo-web.port", "duplicate key 'port'")),
    Case("duplicate-service", lambda c: c.app("services:\n", "services:\n  demo-web: {environment: demo, command: [demoapp-server]}\n"),
         (APP_FILE, "duplicate key 'demo-web'")),
    Case("duplicate-host", lambda c: c.write("fleet.yaml", FLEET + "  h1: {groups: [db]}\n"),
         ("fleet.yaml", "duplicate key 'h1'")),
    Case("merge-key", lambda c: c.app("services:\n  demo-web:\n", "x-base: &base {startsecs: 1}\nservices:\n  demo-web:\n    <<: *base\n"),
         (APP_FILE, "merge keys")),
    Case("python-tag", lambda c: c.service('user: !!python/object/apply:os.system ["touch /tmp/pwned"]\n'),
         (APP_FILE, "unsupported YAML tag")),
    Case("custom-tag", lambda c: c.service("user: !env USER\n"), (APP_FILE, "unsupported YAML tag")),
    Case("two-documents", lambda c: c.write(APP_FILE, APP + "---\n" + APP), (APP_FILE, "exactly one YAML document")),
    Case("not-utf8", lambda c: c.write(APP_FILE, APP.encode() + b"# \xff\xfe\n"), (APP_FILE, "not UTF-8")),
    Case("yaml-syntax", lambda c: c.app("services:\n", "services: [\n"), (APP_FILE, "YAML syntax error")),
    Case("non-string-key", lambda c: c.service("env: {1: x}\n"), (APP_FILE, "keys must be strings")),
    Case("missing-fleet", lambda c: (c.repo.path / "fleet.yaml").unlink(), ("fleet.yaml", "missing")),
    # --- wrong types ------------------------------------------------------------------------------
    Case("port-as-string", lambda c: c.app(f"    port: {PORT}\n", f'    port: "{PORT}"\n'),
         (APP_FILE, "services.demo-web.port", "is not of type 'integer'")),
    Case("command-as-string", lambda c: c.app(f'    command: [demoapp-server, --port, "{PORT}"]\n',
                                              f"    command: demoapp-server --port {PORT}\n"),
         (APP_FILE, "services.demo-web.command", "is not of type 'array'")),
    Case("command-arg-number", lambda c: c.app(f'--port, "{PORT}"]', f"--port, {PORT}]"),
         (APP_FILE, "services.demo-web.command.2", "is not of type 'string'")),
    Case("startsecs-bool", lambda c: c.service("startsecs: true\n"), (APP_FILE, "services.demo-web.startsecs")),
    Case("environments-list", lambda c: c.app("environments:\n  demo: {", "environments:\n  - {"),
         (APP_FILE, "environments", "is not of type 'object'")),
    Case("env-value-number", lambda c: c.service("env: {WORKERS: 4}\n"), (APP_FILE, "services.demo-web.env.WORKERS")),
    Case("index-string", lambda c: c.app("index: false", 'index: "false"'), (APP_FILE, "environments.demo.index")),
    Case("hosts-null-groups", lambda c: c.app("hosts: {groups: [web]}", "hosts: {groups: web}"), (APP_FILE, "hosts.groups")),
    # --- unknown fields ---------------------------------------------------------------------------
    Case("unknown-top-field", lambda c: c.app("kind: App\n", "kind: App\ncolour: red\n"), (APP_FILE, "unknown field 'colour'")),
    Case("unknown-service-field", lambda c: c.service("privileged: true\n"),
         (APP_FILE, "services.demo-web.privileged", "unknown field 'privileged'")),
    Case("unknown-env-field", lambda c: c.app("index: false}", "index: false, pip_args: [--pre]}"),
         (APP_FILE, "environments.demo.pip_args", "unknown field")),
    Case("unknown-fleet-field", lambda c: c.write("fleet.yaml", FLEET + "secrets: {token: x}\n"),
         ("fleet.yaml", "unknown field 'secrets'")),
    Case("unknown-health-field", lambda c: c.app("timeout_s: 1}", "timeout_s: 1, exec: /bin/sh}"),
         (APP_FILE, "services.demo-web.health.exec")),
    # --- names that are not identifiers -----------------------------------------------------------
    Case("service-name-traversal", lambda c: c.app("  demo-web:\n", "  ../../etc/cron.d/x:\n"), (APP_FILE, "'../../etc/cron.d/x'")),
    Case("service-name-section", lambda c: c.app("  demo-web:\n", '  "x]\\n[program:evil]":\n'), (APP_FILE, "program:evil")),
    Case("service-name-percent", lambda c: c.app("  demo-web:\n", '  "%(ENV_HOME)s":\n'), (APP_FILE, "%(ENV_HOME)s")),
    Case("environment-name-space", lambda c: c.app("  demo: {lockfile", '  "de mo": {lockfile'), (APP_FILE, "'de mo'")),
    Case("environment-name-nul", lambda c: c.app("  demo: {lockfile", '  "demo\\0": {lockfile'), (APP_FILE, "environments")),
    Case("app-name-mismatch", lambda c: c.app("name: demo\n", "name: other\n"), (APP_FILE, "name", "must match its directory")),
    Case("app-name-not-identifier", lambda c: c.app("name: demo\n", 'name: "demo;rm -rf /"\n'), (APP_FILE, "name")),
    Case("command0-absolute", lambda c: c.app("[demoapp-server,", "[/bin/sh,"), (APP_FILE, "services.demo-web.command.0")),
    Case("command0-traversal", lambda c: c.app("[demoapp-server,", "[../../../bin/sh,"), (APP_FILE, "services.demo-web.command.0")),
    Case("host-name-newline", lambda c: c.write("fleet.yaml", FLEET + '  "h2\\n[program:x]": {groups: [web]}\n'), ("fleet.yaml", "hosts")),
    # --- values that would inject into supervisord's ini -------------------------------------------
    Case("arg-newline-program", lambda c: c.app(f'"{PORT}"]', f'"{PORT}", "x\\n[program:evil]\\ncommand=/bin/sh"]'),
         (APP_FILE, "services.demo-web.command.3")),
    Case("arg-nul", lambda c: c.app(f'"{PORT}"]', f'"{PORT}", "a\\0b"]'), (APP_FILE, "services.demo-web.command.3")),
    Case("arg-carriage-return", lambda c: c.app(f'"{PORT}"]', f'"{PORT}", "a\\rb"]'), (APP_FILE, "services.demo-web.command.3")),
    Case("arg-line-separator", lambda c: c.app(f'"{PORT}"]', f'"{PORT}", "a\\u2028[program:x]"]'),
         (APP_FILE, "services.demo-web.command.3")),
    Case("env-value-newline-program", lambda c: c.service('env: {X: "a\\n[program:evil]\\ncommand=/bin/sh"}\n'),
         (APP_FILE, "services.demo-web.env.X")),
    Case("env-value-nul", lambda c: c.service('env: {X: "a\\0b"}\n'), (APP_FILE, "services.demo-web.env.X")),
    Case("env-value-here", lambda c: c.service('env: {X: "%(here)s/x"}\n'), (APP_FILE, "services.demo-web.env.X", "%(here)s")),
    Case("env-value-inline-comment", lambda c: c.service('env: {X: "a ;[program:x]"}\n'), (APP_FILE, "services.demo-web.env.X", "comment")),
    Case("env-value-quotes", lambda c: c.service("env: {X: '\"quoted\"'}\n"), (APP_FILE, "services.demo-web.env.X", "quote")),
    Case("env-value-both-quotes", lambda c: c.service("env: {X: 'a\"b''c'}\n"), (APP_FILE, "services.demo-web.env.X", "both")),
    Case("env-key-percent", lambda c: c.service('env: {"X%(ENV_HOME)s": y}\n'), (APP_FILE, "X%(ENV_HOME)s")),
    Case("env-key-newline", lambda c: c.service('env: {"X\\n[program:x]": y}\n'), (APP_FILE, "services.demo-web.env")),
    Case("env-key-equals", lambda c: c.service('env: {"A=B,C": y}\n'), (APP_FILE, "A=B,C")),
    Case("user-newline", lambda c: c.service('user: "nobody\\n[program:x]"\n'), (APP_FILE, "services.demo-web.user")),
    Case("user-percent", lambda c: c.service('user: "%(ENV_USER)s"\n'), (APP_FILE, "services.demo-web.user")),
    Case("health-not-loopback", lambda c: c.app("http://127.0.0.1:", "http://169.254.169.254:"), (APP_FILE, "services.demo-web.health.http")),
    Case("traffic-unknown-service", lambda c: c.write(APP_FILE, APP + "traffic:\n  listen: 127.0.0.1:18100\n  weights: {ghost: 1}\n"),
         (APP_FILE, "traffic.weights.ghost", "unknown service")),
    # --- root ------------------------------------------------------------------------------------
    Case("user-root", lambda c: c.service("user: root\n"), (APP_FILE, "services.demo-web.user", "--allow-root-services")),
    # --- ports -----------------------------------------------------------------------------------
    Case("port-zero", lambda c: c.app(f"    port: {PORT}\n", "    port: 0\n"), (APP_FILE, "services.demo-web.port", "minimum")),
    Case("port-too-big", lambda c: c.app(f"    port: {PORT}\n", "    port: 70000\n"), (APP_FILE, "services.demo-web.port", "maximum")),
    Case("port-negative", lambda c: c.app(f"    port: {PORT}\n", "    port: -80\n"), (APP_FILE, "services.demo-web.port")),
    Case("port-float", lambda c: c.app(f"    port: {PORT}\n", "    port: 8080.5\n"), (APP_FILE, "services.demo-web.port")),
    Case("port-twice", lambda c: c.app("services:\n", f"services:\n  twin: {{environment: demo, port: {PORT}, command: [demoapp-server]}}\n"),
         (APP_FILE, "port", "also used")),
    # --- python / installer ------------------------------------------------------------------------
    Case("python-injection", lambda c: c.app("demo: {lockfile", 'demo: {python: "3.11; rm -rf /", lockfile'), (APP_FILE, "environments.demo.python")),
    Case("installer-unknown", lambda c: c.app("index: false}", "index: false, installer: curl}"), (APP_FILE, "environments.demo.installer")),
    # --- paths escaping the repo -------------------------------------------------------------------
    Case("lockfile-traversal", lambda c: c.app("lockfile: demo.lock", "lockfile: ../../../../../../../etc/passwd"),
         (APP_FILE, "environments.demo.lockfile", "escapes the state repo")),
    Case("lockfile-absolute", lambda c: c.app("lockfile: demo.lock", "lockfile: /etc/passwd"),
         (APP_FILE, "environments.demo.lockfile", "absolute")),
    Case("lockfile-symlink-outside", lambda c: c.symlink("apps/demo/demo.lock", c.outside / "demo.lock"),
         (APP_FILE, "environments.demo.lockfile", "escapes the state repo")),
    Case("lockfile-relative-symlink-outside", lambda c: c.symlink("apps/demo/demo.lock", Path("../../../../../../../etc/hostname")),
         (APP_FILE, "environments.demo.lockfile", "escapes the state repo")),
    Case("find-links-absolute", lambda c: c.app("find_links: [../../wheelhouse]", f"find_links: [{c.outside / 'wheelhouse'}]"),
         (APP_FILE, "environments.demo.find_links.0", "absolute")),
    Case("find-links-traversal", lambda c: c.app("find_links: [../../wheelhouse]", "find_links: [../../../../..]"),
         (APP_FILE, "environments.demo.find_links.0", "escapes the state repo")),
    Case("find-links-symlink-outside", lambda c: (c.symlink("wheelhouse2", c.outside / "wheelhouse"),
                                                  c.app("find_links: [../../wheelhouse]", "find_links: [../../wheelhouse2]")),
         (APP_FILE, "environments.demo.find_links.0", "escapes the state repo")),
    Case("app-yaml-symlink-outside", lambda c: c.symlink(APP_FILE, c.outside / "app.yaml"),
         (APP_FILE, "symlink that points outside")),
    Case("app-dir-symlink-outside", lambda c: c.symlink("apps/evil", c.outside / "evil"),
         ("apps/evil/app.yaml", "symlink that points outside")),
    Case("fleet-yaml-symlink-outside", lambda c: c.symlink("fleet.yaml", c.outside / "fleet.yaml"),
         ("fleet.yaml", "symlink that points outside")),
    # --- lockfiles ---------------------------------------------------------------------------------
    Case("lock-without-hash", lambda c: c.lock("demoapp==2.0.0\n"), ("apps/demo/demo.lock", "demoapp", "no --hash=sha256")),
    Case("lock-md5-hash", lambda c: c.lock("demoapp==2.0.0 --hash=md5:0123456789abcdef0123456789abcdef\n"),
         ("apps/demo/demo.lock", "demoapp", "algorithm")),
    Case("lock-short-hash", lambda c: c.lock("demoapp==2.0.0 --hash=sha256:abc\n"), ("apps/demo/demo.lock", "hex digits")),
    Case("lock-unpinned", lambda c: c.lock(f"demoapp>=1 --hash={_hash_of(c)}\n"), ("apps/demo/demo.lock", "not pinned")),
    Case("lock-index-url", lambda c: c.lock("--index-url https://evil.invalid/simple\n" + _line2(c) + "\n"),
         ("apps/demo/demo.lock:1", "--index-url")),
    Case("lock-extra-index", lambda c: c.lock(_line2(c) + "\n--extra-index-url=https://evil.invalid/simple\n"),
         ("apps/demo/demo.lock:2", "--extra-index-url")),
    Case("lock-find-links", lambda c: c.lock(f"--find-links {c.outside / 'wheelhouse'}\n" + _line2(c) + "\n"),
         ("apps/demo/demo.lock:1", "--find-links")),
    Case("lock-editable", lambda c: c.lock("-e ../../evil\n" + _line2(c) + "\n"), ("apps/demo/demo.lock:1", "editable")),
    Case("lock-include", lambda c: c.lock("-r /etc/passwd\n" + _line2(c) + "\n"), ("apps/demo/demo.lock:1", "includes another file")),
    Case("lock-url", lambda c: c.lock(f"demoapp @ https://evil.invalid/demoapp.whl --hash={_hash_of(c)}\n"),
         ("apps/demo/demo.lock", "URL requirement")),
    Case("lock-env-var", lambda c: c.lock(f"demoapp==${{VERSION}} --hash={_hash_of(c)}\n"), ("apps/demo/demo.lock", "environment variables")),
    Case("lock-marker", lambda c: c.lock(f"demoapp==2.0.0 ; python_version < '3' --hash={_hash_of(c)}\n"), ("apps/demo/demo.lock", "marker")),
    Case("lock-twice", lambda c: c.lock(_line2(c) + "\n" + _line2(c) + "\n"), ("apps/demo/demo.lock:2", "listed twice")),
    Case("lock-empty", lambda c: c.lock("# nothing\n"), ("apps/demo/demo.lock", "pins no requirements")),
    # --- the loader's later checks (YAML 1.2 scalars, hints, addresses as bound, §3d) ----------------------
    Case("yaml11-bool-yes", lambda c: c.app("index: false", "index: yes"),
         (APP_FILE, "environments.demo.index", "'yes' is not of type 'boolean'")),
    Case("command0-venv-path", lambda c: c.app("[demoapp-server,", "[/opt/venv/bin/demoapp-server,"),
         (APP_FILE, "services.demo-web.command.0", "a console script name from the venv, not a path")),
    Case("yaml-unclosed-bracket", lambda c: c.app(f'"{PORT}"]', f'"{PORT}"'), (APP_FILE, "YAML syntax error", "opened at line 11")),
    Case("listen-takes-service-port", lambda c: c.write(APP_FILE, APP + f"traffic: {{listen: 'localhost:{PORT}', weights: {{demo-web: 1}}}}\n"),
         (APP_FILE, "traffic.listen", f"takes 127.0.0.1:{PORT}, where service 'demo-web' of {APP_FILE}:10 listens")),
    Case("listen-overlaps-other-app", lambda c: (
        c.write(APP_FILE, APP + "traffic: {listen: '127.0.0.1:18100', weights: {demo-web: 1}}\n"),
        c.write("apps/other/app.yaml", _other_app("traffic: {listen: '0.0.0.0:18100', weights: {other-web: 1}}\n"))),
         ("apps/other/app.yaml", "traffic.listen", f"overlaps listen address '127.0.0.1:18100' of {APP_FILE}:13")),
    Case("port-clash-beside-typo", lambda c: c.write("apps/other/app.yaml", _other_app("colour: red\n", port=PORT)),
         ("apps/other/app.yaml", "unknown field 'colour'", f"port {PORT} is also defined in {APP_FILE}")),
    Case("host-missing-from-fleet", lambda c: c.write("fleet.yaml", FLEET.replace("  h1:", "  hl:")),
         ("fleet.yaml", "host 'h1' is not defined in fleet.yaml", "did you mean 'hl'")),
]


def _other_app(extra: str, port: int = PORT + 1) -> str:
    """A second app on the same host, locked like demo (its lockfile is demo's, through a relative path)."""
    return (APP.replace("name: demo", "name: other").replace("demo-web", "other-web").replace("  demo: {", "  other: {")
            .replace("lockfile: demo.lock", "lockfile: ../demo/demo.lock").replace("environment: demo", "environment: other")
            .replace(str(PORT), str(port)) + extra)


def test_corpus_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 60
    print(f"\nhostile state corpus: {len(CASES)} hostile revisions (+1 wrong-hash lock that fails at build)")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A converged host: demo-web (1.0.0) runs under the embedded supervisord; `good` is its revision."""
    base = tmp_path_factory.mktemp("hostile")
    repo = StateRepo(base / "state")
    root = base / "root"
    repo.write("fleet.yaml", FLEET)
    repo.write(APP_FILE, APP)
    repo.wheel("2.0.0")                                  # committed, so every case can lock it
    repo.lock("apps/demo/demo.lock", "1.0.0")
    good = repo.commit("good")
    outside = base / "outside"
    outside.mkdir()
    shutil.copytree(repo.path / "wheelhouse", outside / "wheelhouse")
    for name in ("fleet.yaml", APP_FILE, "apps/demo/demo.lock"):
        shutil.copy(repo.path / name, outside / Path(name).name)
    (outside / "evil").mkdir()
    (outside / "evil" / "app.yaml").write_text(APP.replace("name: demo", "name: evil").replace("demo-web", "evil-web"))
    try:
        once(repo.url, root)
        before = snapshot(root)
        assert before["served"] == "demoapp 1.0.0\n"
        yield repo, root, good, Ctx(repo, outside), before
    finally:
        from agent.drivers.supervisor import EmbeddedSupervisor

        EmbeddedSupervisor(root).stop()


def snapshot(root: Path) -> dict:
    info = settled_programs(root)
    return {
        "programs": {name: (p["pid"], p["statename"]) for name, p in info.items()},
        "served": get_text(f"http://127.0.0.1:{PORT}/"),
        "conf": (root / "supervisor/programs/demo-web.conf").read_text(),
        "link": os.readlink(root / "envs/demo"),
        "venvs": sorted(os.listdir(root / "venvs")),
    }


def once_in_process(repo: StateRepo, root: Path) -> tuple[int, str, str]:
    """`gitops-agent once` through the real CLI entry point, in this process (saves ~0.4 s per case of
    interpreter start-up and imports; `test_wrong_hash_...` and the fixture run the CLI as a subprocess)."""
    from agent.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["once", *agent_args(repo.url, root)])
    return code, out.getvalue(), err.getvalue()


def reset_to(repo: StateRepo, sha: str) -> None:
    git(repo.path, "reset", "-q", "--hard", sha)
    git(repo.path, "clean", "-qfdx")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_revision_is_rejected_whole(host, case):
    repo, root, good, ctx, before = host
    reset_to(repo, good)
    repo.lock("apps/demo/demo.lock", "2.0.0")           # the valid part of the same revision
    case.mutate(ctx)
    bad = repo.commit(case.id)

    code, stdout, stderr = once_in_process(repo, root)
    assert code == 1, stdout + stderr
    for needle in case.expect:
        assert needle in stderr, f"{needle!r} not in the error:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert "is invalid" in stderr and "keeping the last good revision" in stderr
    assert "build_venv" not in stdout and "update_program" not in stdout, stdout

    assert snapshot(root) == before                      # nothing applied, nothing restarted
    st = status(root)
    assert st["applied"]["sha"] == good and st["attempted"]["sha"] == bad
    assert st["result"] == "invalid" and case.expect[0] in st["last_error"]
    assert not (Path("/tmp/pwned")).exists()


def test_wrong_hash_fails_at_build_and_keeps_the_old_venv(host):
    """A well-formed lock whose hash is not the wheel's: only the build can tell. Nothing is switched."""
    repo, root, good, ctx, before = host
    reset_to(repo, good)
    wrong = lock_line(repo.wheel("1.0.0")).split("--hash=")[1]
    ctx.lock(f"demoapp==2.0.0 --hash={wrong}\n")
    bad = repo.commit("wrong hash")

    proc = once(repo.url, root, expect=1)
    out = proc.stdout + proc.stderr
    assert "[FAILED] build_venv demo" in proc.stdout, out
    assert "hash" in out.lower() and "demoapp" in out, out
    assert "[skipped] write_program demo-web" in proc.stdout, out
    assert snapshot(root) == before                      # old venv kept, no partial dir, service untouched
    st = status(root)
    assert st["applied"]["sha"] == good and st["attempted"]["sha"] == bad and st["result"] == "failed"
    assert st["resources"]["venv:demo"]["state"] == "failed" and "hash" in st["resources"]["venv:demo"]["message"].lower()
    assert "hash" in st["last_error"].lower()

    reset_to(repo, good)                                  # the fix is a new commit: converges again
    repo.commit("revert to good")
    once(repo.url, root)
    assert snapshot(root)["programs"] == before["programs"]
