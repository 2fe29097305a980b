"""Venvs from a private index with credentials (DESIGN §3a), with pip and with uv, against a real pypiserver.

What must hold: a hashed lock of a wheel that only the private index has builds with the right
credentials; wrong or missing ones fail with an error that says the index refused them and names the
index URL, and nothing is switched or left half built; and the password is nowhere but in the
installer's environment: not in an exception, a log record, a file anyone but the agent may read, or the
installer's argv as the kernel shows it (/proc/<pid>/cmdline).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from agent.core.errors import BuildError, Permanent
from agent.core.lockfile import venv_identity
from agent.drivers import venv as venv_mod
from agent.drivers.venv import IndexAuthFailed, InvalidIndexUrl, VenvManager, VenvSpec, find_uv

try:  # tests/ on sys.path (conftest, or pytest's rootdir-less import mode)
    import wheelfactory
    from pypi_server import NASTY_PASSWORD_CHARS, PypiServer, pypi_server  # the fixture
except ImportError:  # pragma: no cover - tests/ made a package
    from tests import wheelfactory
    from tests.pypi_server import NASTY_PASSWORD_CHARS, PypiServer, pypi_server  # noqa: F401 - the fixture

UV = find_uv()
PY = "%d.%d" % sys.version_info[:2]
pytestmark = pytest.mark.timeout(600)   # two pip venvs in one test: `python -m venv` alone took 17 s under load
INSTALLERS = [pytest.param("pip"),
              pytest.param("uv", marks=pytest.mark.skipif(UV is None, reason="uv binary not found"))]


# ----- helpers -----

@pytest.fixture(scope="module")
def published(pypi_server: PypiServer) -> dict[str, str]:
    """Wheels only the private index serves: lock line per (name, version)."""
    lines = {}
    for version in ("1.0", "2.0"):
        wheel = wheelfactory.make_wheel(pypi_server.packages, "privpkg", version,
                                        {"privpkg": f"VERSION = {version!r}\n"})
        lines[version] = wheelfactory.lock_line(wheel)
    return lines


def _spec(root: Path, index: PypiServer, installer: str, lock_line: str, *, username: str | None,
          password: str | None, name: str = "web") -> VenvSpec:
    """A spec as the executor hands it over: no find-links, no --no-index, so the index is the only source."""
    lock = root.parent / "state" / f"{name}-{installer}-{hashlib.sha256(lock_line.encode()).hexdigest()[:8]}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(lock_line + "\n")
    return VenvSpec(name=name, python=PY, lockfile=lock, find_links=(), installer=installer, options=(),
                    identity=venv_identity(PY, lock.read_bytes(), installer, ()),
                    index_url=index.url, index_username=username, index_password=password)


def _forms(password: str) -> set[str]:
    """The password as typed and as it may appear inside a URL or a form."""
    return {password, quote(password, safe=""), quote(password), quote_plus(password)}


def _proc(pid: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of a running process, as /proc shows them."""
    deadline = time.monotonic() + 10
    while True:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return [], {}
        if raw or state == "Z" or time.monotonic() > deadline:
            env = dict(item.decode("utf-8", "replace").partition("=")[::2] for item in environ.split(b"\0") if item)
            return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a], env
        time.sleep(0.001)


class ArgvSpy:
    """Every child the driver starts, as the kernel shows it: /proc/<pid>/cmdline (and environ) read just
    after exec.

    subprocess.run looks Popen up in the subprocess module at call time, so patching it there sees each
    child; the read happens before `run` waits, while pip/uv are still busy with the network. Some
    kernels show an empty cmdline for a moment right after exec: read again until it is there (or the
    child is a zombie, whose cmdline stays empty)."""

    def __init__(self) -> None:
        self.cmdlines: list[list[str]] = []
        self.environs: list[dict[str, str]] = []
        spy = self

        class Popen(subprocess.Popen):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                argv, env = _proc(self.pid)
                spy.cmdlines.append(argv)
                spy.environs.append(env)

        self.popen = Popen

    def installs(self) -> list[list[str]]:
        return [c for c in self.cmdlines if "install" in c]


