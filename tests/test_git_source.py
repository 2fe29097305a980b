"""GitSource against real git repositories made in tmp_path.

A bare "server" repo, a user clone that commits and pushes to it, and a GitSource whose mirror and
checkouts live in their own cache dir. One test goes over a real network transport (`git daemon`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.drivers.git import GitSource, Revision, is_ancestor, redact
from agent.core.errors import ConfigError, SourceError
from conftest import start_git_daemon

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


@dataclass
class Remote:
    """A bare server repo and a user's clone of it."""

    server: Path
    work: Path

    @property
    def url(self) -> str:
        return self.server.as_uri()

    def commit(self, name: str, content: str, message: str | None = None, push: bool = True) -> str:
        (self.work / name).parent.mkdir(parents=True, exist_ok=True)
        (self.work / name).write_text(content)
        git(self.work, "add", name)
        git(self.work, "commit", "-q", "-m", message or f"write {name}")
        if push:
            git(self.work, "push", "-q", "origin", "HEAD:refs/heads/main")
        return self.head()

    def head(self) -> str:
        return git(self.work, "rev-parse", "HEAD")


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    server = tmp_path / "server.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(server))
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(server), str(work))
    git(work, "checkout", "-q", "-b", "main")
    r = Remote(server, work)
    r.commit("fleet.yaml", "hosts: {}\n", "first commit\n\nbody line")
    return r


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "root" / "source"


def fetch_head_mtime(cache: Path) -> int:
    return (cache / "repo.git" / "FETCH_HEAD").stat().st_mtime_ns


# -- resolve ------------------------------------------------------------------------------------


def test_branch_new_commit_is_seen(remote: Remote, cache: Path) -> None:
    src = GitSource(remote.url, "main", cache)
    first = src.resolve()
    assert first == Revision(remote.head(), "main", first.committed_at, "first commit")
    assert abs(first.committed_at - time.time()) < 60
    second_sha = remote.commit("fleet.yaml", "hosts: {web-1: {}}\n", "add web-1")
    second = src.resolve()
    assert second.sha == second_sha and second.summary == "add web-1"
    assert src.commit_time(second_sha) == second.committed_at


def test_noop_resolve_does_not_fetch(remote: Remote, cache: Path) -> None:
    src = GitSource(remote.url, "main", cache)
    rev = src.resolve()
    before = fetch_head_mtime(cache)
    time.sleep(0.01)  # so a fetch, had there been one, would move the mtime
    for _ in range(3):
        assert src.resolve() == rev
    assert fetch_head_mtime(cache) == before
    # A fresh instance on the same mirror (an agent restart) does not fetch either.
    assert GitSource(remote.url, "main", cache).resolve() == rev
    assert fetch_head_mtime(cache) == before
    remote.commit("x", "1")
    assert src.resolve().sha == remote.head()
    assert fetch_head_mtime(cache) != before


@pytest.mark.parametrize("annotated", [True, False])
def test_tag_resolves_to_commit_and_follows_moves(remote: Remote, cache: Path, annotated: bool) -> None:
    tagged = remote.head()
    flags = ["-a", "-m", "release v1"] if annotated else []
    git(remote.work, "tag", *flags, "v1")
    git(remote.work, "push", "-q", "origin", "v1")
    remote.commit("later", "x")  # the branch moves on; the tag does not

    rev = GitSource(remote.url, "v1", cache).resolve()
    assert rev.sha == tagged and rev.ref == "v1"
    assert GitSource(remote.url, "refs/tags/v1", cache).resolve().sha == tagged

    git(remote.work, "tag", "-f", *flags, "v1", "HEAD")  # a re-tag is followed too
    git(remote.work, "push", "-q", "-f", "origin", "v1")
    assert GitSource(remote.url, "v1", cache).resolve().sha == remote.head()


@pytest.mark.parametrize("length", [40, 7])
def test_commit_sha_full_and_short(remote: Remote, cache: Path, length: int) -> None:
    pinned = remote.head()
    remote.commit("later", "x")
    rev = GitSource(remote.url, pinned[:length], cache).resolve()
    assert rev.sha == pinned and rev.ref == pinned[:length]
    assert rev.summary == "first commit"


def test_full_sha_under_no_ref_is_fetched_by_id(remote: Remote, cache: Path) -> None:
    base = remote.head()
    orphan = remote.commit("x", "1", "orphaned by a force-push")
    git(remote.work, "push", "-q", "-f", "origin", f"{base}:refs/heads/main")
    rev = GitSource(remote.url, orphan, cache).resolve()  # protocol v2 serves it by id
    assert rev.sha == orphan and rev.summary == "orphaned by a force-push"


