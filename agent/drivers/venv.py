"""Virtualenv driver: build content-addressed venvs from hashed lockfiles and switch between them.

Layout under the agent's root::

    venvs/<name>-<identity>/            one venv per (python, lock bytes, installer, options)
    venvs/<name>-<identity>/.gitops-agent.json   marker, written last: "this venv is complete"
    envs/<name> -> ../venvs/<name>-<identity>    symlink that services use, swapped atomically

Why this shape: venvs are not relocatable (shebangs hold the absolute path), so a venv is built where it
will live, and "done" is signalled by a marker written atomically after every check passed. A directory
without the marker is an interrupted build and is never used. Services follow the symlink, so the switch
is one `os.replace`, and a rollback to a kept venv is a switch, not a rebuild.

Every installer call is an argument list (no shell) with an environment built from scratch, so a
build depends on the revision only: PATH, a private HOME (`<root>/installer-home`: their caches, no
user config), LANG, network plumbing (proxy, CA bundle, TMPDIR) and what the agent sets. No inherited PIP_*
or UV_* variable, and no pip.conf or uv.toml is read (`PIP_CONFIG_FILE=/dev/null` and `--isolated`,
`UV_NO_CONFIG=1`): a host's find-links or index cannot add or replace a wheel. The caller's network
settings for pip (PIP_CERT, PIP_PROXY, timeouts) are handed over as options. The lock's hashes decide
what may be installed whatever the index.

A private index (`VenvSpec.index_url`) replaces PyPI for pip and uv (find_links still apply). Its
credentials reach the installer through its environment only, for the install step only: pip reads
`--index-url ${GITOPS_AGENT_INDEX_URL}` from an options file (pip expands `${VAR}` in requirements files,
and `--isolated` makes it ignore PIP_INDEX_URL), uv gets a named default index with
UV_INDEX_GITOPS_AGENT_USERNAME/PASSWORD. Never argv, the marker, a log line or an error message: every
text the build raises goes through a redaction of the password and of any URL's userinfo. A failed
install is followed by one request to the index with the same credentials, so "the index refused the
credentials" (pip only logs a 401/403 at debug level) is told apart from other failures.

A foreign entry where `envs/<name>` should be (a directory or file put there by hand) is renamed aside
(`envs/.<name>.aside-<utc time>`, with a warning) when the link is switched: kept, never deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import field
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus, urlsplit

from agent.core._record import record
from agent.core.errors import BuildError, ConfigError, InvalidVenvRef, Permanent
from agent.drivers.fsutil import atomic_write, fsync_dir

if TYPE_CHECKING:
    from agent.core.lockfile import LockedRequirement

__all__ = ["VenvSpec", "VenvInfo", "VenvManager", "resolve_python", "find_uv", "MARKER", "LOCK_COPY",
           "INSTALLER_HOME", "IndexAuthFailed", "InvalidIndexUrl", "REDACTED"]

log = logging.getLogger(__name__)

MARKER = ".gitops-agent.json"
LOCK_COPY = ".gitops-agent.lock"  # the exact lock bytes the venv was built from
SEEDED = frozenset({"pip", "setuptools", "wheel"})  # what `python -m venv` may put in by itself
_IDENTITY = re.compile(r"^[0-9a-f]{16}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # the schema's identifier: no '/', no leading '.'
_VERSION = re.compile(r"^3\.[0-9]{1,2}$")
_TRASH_PREFIX = ".trash-"
_HELD_PREFIX = ".held-"     # a drifted venv kept aside while it is repaired, until the new one is complete
INSTALLER_HOME = "installer-home"    # under the root: HOME of pip and uv (their caches), never the caller's
_STDERR_TAIL_LINES = 25
_STDERR_TAIL_CHARS = 3000
# Caller variables an installer gets: network plumbing only (how to reach an index, where temp files go).
# None of them can choose a wheel: the lock's hashes do, from the revision's find_links or index.
_PLUMBING = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
             "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "TMPDIR")
# The caller's pip network settings (documented for TLS-intercepting proxies: deploy/README.md) are no
# variables of the installers: the agent hands them over as pip's own options (`--isolated` ignores
# PIP_*), and uv gets the CA bundle and proxy through the standard variables when those are unset.
_PIP_NETWORK = {"PIP_CERT": "--cert", "PIP_CLIENT_CERT": "--client-cert", "PIP_PROXY": "--proxy",
                "PIP_DEFAULT_TIMEOUT": "--timeout", "PIP_TIMEOUT": "--timeout", "PIP_RETRIES": "--retries"}
# What the agent itself sets for pip and uv (and nothing else of the PIP_*/UV_* kind reaches them).
_AGENT_SET = {
    "PIP_CONFIG_FILE": os.devnull,       # pip reads no pip.conf at all: global, user, site or env
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_NO_INPUT": "1",
    "PIP_PROGRESS_BAR": "off",
    "UV_NO_CONFIG": "1",                 # uv reads no uv.toml / pyproject.toml: user, system or project
    "UV_NO_PROGRESS": "1",
    "UV_PYTHON_DOWNLOADS": "never",      # the interpreter is the one resolve_python found, never a download
}
# A private index. pip: an options file `-r`-included after the lock, whose `${VAR}` pip expands from the
# install step's environment (the URL with percent-encoded userinfo). uv: a named default index, so its
# credentials go in UV_INDEX_<NAME>_USERNAME/PASSWORD as they are, not in a URL.
_PIP_INDEX_VAR = "GITOPS_AGENT_INDEX_URL"
_PIP_INDEX_OPTIONS = "pip-index-options.txt"     # under the installer home; holds no secret, only the ${VAR}
_UV_INDEX_NAME = "gitops-agent"
_UV_INDEX_VAR = "UV_INDEX_GITOPS_AGENT"          # uv's spelling of the name: upper case, '-' -> '_'
REDACTED = "***"
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#@]+@")
_INDEX_PROBE_TIMEOUT_S = 30.0
# Dropped from the environment of the interpreter probes (they install nothing, but must not be redirected).
_DROPPED = ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONUSERBASE",
            "PYTHONNOUSERSITE", "__PYVENV_LAUNCHER__")

# Run inside the new venv (`python -I -c`): import the object of every console script the agent found in the
# locked distributions' metadata (argv[1]: JSON [[name, value, dist], ...]), without running it; the same
# resolution as importlib.metadata's EntryPoint.load, without importing importlib.metadata in the venv
# (~0.1 s of a small build). Prints one JSON object: {"checked": n, "failed": ["name = value (dist): error"]}.
_LOAD_ENTRY_POINTS = r"""
import importlib, json, re, sys
pattern = re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")
checked, failed = 0, []
for name, value, dist in json.loads(sys.argv[1]):
    checked += 1
    try:
        match = pattern.match(value)
        if match is None:
            raise ValueError("not a module:attribute reference")
        obj = importlib.import_module(match.group("module"))
        for attr in filter(None, (match.group("attr") or "").split(".")):
            obj = getattr(obj, attr)
    except BaseException as exc:
        failed.append(f"{name} = {value} ({dist}): {type(exc).__name__}: {exc}")
