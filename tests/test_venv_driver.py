"""Venv driver against real `python -m venv` + pip and uv, from hand-made wheels in a local find-links dir.

Builds cost seconds (venv+pip ~3 s), so the real venvs are built once per module and shared; tests that
mutate a shared venv put it back. Retention and listing logic is file-level, so those tests use
hand-made venv dirs (a dir plus a marker) and stay fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from agent.drivers import venv as venv_mod
from agent.drivers.venv import MARKER, VenvManager, VenvSpec, find_uv, resolve_python
from agent.core.errors import AgentError, BuildError, ConfigError, InvalidState, InvalidVenvRef, Permanent
from agent.core.outcome import Verdict, verdict_for
from agent.core.lockfile import venv_identity

try:  # tests/ on sys.path (conftest, or pytest's rootdir-less import mode)
    import wheelfactory
except ImportError:  # pragma: no cover - tests/ made a package
    from tests import wheelfactory

UV = find_uv()
needs_uv = pytest.mark.skipif(UV is None, reason="uv binary not found (PATH or `uv` package)")
PY = "%d.%d" % sys.version_info[:2]
OFFLINE = ("--no-index",)  # tests never touch an index: find-links only


# ----- helpers -----

def _spec(root: Path, name: str, lines: list[str], wheelhouse: Path, *, installer: str = "pip",
          python: str = PY, lock_name: str | None = None) -> VenvSpec:
    """Write a lockfile and return the spec the planner would hand over (identity computed like load.py)."""
    lock = root / "state" / (lock_name or f"{name}-{installer}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("\n".join(lines) + "\n")
    return VenvSpec(name=name, python=python, lockfile=lock, find_links=(wheelhouse,), installer=installer,
                    options=OFFLINE, identity=venv_identity(python, lock.read_bytes(), installer, OFFLINE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status, resp.read().decode()


def _serve_and_get(script: Path) -> str:
    """Start the console script as a real server, wait for /healthz, return GET / ; always stop it."""
    port = _free_port()
    proc = subprocess.Popen([str(script), "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert _get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
                return _get(f"http://127.0.0.1:{port}/")[1]
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0  # clean exit on SIGTERM: supervisord sees a normal stop


def _fake_venv(mgr: VenvManager, name: str, identity: str, *, complete: bool, mtime: float) -> Path:
    """A venv dir as the manager sees it (dir + optional marker) for retention logic; no interpreter."""
    path = mgr.path_for(name, identity)
    path.mkdir(parents=True)
    if complete:
        (path / MARKER).write_text(json.dumps({"identity": identity, "packages": {}}))
        os.utime(path / MARKER, (mtime, mtime))
    os.utime(path, (mtime, mtime))
    return path


# ----- shared real builds -----

@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> dict:
    wh = tmp_path_factory.mktemp("wheelhouse")
    lib = wheelfactory.make_wheel(wh, "tiny.lib", "1.0", {"tinylib": "def hello():\n    return 'hi'\n"},
                                  console_scripts={"tinylib-hello": "tinylib:hello"})
    extra = wheelfactory.make_wheel(wh, "extra", "0.1", {"extra_mod": ""})
    return {
        "dir": wh,
        "v1": wheelfactory.make_http_app_wheel(wh, "demoapp", "1.0.0"),
        "v2": wheelfactory.make_http_app_wheel(wh, "demoapp", "2.0.0"),
        "lib": lib,
        "extra": extra,
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("agent-root")


@pytest.fixture(scope="module")
def mgr(root) -> VenvManager:
    return VenvManager(root, retention=2)


@pytest.fixture(scope="module")
def spec_v1(root, wheelhouse) -> VenvSpec:
    return _spec(root, "app", [wheelfactory.lock_line(wheelhouse["v1"]), wheelfactory.lock_line(wheelhouse["lib"])],
                 wheelhouse["dir"], lock_name="app-v1.lock")


@pytest.fixture(scope="module")
def spec_v2(root, wheelhouse) -> VenvSpec:
    return _spec(root, "app", [wheelfactory.lock_line(wheelhouse["v2"]), wheelfactory.lock_line(wheelhouse["lib"])],
                 wheelhouse["dir"], lock_name="app-v2.lock")


@pytest.fixture(scope="module")
def v1(mgr, spec_v1) -> Path:
    return mgr.build(spec_v1)


@pytest.fixture(scope="module")
def v2_over_interrupted(mgr, spec_v2) -> tuple[Path, Path]:
    """Build v2 where an interrupted build left a half dir, with a hostile caller environment."""
    final = mgr.path_for(spec_v2.name, spec_v2.identity)
    (final / "bin").mkdir(parents=True)
    junk = final / "bin" / "half-written"
    junk.write_text("left by a crash")
    with pytest.MonkeyPatch.context() as mp:  # would redirect or break a naive build
        mp.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/nowhere")
        mp.setenv("PIP_USER", "1")
        mp.setenv("PIP_NO_BINARY", ":all:")
        mp.setenv("PIP_REQUIRE_VIRTUALENV", "1")
        mp.setenv("VIRTUAL_ENV", "/nonexistent/venv")
        mp.setenv("PYTHONPATH", "/nonexistent")
        path = mgr.build(spec_v2)
    return path, junk


# ----- building -----

def test_build_at_final_path_with_marker_written_last(mgr, spec_v1, v1):
    assert v1 == mgr.path_for("app", spec_v1.identity) == mgr.root / "venvs" / f"app-{spec_v1.identity}"
    marker = json.loads((v1 / MARKER).read_text())
    assert marker["identity"] == spec_v1.identity and marker["installer"] == "pip"
    assert marker["packages"] == {"demoapp": "1.0.0", "tiny-lib": "1.0"}
    assert marker["options"] == ["--no-index"] and marker["python"] == PY
    assert len(marker["lock_sha256"]) == 64 and marker["built_at"]
    # built in place: the shebang names the final path, so nothing was moved after the build
    assert (v1 / "bin" / "demoapp-server").read_text().splitlines()[0] == f"#!{v1}/bin/python"
    newest_file = max(p.stat().st_mtime_ns for p in v1.rglob("*") if p.is_file() and p.name != MARKER)
    assert (v1 / MARKER).stat().st_mtime_ns >= newest_file
    assert [(i.path, i.complete) for i in mgr.list("app") if i.path == v1] == [(v1, True)]


def test_console_script_runs(v1):
    assert _serve_and_get(v1 / "bin" / "demoapp-server") == "demoapp 1.0.0\n"
    out = subprocess.run([v1 / "bin" / "python", "-c", "import tinylib; print(tinylib.hello())"],
                         capture_output=True, text=True, check=True).stdout
    assert out == "hi\n"


def _no_subprocess(monkeypatch) -> None:
    """Any process started from here on fails the test (how a no-op or a fact read proves it ran none)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args[:1]}")
    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_build_again_is_a_no_op(mgr, spec_v1, v1, monkeypatch):
    before = (v1 / MARKER).stat().st_mtime_ns
    _no_subprocess(monkeypatch)
    assert mgr.build(spec_v1) == v1
    assert (v1 / MARKER).stat().st_mtime_ns == before