def test_pinned_sha_already_present_does_not_fetch(remote: Remote, cache: Path) -> None:
    GitSource(remote.url, "main", cache).resolve()
    before = fetch_head_mtime(cache)
    assert GitSource(remote.url, remote.head(), cache).resolve().sha == remote.head()
    assert fetch_head_mtime(cache) == before


def test_force_push_is_followed(remote: Remote, cache: Path) -> None:
    base = remote.head()
    doomed = remote.commit("bad", "oops", "bad commit")
    src = GitSource(remote.url, "main", cache)
    assert src.resolve().sha == doomed
    git(remote.work, "reset", "-q", "--hard", base)
    rewritten = remote.commit("good", "fixed", "rewritten history", push=False)
    git(remote.work, "push", "-q", "-f", "origin", "HEAD:refs/heads/main")
    rev = src.resolve()
    assert rev.sha == rewritten
    assert is_ancestor(cache, base, rev.sha)
    assert not is_ancestor(cache, doomed, rev.sha)
    assert not is_ancestor(cache, "0" * 40, rev.sha)  # unknown commit: cannot prove fast-forward


def test_deleted_branch_is_pruned(remote: Remote, cache: Path) -> None:
    git(remote.work, "push", "-q", "origin", "HEAD:feature")
    src = GitSource(remote.url, "feature", cache)
    src.resolve()
    git(remote.work, "push", "-q", "origin", ":feature")
    with pytest.raises(SourceError, match="'feature' not found"):
        src.resolve()


def test_branch_wins_over_tag_of_same_name(remote: Remote, cache: Path) -> None:
    git(remote.work, "tag", "main", "HEAD")
    git(remote.work, "push", "-q", "origin", "refs/tags/main")
    remote.commit("later", "x")
    assert GitSource(remote.url, "main", cache).resolve().sha == remote.head()
    assert GitSource(remote.url, "refs/tags/main", cache).resolve().sha != remote.head()