print(json.dumps({"checked": checked, "failed": failed}))
"""


def _console_scripts(venv: Path, names: set[str]) -> list[tuple[str, str, str]]:
    """(script name, `module:attr` value, distribution) of every console or GUI script of the distributions
    `names` (canonical) in the venv's site-packages, read in the agent's process from their metadata."""
    from importlib import metadata

    found = []
    for dist in metadata.distributions(path=[str(p) for p in _site_packages(venv)]):
        name = _canonical(dist.metadata["Name"] or "")
        if name in names:
            found += [(ep.name, ep.value, name) for ep in dist.entry_points
                      if ep.group in ("console_scripts", "gui_scripts")]
    return found


class IndexAuthFailed(BuildError, Permanent):
    """The private index refused the build's credentials (HTTP 401/403): a person must fix the secret or
    the index's permissions; the same input fails the same way. The message names the index URL, never
    the credentials."""


class InvalidIndexUrl(BuildError, Permanent, ValueError):
    """`index_url` is not an http(s) URL, or carries credentials itself (they belong in the secret: a URL
    is logged, shown and kept in plain text)."""


@record
class VenvSpec:
    """What to build: one environment of one app, as planned from the state repo.

    `index_url` (an http(s) PEP 503 index, no credentials in it) replaces PyPI; `index_username` and
    `index_password` are sent to it. They are not part of the identity: the lock's hashes decide the
    content, wherever the wheels come from."""

    name: str
    python: str
    lockfile: Path
    find_links: tuple[Path, ...]
    installer: str = "pip"
    options: tuple[str, ...] = ()
    identity: str = ""
    index_url: str | None = None
    index_username: str | None = None
    index_password: str | None = field(default=None, repr=False)
    compile_bytecode: bool = False      # not part of the identity: the same packages, compiled now or on import


@record
class VenvInfo:
    """A venv dir on disk. `complete` means its marker exists; `marker` is its parsed content."""

    name: str
    identity: str
    path: Path
    complete: bool
    marker: dict | None
    mtime: float


@record
class _Run:
    """Finished subprocess: kept small so error messages can quote it."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


@record
class _Index:
    """A private index with its credentials, and what each installer needs to use it."""

    url: str
    username: str | None
    password: str | None = field(repr=False)

    @property
    def has_credentials(self) -> bool:
        return self.username is not None or self.password is not None

    def url_with_userinfo(self) -> str:
        """The URL with percent-encoded `user:password@` (pip decodes it): '%', '@', ':', '/' stay data."""
        if not self.has_credentials:
            return self.url
        parts = urlsplit(self.url)
        userinfo = quote(self.username or "", safe="")
        if self.password is not None:
            userinfo += ":" + quote(self.password, safe="")
        return parts._replace(netloc=f"{userinfo}@{parts.netloc}").geturl()

    def install_env(self, installer: str) -> dict[str, str]:
        """Variables only the install step gets (not `pip check`, not the entry point imports)."""
        if installer == "pip":
            return {_PIP_INDEX_VAR: self.url_with_userinfo()}
        env = {"UV_DEFAULT_INDEX": f"{_UV_INDEX_NAME}={self.url}"}
        if self.has_credentials:
            env[f"{_UV_INDEX_VAR}_USERNAME"] = self.username or ""
        if self.password is not None:
            env[f"{_UV_INDEX_VAR}_PASSWORD"] = self.password
        return env


