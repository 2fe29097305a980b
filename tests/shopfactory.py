"""The example shop (examples/shop, desired-state-example/apps/shop) for tests: releases, locks, secrets.

Why: tests of secrets, files, jobs, depends_on and processes want a real Django app to deploy, and a
second release of it to roll out (a migration to run, a version to see change). This module builds the
shop wheel at any version with the real build (examples/shop/build.py: setuptools, reproducible), writes
a hashed lock for it that reuses main.lock's pins for django, gunicorn and their dependencies, makes
age keys and age-encrypted dotenv files with the stock `age` CLI, and renders the app's templates and
resolves its `env` values the way DESIGN §3a describes, so a test can run the shop's commands by hand.

Builds take a few seconds (an isolated setuptools build), so each version is built once per test
session and copied from then on; the bytes are the same either way.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import yaml
from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

__all__ = [
    "REPO_ROOT", "SHOP_SRC", "SHOP_APP", "DEMO_IDENTITY", "MAIN_LOCK",
    "build_shop_wheel", "sha256_of", "lock_blocks", "shop_lock_text", "write_shop_lock",
    "new_identity", "recipient_of", "dotenv_text", "encrypt_dotenv", "decrypt_dotenv",
    "render_template", "template_context", "resolve_env", "load_app", "uv_env", "build_venv",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
SHOP_SRC = REPO_ROOT / "examples" / "shop"
SHOP_APP = REPO_ROOT / "desired-state-example" / "apps" / "shop"
MAIN_LOCK = SHOP_APP / "main.lock"
DEMO_IDENTITY = REPO_ROOT / "desired-state-example" / "keys" / "demo-host.agekey"

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_built: dict[str, Path] = {}
_cache_dir: Path | None = None


def _load_build_module():
    spec = importlib.util.spec_from_file_location("shop_build", SHOP_SRC / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_shop_wheel(version: str, dest_dir: Path) -> Path:
    """`<dest_dir>/shop-<version>-py3-none-any.whl`, built from examples/shop (once per session)."""
    global _cache_dir
    if version not in _built:
        if _cache_dir is None:
            _cache_dir = Path(tempfile.mkdtemp(prefix="shopfactory-"))
            atexit.register(shutil.rmtree, _cache_dir, True)
        _built[version] = _load_build_module().build_wheel(version, _cache_dir / version)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / _built[version].name
    shutil.copyfile(_built[version], target)
    return target


# --- locks -------------------------------------------------------------------------------------------

def lock_blocks(text: str) -> dict[str, str]:
    """A hashed lock's entries by canonical name: each the requirement line, its `--hash` continuation
    lines and its `# via` comments, as written. Header comments are dropped."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name = canonicalize_name(Requirement(line.rstrip(" \\")).name)
            current = blocks.setdefault(name, [])
        if current is not None:
            current.append(line)
    return {name: "\n".join(lines) + "\n" for name, lines in blocks.items()}


def shop_lock_text(wheel: Path, base: Path = MAIN_LOCK) -> str:
    """main.lock with its shop entry replaced by `wheel`'s version and sha256 (django, gunicorn and
    their dependencies stay exactly as pinned there)."""
    match = re.fullmatch(r"shop-(.+)-py3-none-any\.whl", Path(wheel).name)
    if not match:
        raise ValueError(f"{wheel}: not a shop wheel file name")
    blocks = lock_blocks(base.read_text())
    if "shop" not in blocks:
        raise ValueError(f"{base}: no shop entry to replace")
    blocks["shop"] = f"shop=={match.group(1)} \\\n    --hash=sha256:{sha256_of(wheel)}\n"
    header = "# shop lock written by tests/shopfactory.py from desired-state-example/apps/shop/main.lock\n"
    return header + "".join(blocks[name] for name in sorted(blocks))


def write_shop_lock(path: Path, wheel: Path, base: Path = MAIN_LOCK) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(shop_lock_text(wheel, base))
    return path


# --- age secrets -------------------------------------------------------------------------------------

def new_identity(key_dir: Path, name: str = "host") -> Path:
    """A fresh age identity `<key_dir>/<name>.agekey` (mode 0600, made by age-keygen)."""
    key_dir = Path(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True)
    path = key_dir / f"{name}.agekey"
    if path.exists():
        raise FileExistsError(f"{path} exists: pick another name")
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    path.chmod(0o600)
    return path


def recipient_of(identity: Path) -> str:
    return subprocess.run(["age-keygen", "-y", str(identity)], check=True, capture_output=True,
                          text=True).stdout.strip()


def dotenv_text(values: Mapping[str, str]) -> str:
    """`KEY=value` lines, each value literal to the end of its line (so no line breaks in values)."""
    lines = []
    for key, value in values.items():
        if not _KEY.match(key):
            raise ValueError(f"bad dotenv key {key!r}")
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"the value of {key} holds a line break or NUL: a dotenv line cannot")
        lines.append(f"{key}={value}\n")
    return "".join(lines)


