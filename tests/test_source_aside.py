"""Issue 12 item 1: a read-only command must not redirect the daemon's source, and must write nothing.

Before: `gitops-agent plan --repo OTHER --root R` ran `git remote set-url` on R's shared mirror (without the
root lock); the daemon checked the URL once at start, so its next poll fetched and applied OTHER's commit.
Now `plan` uses `GitSource.aside` (a temp mirror outside R that borrows R's objects), and a writing source
checks its mirror's URL at every resolve. Both repos are served over real smart HTTP (`git http-backend`
behind a small CGI server on 127.0.0.1); the URLs carry a password that must never reach a log line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import subprocess
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.drivers.git import GitSource, is_ancestor
from conftest import free_port, git
from git_http import BACKEND, GitCGIHandler

SECRET = "s3cr3t-pw"


class _GitCGI(GitCGIHandler):
    """Smart HTTP with no auth challenge: git never sends the URL's password."""


class Served:
    """Bare repos under one dir, each with a work clone that commits and pushes to it."""

    def __init__(self, base: Path, port: int):
        self.base, self.port = base, port

    def repo(self, name: str) -> Repo:
        server = self.base / f"{name}.git"
        git(self.base, "init", "-q", "--bare", "-b", "main", str(server))
        work = self.base / f"{name}-work"
        git(self.base, "init", "-q", "-b", "main", str(work))
        for key, value in (("user.email", "t@example.invalid"), ("user.name", "t"), ("commit.gpgsign", "false")):
            git(work, "config", key, value)
        git(work, "remote", "add", "origin", str(server))
        return Repo(work, f"http://agent:{SECRET}@127.0.0.1:{self.port}/{name}.git")


class Repo:
    def __init__(self, work: Path, url: str):
        self.work, self.url = work, url

    def commit(self, rel: str, text: str) -> str:
        (self.work / rel).write_text(text)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", f"write {rel}")
        git(self.work, "push", "-q", "origin", "HEAD:refs/heads/main")
        return git(self.work, "rev-parse", "HEAD")