def _index_of(spec: VenvSpec) -> _Index | None:
    """The spec's private index, checked: http(s), a host, no userinfo, nothing pip or uv would split."""
    if spec.index_url is None:
        return None
    url = spec.index_url
    try:
        parts = urlsplit(url)
        parts.port            # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise InvalidIndexUrl(f"{spec.name}: index_url {_redact_userinfo(url)!r} is no URL: {exc}") from None
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidIndexUrl(f"{spec.name}: index_url {_redact_userinfo(url)!r} carries credentials: "
                              "give them as index credentials (from a secret), not in the URL")
    if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"[\s\x00-\x1f\x7f]", url):
        raise InvalidIndexUrl(f"{spec.name}: index_url {url!r} is not an http(s) URL with a host")
    return _Index(url, spec.index_username, spec.index_password)


def _redact_userinfo(text: str) -> str:
    return _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)


def _redactor(spec: VenvSpec) -> Callable[[str], str]:
    """Text -> text with the index password (as typed, percent-encoded, base64 in a Basic header) and
    any URL's userinfo replaced by `***`: for everything a build raises or logs."""
    secrets: set[str] = set()
    if spec.index_password:
        password = spec.index_password
        encoded = quote(password, safe="")
        secrets |= {password, encoded, quote(password), quote_plus(password),
                    re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), encoded)}
        basic = f"{spec.index_username or ''}:{password}"
        import base64     # an index with credentials only

        secrets.add(base64.b64encode(basic.encode("utf-8", "replace")).decode("ascii"))
    ordered = sorted(secrets, key=len, reverse=True)   # longest first: no half-replaced secret survives

    def redact(text: str) -> str:
        for secret in ordered:
            text = text.replace(secret, REDACTED)
        return _redact_userinfo(text)

    return redact


