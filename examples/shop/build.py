#!/usr/bin/env python3
"""Build the shop wheel of one release, reproducibly: the same tree and version give the same bytes.

The tree is copied to a scratch directory, `src/shop/_version.py` is rewritten there with the
release's version (the checked-in file keeps the example's version), and `python -m build --wheel`
makes the wheel with the exact setuptools pinned in pyproject.toml. SOURCE_DATE_EPOCH fixes the zip
timestamps and the copy's modes are normalised, so the sha256 is stable (a hashed lock can name it).
The build is isolated from the machine's pip configuration (no pip.conf, no PIP_* find-links or
indexes): setuptools comes from PyPI (or pip's cache).

Usage:  build.py --version 1.1.0 --out DIR     prints "<sha256>  <path>" (sha256sum's format)
As a module:  build_wheel("1.1.0", Path(DIR)) -> Path
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["BuildError", "build_wheel", "sha256_of", "HERE", "SOURCE_DATE_EPOCH"]

HERE = Path(__file__).resolve().parent
SOURCE_DATE_EPOCH = "1704067200"  # 2024-01-01T00:00:00Z
_VERSION = re.compile(r"^\d+(\.\d+){1,3}([ab]\d+|rc\d+)?(\.post\d+)?(\.dev\d+)?$")  # plain PEP 440 releases
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
# No PIP_*/UV_* setting is inherited (find-links, extra indexes or constraints could add or replace
# where setuptools comes from), except these, which only say how to reach the index.
_DROPPED_PREFIXES = ("PIP_", "UV_")
_KEPT = frozenset({"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_TIMEOUT", "PIP_RETRIES"})


class BuildError(RuntimeError):
    """The build failed; the message carries the build's output."""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _KEPT or not k.startswith(_DROPPED_PREFIXES)}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PIP_PROGRESS_BAR="off", SOURCE_DATE_EPOCH=os.environ.get("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH),
               PYTHONDONTWRITEBYTECODE="1")
    return env


def _normalise_modes(root: Path) -> None:
    """u=rwX,go=rX everywhere: the wheel records modes, and checkouts differ in umask."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def build_wheel(version: str, out_dir: Path, python: str | None = None) -> Path:
    """Build shop `version` into `out_dir` (created) and return the wheel's path."""
    if not _VERSION.match(version):
        raise ValueError(f"version {version!r} is not a plain release version such as 1.1.0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shop-build-") as scratch:
        work = Path(scratch) / "shop"
        work.mkdir()
        shutil.copy2(HERE / "pyproject.toml", work / "pyproject.toml")
        shutil.copytree(HERE / "src", work / "src", ignore=_IGNORED)
        release = work / "src/shop/_version.py"
        text, n = re.subn(r'(?m)^__version__ = ".*"$', f'__version__ = "{version}"', release.read_text())
        if n != 1:
            raise BuildError(f"{release}: no single __version__ line to rewrite")
        release.write_text(text)
        _normalise_modes(work)
        dist = Path(scratch) / "dist"
        # cwd is the scratch dir: `python -m build` run from here would import this file as `build`
        proc = subprocess.run([python or sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(work)],
                              cwd=scratch, env=_build_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise BuildError(f"building shop {version} failed (exit {proc.returncode}):\n{proc.stdout}")
        built = sorted(dist.glob("*.whl"))
        expected = f"shop-{version}-py3-none-any.whl"
        if [p.name for p in built] != [expected]:
            raise BuildError(f"expected {expected}, the build made {[p.name for p in built]}")
        target = out_dir / expected
        shutil.move(str(built[0]), target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", required=True, help="the release version, e.g. 1.1.0")
    parser.add_argument("--out", required=True, type=Path, help="directory for the wheel (created)")
    parser.add_argument("--python", default=None, help="interpreter that runs the build (default: this one)")
    args = parser.parse_args(argv)
    try:
        wheel = build_wheel(args.version, args.out, args.python)
    except (ValueError, BuildError) as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 1
    print(f"{sha256_of(wheel)}  {wheel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
