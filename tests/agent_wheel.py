"""The agent as a user gets it: sdist and wheel built from this checkout, the wheel installed (not
editable) into a fresh venv. Shared by the package and bootstrap tests; one build per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_BUILT: dict[str, tuple[Path, Path]] = {}


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without PYTHONPATH (it would make an installed agent import this checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def build_dists() -> tuple[Path, Path]:
    """(sdist, wheel) of this checkout, built once per session with `python -m build` (the wheel is built
    from the sdist, so a file missing from the sdist is missing from the wheel too)."""
    if "dists" not in _BUILT:
        out = Path(tempfile.mkdtemp(prefix="gitops-agent-dist-"))
        atexit.register(shutil.rmtree, out, True)           # the session's build, removed when it ends
        proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                              capture_output=True, text=True, env=clean_env(), timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"python -m build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        (sdist,), (wheel,) = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
        _BUILT["dists"] = (sdist, wheel)
    return _BUILT["dists"]


def install_into_venv(wheel: Path, venv: Path) -> Path:
    """A fresh venv at `venv` with `wheel` installed from its file (uv when it runs, else pip); its bin dir."""
    uv = shutil.which("uv")
    if uv and subprocess.run([uv, "--version"], capture_output=True).returncode == 0:
        cmds = [[uv, "venv", "-q", "--python", sys.executable, str(venv)],
                [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(wheel)]]
    else:
        cmds = [[sys.executable, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)]]
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return venv / "bin"