def _index_refusal(index: _Index, package: str, base: dict[str, str] | None = None) -> str | None:
    """Ask the index for the page the installer needed, with the same credentials: "401 Unauthorized" or
    "403 Forbidden" if it refuses them, else None (it answers, or fails for another reason).

    Why a request of our own: pip logs a refused index page only at debug level and then reports "no
    matching distribution", which reads like a wrong lock. The credentials go in a Basic header that
    urllib drops on redirects, and redirects are not followed (a refusal elsewhere proves nothing).
    """
    import ssl
    import urllib.error
    import urllib.request

    caller = os.environ if base is None else base

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    request = urllib.request.Request(f"{index.url.rstrip('/')}/{package}/")
    if index.has_credentials:
        basic = f"{index.username or ''}:{index.password or ''}".encode()
        import base64

        request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(basic).decode("ascii"))
    try:
        context = ssl.create_default_context(cafile=caller.get("PIP_CERT") or None)   # as pip's --cert
        handlers: list[urllib.request.BaseHandler] = [NoRedirect(), urllib.request.HTTPSHandler(context=context)]
        if caller.get("PIP_PROXY"):
            handlers.append(urllib.request.ProxyHandler({"http": caller["PIP_PROXY"], "https": caller["PIP_PROXY"]}))
        with urllib.request.build_opener(*handlers).open(request, timeout=_INDEX_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"{exc.code} {exc.reason}" if exc.code in (401, 403) else None
    except (OSError, ValueError, ssl.SSLError):
        return None


def _tail(text: str, lines: int = _STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-_STDERR_TAIL_CHARS:]


def _failure_detail(stdout: str, stderr: str) -> str:
    """What a person needs from a failed step: the end of stdout (pip check reports there), then the
    end of stderr (installers' errors, e.g. pip's hash mismatch table)."""
    parts = [_tail(stdout, 8), _tail(stderr)]
    return "\n".join(part for part in parts if part)


def _build_env(home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for installer subprocesses, built from scratch: the same revision builds the same venv
    on every host, whatever the host's pip/uv configuration (find-links, index, `user`, `target`...)."""
    caller = os.environ if base is None else base
    env = {key: caller[key] for key in _PLUMBING if key in caller}
    if caller.get("PIP_CERT"):
        env.setdefault("SSL_CERT_FILE", caller["PIP_CERT"])     # uv's name for the CA bundle
    if caller.get("PIP_PROXY"):
        env.setdefault("HTTPS_PROXY", caller["PIP_PROXY"])
    env.update(_AGENT_SET)
    env.update({
        "PATH": caller.get("PATH") or os.defpath,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",  # a ~/.local package must not satisfy or break a check
    })
    return env


def _pip_network_options(base: dict[str, str] | None = None) -> list[str]:
    """The caller's PIP_CERT, PIP_PROXY, timeouts... as pip options: how to reach an index, never which wheel."""
    caller = os.environ if base is None else base
    options: dict[str, str] = {}
    for key, option in _PIP_NETWORK.items():
        if caller.get(key):
            options.setdefault(option, caller[key])
    return [a for option, value in options.items() for a in (option, value)]


def _probe_env() -> dict[str, str]:
    """Environment of the interpreter and uv probes: the caller's (a pyenv shim needs its HOME), minus
    what could redirect or break them."""
    env = {key: value for key, value in os.environ.items()
           if key not in _DROPPED and not key.startswith(("PIP_", "UV_"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _create_venv(path: Path, name: str) -> None:
    """An empty venv of this interpreter, made in this process (the standard library's `venv`, no pip: uv
    installs into it): ~6 ms, where `uv venv` is a process of its own (~30 ms here alone, 0.1 s beside a
    fresh host's other builds and supervisord starting)."""
    import venv

    try:
        venv.EnvBuilder(symlinks=True, with_pip=False).create(path)
    except OSError as exc:
        raise BuildError(f"{name}: cannot create the venv {path}: {exc}") from exc


def _run(argv: Sequence[str], *, env: dict[str, str], cwd: Path, timeout: float, what: str,
         redact: Callable[[str], str] = lambda text: text) -> _Run:
    """Run one command; raise BuildError (with the stderr tail, redacted) if it cannot start, times out or
    fails."""
    argv = tuple(str(a) for a in argv)
    try:
        proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, errors="replace")
    except FileNotFoundError as exc:
        raise BuildError(redact(f"{what}: cannot run {argv[0]}: {exc}")) from exc
    except subprocess.TimeoutExpired as exc:   # not chained: it holds the unredacted output
        stderr = exc.stderr.decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise BuildError(redact(f"{what}: timed out after {timeout:g}s\n{_tail(stderr)}")) from None
    result = _Run(argv, proc.returncode, proc.stdout, proc.stderr)
    if result.returncode != 0:
        detail = _failure_detail(result.stdout, result.stderr)
        raise BuildError(redact(f"{what} failed (exit {result.returncode}):\n{detail}"))
    return result


def _python_version(executable: str) -> tuple[str, str] | None:
    """(X.Y, real sys.executable) of an interpreter, or None if it does not run (e.g. a dead pyenv shim)."""
    code = "import sys; print('%d.%d' % sys.version_info[:2]); print(sys.executable)"
    try:
        proc = subprocess.run([executable, "-I", "-c", code], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, env=_probe_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.split()
    return (lines[0], lines[1]) if proc.returncode == 0 and len(lines) == 2 else None


def _pyenv_candidates(version: str) -> list[str]:
    """Interpreters pyenv installed for X.Y (newest patch first), active or not: a shim only runs the
    versions selected by `pyenv global/local`, but any installed one can build a venv."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    found = []
    for exe in root.glob(f"versions/{version}.*/bin/python{version}"):
        patch = exe.parent.parent.name.removeprefix(f"{version}.")
        if patch.isdigit():  # skip 3.12-dev, 3.12.1t and friends
            found.append((int(patch), str(exe)))
    return [exe for _, exe in sorted(found, reverse=True)]


def _canonical(name: str) -> str:
    """PEP 503 name normalisation (what packaging.utils.canonicalize_name does), without importing packaging."""
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve_python(version: str) -> str:
    """Path of an interpreter for "X.Y": this one if it matches, else `pythonX.Y` on PATH, else a pyenv
    installation; each candidate is run once to verify it.

    The probe catches a pyenv shim for a version that is not selected (it exists but exits 127) and
    yields the real executable, so the venv records the interpreter, not a shim.
    """
    if not _VERSION.match(version):
        raise BuildError(f"python version {version!r} is not of the form 3.N")
    if "%d.%d" % sys.version_info[:2] == version and sys.executable:
        return sys.executable
    on_path = shutil.which(f"python{version}")
    for candidate in ([on_path] if on_path else []) + _pyenv_candidates(version):
        probed = _python_version(candidate)
        if probed and probed[0] == version:
            return probed[1] or candidate
    raise BuildError(f"no Python {version} interpreter found (python{version} on PATH, pyenv versions)")


_FIND_UV = threading.Lock()     # builds run in threads: sysconfig's first use (in uv's finder) is not thread-safe


def find_uv() -> str | None:
    """The uv binary: the one the `uv` Python package ships next to this interpreter (the version
    installed with the agent), else `uv` on PATH if it really runs (a pyenv shim may exist and exit 127)."""
    with _FIND_UV:
        return _find_uv()


def _find_uv() -> str | None:
    beside = Path(sys.executable).parent / "uv"     # where the `uv` package puts it in the agent's venv
    if sys.prefix != sys.base_prefix and beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)                          # (without importing the package and sysconfig: ~5 ms)
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found]

        return find_uv_bin()
    except (ImportError, FileNotFoundError, OSError):
        pass
    found = shutil.which("uv")
    if not found:
        return None
    try:
        ok = subprocess.run([found, "--version"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
                            env=_probe_env()).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return found if ok else None


def _site_packages(venv: Path) -> list[Path]:
    """site-packages dirs of a venv, once each (`lib64` is often a symlink to `lib`)."""
    unique: dict[Path, Path] = {}
    for candidate in sorted(venv.glob("lib*/python3*/site-packages")):
        if candidate.is_dir():
            unique.setdefault(candidate.resolve(), candidate)
    return list(unique.values())


def _distributions(venv: Path) -> dict[str, str]:
    """Every distribution in the venv's site-packages: canonical name -> version (in-process)."""
    found: dict[str, str] = {}
    paths = [str(p) for p in _site_packages(venv)]
    if not paths:
        return found
    from importlib import metadata    # lazy: a no-op reconcile reads installed() from its cache

    for dist in metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_canonical(name), dist.version)
    return found


def _utc_now() -> str:
    from datetime import datetime, timezone   # lazy: only a build stamps a marker

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_marker(venv: Path) -> dict | None:
    try:
        data = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _normalized(path: Path | str) -> Path:
    """Absolute, with '..' folded but symlinks kept: the same spelling list(), current() and callers use."""
    return Path(os.path.normpath(Path(path).absolute()))


def _checked_name(name: str) -> str:
    """Environment names become path components: refuse anything that could leave the root."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidVenvRef(f"bad environment name {name!r}: letters, digits, '_', '.', '-' (not first), "
                             "at most 63")
    return name


class VenvManager:
    """Owns `<root>/venvs` and `<root>/envs`. One manager (one agent) per root: builds are not locked
    against other processes; the agent's root lock provides that."""

    def __init__(self, root: Path, retention: int = 3, *, timeout_s: float = 900.0,
                 installed_file: Path | None = None, read_only: bool = False):
        """`installed_file`: where `installed()` keeps what it read for the next process (a `once` then reads
        no package metadata while no venv changed); `read_only`: it is read, never written."""
        self._installed: dict[Path, tuple[tuple[int, ...], dict[str, str]]] = {}   # path -> (site-packages mtimes, dists)
        self._site_dirs: dict[Path, list[Path]] = {}    # venv path -> its site-packages dirs
        self._markers: dict[Path, tuple[tuple[int, int, int], dict | None]] = {}  # path -> (marker stat, content)
        self._installed_file = installed_file
        self._installed_read_only = read_only
        self._installed_loaded = installed_file is None
        self._installed_lock = threading.Lock()
        if retention < 1:
            raise ConfigError(f"retention must be at least 1, not {retention}")
        self.root = _normalized(root)
        self.retention = retention
        self.timeout_s = timeout_s
        self._venvs = self.root / "venvs"
        self._envs = self.root / "envs"
        self._building: set[Path] = set()

    # ----- naming -----

    def path_for(self, name: str, identity: str) -> Path:
        """Where the venv for this (name, identity) lives: the path is its identity."""
        if not isinstance(identity, str) or not _IDENTITY.match(identity):
            raise InvalidVenvRef(f"bad venv identity {identity!r}: 16 lowercase hex digits")
        return self._venvs / f"{_checked_name(name)}-{identity}"

    def link_for(self, name: str) -> Path:
        """The stable path services use; it points at the current venv."""
        return self._envs / _checked_name(name)

    def current(self, name: str) -> Path | None:
        """Target of the env symlink (normalized, not resolved through other links), or None if no link.

        A dangling link still returns its target, so the caller can see *which* venv went missing.
        """
        envs = str(self._envs)        # plain strings: asked once per environment on every poll
        try:
            target = os.readlink(os.path.join(envs, _checked_name(name)))
        except OSError:  # no link, or something else there (replaced by hand)
            return None
        return Path(os.path.normpath(os.path.join(envs, target)))

    # ----- facts -----

    def list(self, name: str | None = None) -> list[VenvInfo]:
        """Venv dirs (of one environment, or all), newest first; incomplete ones included."""
        try:
            entries = list(os.scandir(self._venvs))
        except FileNotFoundError:
            return []
        infos = []
        for entry in entries:
            env_name, _, identity = entry.name.rpartition("-")
            if entry.name.startswith(".") or not env_name or not _IDENTITY.match(identity):
                continue
            if (name is not None and env_name != name) or not entry.is_dir(follow_symlinks=False):
                continue
            infos.append(self._info(env_name, identity, Path(entry.path)))
        return sorted(infos, key=lambda i: (i.mtime, i.path.name), reverse=True)

    def _info(self, name: str, identity: str, path: Path) -> VenvInfo:
        """A venv's facts. Its marker is read and parsed again only when the file itself changed (another
        inode, size or mtime): a marker is written once, whole, so a stat is enough on every other poll."""
        try:
            st = os.stat(os.path.join(path, MARKER))
        except OSError:
            st = None
        marker = None
        if st is not None:
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._markers.get(path)
            if cached is not None and cached[0] == key:
                marker = cached[1]
            else:
                marker = _read_marker(path)
                self._markers[path] = (key, marker)
        if marker is not None:
            return VenvInfo(name, identity, path, True, marker, st.st_mtime)
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            mtime = 0.0
        return VenvInfo(name, identity, path, False, None, mtime)

    def installed(self, path: Path) -> dict[str, str]:
        """What is really installed: canonical name -> version, read in-process (~1 ms, no subprocess).

        pip/setuptools/wheel that `python -m venv` seeds are left out, unless the venv's marker says
        the lock pinned them (then they are content like any other).
        """
        path = Path(path)
        dirs = self._site_dirs.get(path)
        if not dirs:     # a venv's path names its identity: its site-packages dirs never move (globbed once)
            dirs = self._site_dirs[path] = _site_packages(path)
        try:   # any pip install/uninstall adds or removes a .dist-info dir: the dir's mtime moves
            stamp = tuple(p.stat().st_mtime_ns for p in dirs)
        except OSError:
            stamp = None
        if not self._installed_loaded:
            self._load_installed()
        cached = self._installed.get(path)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return dict(cached[1])
        marker = _read_marker(path) or {}
        locked = set((marker.get("packages") or {}).keys())
        found = {n: v for n, v in _distributions(path).items() if n not in SEEDED or n in locked}
        if stamp is not None:
            self._installed[path] = (stamp, found)
            self._save_installed()
        return dict(found)

    def _load_installed(self) -> None:
        """The cache of `installed()` that earlier processes kept: the same entries, trusted the same way
        (by the site-packages dirs' mtimes, which any install or uninstall moves). A bad file is ignored."""
        self._installed_loaded = True
        try:
            data = json.loads(self._installed_file.read_text())
            for key, entry in data["venvs"].items():
                stamp, found = tuple(entry["stamp"]), entry["installed"]
                if all(isinstance(t, int) for t in stamp) and all(
                        isinstance(k, str) and isinstance(v, str) for k, v in found.items()):
                    self._installed.setdefault(Path(key), (stamp, dict(found)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return

    def _save_installed(self) -> None:
        if self._installed_file is None or self._installed_read_only:
            return
        with self._installed_lock:     # builds run in threads
            venvs = {str(p): {"stamp": list(stamp), "installed": found}
                     for p, (stamp, found) in list(self._installed.items()) if p.is_dir()}
            try:
                atomic_write(self._installed_file, json.dumps({"venvs": venvs}, sort_keys=True), mode=0o600)
            except OSError as exc:
                log.warning("cannot write %s: %s", self._installed_file, exc.strerror or exc)

    # ----- build -----

    def build(self, spec: VenvSpec) -> Path:
        """Build (or find already built) the venv for `spec` at its final path; return that path.

        Complete venvs are reused as they are. A dir without marker is a leftover of an interrupted
        build and is deleted first (or, if a crash interrupted a repair, the venv held aside is put
        back). On any failure the partial dir is removed, the symlink is untouched, and BuildError
        carries the installer's stderr tail. Lock problems raise InvalidState.
        """
        return self._build(spec, recover=True)

    def repair(self, spec: VenvSpec) -> Path:
        """Rebuild the venv for `spec` at its own path: its installed packages drifted from the lock.

        Why not delete and build: a failed rebuild would then leave the service's current venv gone.
        The drifted venv is renamed aside (atomic, same dir) and deleted only once the new one is
        complete; a failed rebuild renames it back, so the host keeps what its services ran from.
        """
        if not spec.identity:
            raise BuildError(f"{spec.name}: a repair needs the planned venv identity")
        path = self.path_for(spec.name, spec.identity)
        self._recover_held(path)
        held = path.parent / f"{_HELD_PREFIX}{path.name}.{os.urandom(4).hex()}"
        if path.exists():
            os.rename(path, held)
            fsync_dir(path.parent)
        try:
            built = self._build(spec, recover=False)
        except BaseException:
            if held.exists():
                self._delete(path)           # the partial dir, if the failed build left one
                os.rename(held, path)
                fsync_dir(path.parent)
            raise
        self._delete(held)
        return built

    def _recover_held(self, path: Path) -> None:
        """Finish a repair a crash interrupted: keep the new venv if it completed, else put the held one back."""
        held = sorted(path.parent.glob(f"{_HELD_PREFIX}{path.name}.*"), key=lambda p: p.stat().st_mtime)
        if not held:
            return
        if not (path / MARKER).exists() and (held[-1] / MARKER).exists():
            self._delete(path)
            os.rename(held.pop(), path)
            fsync_dir(path.parent)
        for leftover in held:
            self._delete(leftover)

    def _build(self, spec: VenvSpec, *, recover: bool) -> Path:
        from agent.core.lockfile import parse_lock, venv_identity     # here: a no-op never builds

        _checked_name(spec.name)          # before any file is read: a bad name is the revision's fault
        try:
            lock_bytes = Path(spec.lockfile).read_bytes()
        except OSError as exc:
            raise BuildError(f"{spec.name}: cannot read lockfile {spec.lockfile}: {exc}") from exc
        identity = venv_identity(spec.python, lock_bytes, spec.installer, spec.options)
        if spec.identity and spec.identity != identity:
            raise BuildError(f"{spec.name}: lockfile {spec.lockfile} changed since it was planned "
                             f"(identity {spec.identity}, now {identity})")
        locked = parse_lock(lock_bytes.decode("utf-8", "replace"), str(spec.lockfile))
        path = self.path_for(spec.name, identity)
        if recover:
            self._recover_held(path)
        if (path / MARKER).exists():
            return path
        if spec.installer not in ("pip", "uv"):
            raise BuildError(f"{spec.name}: unknown installer {spec.installer!r}")
        index = _index_of(spec)
        self._building.add(path)
        try:
            if path.exists() or path.is_symlink():
                self._delete(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._build_at(path, spec, identity, lock_bytes, locked, index)
        except BaseException:
            self._delete(path)
            raise
        finally:
            self._building.discard(path)
        return path

    def _build_at(self, path: Path, spec: VenvSpec, identity: str, lock_bytes: bytes,
                  locked: tuple[LockedRequirement, ...], index: _Index | None) -> None:
        interpreter = resolve_python(spec.python)
        uv = find_uv() if spec.installer == "uv" else None
        if spec.installer == "uv" and uv is None:
            raise BuildError(f"{spec.name}: installer 'uv' requested but no uv binary found")
        redact = _redactor(spec)
        home = self._installer_home()
        env = _build_env(home)

        def run(argv: Sequence[object], what: str, extra_env: dict[str, str] | None = None) -> _Run:
            return _run(argv, env={**env, **(extra_env or {})}, cwd=self._venvs, timeout=self.timeout_s,
                        what=f"{spec.name}: {what}", redact=redact)

        if uv and interpreter == sys.executable:
            _create_venv(path, spec.name)
        elif uv:
            run([uv, "venv", "--no-project", "--quiet", "--python", interpreter, path], "uv venv")
        else:
            run([interpreter, "-m", "venv", path], "python -m venv")
        lock_copy = path / LOCK_COPY
        lock_copy.write_bytes(lock_bytes)  # install from these exact bytes, not a file that may change
        python = path / "bin" / "python"
        links = [a for d in spec.find_links for a in ("--find-links", str(d))]
        common = ["--require-hashes", "--no-deps", "--only-binary", ":all:", "-r", lock_copy, *links,
                  *spec.options]
        if index and not uv:     # pip: `--index-url ${VAR}` from a file, the URL itself from the environment
            options_file = home / _PIP_INDEX_OPTIONS
            atomic_write(options_file, f"--index-url ${{{_PIP_INDEX_VAR}}}\n", mode=0o600)
            common[common.index(lock_copy) + 1:common.index(lock_copy) + 1] = ["-r", options_file]
        index_env = index.install_env(spec.installer) if index else {}
        pip = [python, "-m", "pip", "--isolated", "--disable-pip-version-check", "--no-input"]
        try:
            if uv:
                compile_flag = ["--compile-bytecode"] if spec.compile_bytecode else []
                install = [uv, "pip", "install", "--python", python, *compile_flag, *common]
                try:   # the cache first: a lock pins every file by hash, so a cached wheel is the wheel; an
                    # index's page is only asked (revalidated: ~0.1 s and its parse) when the cache lacks one
                    run([*install[:3], "--offline", *install[3:]], "uv pip install (from the cache)", index_env)
                except BuildError as exc:
                    log.debug("%s: not all of it is in uv's cache, asking the index: %s", spec.name, exc)
                    run(install, "uv pip install", index_env)
            else:
                compile_flag = [] if spec.compile_bytecode else ["--no-compile"]
                run([*pip, "install", "--progress-bar", "off", *compile_flag, *_pip_network_options(), *common],
                    "pip install", index_env)
        except BuildError as exc:
            if index is None:
                raise
            self._raise_if_refused(spec, index, min(r.name for r in locked), str(exc), redact)
            raise
        expected = {r.name: r.version for r in locked}
        # The read-only checks run side by side (each is mostly an interpreter or uv starting): ~50 ms less
        # per build; pip check's verdict is reported first, as when they ran one after the other. Beside them,
        # os.sync: the installed files must be on disk before the marker that vouches for them, and flushing
        # (waiting on the disk: 0.1-0.2 s after a fresh host's writes) overlaps the checks' CPU.
        from concurrent.futures import ThreadPoolExecutor     # a build's only threads (facts import this module)

        with ThreadPoolExecutor(max_workers=2) as pool:
            synced = pool.submit(os.sync)
            entry_points = pool.submit(self._check_entry_points, path, python, set(expected), run)
            run([uv, "pip", "check", "--python", python] if uv else [*pip, "check"],
                "uv pip check" if uv else "pip check")     # raising, the pool still waits for the others
        entry_points.result()
        self._check_installed(path, expected, spec.name)
        synced.result()
        marker = {
            "name": spec.name,
            "identity": identity,
            "python": spec.python,
            "interpreter": interpreter,
            "lock_sha256": sha256(lock_bytes).hexdigest(),
            "installer": spec.installer,
            "options": list(spec.options),
            "packages": dict(sorted(expected.items())),
            "built_at": _utc_now(),
        }
        atomic_write(path / MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n", mode=0o644)

    @staticmethod
    def _raise_if_refused(spec: VenvSpec, index: _Index, package: str, detail: str,
                          redact: Callable[[str], str]) -> None:
        """After a failed install: raise IndexAuthFailed if the index refuses the credentials (one request
        of our own, see `_index_refusal`), so the error says so instead of "no matching distribution"."""
        refusal = _index_refusal(index, package)
        if refusal is None:
            return
        ask = "refused the credentials" if index.has_credentials else "asks for credentials and none are configured"
        raise IndexAuthFailed(redact(f"{spec.name}: authentication failed: the package index {index.url} {ask} "
                                     f"(HTTP {refusal})\n{detail}")) from None

    def _installer_home(self) -> Path:
        """The private HOME of pip and uv (their caches live there; no user config is ever read)."""
        home = self.root / INSTALLER_HOME
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return home

    def _check_entry_points(self, path: Path, python: Path, names: set[str], run) -> None:
        """Import every console script of the locked dists inside the venv, without running them."""
        scripts = _console_scripts(path, names)
        result = run([python, "-I", "-c", _LOAD_ENTRY_POINTS, json.dumps(sorted(scripts))], "entry point check")
        try:
            report = json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError) as exc:
            raise BuildError(f"{path.name}: entry point check printed no report: {_tail(result.stderr)}") from exc
        if report["failed"]:
            raise BuildError(f"{path.name}: console scripts fail to load:\n" + "\n".join(report["failed"]))

    def _check_installed(self, path: Path, expected: dict[str, str], name: str) -> None:
        """Installed (name, version) set must be exactly the lock's: nothing missing, nothing extra."""
        actual = {n: v for n, v in _distributions(path).items() if n not in SEEDED or n in expected}
        if actual != expected:
            missing = sorted(f"{n}=={v}" for n, v in expected.items() if actual.get(n) != v)
            extra = sorted(f"{n}=={v}" for n, v in actual.items() if expected.get(n) != v)
            raise BuildError(f"{name}: installed set differs from the lock: missing {missing}, unexpected {extra}")

    # ----- switch, prune, remove -----

    def switch(self, name: str, path: Path) -> None:
        """Point `envs/<name>` at `path` atomically (temp symlink + rename); the target must be complete.

        The link is relative (`../venvs/...`) so it stays right if the whole root is seen through another
        mount path; venvs themselves still may not move. Anything else found at the link's place (a
        directory or file made by hand) is renamed aside first: a directory would make every switch fail,
        and a file would be replaced silently.
        """
        path = _normalized(path)
        if path.parent != self._venvs or not path.name.startswith(f"{name}-"):
            raise BuildError(f"refusing to point env {name!r} at {path}: not one of its venvs under {self._venvs}")
        if not (path / MARKER).is_file():
            raise BuildError(f"refusing to point env {name!r} at incomplete venv {path}")
        link = self.link_for(name)
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.parent / f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        os.symlink(os.path.relpath(path, link.parent), tmp)
        try:
            self._set_aside_foreign(link)
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(link.parent)

    def _set_aside_foreign(self, link: Path) -> None:
        """Rename a non-symlink at `link` to `.<name>.aside-<utc time>` next to it, and say so.

        Kept, not deleted: it may be someone's work. The hidden name is no environment name (those never
        start with '.'), so facts, watches and `remove_all` leave it alone.
        """
        try:
            if stat.S_ISLNK(os.lstat(link).st_mode):
                return
        except FileNotFoundError:
            return
        from datetime import datetime, timezone   # lazy: only a hand-made mess needs a time stamp

        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = link.parent / f".{link.name}.aside-{stamp}"
        while aside.exists() or aside.is_symlink():
            aside = link.parent / f".{link.name}.aside-{stamp}-{os.urandom(2).hex()}"
        kind = "directory" if link.is_dir() else "file"
        os.rename(link, aside)
        fsync_dir(link.parent)
        log.warning("%s was a %s, not the agent's symlink: moved it to %s (kept; delete it when done)",
                    link, kind, aside)

    def prune(self, name: str, keep: int | None = None, protect: Iterable[Path] = ()) -> list[Path]:
        """Delete old venvs of `name`: keep the newest `keep` complete ones, the current one and `protect`.

        Incomplete dirs are deleted unless this manager is building them right now. Returns what went.
        """
        keep = self.retention if keep is None else keep
        spared = {_normalized(p) for p in protect}
        current = self.current(name)
        if current is not None:
            spared.add(current)
        removed: list[Path] = []
        complete_seen = 0
        for info in self.list(name):
            if info.path in spared or info.path in self._building:
                continue
            if info.complete and complete_seen < keep:
                complete_seen += 1
                continue
            self._delete(info.path)
            removed.append(info.path)
        self._empty_trash()
        return removed

    def remove(self, name: str, identity: str) -> Path | None:
        """Delete one venv of `name` (atomically, via the trash), never the current one. Returns the
        path removed, or None if absent."""
        path = self.path_for(name, identity)
        if not path.exists():
            return None
        if self.current(name) == _normalized(path):
            raise BuildError(f"refusing to delete {path}: envs/{name} points at it")
        self._delete(path)
        self._empty_trash()
        return path

    def remove_all(self, name: str) -> list[Path]:
        """Forget an environment that left the repo: its symlink first (no dangling use), then its venvs."""
        removed: list[Path] = []
        link = self.link_for(name)
        if link.is_symlink():
            link.unlink()
            fsync_dir(link.parent)
            removed.append(link)
        for info in self.list(name):
            if info.path not in self._building:
                self._delete(info.path)
                removed.append(info.path)
        for held in self._venvs.glob(f"{_HELD_PREFIX}*"):           # a crashed repair's drifted venv
            env_name, _, identity = held.name[len(_HELD_PREFIX):].rpartition(".")[0].rpartition("-")
            if env_name == name and _IDENTITY.match(identity):
                self._delete(held)
        self._empty_trash()
        return removed

    def _delete(self, path: Path) -> None:
        """Remove a venv dir: rename it aside first (atomic), so a crash mid-delete leaves no half venv
        that still looks complete; then delete the renamed tree."""
        if path.is_symlink() or path.is_file():
            path.unlink()
            return
        if not path.exists():
            return
        trash = path.parent / f"{_TRASH_PREFIX}{path.name}.{os.urandom(4).hex()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _empty_trash(self) -> None:
        """Finish deletes a crash interrupted."""
        for leftover in self._venvs.glob(f"{_TRASH_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
