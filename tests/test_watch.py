"""The watcher on a real file system: debounced, reads ignored, replaced dirs re-armed, local repos found."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from agent.core.layout import Layout
from agent.service.watch import Debouncer, Watcher, WatchSpec, local_repo_dir, managed_paths
from conftest import git

pytestmark = pytest.mark.timeout(30)


class Calls:
    def __init__(self):
        self.calls: list[tuple] = []
        self.event = threading.Event()

    def __call__(self, sources, since, until):
        self.calls.append((sources, since, until))
        self.event.set()

    def wait(self, n: int = 1, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.calls) >= n


def test_debouncer_merges_a_burst_into_one_call_with_its_time_span():
    calls = Calls()
    d = Debouncer(calls, quiet_s=0.05, max_wait_s=1.0).start()
    try:
        t0 = time.monotonic()
        for _ in range(10):
            d.poke("host")
            time.sleep(0.01)
        d.poke("repo")
        assert calls.wait(1)
        time.sleep(0.15)
        assert len(calls.calls) == 1
        sources, since, until = calls.calls[0]
        assert sources == {"host", "repo"} and t0 <= since < until
    finally:
        d.stop()


def test_debouncer_fires_under_a_constant_stream_after_max_wait():
    calls = Calls()
    d = Debouncer(calls, quiet_s=0.05, max_wait_s=0.2).start()
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            d.poke("host")
            time.sleep(0.01)
        assert len(calls.calls) >= 2
    finally:
        d.stop()


@pytest.fixture
def watcher():
    calls = Calls()
    w = Watcher(calls, debounce_s=0.03).start()
    yield w, calls
    w.stop()


def test_writes_trigger_reads_do_not_and_a_replaced_dir_is_rewatched(tmp_path, watcher):
    w, calls = watcher
    d = tmp_path / "programs"
    d.mkdir()
    (d / "a.conf").write_text("x")
    spec = WatchSpec(d, "host")
    w.watch([spec])
    time.sleep(0.1)
    (d / "a.conf").read_text()
    time.sleep(0.2)
    assert calls.calls == []                       # reading is not a change
    (d / "a.conf").write_text("y")
    assert calls.wait(1)
    # replace the directory (a venv rebuilt in place): after re-watching, events still arrive
    shutil.rmtree(d)
    d.mkdir()
    time.sleep(0.2)
    n = len(calls.calls)
    w.watch([spec])
    (d / "b.conf").write_text("z")
    assert calls.wait(n + 1)
    w.watch([])
    assert w.specs == ()


def test_name_filter(tmp_path, watcher):
    w, calls = watcher
    logs = tmp_path / "logs"
    logs.mkdir()
    w.watch([WatchSpec(logs, "host", names=frozenset({"supervisord.log"}))])
    (logs / "web-stdout.log").write_text("chatty service\n")
    time.sleep(0.2)
    assert calls.calls == []
    (logs / "supervisord.log").write_text("stopped: web\n")
    assert calls.wait(1)


def test_local_repo_dir(tmp_path):
    work, bare = tmp_path / "work", tmp_path / "bare.git"
    work.mkdir()
    git(work, "init", "-q")
    git(tmp_path, "init", "-q", "--bare", str(bare))
    assert local_repo_dir(str(work)) == work / ".git"
    assert local_repo_dir(f"file://{work}") == work / ".git"
    assert local_repo_dir(f"file://{bare}") == bare
    assert local_repo_dir("https://example.invalid/state.git") is None
    assert local_repo_dir("git@example.invalid:state.git") is None
    assert local_repo_dir(str(tmp_path / "missing")) is None
    assert local_repo_dir(None) is None


def test_managed_paths_cover_programs_envs_site_packages_log_and_repo(tmp_path):
    layout = Layout(tmp_path / "root")
    venv = layout.venvs / "demo-abc"
    (venv / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    layout.envs.mkdir(parents=True)
    (layout.envs / "demo").symlink_to(venv)
    layout.programs.mkdir(parents=True)
    layout.logs.mkdir(parents=True)
    repo = tmp_path / "state"
    repo.mkdir()
    git(repo, "init", "-q")
    got = {(str(s.path.relative_to(tmp_path)), s.source, s.recursive) for s in managed_paths(layout, str(repo))}
    assert got == {
        ("root/supervisor/programs", "host", False),
        ("root/envs", "host", False),
        ("root/logs", "host", False),
        ("root/venvs/demo-abc/lib/python3.11/site-packages", "host", False),
        ("state/.git", "repo", False),
        ("state/.git/refs", "repo", True),
    }
    # nothing exists yet on a fresh root: nothing to watch there, and no error
    assert managed_paths(Layout(tmp_path / "fresh")) == []