def encrypt_dotenv(values: Mapping[str, str], dest: Path, key_dir: Path | None = None, *,
                   identity: Path | None = None, recipients: Iterable[str] = ()) -> Path:
    """Write `dest` (armored age) holding `values` as a dotenv; return the identity that decrypts it.

    A fresh identity is made in `key_dir` unless `identity` is given; `recipients` are added too. The
    plaintext goes to age on stdin: it is never written to disk nor put on a command line."""
    if identity is None:
        if key_dir is None:
            raise ValueError("give key_dir (for a fresh identity) or identity")
        identity = new_identity(key_dir, Path(dest).name.replace(".", "-"))
    argv = ["age", "-a", "-r", recipient_of(identity)]
    for recipient in recipients:
        argv += ["-r", recipient]
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*argv, "-o", str(dest)], input=dotenv_text(values).encode(), check=True, capture_output=True)
    return Path(identity)


def decrypt_dotenv(path: Path, identity: Path = DEMO_IDENTITY) -> dict[str, str]:
    """The KEY=value pairs of an age-encrypted dotenv (value: everything after the first '=')."""
    plain = subprocess.run(["age", "-d", "-i", str(identity), str(path)], check=True, capture_output=True).stdout
    values = {}
    for line in plain.decode().splitlines():
        if line:
            key, sep, value = line.partition("=")
            if not sep or not _KEY.match(key):
                raise ValueError(f"{path}: a line is not KEY=value")
            values[key] = value
    return values


# --- templates and env, as DESIGN §3a describes them -------------------------------------------------

def template_context(*, host: str = "localhost", groups: Iterable[str] = ("web",), labels: Mapping | None = None,
                     app: str = "shop", data_dir: Path, ports: Mapping[str, int] | None = None,
                     secrets: Mapping[str, Mapping[str, str]] | None = None) -> dict:
    return {
        "host": {"name": host, "groups": list(groups), "labels": dict(labels or {})},
        "app": {"name": app, "data_dir": str(data_dir)},
        "services": {name: {"port": port} for name, port in (ports or {}).items()},
        "secrets": {name: dict(values) for name, values in (secrets or {}).items()},
    }


def render_template(path: Path, context: Mapping) -> str:
    """Render a template of the app dir in Jinja2's immutable sandbox, undefined names being errors."""
    path = Path(path)
    env = ImmutableSandboxedEnvironment(loader=FileSystemLoader(str(path.parent)), undefined=StrictUndefined,
                                        keep_trailing_newline=True, autoescape=False)
    return env.get_template(path.name).render(**context)


def resolve_env(spec: Mapping, *, files: Mapping[str, Path], data_dir: Path,
                secrets: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """An app.yaml `env` mapping to plain strings: {file: NAME} -> that rendered file's path,
    {data_dir: true} -> the data dir, {secret: NAME/KEY} -> the value, a string as is."""
    env = {}
    for key, value in spec.items():
        if isinstance(value, str):
            env[key] = value
        elif isinstance(value, dict) and "file" in value:
            env[key] = str(files[value["file"]])
        elif isinstance(value, dict) and value.get("data_dir") is True:
            env[key] = str(data_dir)
        elif isinstance(value, dict) and "secret" in value:
            name, _, secret_key = value["secret"].partition("/")
            env[key] = secrets[name][secret_key]
        else:
            raise ValueError(f"env {key}: unknown value form")
    return env


def load_app(app_dir: Path = SHOP_APP) -> dict:
    return yaml.safe_load((Path(app_dir) / "app.yaml").read_text())


# --- venvs -------------------------------------------------------------------------------------------

def uv_env() -> dict[str, str]:
    """The environment for uv: no inherited UV_*/PIP_* setting and no uv.toml (like the agent's driver)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_"))}
    env.update(UV_NO_CONFIG="1", UV_NO_PROGRESS="1", UV_PYTHON_DOWNLOADS="never")
    return env


def build_venv(dest: Path, lock: Path, find_links: Path, python: str | None = None) -> Path:
    """A venv at `dest` with exactly `lock` installed (hashes required; the shop wheel from `find_links`,
    the rest from PyPI or uv's cache). Returns its bin dir."""
    python = python or shutil.which("python3.11") or sys.executable
    env = uv_env()
    subprocess.run(["uv", "venv", "--quiet", "--python", python, str(dest)], check=True, env=env,
                   capture_output=True)
    proc = subprocess.run(["uv", "pip", "install", "--quiet", "--python", str(Path(dest) / "bin" / "python"),
                           "--require-hashes", "--find-links", str(find_links), "-r", str(lock)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"uv pip install -r {lock} failed (exit {proc.returncode}):\n{proc.stderr}")
    return Path(dest) / "bin"