def test_interrupted_dir_is_deleted_and_rebuilt_despite_hostile_env(v2_over_interrupted, spec_v2, mgr):
    path, junk = v2_over_interrupted
    assert not junk.exists()
    assert (path / MARKER).is_file()
    assert mgr.installed(path) == {"demoapp": "2.0.0", "tiny-lib": "1.0"}


def test_installed_reads_in_process_and_skips_seeded_tools(mgr, v1, monkeypatch):
    _no_subprocess(monkeypatch)                            # no `pip freeze` (~250 ms a call)
    got = mgr.installed(v1)
    assert got == {"demoapp": "1.0.0", "tiny-lib": "1.0"}  # no pip/setuptools although venv seeded them


def test_installed_sees_hand_changes(mgr, v1, wheelhouse):
    pip = [str(v1 / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    try:
        subprocess.run(pip + ["install", "--no-deps", "--no-index", "--find-links", str(wheelhouse["dir"]), "extra"],
                       check=True, capture_output=True)
        subprocess.run(pip + ["uninstall", "-y", "tiny.lib"], check=True, capture_output=True)
        assert mgr.installed(v1) == {"demoapp": "1.0.0", "extra": "0.1"}
    finally:  # put the shared venv back as the lock says
        subprocess.run(pip + ["uninstall", "-y", "extra"], capture_output=True)
        subprocess.run(pip + ["install", "--no-deps", "--no-index", str(wheelhouse["lib"])], capture_output=True)
    assert mgr.installed(v1) == {"demoapp": "1.0.0", "tiny-lib": "1.0"}


def test_hash_mismatch_fails_and_leaves_current_untouched(mgr, root, v1, wheelhouse):
    mgr.switch("app", v1)
    wrong = wheelfactory.lock_line(wheelhouse["v1"]).split("--hash=")[0] + \
        "--hash=" + wheelfactory.lock_line(wheelhouse["v2"]).split("--hash=")[1]
    bad = _spec(root, "app", [wrong, wheelfactory.lock_line(wheelhouse["lib"])], wheelhouse["dir"],
                lock_name="app-tampered.lock")
    with pytest.raises(BuildError) as info:
        mgr.build(bad)
    assert "DO NOT MATCH THE HASHES" in str(info.value)
    assert not mgr.path_for("app", bad.identity).exists()
    assert mgr.current("app") == v1 and (v1 / MARKER).is_file()
    assert mgr.installed(v1) == {"demoapp": "1.0.0", "tiny-lib": "1.0"}


def _pip_into(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, capture_output=True)


def test_repair_keeps_the_drifted_venv_until_the_new_one_is_complete(mgr, root, wheelhouse, tmp_path):
    spec = _spec(root, "fix", [wheelfactory.lock_line(wheelhouse["v1"]), wheelfactory.lock_line(wheelhouse["lib"])],
                 wheelhouse["dir"], lock_name="fix.lock")
    path = mgr.build(spec)
    mgr.switch("fix", path)
    _pip_into(path, "install", "--no-deps", "--no-index", "--find-links", str(wheelhouse["dir"]), "extra")
    drifted = {"demoapp": "1.0.0", "tiny-lib": "1.0", "extra": "0.1"}
    assert mgr.installed(path) == drifted

    empty = tmp_path / "no-wheels"
    empty.mkdir()
    with pytest.raises(BuildError, match="demoapp"):          # the wheels are gone: the rebuild fails
        mgr.repair(dataclasses.replace(spec, find_links=(empty,)))
    assert mgr.current("fix") == path and (path / MARKER).is_file()
    assert mgr.installed(path) == drifted                      # the venv the service ran from, back as it was
    assert _serve_and_get(path / "bin" / "demoapp-server") == "demoapp 1.0.0\n"
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]

    assert mgr.repair(spec) == path
    assert mgr.installed(path) == {"demoapp": "1.0.0", "tiny-lib": "1.0"}
    assert mgr.current("fix") == path
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("new_completed", [False, True])
def test_a_repair_a_crash_interrupted_is_finished_by_the_next_build(mgr, root, wheelhouse, monkeypatch,
                                                                   new_completed):
    name = f"crash{int(new_completed)}"
    spec = _spec(root, name, [wheelfactory.lock_line(wheelhouse["v1"]), wheelfactory.lock_line(wheelhouse["lib"])],
                 wheelhouse["dir"], lock_name=f"{name}.lock")
    path = mgr.build(spec)
    held = path.parent / f".held-{path.name}.0badc0de"
    shutil.copytree(path, held, symlinks=True)               # the drifted venv, renamed aside by the repair
    (held / "held-copy").write_text("")
    if not new_completed:                                      # the crash hit mid-build: no marker yet
        (path / MARKER).unlink()
    _no_subprocess(monkeypatch)                                # finishing it rebuilds nothing
    assert mgr.build(spec) == path
    assert (path / MARKER).is_file() and (path / "held-copy").exists() != new_completed
    assert not held.exists()


def test_lock_changed_after_planning_is_refused(mgr, root, wheelhouse):
    spec = _spec(root, "moving", [wheelfactory.lock_line(wheelhouse["lib"])], wheelhouse["dir"])
    spec.lockfile.write_text(wheelfactory.lock_line(wheelhouse["extra"]) + "\n")
    with pytest.raises(BuildError, match="changed since it was planned"):
        mgr.build(spec)
    assert not mgr.list("moving")


def test_invalid_lock_raises_invalid_state(mgr, root, wheelhouse):
    spec = _spec(root, "loose", ["demoapp>=1"], wheelhouse["dir"])
    with pytest.raises(InvalidState):
        mgr.build(spec)


# ----- switching -----

def test_switch_back_and_forth_is_atomic_and_needs_no_rebuild(mgr, spec_v1, v1, v2_over_interrupted, monkeypatch):
    v2 = v2_over_interrupted[0]
    link = mgr.link_for("app")
    mgr.switch("app", v2)
    assert mgr.current("app") == v2 and link.resolve() == v2.resolve()
    assert _serve_and_get(link / "bin" / "demoapp-server") == "demoapp 2.0.0\n"

    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:  # the link must never be missing or dangling mid-switch
        while not stop.is_set():
            try:
                os.stat(link / "bin" / "python")
            except OSError as exc:
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(200):
            mgr.switch("app", v1)
            mgr.switch("app", v2)
    finally:
        stop.set()
        thread.join()
    assert errors == []

    _no_subprocess(monkeypatch)  # rollback = the kept venv is found complete, then a symlink swap
    assert mgr.build(spec_v1) == v1
    mgr.switch("app", v1)
    assert mgr.current("app") == v1
    assert not os.path.isabs(os.readlink(link))  # relative: ../venvs/<name>-<identity>
    assert not [p for p in link.parent.iterdir() if p.name.endswith(".tmp")]  # no temp links left behind


def test_switch_refuses_incomplete_or_foreign_dirs(mgr, tmp_path):
    half = mgr.path_for("half", "0" * 16)
    half.mkdir(parents=True)
    with pytest.raises(BuildError, match="incomplete"):
        mgr.switch("half", half)
    with pytest.raises(BuildError, match="not one of its venvs"):
        mgr.switch("half", tmp_path)
    assert mgr.current("half") is None


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_switch_sets_a_foreign_entry_aside_and_heals(tmp_path, caplog, kind):
    """envs/<name> replaced by hand (a dir or a file) made every switch fail, or silently replaced a
    file: it is renamed aside next to the link (kept, with a warning) and the link is put back."""
    mgr = VenvManager(tmp_path)
    venv = _fake_venv(mgr, "web", "1" * 16, complete=True, mtime=time.time())
    link = mgr.link_for("web")
    link.parent.mkdir(parents=True)
    if kind == "directory":
        link.mkdir()
        (link / "notes.txt").write_text("someone's work")
    else:
        link.write_text("someone's work")
    assert mgr.current("web") is None                  # the planner sees no current venv: it plans a switch

    with caplog.at_level(logging.WARNING, logger="agent.drivers.venv"):
        mgr.switch("web", venv)
    assert mgr.current("web") == venv and link.is_symlink()
    aside = [p for p in link.parent.iterdir() if p.name != "web"]
    assert len(aside) == 1 and aside[0].name.startswith(".web.aside-")
    kept = aside[0] / "notes.txt" if kind == "directory" else aside[0]
    assert kept.read_text() == "someone's work"        # user data is never deleted silently
    assert str(aside[0]) in caplog.text and "WARNING" in caplog.text

    caplog.clear()
    mgr.switch("web", venv)                            # a symlink is ours: replaced without a word
    assert len(list(link.parent.iterdir())) == 2 and caplog.text == ""
    link.unlink()
    link.mkdir()                                       # it happens again: a second, distinct aside name
    mgr.switch("web", venv)
    assert mgr.current("web") == venv and len([p for p in link.parent.iterdir() if ".aside-" in p.name]) == 2


def test_bad_names_and_identities_raise_a_permanent_build_error(tmp_path):
    """They used to raise a bare ValueError, which escaped the executor (it catches AgentError/OSError)."""
    mgr = VenvManager(tmp_path)
    calls = [lambda: mgr.link_for("../etc"), lambda: mgr.current(".hidden"), lambda: mgr.path_for("a/b", "0" * 16),
             lambda: mgr.path_for("web", "not-a-hash"), lambda: mgr.remove("web", "0" * 15),
             lambda: mgr.build(VenvSpec("../up", PY, tmp_path / "missing.lock", ()))]
    for call in calls:
        with pytest.raises(InvalidVenvRef) as info:
            call()
        assert isinstance(info.value, BuildError) and isinstance(info.value, AgentError)
        assert verdict_for(info.value, rolled_back=False) is Verdict.FAILED_PERMANENT  # no retry loop
    with pytest.raises(ConfigError, match="retention"):
        VenvManager(tmp_path, retention=0)
    assert issubclass(ConfigError, Permanent)


# ----- retention (file-level: hand-made venv dirs) -----

def test_list_and_prune_keep_newest_current_and_protected(tmp_path):
    mgr = VenvManager(tmp_path, retention=2)
    now = time.time()
    paths = [_fake_venv(mgr, "web", f"{i:016x}", complete=True, mtime=now - 100 * (6 - i)) for i in range(6)]
    half = _fake_venv(mgr, "web", "f" * 16, complete=False, mtime=now)
    other = _fake_venv(mgr, "web-admin", "a" * 16, complete=True, mtime=now - 10_000)  # a name with a dash prefix
    mgr.switch("web", paths[0])  # current = the oldest (a rollback)

    listed = mgr.list("web")
    assert [i.path for i in listed] == [half] + paths[::-1]
    assert [i.complete for i in listed] == [False] + [True] * 6
    assert {i.name for i in mgr.list()} == {"web", "web-admin"}

    removed = mgr.prune("web", protect=[paths[1]])
    assert sorted(removed) == sorted([half, paths[2], paths[3]])
    assert [i.path for i in mgr.list("web")] == [paths[5], paths[4], paths[1], paths[0]]
    assert other.exists() and mgr.current("web") == paths[0]
    assert mgr.prune("web", keep=1) == [paths[4], paths[1]]
    assert not list((tmp_path / "venvs").glob(".trash-*"))


def test_prune_spares_a_build_in_progress(tmp_path):
    mgr = VenvManager(tmp_path)
    building = _fake_venv(mgr, "web", "1" * 16, complete=False, mtime=time.time())
    mgr._building.add(building)  # what build() records while it runs
    assert mgr.prune("web") == [] and building.exists()


def test_remove_all(tmp_path):
    mgr = VenvManager(tmp_path)
    a = _fake_venv(mgr, "gone", "1" * 16, complete=True, mtime=1)
    b = _fake_venv(mgr, "gone", "2" * 16, complete=False, mtime=2)
    keep = _fake_venv(mgr, "stays", "3" * 16, complete=True, mtime=3)
    held = [mgr.path_for(n, "4" * 16).with_name(f".held-{n}-{'4' * 16}.0badc0de") for n in ("gone", "gone-too")]
    for path in held:                                     # drifted venvs a crashed repair left aside
        path.mkdir()
    mgr.switch("gone", a)
    assert sorted(mgr.remove_all("gone")) == sorted([mgr.link_for("gone"), a, b])
    assert mgr.current("gone") is None and mgr.list("gone") == [] and keep.exists()
    assert [p.exists() for p in held] == [False, True]   # "gone-too" is another environment


def test_empty_root_has_no_facts(tmp_path):
    mgr = VenvManager(tmp_path / "nothing-yet")
    assert mgr.list() == [] and mgr.current("x") is None and mgr.prune("x") == []


# ----- uv backend -----

@needs_uv
def test_uv_build(mgr, root, wheelhouse):
    spec = _spec(root, "fast", [wheelfactory.lock_line(wheelhouse["v1"]), wheelfactory.lock_line(wheelhouse["lib"])],
                 wheelhouse["dir"], installer="uv")
    path = mgr.build(spec)
    marker = json.loads((path / MARKER).read_text())
    assert marker["installer"] == "uv" and path.name == f"fast-{spec.identity}"
    assert mgr.installed(path) == {"demoapp": "1.0.0", "tiny-lib": "1.0"}
    site = next((path / "lib").glob("python*/site-packages"))
    assert list(site.glob("__pycache__/demoapp_server*.pyc"))   # the entry point check imported it
    assert _serve_and_get(path / "bin" / "demoapp-server") == "demoapp 1.0.0\n"


@needs_uv
@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_bytecode_is_lazy_unless_asked_for(mgr, root, wheelhouse, installer):
    """Compiling every module up front is most of a warm build: by default only what the console scripts
    import is compiled (by the entry point check); `compile_bytecode` (a `user:` service) compiles all."""
    lines = [wheelfactory.lock_line(wheelhouse["v1"]), wheelfactory.lock_line(wheelhouse["extra"])]
    lazy = mgr.build(_spec(root, f"lazy{installer}", lines, wheelhouse["dir"], installer=installer))
    site = next((lazy / "lib").glob("python*/site-packages"))
    assert list(site.glob("__pycache__/demoapp_server*.pyc")) and not list(site.glob("__pycache__/extra_mod*.pyc"))
    eager_spec = _spec(root, f"eager{installer}", lines, wheelhouse["dir"], installer=installer)
    eager = mgr.build(dataclasses.replace(eager_spec, compile_bytecode=True))
    site = next((eager / "lib").glob("python*/site-packages"))
    assert list(site.glob("__pycache__/extra_mod*.pyc"))


@needs_uv
def test_uv_hash_mismatch(mgr, root, wheelhouse):
    wrong = "demoapp==1.0.0 --hash=sha256:" + "0" * 64
    spec = _spec(root, "fastbad", [wrong], wheelhouse["dir"], installer="uv")
    with pytest.raises(BuildError, match="(?i)hash mismatch"):
        mgr.build(spec)
    assert mgr.list("fastbad") == []


@needs_uv
def test_broken_console_script_fails_verification_and_leaves_no_marker(mgr, root, wheelhouse, tmp_path):
    broken = wheelfactory.make_wheel(tmp_path, "broken", "1.0", {"broken_mod": "raise ImportError('boom')\n"},
                                     console_scripts={"broken": "broken_mod:main"})
    spec = _spec(root, "broken", [wheelfactory.lock_line(broken)], tmp_path, installer="uv")
    with pytest.raises(BuildError) as info:
        mgr.build(spec)
    assert "broken = broken_mod:main" in str(info.value) and "boom" in str(info.value)
    assert mgr.list("broken") == []  # verification failed after install: the dir is gone, no marker ever


@needs_uv
def test_missing_dependency_fails_pip_check(mgr, root, wheelhouse, tmp_path):
    needy = wheelfactory.make_wheel(tmp_path, "needy", "1.0", {"needy": ""}, requires=["tiny.lib>=1"])
    spec = _spec(root, "needy", [wheelfactory.lock_line(needy)], tmp_path, installer="uv")
    with pytest.raises(BuildError, match="(?s)pip check.*tiny-lib"):
        mgr.build(spec)  # --no-deps installs it; the check catches the incomplete lock
    assert mgr.list("needy") == []


def _other_python() -> str | None:
    for version in ("3.12", "3.10", "3.13"):
        if version != PY:
            try:
                resolve_python(version)
                return version
            except BuildError:
                pass
    return None


OTHER_PY = _other_python()


@needs_uv
@pytest.mark.skipif(OTHER_PY is None, reason="no second Python version installed")
def test_other_python_version(mgr, root, wheelhouse):
    spec = _spec(root, "other-py", [wheelfactory.lock_line(wheelhouse["lib"])], wheelhouse["dir"], installer="uv",
                 python=OTHER_PY)
    path = mgr.build(spec)
    assert list((path / "lib").glob(f"python{OTHER_PY}/site-packages"))
    assert mgr.installed(path) == {"tiny-lib": "1.0"}


# ----- interpreter and environment -----

def test_resolve_python():
    assert resolve_python(PY) == sys.executable
    with pytest.raises(BuildError, match="no Python 3.99"):
        resolve_python("3.99")
    with pytest.raises(BuildError, match="not of the form"):
        resolve_python("python; rm -rf /")


def test_installer_env_is_built_from_scratch(tmp_path):
    """Only PATH, network plumbing (proxy, CA bundle) and TMPDIR come from the caller; HOME is the
    agent's private dir and pip/uv read no configuration file and no inherited PIP_*/UV_* variable."""
    home = tmp_path / "home"
    env = venv_mod._build_env(home, {
        "PATH": "/bin", "HOME": "/root", "XDG_CONFIG_HOME": "/root/.config", "LANG": "de_DE.UTF-8",
        "PIP_INDEX_URL": "x", "PIP_FIND_LINKS": "/host", "PIP_CONFIG_FILE": "/etc/host-pip.conf", "PIP_CERT": "/ca",
        "UV_INDEX_URL": "y", "UV_FIND_LINKS": "/host", "UV_CACHE_DIR": "/c", "VIRTUAL_ENV": "/v", "PYTHONPATH": "/p",
        "https_proxy": "http://proxy:3128", "SSL_CERT_FILE": "/ca.pem", "TMPDIR": "/scratch", "EDITOR": "vi"})
    assert env["PATH"] == "/bin" and env["HOME"] == str(home) and env["LANG"] == "C.UTF-8"
    assert env["XDG_CONFIG_HOME"].startswith(str(home)) and env["XDG_CACHE_HOME"].startswith(str(home))
    assert env["PIP_CONFIG_FILE"] == os.devnull and env["UV_NO_CONFIG"] == "1"
    assert env["https_proxy"] == "http://proxy:3128" and env["SSL_CERT_FILE"] == "/ca.pem" and env["TMPDIR"] == "/scratch"
    assert not {"PIP_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT", "UV_INDEX_URL", "UV_FIND_LINKS", "UV_CACHE_DIR",
                "VIRTUAL_ENV", "PYTHONPATH", "EDITOR"} & env.keys()
    assert {k for k in env if k.startswith(("PIP_", "UV_"))} <= set(venv_mod._AGENT_SET)


def test_pip_network_settings_are_handed_over_as_options_never_as_variables(tmp_path):
    """deploy/README.md tells users behind a TLS-intercepting proxy to set PIP_CERT: pip's --isolated
    ignores PIP_*, so the agent passes it (and proxy, timeout, retries) as options; uv gets the standard
    variables. Nothing that picks wheels (find-links, index) is carried over."""
    caller = {"PATH": "/bin", "PIP_CERT": "/ca.pem", "PIP_PROXY": "http://proxy:3128", "PIP_DEFAULT_TIMEOUT": "60",
              "PIP_RETRIES": "2", "PIP_FIND_LINKS": "/host", "PIP_INDEX_URL": "http://host/simple", "PIP_NO_INDEX": "0"}
    assert venv_mod._pip_network_options(caller) == ["--cert", "/ca.pem", "--proxy", "http://proxy:3128",
                                                     "--timeout", "60", "--retries", "2"]
    env = venv_mod._build_env(tmp_path, caller)
    assert env["SSL_CERT_FILE"] == "/ca.pem" and env["HTTPS_PROXY"] == "http://proxy:3128"
    assert venv_mod._build_env(tmp_path, {**caller, "SSL_CERT_FILE": "/own.pem"})["SSL_CERT_FILE"] == "/own.pem"
    assert venv_mod._pip_network_options({"PATH": "/bin"}) == []


def _hostile_host(monkeypatch, tmp_path: Path, host_links: Path) -> None:
    """A host whose own pip and uv configuration adds wheels (find-links) and an index to every build:
    in the environment, in HOME (~/.pip, ~/.config) and in XDG_CONFIG_HOME."""
    home, xdg = tmp_path / "host-home", tmp_path / "host-xdg"
    pip_conf = f"[global]\nfind-links = {host_links}\nextra-index-url = http://127.0.0.1:9/simple\n"
    uv_toml = f'find-links = ["{host_links}"]\nextra-index-url = ["http://127.0.0.1:9/simple"]\n'
    for conf, text in [(home / ".pip" / "pip.conf", pip_conf), (home / ".config" / "pip" / "pip.conf", pip_conf),
                       (xdg / "pip" / "pip.conf", pip_conf), (home / ".config" / "uv" / "uv.toml", uv_toml),
                       (xdg / "uv" / "uv.toml", uv_toml)]:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(text)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setenv("PIP_FIND_LINKS", str(host_links))
    monkeypatch.setenv("UV_FIND_LINKS", str(host_links))
    monkeypatch.setenv("PIP_CONFIG_FILE", str(home / ".pip" / "pip.conf"))
    monkeypatch.setenv("UV_CONFIG_FILE", str(xdg / "uv" / "uv.toml"))


@pytest.mark.parametrize("installer", ["pip", pytest.param("uv", marks=needs_uv)])
def test_index_false_build_installs_the_locked_wheel_whatever_the_host_config(tmp_path, wheelhouse, monkeypatch,
                                                                             installer):
    """The host offers an impostor of the locked wheel (same name and version, other bytes): the build
    installs exactly the wheel of the revision's find_links."""
    host_links = tmp_path / "host-wheels"
    host_links.mkdir()
    wheelfactory.make_wheel(host_links, "tiny.lib", "1.0", {"tinylib": "def hello():\n    return 'the host'\n"})
    _hostile_host(monkeypatch, tmp_path, host_links)
    mgr = VenvManager(tmp_path / "root")
    spec = _spec(tmp_path, "iso", [wheelfactory.lock_line(wheelhouse["lib"])], wheelhouse["dir"], installer=installer)
    path = mgr.build(spec)
    assert mgr.installed(path) == {"tiny-lib": "1.0"}
    out = subprocess.run([path / "bin" / "python", "-c", "import tinylib; print(tinylib.hello())"],
                         capture_output=True, text=True, check=True).stdout
    assert out == "hi\n"                                 # the revision's wheel, not the host's
    home = mgr.root / venv_mod.INSTALLER_HOME                      # the installers' HOME: the agent's, private
    assert home.is_dir() and home.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("installer", ["pip", pytest.param("uv", marks=needs_uv)])
def test_index_false_build_fails_cleanly_when_only_the_host_has_the_wheel(tmp_path, wheelhouse, monkeypatch, installer):
    """The revision's find_links lacks the locked wheel and the host's configuration holds it (the very
    same bytes): the build fails, instead of depending on the host."""
    host_links = tmp_path / "host-wheels"
    host_links.mkdir()
    shutil.copy(wheelhouse["lib"], host_links)
    _hostile_host(monkeypatch, tmp_path, host_links)
    empty = tmp_path / "revision-wheels"
    empty.mkdir()
    mgr = VenvManager(tmp_path / "root")
    spec = _spec(tmp_path, "iso", [wheelfactory.lock_line(wheelhouse["lib"])], empty, installer=installer)
    with pytest.raises(BuildError, match="pip install failed"):
        mgr.build(spec)
    assert mgr.list("iso") == [] and mgr.current("iso") is None


def test_installed_is_kept_for_the_next_process_and_still_sees_hand_changes(root, v1, wheelhouse, tmp_path,
                                                                             monkeypatch):
    """A `once` reads no package metadata while no venv changed: what installed() read is kept in a file for
    the next manager, trusted by the same site-packages mtimes. A read-only manager (plan) never writes it."""
    import agent.drivers.venv as venv_mod

    cache = tmp_path / "state" / "installed.json"
    VenvManager(root, retention=2, installed_file=cache, read_only=True).installed(v1)
    assert not cache.exists()
    first = VenvManager(root, retention=2, installed_file=cache)
    assert first.installed(v1) == {"demoapp": "1.0.0", "tiny-lib": "1.0"}
    assert cache.is_file() and cache.stat().st_mode & 0o777 == 0o600

    read = []
    real = venv_mod._distributions
    monkeypatch.setattr(venv_mod, "_distributions", lambda path: read.append(path) or real(path))
    assert VenvManager(root, retention=2, installed_file=cache).installed(v1) == {"demoapp": "1.0.0", "tiny-lib": "1.0"}
    assert read == []                                       # from the file
    pip = [str(v1 / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    try:
        subprocess.run(pip + ["install", "--no-deps", "--no-index", "--find-links", str(wheelhouse["dir"]), "extra"],
                       check=True, capture_output=True)
        assert VenvManager(root, retention=2, installed_file=cache).installed(v1) == \
               {"demoapp": "1.0.0", "tiny-lib": "1.0", "extra": "0.1"}
        assert read == [v1]                                 # the install moved the stamp: read again
    finally:
        subprocess.run(pip + ["uninstall", "-y", "extra"], capture_output=True, check=False)
    assert VenvManager(root, retention=2, installed_file=cache).installed(v1) == {"demoapp": "1.0.0", "tiny-lib": "1.0"}
    cache.write_text("{not json")
    assert VenvManager(root, retention=2, installed_file=cache).installed(v1) == {"demoapp": "1.0.0", "tiny-lib": "1.0"}