@pytest.fixture
def argv_spy(monkeypatch: pytest.MonkeyPatch) -> ArgvSpy:
    spy = ArgvSpy()
    monkeypatch.setattr(subprocess, "Popen", spy.popen)
    return spy


def _readable_files_with(root: Path, needles: set[str]) -> list[str]:
    """Files under `root` that someone besides the owner may read (any group/other bit) holding a needle."""
    hits = []
    encoded = {n.encode() for n in needles}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077:
                continue
            data = path.read_bytes()
            hits += [f"{path} (mode {stat.S_IMODE(st.st_mode):o})" for n in encoded if n in data]
    return hits


def _assert_nowhere(password: str, root: Path, spy: ArgvSpy, caplog: pytest.LogCaptureFixture,
                    exc: BaseException | None = None) -> None:
    forms = _forms(password)
    installs = spy.installs()
    assert installs and all(installs), f"no installer argv seen: {spy.cmdlines}"
    for argv in spy.cmdlines:
        assert not any(form in arg for form in forms for arg in argv), argv
    logged = caplog.text + "".join(
        (r.getMessage() + (r.exc_text or "")) for r in caplog.records)
    assert not any(form in logged for form in forms)
    if exc is not None:
        text = "".join(traceback.format_exception(exc)) + repr(exc)
        assert not any(form in text for form in forms), text
    assert _readable_files_with(root, forms) == []


# ----- builds -----