def test_plain_local_path_is_accepted(remote: Remote, cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert GitSource("server.git", "main", cache).resolve().sha == remote.head()


# -- errors ---------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_repo_is_source_error_with_redacted_password(cache: Path, caplog) -> None:
    url = f"https://deploy:s3cret-token@127.0.0.1:{closed_port()}/state.git"
    with pytest.raises(SourceError) as info:
        GitSource(url, "main", cache, timeout=10).resolve()
    message = str(info.value)
    assert "s3cret" not in message and "deploy" not in message
    assert "https://***@127.0.0.1" in message
    assert "s3cret" not in caplog.text


def test_missing_repo_is_source_error(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(SourceError, match="cannot reach") as info:
        GitSource((tmp_path / "nowhere.git").as_uri(), "main", cache).resolve()
    assert "\n" not in str(info.value)  # one sentence, not git's banner


@pytest.mark.parametrize("ref", ["no-such-branch", "deadbeefdeadbeef", "0" * 40])
def test_unknown_ref_is_source_error(remote: Remote, cache: Path, ref: str) -> None:
    with pytest.raises(SourceError) as info:
        GitSource(remote.url, ref, cache).resolve()
    assert repr(ref) in str(info.value) and remote.url in str(info.value)


def test_commit_time_of_unknown_commit_is_source_error(remote: Remote, cache: Path) -> None:
    src = GitSource(remote.url, "main", cache)
    src.resolve()
    with pytest.raises(SourceError, match="not found"):
        src.commit_time("1" * 40)


@pytest.mark.parametrize("ref", ["", "-x", "a..b", "refs/pull/1/head", "main lock", "x^{}"])
def test_bad_ref_is_config_error(cache: Path, ref: str) -> None:
    with pytest.raises(ConfigError):
        GitSource("file:///nowhere", ref, cache)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:token@example.com/a.git", "https://***@example.com/a.git"),
        ("https://token@example.com:8443/a.git", "https://***@example.com:8443/a.git"),
        ("ssh://git:pw@example.com/a.git", "ssh://***@example.com/a.git"),
        ("ssh://git@example.com/a.git", "ssh://git@example.com/a.git"),
        ("git@example.com:org/a.git", "git@example.com:org/a.git"),
        ("file:///srv/a.git", "file:///srv/a.git"),
        ("/srv/a.git", "/srv/a.git"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


# -- checkout -------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_checkout_is_the_exact_commit_not_the_work_tree(remote: Remote, cache: Path) -> None:
    remote.commit("apps/m/app.yaml", "name: m\n")
    (remote.work / ".gitattributes").write_text("*.lock eol=crlf\n")
    remote.commit("apps/m/blue.lock", "a==1\nb==2\n")
    git(remote.work, "add", ".gitattributes")
    git(remote.work, "commit", "-q", "-m", "attrs")
    git(remote.work, "push", "-q", "origin", "HEAD:refs/heads/main")
    # The user's uncommitted and untracked edits must never show up.
    (remote.work / "fleet.yaml").write_text("EDITED\n")
    (remote.work / "untracked.yaml").write_text("x\n")

    src = GitSource(remote.url, "main", cache)
    rev = src.resolve()
    path = src.checkout(rev)
    assert path == cache / "checkouts" / rev.sha
    assert tree(path) == {
        ".gitattributes": "*.lock eol=crlf\n",
        "apps/m/app.yaml": "name: m\n",
        "apps/m/blue.lock": "a==1\nb==2\n",
        "fleet.yaml": "hosts: {}\n",
    }
    assert (path / "apps/m/blue.lock").read_bytes() == b"a==1\nb==2\n"  # committed bytes, no eol rewrite
    assert not (path / ".git").exists()
    assert not os.access(path / "fleet.yaml", os.W_OK) or os.geteuid() == 0
    assert (path / "fleet.yaml").stat().st_mode & 0o222 == 0
    assert git(remote.work, "status", "--porcelain")  # the user's work tree is untouched
    assert (remote.work / "fleet.yaml").read_text() == "EDITED\n"


def test_old_commit_checkout(remote: Remote, cache: Path) -> None:
    first = remote.head()
    remote.commit("fleet.yaml", "v2\n")
    src = GitSource(remote.url, first, cache)
    assert tree(src.checkout(src.resolve())) == {"fleet.yaml": "hosts: {}\n"}


def test_second_checkout_of_same_sha_does_no_work(remote: Remote, cache: Path) -> None:
    src = GitSource(remote.url, "main", cache)
    rev = src.resolve()
    path = src.checkout(rev)
    parent = path.parent
    before = (path.stat().st_ino, path.stat().st_mtime_ns, parent.stat().st_mtime_ns)
    time.sleep(0.01)
    again = GitSource(remote.url, "main", cache)
    assert again.checkout(again.resolve()) == path
    assert src.checkout(rev) == path
    # Same inode, and the checkouts dir itself unchanged: no temp dir was even created.
    assert (path.stat().st_ino, path.stat().st_mtime_ns, parent.stat().st_mtime_ns) == before


def test_old_checkouts_are_pruned(remote: Remote, cache: Path) -> None:
    src = GitSource(remote.url, "main", cache, keep_checkouts=2)
    shas = []
    for i in range(4):
        if i:
            remote.commit("fleet.yaml", f"v{i}\n")
        rev = src.resolve()
        src.checkout(rev)
        shas.append(rev.sha)
        time.sleep(0.01)
    assert sorted(p.name for p in (cache / "checkouts").iterdir()) == sorted(shas[-2:])
    # Returning an old one again never deletes it, even though it is not among the newest.
    old = GitSource(remote.url, shas[0], cache, keep_checkouts=1)
    path = old.checkout(old.resolve())
    assert path.is_dir() and tree(path) == {"fleet.yaml": "hosts: {}\n"}
    assert sorted(p.name for p in (cache / "checkouts").iterdir()) == [shas[0]]


def test_stale_temp_dirs_are_swept(remote: Remote, cache: Path) -> None:
    src = GitSource(remote.url, "main", cache)
    stale = cache / "checkouts" / ".tmp-crashed"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))
    src.checkout(src.resolve())
    assert not stale.exists()


# -- a real network transport ---------------------------------------------------------------------


@pytest.fixture
def git_daemon(remote: Remote, request) -> str:
    port = start_git_daemon(request, remote.server.parent)
    return f"git://127.0.0.1:{port}/{remote.server.name}"


def test_git_daemon_transport(remote: Remote, cache: Path, git_daemon: str) -> None:
    src = GitSource(git_daemon, "main", cache)
    rev = src.resolve()
    assert rev.sha == remote.head()
    before = fetch_head_mtime(cache)
    assert src.resolve() == rev
    assert fetch_head_mtime(cache) == before
    new = remote.commit("apps/a.yaml", "a\n")
    assert src.resolve().sha == new
    assert tree(src.checkout(src.resolve()))["apps/a.yaml"] == "a\n"


def test_after_a_push_webhook_the_resolve_fetches_without_asking_first(remote: Remote, cache: Path,
                                                                        git_daemon: str, monkeypatch) -> None:
    """`expect_push`: the remote moved, so the next resolve fetches at once (one `git fetch`, no `ls-remote`
    before it); the flag is used once, and a later poll asks the remote as usual."""
    src = GitSource(git_daemon, "main", cache)
    assert src.resolve().sha == remote.head()
    asked = []
    real = src._ls_remote
    monkeypatch.setattr(src, "_ls_remote", lambda: asked.append(1) or real())
    new = remote.commit("apps/b.yaml", "b\n", "push b")
    src.expect_push()
    rev = src.resolve()
    assert rev.sha == new and rev.summary == "push b" and asked == []
    assert tree(src.checkout(rev))["apps/b.yaml"] == "b\n"
    src.expect_push()                       # a webhook for a push that moved nothing this agent tracks
    assert src.resolve().sha == new and asked == []
    assert src.resolve().sha == new and asked == [1]      # the next poll: ls-remote, no fetch


def test_on_fetch_is_called_as_each_fetch_starts_and_only_then(remote: Remote, cache: Path) -> None:
    """The reconciler warms the loader's imports on it: a fetch means a new commit is likely."""
    calls: list[int] = []
    src = GitSource(remote.url, "main", cache, on_fetch=lambda: calls.append(fetch_head_exists(cache)))
    src.resolve()
    src.resolve()
    assert calls == [0]                      # called before the first fetch wrote FETCH_HEAD, not on the no-op
    remote.commit("x", "1")
    assert src.resolve().sha == remote.head() and calls == [0, 1]


def fetch_head_exists(cache: Path) -> int:
    return int((cache / "repo.git" / "FETCH_HEAD").exists())


def test_a_url_git_must_quote_is_kept_exactly_in_the_mirror(tmp_path: Path) -> None:
    """The mirror's remote URL is written by `git config` itself: quotes, comment characters and spaces in
    it survive, and the fetch reaches that repository."""
    server = tmp_path / 'we ird #;"x\\.git'
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(server))
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(server), str(work))
    r = Remote(server, work)
    sha = r.commit("fleet.yaml", "hosts: {}\n", "odd path")
    src = GitSource(str(server), "main", tmp_path / "root" / "source")
    assert src.resolve().sha == sha
    url = subprocess.run(["git", "--git-dir", str(tmp_path / "root" / "source" / "repo.git"), "config",
                          "remote.origin.url"], capture_output=True, text=True, check=True).stdout.rstrip("\n")
    assert url == server.as_uri() or url == str(server)