@pytest.fixture
def served(tmp_path: Path):
    if not Path(BACKEND).exists():
        pytest.skip("git http-backend is not installed")
    base = tmp_path / "served"
    base.mkdir()
    _GitCGI.project_root = str(base)
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _GitCGI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Served(base, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its type, mode, size, mtime (ns) and, for files, a sha256 of its bytes."""
    out: dict[str, tuple] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_size, st.st_mtime_ns, digest)
    st = root.stat()
    out["."] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_mtime_ns)
    return out


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def objects_held(git_dir: Path) -> int:
    """Objects stored in this repository itself (loose and packed), not those its alternates lend."""
    out = subprocess.run(["git", "--git-dir", str(git_dir), "count-objects", "-v"], capture_output=True, text=True,
                         check=True).stdout
    fields = dict(line.split(": ") for line in out.splitlines())
    return int(fields["count"]) + int(fields["in-pack"])


def test_plan_against_another_repo_leaves_the_root_alone_and_the_daemon_on_its_repo(served, tmp_path, caplog):
    r, other = served.repo("r"), served.repo("other")
    r.commit("common.txt", "the same bytes in both repos: one blob, already in R's mirror\n")
    r.commit("fleet.yaml", "repo: r 1\n")
    other.commit("common.txt", "the same bytes in both repos: one blob, already in R's mirror\n")
    o1 = other.commit("fleet.yaml", "repo: other 1\n")
    root = tmp_path / "root"
    daemon = GitSource(r.url, "main", root / "source")          # the long-lived source of `run` on root R
    daemon.checkout(daemon.resolve())
    before = snapshot(root)

    caplog.set_level(logging.DEBUG)
    with GitSource.aside(other.url, "main", root / "source") as plan:     # `plan --repo OTHER --root R`
        rev = plan.resolve()
        assert rev.sha == o1
        assert tree(plan.checkout(rev))["fleet.yaml"] == "repo: other 1\n"
        scratch = plan.cache_dir
        assert not scratch.resolve().is_relative_to(root.resolve())
    assert not scratch.exists()
    assert snapshot(root) == before                             # byte for byte, mtimes included

    other.commit("fleet.yaml", "repo: other 2\n")
    r2 = r.commit("fleet.yaml", "repo: r 2\n")
    rev = daemon.resolve()
    assert rev.sha == r2
    assert tree(daemon.checkout(rev))["fleet.yaml"] == "repo: r 2\n"
    assert SECRET not in caplog.text
    daemon.close()


def test_a_writing_source_notices_a_repointed_mirror_at_every_resolve(served, tmp_path, caplog):
    """What an older agent's `plan` (or a hand edit) did: the daemon must not follow it, and must say so."""
    r, other = served.repo("r"), served.repo("other")
    r1 = r.commit("fleet.yaml", "repo: r 1\n")
    other.commit("fleet.yaml", "repo: other 1\n")
    cache = tmp_path / "root" / "source"
    daemon = GitSource(r.url, "main", cache)
    assert daemon.resolve().sha == r1

    old_plan = GitSource(other.url, "main", cache)              # the old plan: a writer on the same mirror
    old_plan.resolve()
    old_plan.close()
    caplog.set_level(logging.INFO)
    r2 = r.commit("fleet.yaml", "repo: r 2\n")
    assert daemon.resolve().sha == r2
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any(f"http://***@127.0.0.1:{served.port}/other.git" in w and f"http://***@127.0.0.1:{served.port}/r.git" in w
               for w in warnings), warnings
    assert SECRET not in caplog.text

    # a hand edit between two resolves, with nothing new on r: still r's commit, still noticed
    subprocess.run(["git", "--git-dir", str(cache / "repo.git"), "remote", "set-url", "origin", other.url], check=True)
    caplog.clear()
    assert daemon.resolve().sha == r2
    assert any(rec.levelno == logging.WARNING and "other.git" in rec.getMessage() for rec in caplog.records)
    daemon.close()


def test_an_aside_source_fetches_only_what_is_new(served, tmp_path):
    r = served.repo("r")
    for i in range(10):
        r.commit(f"f{i}.txt", f"{i}\n" * 50)
    root = tmp_path / "root"
    daemon = GitSource(r.url, "main", root / "source")
    first = daemon.resolve()
    daemon.close()

    with GitSource.aside(r.url, "main", root / "source") as plan:       # nothing moved: nothing fetched
        assert plan.resolve() == first
        assert objects_held(plan.mirror) == 0
        assert not (plan.mirror / "FETCH_HEAD").exists()
        assert tree(plan.checkout(first))["f9.txt"] == "9\n" * 50
        assert is_ancestor(plan.cache_dir, first.sha, first.sha)

    new = r.commit("f0.txt", "changed\n")
    before = snapshot(root)
    with GitSource.aside(r.url, "main", root / "source") as plan:
        assert plan.resolve().sha == new
        # the new commit, tree and blob, plus the delta base a thin pack needs (of ~30 objects in R)
        assert 3 <= objects_held(plan.mirror) <= 5
        assert is_ancestor(plan.cache_dir, first.sha, new)
        assert tree(plan.checkout(plan.resolve()))["f0.txt"] == "changed\n"
    assert snapshot(root) == before


def test_an_aside_source_on_a_fresh_root_creates_nothing_there(served, tmp_path):
    r = served.repo("r")
    sha = r.commit("fleet.yaml", "x\n")
    root = tmp_path / "root"
    given = tmp_path / "scratch"
    given.mkdir()
    with GitSource.aside(r.url, "main", root / "source", scratch=given) as plan:
        assert plan.resolve().sha == sha
        out = plan.checkout(plan.resolve())
        assert tree(out) == {"fleet.yaml": "x\n"}
        assert stat.S_IMODE(out.stat().st_mode) & 0o222 == 0    # read-only: a non-root rmtree could not empty it
    assert not root.exists()
    assert given.is_dir() and list(given.iterdir()) == []      # emptied (read-only checkouts too), kept: the caller's

