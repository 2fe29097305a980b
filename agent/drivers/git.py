"""The Git source: fetch the state repo into a mirror the agent owns, resolve a ref, check out a commit.

Why it looks like this (DESIGN §2 step 1, §7 Git timings):

* The caller resolves on every poll, so the unchanged case must be tiny: one `git ls-remote` limited to
  the two candidate ref names, compared with the mirror's own ref (a file read). Only when they differ do
  we fetch. A commit is immutable, so a `Revision` is cached per sha and never re-read.
* The mirror is a bare repo under `cache_dir`, never the user's clone: a hand edit in someone's work tree
  can never leak into what the agent applies. Refspecs are forced and pruned so branch *and* tag moves,
  including force-pushes and deletions, follow the remote exactly.
* A checkout is the exact tree of one commit, built aside in a temp dir with a private index and renamed
  into `checkouts/<sha>`; the rename is the completion mark, so a crash leaves only a temp dir behind.
  `info/attributes` in the mirror switches off eol/filter conversion so the files are the committed bytes.
* The mirror's remote URL is checked before every resolve and every fetch, not once at start: whoever
  re-pointed it (an older agent's `plan`, a hand edit) is named in a warning and the mirror is pointed back,
  because the agent's own `--repo` is the declared source and the mirror only a cache of it (Flux's
  source-controller follows `spec.url` the same way). A stall here would leave a person nothing to decide.
* Read-only commands (`plan`) use `GitSource.aside`: a throw-away mirror outside the root that borrows the
  root mirror's objects (`objects/info/alternates`) and its refs as a starting point, so it fetches only
  what is new, from whatever URL it was asked for, and never writes under the root.
* Nothing may wait on a prompt (GIT_TERMINAL_PROMPT=0, SSH_ASKPASS_REQUIRE=never, no controlling
  terminal for child processes, a timeout on every call), and a URL's credentials never reach a message
  or a log line (`redact`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from agent.core._record import record
from agent.core.errors import ConfigError, SourceError

__all__ = ["Revision", "GitSource", "redact", "is_ancestor"]

log = logging.getLogger(__name__)

MIRROR = "repo.git"
_REVISIONS = "revisions"
CHECKOUTS = "checkouts"
_REMOTE = "origin"
_REFSPECS = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*")
# Highest-precedence attributes: check out the committed bytes, no eol/filter/ident conversion.
_ATTRIBUTES = "* -text -eol -filter -ident -working-tree-encoding -export-ignore -export-subst\n"
_SHA_LIKE = re.compile(r"[0-9a-fA-F]{4,40}")
_FULL_SHA = re.compile(r"[0-9a-f]{40}")
_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_TMP_PREFIX = ".tmp-"
# Appended to a new mirror's config (fixed values; the URL is set with `git config`, which quotes it).
_MIRROR_CONFIG = f"""[remote "{_REMOTE}"]
\tfetch = {_REFSPECS[0]}
\tfetch = {_REFSPECS[1]}
\tprune = true
\ttagOpt = --no-tags
[core]
\tlogAllRefUpdates = false
"""
# An `aside` mirror keeps fetched objects as a pack (index-pack) instead of unpacking loose objects: writing
# a loose object the alternate store already holds "freshens" it, i.e. touches the mtime of a file in the
# root's mirror. No auto gc in a throw-away repo.
_ASIDE_CONFIG = """[fetch]
\tunpackLimit = 1
[transfer]
\tunpackLimit = 1
[gc]
\tauto = 0
"""
_STALE_TMP_S = 3600.0
_HTTP_SCHEMES = {"http", "https", "ftp", "ftps"}


@record
class Revision:
    """One resolved commit of the state repo; immutable, so safe to cache and compare."""

    sha: str  # full 40-hex commit
    ref: str  # what was asked for (branch, tag, or sha)
    committed_at: float  # commit time, epoch seconds (for commit-to-converged metrics)
    summary: str  # first line of the message


def redact(url: str) -> str:
    """Hide credentials in a URL before it reaches a message or a log line.

    Any user part of an http(s) URL is hidden (a token is often given as the user name alone);
    for other schemes only a user part carrying a password is. scp-like `user@host:path` has no
    password slot and is returned as is.
    """
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if parts.scheme.lower() in _HTTP_SCHEMES or ":" in userinfo:
        return urlunsplit(parts._replace(netloc=f"***@{hostport}"))
    return url


def is_ancestor(cache_dir: Path | str, old_sha: str, new_sha: str) -> bool:
    """True when `new_sha` fast-forwards from `old_sha` in the mirror under `cache_dir`.

    One `git merge-base --is-ancestor` (a few ms). A commit the mirror does not hold cannot be proven
    an ancestor, so the answer is False (a caller requiring fast-forward then refuses, which is safe)
    rather than an error that would be retried for ever.
    """
    git_dir = Path(cache_dir) / MIRROR
    proc = subprocess.run(
        ["git", "--git-dir", str(git_dir), "merge-base", "--is-ancestor", old_sha, new_sha],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_git_env(),
        timeout=60,
        check=False,
    )
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    log.warning("cannot tell whether %s is an ancestor of %s: %s", old_sha, new_sha, proc.stderr.strip())
    return False


class GitSource:
    """Fetches one (url, ref) into `<cache_dir>/repo.git`; checks commits out under `<cache_dir>/checkouts`."""

    def __init__(
        self,
        url: str,
        ref: str,
        cache_dir: Path,
        keep_checkouts: int = 3,
        *,
        timeout: float = 60.0,
        ssh_command: str | None = None,
        refs_url: str | None = None,
        on_fetch: Callable[[], None] | None = None,
    ):
        """`refs_url`: the repo's static `info/refs` over HTTP(S) (git update-server-info), polled with
        If-None-Match instead of `git ls-remote` (agent.drivers.refs_http); the fetch still uses `url`.
        `on_fetch` is called as a fetch starts (a new commit is likely: the caller may get ready for it)."""
        self._on_fetch = on_fetch
        self.url = _normalise_url(url)
        self.ref = _check_ref(ref)
        if keep_checkouts < 0:
            raise ConfigError(f"keep_checkouts must be 0 or more, not {keep_checkouts}")
        self.cache_dir = Path(cache_dir)
        self.keep_checkouts = keep_checkouts
        self.timeout = timeout
        self._env = _git_env(ssh_command)
        self._mirror_ready = False
        self._revisions: dict[str, Revision] = {}  # commit sha -> Revision
        self._shown: dict[str, Revision] = {}      # read along with a commit's id, for _read_commit
        self._peeled: dict[str, str] = {}  # ref object sha (commit or annotated tag) -> commit sha
        self._url_checked = False  # the first URL check of this process may see a legitimate --repo change
        self._pushed = False  # a push webhook came in: the next resolve fetches first (see `expect_push`)
        self._borrow: Path | None = None  # aside only: the root's mirror, read for objects, refs and stamps
        self._scratch: Path | None = None  # aside only: what close() removes (its temp dir, or what it put in one)
        self._owns_scratch = False
        self._refs_poller = None
        self._ahead: tuple | None = None  # (thread, its answer) of a `resolve_ahead` not yet taken
        if refs_url:
            from agent.drivers.refs_http import RefsPoller

            self._refs_poller = RefsPoller(refs_url, timeout=timeout)

    @classmethod
    def aside(
        cls,
        url: str,
        ref: str,
        shared: Path | str,
        *,
        scratch: Path | str | None = None,
        timeout: float = 60.0,
        ssh_command: str | None = None,
    ) -> GitSource:
        """A source that writes nothing under `shared` (the root's source dir): for `plan` (DESIGN §6).

        Its mirror and checkouts live in `scratch` (default: a new private temp dir). `close()` removes
        what it wrote there (the checkouts are read-only: a plain `shutil.rmtree` of a non-root user
        cannot), and the dir itself when it made it. The root's mirror, when there is one, lends its
        objects (alternates) and its refs for `ref` as a starting point, so an unchanged ref fetches
        nothing and a moved one fetches only the new objects; `url` may differ from the root mirror's
        (e.g. `plan --repo OTHER`), which is only read, never re-pointed.
        """
        import tempfile     # not at import: a poll of the root's own source makes no temp dir

        own = scratch is None
        where = Path(tempfile.mkdtemp(prefix="gitops-agent-source-")) if own else Path(scratch)
        try:
            src = cls(url, ref, where, timeout=timeout, ssh_command=ssh_command)
        except BaseException:
            if own:
                _remove_tree(where)
            raise
        src._borrow = Path(shared) / MIRROR
        src._scratch, src._owns_scratch = where, own
        return src

    # -- public -----------------------------------------------------------------------------------

    @property
    def mirror(self) -> Path:
        return self.cache_dir / MIRROR

    @property
    def checkouts(self) -> Path:
        return self.cache_dir / CHECKOUTS

    def resolve(self) -> Revision:
        """The commit `ref` names on the remote now; fetches only when the remote moved. After
        `resolve_ahead`, the answer of the resolve it started (its error, raised here)."""
        if self._ahead is not None:
            thread, answer = self._ahead
            self._ahead = None
            thread.join()
            if "error" in answer:
                raise answer["error"]
            return answer["revision"]
        return self._resolve()

    def resolve_ahead(self) -> None:
        """Start the next `resolve` now, in a thread. A `once` spends its first ~0.2 s importing the code
        that loads, plans and applies; the git processes of a resolve (mostly waiting on the remote, and on a
        fresh host creating the mirror and fetching) run meanwhile, on another core. The caller holds the
        root lock, as for any resolve."""
        import threading

        answer: dict = {}

        def run() -> None:
            try:
                answer["revision"] = self._resolve()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's `resolve`, raised there
                answer["error"] = exc

        thread = threading.Thread(target=run, name="resolve-ahead", daemon=True)
        thread.start()
        self._ahead = (thread, answer)

    def _resolve(self) -> Revision:
        self._ensure_mirror()
        self._own_url()
        advertised = self._pushed_refs() if self._pushed else None
        if advertised is None:
            advertised = self._ls_remote()
        name = self._match_ref(advertised)
        if name is not None:
            sha = self._resolve_named(name, advertised[name])
        elif _SHA_LIKE.fullmatch(self.ref):
            sha = self._resolve_sha()
        else:
            raise SourceError(
                f"ref {self.ref!r} not found in {redact(self.url)}: no branch or tag of that name"
            )
        return self._revision(sha)

    def expect_push(self) -> None:
        """A signed push webhook arrived: the next `resolve` fetches at once instead of asking the remote
        first (`ls-remote` would only confirm the ref moved: one process and one round trip more on the
        push-to-serving path). Safe from any thread: one flag, read and cleared by the resolving thread."""
        self._pushed = True

    def _pushed_refs(self) -> dict[str, str] | None:
        """After a push: fetch, then the refs `ref` may name as the fetch left them in the mirror. None when
        that is not the cheaper way (a repo on this host, a static info/refs poller) or the fetch did not
        bring a ref `ref` names (e.g. a `refs/...` outside the mirror's refspecs): ask the remote as usual."""
        self._pushed = False
        if self._refs_poller is not None or _local_git_dir(self.url) is not None:
            return None
        self._fetch()
        refs = {name: sha for name in _candidates(self.ref) if (sha := self._local_ref(_tracking(name)))}
        return refs or None

    def checkout(self, rev: Revision) -> Path:
        """The exact tree of `rev` at `<cache_dir>/checkouts/<sha>`; no work at all if already there."""
        target = self.checkouts / rev.sha
        if target.is_dir():
            return target
        self.checkouts.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_tmp()
        tmp = self.checkouts / f"{_TMP_PREFIX}{rev.sha[:12]}-{os.urandom(4).hex()}"
        try:
            self._materialise(rev.sha, tmp)
            _make_read_only(tmp)
            os.utime(tmp)  # the age prune orders by: when it was completed
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # someone else finishing the same sha first is fine
                    raise
        except (OSError, subprocess.SubprocessError) as exc:
            raise SourceError(f"cannot check out {rev.sha} from {redact(self.url)}: {exc}") from exc
        finally:
            if tmp.exists():
                _remove_tree(tmp)
        log.info("checked out %s (%s) into %s", rev.sha[:12], rev.summary, target)
        self._prune(keep=target)
        return target

    def commit_time(self, sha: str) -> float:
        """Commit (committer) time of `sha` in epoch seconds, from the mirror."""
        full = self._commit_sha(sha)
        if full is None:
            raise SourceError(f"commit {sha!r} not found in the mirror of {redact(self.url)}")
        return self._revision(full).committed_at

    def revision(self, sha: str) -> Revision:
        """The `Revision` of a commit the mirror holds (any commit, not only the tracked ref's)."""
        full = self._commit_sha(sha)
        if full is None:
            raise SourceError(f"commit {sha!r} not found in the mirror of {redact(self.url)}")
        return self._revision(full)

    def path_history(self, sha: str, path: str, n: int = 2) -> list[tuple[str, float]]:
        """The newest `n` commits reachable from `sha` that changed `path` (a dir or file in the tree), as
        (sha, committer time), newest first. Staged waves use it: the first is the change being rolled out,
        the second the app's previous revision. One `git log` in the mirror, a few ms."""
        self._ensure_mirror()
        out = self._run(["log", f"-n{int(n)}", "--format=%H %ct", sha, "--", path])
        return [(c, float(t)) for c, t in (line.split() for line in out.splitlines() if line.strip())]

    def close(self) -> None:
        """A resolve started ahead and never taken ends first (its git processes write the mirror, which
        the caller's root lock covers only until it returns). An `aside` source removes its temp dir."""
        if self._ahead is not None:
            self._ahead[0].join()
            self._ahead = None
        if self._scratch is not None:
            if self._owns_scratch:
                _remove_tree(self._scratch)
            else:
                for made in (MIRROR, CHECKOUTS, _REVISIONS):
                    _remove_tree(self._scratch / made)
            self._scratch = None
            self._mirror_ready = False

    def __enter__(self) -> GitSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resolve steps ------------------------------------------------------------------------------

    def _match_ref(self, advertised: dict[str, str]) -> str | None:
        """The remote ref `self.ref` names; a branch wins over a tag of the same name (documented)."""
        for name in _candidates(self.ref):
            if name in advertised:
                return name
        return None

    def _resolve_named(self, name: str, remote_sha: str) -> str:
        """Fetch only if our copy of `name` differs from what the remote advertises, then peel to a commit.

        When nothing moved this is a file read and a dict lookup: the peeled commit of a ref object is
        remembered (objects are immutable), so the unchanged poll starts no process besides ls-remote.
        """
        local = _tracking(name)
        if self._local_ref(local) != remote_sha:
            self._fetch()
        ref_sha = self._local_ref(local)
        sha = self._peeled.get(ref_sha) if ref_sha else None
        if sha is None and ref_sha and (self.cache_dir / _REVISIONS / ref_sha).is_file():
            sha = ref_sha   # a commit we have read before (branches point at commits; tags may not)
        if sha is None:
            sha = self._commit_sha(local)
            if sha is None:
                raise SourceError(f"ref {self.ref!r} in {redact(self.url)} does not point at a commit")
            self._peeled[ref_sha] = sha
        return sha

    def _resolve_sha(self) -> str:
        """A commit id: immutable, so if the mirror already has it there is nothing to fetch."""
        sha = self._commit_sha(self.ref)
        if sha is None:
            self._fetch()
            sha = self._commit_sha(self.ref)
        if sha is None and _FULL_SHA.fullmatch(self.ref.lower()):
            # Under no ref: a server that allows it hands the commit out by id; a ref keeps gc off it.
            try:
                self._fetch(f"+{self.ref.lower()}:refs/pinned/{self.ref.lower()}")
            except SourceError as exc:
                log.debug("fetch by id refused: %s", exc)
            sha = self._commit_sha(self.ref)
        if sha is None:
            raise SourceError(
                f"ref {self.ref!r} not found in {redact(self.url)}: no branch, tag or commit of that name"
            )
        return sha

    def _revision(self, sha: str) -> Revision:
        """Commit metadata, read once per sha (commits never change): memory, then a small file per
        commit under <cache_dir>/revisions (so a short `once` starts no process), then `git show`."""
        cached = self._revisions.get(sha)
        if cached is None:
            stamp = self.cache_dir / _REVISIONS / sha
            try:
                data = json.loads(_first_readable(stamp, self._borrow and self._borrow.parent / _REVISIONS / sha))
                cached = Revision(sha, self.ref, float(data["committed_at"]), str(data["summary"]))
            except (OSError, ValueError, KeyError, TypeError):
                cached = self._read_commit(sha)
                try:
                    stamp.parent.mkdir(exist_ok=True)
                    stamp.write_text(json.dumps({"committed_at": cached.committed_at, "summary": cached.summary}))
                except OSError:
                    pass
            self._revisions[sha] = cached
        self._shown.pop(sha, None)
        return cached

    # -- git plumbing ------------------------------------------------------------------------------

    def _ensure_mirror(self) -> None:
        """Create the bare mirror on first use (built aside, renamed in).

        The no-op poll reads the mirror's config and refs as files; git itself runs only to fetch, to
        name a commit and to read one (plain `git` processes: GitPython's import alone cost ~100 ms of a
        fresh host's `once`).
        """
        if self._mirror_ready:
            return
        if not (self.mirror / "HEAD").exists():
            self._create_mirror()
        self._mirror_ready = True

    def _own_url(self) -> None:
        """Point the mirror's remote at `self.url` if anything else changed it (one small file read).

        Checked before every resolve and every fetch: the mirror is shared by every command run on the
        root, and a remote re-pointed behind this source's back would otherwise have its next poll fetch,
        and the agent apply, another repository's commit. The first check of a process may meet a URL
        the user changed on purpose (`--repo` of the last run): said at info level; a change later on was
        made by someone else while this source ran: said as a warning naming both URLs.
        """
        found = _config_url(self.mirror / "config")
        if found != self.url:
            if not self._url_checked:
                log.info("source URL changed from %s to %s: re-pointing the mirror %s",
                         redact(found) or "(none)", redact(self.url), self.mirror)
            else:
                log.warning("the mirror %s was re-pointed to %s behind this agent's back (another command "
                            "on this root, or a hand edit); pointing it back to this agent's repo %s",
                            self.mirror, redact(found) or "(none)", redact(self.url))
            self._run(["remote", "set-url", _REMOTE, self.url])
        self._url_checked = True

    def _create_mirror(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.cache_dir, 0o700)  # the remote URL may carry a token
        tmp = self.cache_dir / f"{_TMP_PREFIX}{MIRROR}-{os.urandom(4).hex()}"
        try:
            self._git(["init", "--quiet", "--bare", str(tmp)], what="create a mirror for")
            with open(tmp / "config", "a", encoding="utf-8") as cfg:   # fixed values: no quoting needed
                cfg.write(_MIRROR_CONFIG + (_ASIDE_CONFIG if self._borrow is not None else ""))
            # the URL is the operator's: git quotes it itself
            self._git(["config", "--file", str(tmp / "config"), f"remote.{_REMOTE}.url", self.url],
                      what="configure a mirror for")
            (tmp / "info").mkdir(exist_ok=True)
            (tmp / "info" / "attributes").write_text(_ATTRIBUTES)
            self._borrow_from_root(tmp)
            os.rename(tmp, self.mirror)
        except (OSError, SourceError) as exc:
            if not (self.mirror / "HEAD").exists():
                raise SourceError(f"cannot create the git mirror at {self.mirror}: {exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("created git mirror %s for %s", self.mirror, redact(self.url))

    def _borrow_from_root(self, git_dir: Path) -> None:
        """An `aside` mirror starts from the root's: its objects as an alternate store (read in place, never
        written), and its copies of the refs `ref` may name. A borrowed ref is only a starting point: the
        resolve compares it with what `url` advertises and fetches when they differ."""
        borrow = self._borrow
        if borrow is None or not (borrow / "objects").is_dir() or not (borrow / "HEAD").is_file():
            return
        (git_dir / "objects" / "info").mkdir(parents=True, exist_ok=True)
        (git_dir / "objects" / "info" / "alternates").write_text(str((borrow / "objects").resolve()) + "\n")
        for name in _candidates(self.ref):
            local = _tracking(name)
            sha = _read_ref(borrow, local)
            if sha is not None:
                target = git_dir / local
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(sha + "\n")

    def _ls_remote(self) -> dict[str, str]:
        """Remote refs that `self.ref` could name (the server filters them: protocol v2 ref-prefix).

        A repository on this host is read directly (its ref files): the same answer as `git ls-remote`
        without a process per poll.
        """
        if self._refs_poller is not None:     # a static info/refs: a 304 when nothing moved
            try:
                advertised = self._refs_poller.poll(redact(self._refs_poller.url))
                return {name: advertised[name] for name in _candidates(self.ref) if name in advertised}
            except SourceError as exc:
                log.warning("%s; asking the repo with git ls-remote instead", exc)
        local = _local_git_dir(self.url)
        if local is not None:
            refs = {name: sha for name in _candidates(self.ref) if (sha := _read_ref(local, name))}
            if refs or (local / "HEAD").exists():
                return refs
            raise SourceError(f"cannot reach {redact(self.url)}: not a git repository")
        out = self._run(["ls-remote", _REMOTE, *_candidates(self.ref)], what="reach")
        refs: dict[str, str] = {}
        for line in out.splitlines():
            sha, _, name = line.partition("\t")
            if name and not name.endswith("^{}"):
                refs[name] = sha
        return refs

    def _fetch(self, *refspecs: str) -> None:
        """Fetch with the mirror's forced, pruning refspecs (plus one commit id when asked)."""
        if self._on_fetch is not None:
            self._on_fetch()
        self._own_url()
        started = time.monotonic()
        self._run(["fetch", "--prune", "--quiet", _REMOTE, *refspecs], what="fetch from")
        log.info("fetched %s in %.1f ms", redact(self.url), (time.monotonic() - started) * 1000)

    def _local_ref(self, name: str) -> str | None:
        """The sha our mirror holds for `name`: a loose-file / packed-refs read, no subprocess."""
        self._ensure_mirror()
        return _read_ref(self.mirror, name)

    def _commit_sha(self, rev: str) -> str | None:
        """Full sha of the commit `rev` names in the mirror, or None (a full hex id must exist and be a
        commit: `^{commit}` makes git look the object up rather than take the id on trust). The same
        process reads the commit's time and summary, kept for `_read_commit` (one process per new commit)."""
        self._ensure_mirror()
        try:
            out = self._run(["show", "--no-patch", "--format=%H%n%ct%n%B", "--end-of-options", f"{rev}^{{commit}}",
                             "--"])
        except SourceError:
            return None
        sha, _, rest = out.partition("\n")
        if not _FULL_SHA.fullmatch(sha):
            return None
        self._shown[sha] = self._parse_commit(sha, rest)
        return sha

    def _read_commit(self, sha: str) -> Revision:
        """Committer time and summary (the message's first line) of a commit the mirror holds."""
        shown = self._shown.pop(sha, None)
        if shown is not None:
            return shown
        out = self._run(["show", "--no-patch", "--format=%ct%n%B", sha, "--"], what="read a commit of")
        return self._parse_commit(sha, out)

    def _parse_commit(self, sha: str, out: str) -> Revision:
        """`%ct%n%B` -> Revision."""
        when, _, message = out.partition("\n")
        return Revision(sha, self.ref, float(when), message.split("\n", 1)[0].strip())

    def _materialise(self, sha: str, dest: Path) -> None:
        """Write the tree of `sha` into `dest` via a private index (the mirror's own index is never used)."""
        dest.mkdir()
        index = dest.with_name(dest.name + ".index")
        env = {**self._env, "GIT_INDEX_FILE": str(index)}
        try:
            # one process: a fresh index read from the tree and written out (-u) into the empty dest
            self._run(["--work-tree", str(dest), "read-tree", "--reset", "-u", sha], env=env)
        finally:
            index.unlink(missing_ok=True)

    def _run(self, args: list[str], *, env: dict[str, str] | None = None, what: str = "") -> str:
        """One plain git subprocess in the mirror."""
        return self._git(["--git-dir", str(self.mirror), *args], env=env, what=what)

    def _git(self, args: list[str], *, env: dict[str, str] | None = None, what: str = "") -> str:
        """One plain git subprocess: no shell, no stdin, no terminal, bounded time (its whole process group
        is killed on timeout: a fetch runs ssh or a remote helper under it)."""
        verb = args[2] if args[0] == "--git-dir" else args[0]
        try:
            proc = subprocess.Popen(["git", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env or self._env, start_new_session=True)
        except OSError as exc:
            raise SourceError(f"cannot run git: {exc}") from exc
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise SourceError(f"git {verb} on {redact(self.url)} timed out after {self.timeout:g} s") from exc
        if proc.returncode != 0:
            detail = self._scrub(_first_error(err)) or f"exit status {proc.returncode}"
            prefix = f"cannot {what}" if what else f"git {verb} failed for"
            raise SourceError(f"{prefix} {redact(self.url)}: {detail}")
        return out

    def _scrub(self, text: str) -> str:
        """Remove the URL's credentials from git's own output too."""
        text = text.replace(self.url, redact(self.url))
        if "://" in self.url:
            userinfo = urlsplit(self.url).netloc.rpartition("@")[0]
            if userinfo and redact(self.url) != self.url:
                text = text.replace(userinfo, "***")
        return text

    # -- checkout housekeeping ------------------------------------------------------------------------

    def _prune(self, keep: Path) -> None:
        """Keep the newest `keep_checkouts` checkouts and `keep` itself; delete the rest."""
        entries = [p for p in self.checkouts.iterdir() if _FULL_SHA.fullmatch(p.name) and p.is_dir()]
        entries.sort(key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
        for old in entries[self.keep_checkouts :]:
            if old != keep:
                log.info("pruning old checkout %s", old.name[:12])
                _remove_tree(old)

    def _sweep_stale_tmp(self) -> None:
        """Remove temp dirs a crashed checkout left behind (old enough not to be work in progress)."""
        now = time.time()
        for p in self.checkouts.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                try:
                    if now - p.lstat().st_mtime <= _STALE_TMP_S:
                        continue
                    if p.is_dir() and not p.is_symlink():
                        _remove_tree(p)
                    else:
                        p.unlink()
                except FileNotFoundError:
                    pass


# -- helpers -------------------------------------------------------------------------------------


def _config_url(config: Path) -> str:
    """remote.origin.url from a git config file (the simple form the mirror's own config has)."""
    section = ""
    try:
        lines = config.read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == f'[remote "{_REMOTE}"]' and line.partition("=")[0].strip() == "url":
            return line.partition("=")[2].strip()
    return ""


def _first_readable(*paths: Path | None) -> str:
    """The text of the first of `paths` that can be read (OSError from the last one otherwise)."""
    error: OSError = FileNotFoundError("no path")
    for path in paths:
        if path is None:
            continue
        try:
            return path.read_text()
        except OSError as exc:
            error = exc
    raise error


def _read_ref(git_dir: Path, name: str, depth: int = 0) -> str | None:
    """The sha of ref `name` in `git_dir` from its loose file or packed-refs; None if it has none."""
    try:
        text = (git_dir / name).read_text().strip()
    except (OSError, ValueError):
        text = ""
    if text.startswith("ref: ") and depth < 5:
        return _read_ref(git_dir, text[5:].strip(), depth + 1)
    if _FULL_SHA.fullmatch(text):
        return text
    try:
        packed = (git_dir / "packed-refs").read_text()
    except OSError:
        return None
    for line in packed.splitlines():
        sha, _, ref = line.partition(" ")
        if ref == name and _FULL_SHA.fullmatch(sha):
            return sha
    return None


def _local_git_dir(url: str) -> Path | None:
    """The git dir of a repository on this host (file:// URL or path), when it can be read directly."""
    if url.startswith("file://"):
        path = Path(urlsplit(url).path)
    elif "://" not in url and url.startswith("/"):
        path = Path(url)
    else:
        return None
    if (path / ".git").is_dir():
        path = path / ".git"
    elif (path / ".git").is_file():
        return None            # a linked worktree or submodule: let git resolve it
    if not (path / "HEAD").is_file() or (path / "commondir").exists():
        return None
    return path


def _git_env(ssh_command: str | None = None) -> dict[str, str]:
    """The environment for every git child: inherits GIT_SSH_COMMAND and friends, never prompts."""
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("SSH_ASKPASS_REQUIRE", "never")
    if ssh_command:
        env["GIT_SSH_COMMAND"] = ssh_command
    return env


def _normalise_url(url: str) -> str:
    """Reject option-like URLs; make a plain local path absolute (git runs with the mirror as cwd)."""
    url = url.strip()
    if not url or url.startswith("-"):
        raise ConfigError(f"not a git repository URL: {redact(url)!r}")
    if "://" in url:
        return url
    head, colon, _ = url.partition(":")
    if colon and "/" not in head:  # scp-like user@host:path
        return url
    return str(Path(url).expanduser().resolve())


def _check_ref(ref: str) -> str:
    """A branch, a tag (optionally as refs/heads/X, refs/tags/X) or a commit id; nothing git would misread."""
    bad = (
        not ref
        or ref.startswith(("-", "/"))
        or ref.endswith(("/", ".lock", "."))
        or ".." in ref
        or "@{" in ref
        or _BAD_REF_CHARS.search(ref)
    )
    if bad:
        raise ConfigError(f"not a valid git ref: {ref!r}")
    if ref.startswith("refs/") and not ref.startswith(("refs/heads/", "refs/tags/")):
        raise ConfigError(f"only branches (refs/heads/) and tags (refs/tags/) can be tracked, not {ref!r}")
    return ref


def _first_error(stderr: str) -> str:
    """git's first fatal/error line without its prefix: one sentence for a status line, not a banner."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        for prefix in ("fatal:", "error:"):
            if line.lower().startswith(prefix):
                return line[len(prefix) :].strip()
    return lines[0] if lines else ""


def _candidates(ref: str) -> tuple[str, ...]:
    """Full remote ref names `ref` may mean, in order of preference: branch, then tag."""
    if ref.startswith("refs/"):
        return (ref,)
    return (f"refs/heads/{ref}", f"refs/tags/{ref}")


def _tracking(remote_ref: str) -> str:
    """Where the mirror's refspecs store a remote ref."""
    if remote_ref.startswith("refs/heads/"):
        return f"refs/remotes/{_REMOTE}/" + remote_ref[len("refs/heads/") :]
    return remote_ref


def _make_read_only(root: Path) -> None:
    """Drop write bits (files first, then directories) so nothing edits a checkout in place."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode & ~0o222)
        os.chmod(dirpath, os.stat(dirpath).st_mode & ~0o222)


def _remove_tree(root: Path) -> None:
    """rmtree that first gives directories back their write bit (checkouts are read-only)."""
    for dirpath, _dirs, _files in os.walk(root):
        try:
            os.chmod(dirpath, os.stat(dirpath).st_mode | 0o700)
        except OSError:
            pass
    shutil.rmtree(root, ignore_errors=True)