def test_resolve_ahead_answers_the_next_resolve_then_resolving_goes_on(remote: Remote, cache: Path) -> None:
    """`once` starts the resolve before it imports the rest (GitSource.resolve_ahead): the next resolve is
    that answer, a later one asks the remote again."""
    src = GitSource(remote.url, "main", cache)
    src.resolve_ahead()
    first = src.resolve()
    assert first.sha == remote.head() and first.summary == "first commit"
    second_sha = remote.commit("fleet.yaml", "hosts: {web-2: {}}\n", "add web-2")
    assert src.resolve().sha == second_sha
    src.resolve_ahead()
    assert src.resolve().sha == second_sha
    src.close()


def test_resolve_ahead_error_is_raised_by_the_resolve_that_takes_it(tmp_path: Path, cache: Path) -> None:
    src = GitSource((tmp_path / "nowhere.git").as_uri(), "main", cache)
    src.resolve_ahead()
    with pytest.raises(SourceError, match="cannot reach"):
        src.resolve()
    with pytest.raises(SourceError, match="cannot reach"):     # taken once: the next one runs again
        src.resolve()


def test_close_waits_for_a_resolve_ahead_nobody_took(remote: Remote, cache: Path) -> None:
    """The root lock covers the mirror only while its holder runs: an untaken resolve ends before close()
    returns, leaving a complete mirror that a plain resolve uses without fetching."""
    src = GitSource(remote.url, "main", cache)
    src.resolve_ahead()
    src.close()
    assert fetch_head_mtime(cache)
    before = fetch_head_mtime(cache)
    assert GitSource(remote.url, "main", cache).resolve().sha == remote.head()
    assert fetch_head_mtime(cache) == before