@pytest.mark.parametrize("installer", INSTALLERS)
@pytest.mark.parametrize("user", ["deploy", "reader"])   # deploy's password is all %@:/" and spaces
def test_builds_from_the_private_index(tmp_path, pypi_server, published, installer, user, argv_spy, caplog):
    caplog.set_level(logging.DEBUG)
    password = pypi_server.users[user]
    root = tmp_path / "root"
    mgr = VenvManager(root)
    spec = _spec(root, pypi_server, installer, published["1.0"], username=user, password=password)

    path = mgr.build(spec)
    mgr.switch("web", path)

    assert mgr.installed(path) == {"privpkg": "1.0"}
    out = subprocess.run([path / "bin" / "python", "-I", "-c", "import privpkg; print(privpkg.VERSION)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1.0"
    assert password not in repr(spec)
    _assert_nowhere(password, root, argv_spy, caplog)
    # The credentials went through the install step's environment, and to no other child.
    with_password = [argv for argv, env in zip(argv_spy.cmdlines, argv_spy.environs)
                     if any(form in value for form in _forms(password) for value in env.values())]
    assert with_password == argv_spy.installs()


@pytest.mark.parametrize("installer", INSTALLERS)
def test_wrong_password_fails_clearly_and_changes_nothing(tmp_path, pypi_server, published, installer,
                                                          argv_spy, caplog):
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "root"
    mgr = VenvManager(root)
    good = mgr.build(_spec(root, pypi_server, installer, published["1.0"], username="deploy",
                           password=pypi_server.password))
    mgr.switch("web", good)
    wrong = f"wrong{NASTY_PASSWORD_CHARS}{os.urandom(4).hex()}"
    spec = _spec(root, pypi_server, installer, published["2.0"], username="deploy", password=wrong)

    with pytest.raises(IndexAuthFailed) as caught:
        mgr.build(spec)

    message = str(caught.value)
    assert isinstance(caught.value, BuildError) and isinstance(caught.value, Permanent)
    assert "authentication failed" in message and "refused the credentials" in message
    assert "HTTP 403" in message                       # pypiserver's answer to a wrong password
    assert pypi_server.url in message
    assert not re.search(r"://[^/\s]*deploy", message), message   # no userinfo, not even the user name
    assert mgr.current("web") == good                  # still the old venv
    assert [info.path for info in mgr.list("web")] == [good]       # nothing half built left
    assert not mgr.path_for("web", spec.identity).exists()
    _assert_nowhere(wrong, root, argv_spy, caplog, caught.value)
    _assert_nowhere(pypi_server.password, root, argv_spy, caplog, caught.value)


@pytest.mark.parametrize("installer", INSTALLERS)
def test_missing_credentials_say_so(tmp_path, pypi_server, published, installer):
    root = tmp_path / "root"
    mgr = VenvManager(root)
    with pytest.raises(IndexAuthFailed, match=r"asks for credentials and none are configured \(HTTP 401"):
        mgr.build(_spec(root, pypi_server, installer, published["1.0"], username=None, password=None))
    assert mgr.list("web") == [] and mgr.current("web") is None


def test_other_failures_are_no_auth_failure(tmp_path, pypi_server):
    """A lock the index cannot satisfy (accepted credentials) stays a plain BuildError. The check after a
    failure is the driver's own, the same for both installers: uv builds faster."""
    root = tmp_path / "root"
    spec = _spec(root, pypi_server, "uv" if UV else "pip", "nosuchpkg==1.0 --hash=sha256:" + "0" * 64, username="reader",
                 password=pypi_server.users["reader"])
    with pytest.raises(BuildError) as caught:
        VenvManager(root).build(spec)
    assert not isinstance(caught.value, IndexAuthFailed)
    assert "nosuchpkg" in str(caught.value)


# ----- checks without an installer -----

@pytest.mark.parametrize("url", ["https://deploy:s3cret@pypi.example/simple", "https://s3cret@pypi.example/simple"])
def test_credentials_in_the_url_are_refused_without_showing_them(tmp_path, url):
    lock = tmp_path / "x.lock"
    lock.write_text("privpkg==1.0 --hash=sha256:" + "0" * 64 + "\n")
    spec = VenvSpec(name="web", python=PY, lockfile=lock, find_links=(), index_url=url)
    with pytest.raises(InvalidIndexUrl) as caught:
        VenvManager(tmp_path / "root").build(spec)
    assert "s3cret" not in str(caught.value) and "://***@pypi.example" in str(caught.value)
    assert not (tmp_path / "root" / "venvs").exists() or not any((tmp_path / "root" / "venvs").iterdir())


@pytest.mark.parametrize("url", ["ftp://pypi.example/simple", "pypi.example/simple", "https:///simple",
                                 "https://pypi.example/sim ple", "https://pypi.example:99999/simple"])
def test_index_url_must_be_http_with_a_host(tmp_path, url):
    lock = tmp_path / "x.lock"
    lock.write_text("privpkg==1.0 --hash=sha256:" + "0" * 64 + "\n")
    with pytest.raises(InvalidIndexUrl):
        VenvManager(tmp_path / "root").build(VenvSpec("web", PY, lock, (), index_url=url))


def test_redaction_covers_raw_encoded_and_userinfo():
    password = 'p%@:/" x y'
    spec = VenvSpec("web", PY, Path("x.lock"), (), index_url="https://i.example/simple",
                    index_username="deploy", index_password=password)
    redact = venv_mod._redactor(spec)
    text = (f"raw {password} | {quote(password, safe='')} | {quote_plus(password)} | "
            f"https://deploy:****@i.example/simple | http://someone@other.example/x")
    out = redact(text)
    assert not any(form in out for form in _forms(password)), out
    assert "https://***@i.example/simple" in out and "http://***@other.example/x" in out
    assert "deploy" not in out
    assert password not in repr(spec) and "index_password" not in repr(spec)


def test_credentials_reach_only_the_install_step_environment():
    index = venv_mod._Index("http://127.0.0.1:1/simple/", "de ploy", 'p%@:/" x')
    pip = index.install_env("pip")
    assert pip == {"GITOPS_AGENT_INDEX_URL": "http://de%20ploy:p%25%40%3A%2F%22%20x@127.0.0.1:1/simple/"}
    assert index.install_env("uv") == {"UV_DEFAULT_INDEX": "gitops-agent=http://127.0.0.1:1/simple/",
                                       "UV_INDEX_GITOPS_AGENT_USERNAME": "de ploy",
                                       "UV_INDEX_GITOPS_AGENT_PASSWORD": 'p%@:/" x'}
