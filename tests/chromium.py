"""Load a page in real headless Chromium (Debian's `chromium`): the DOM after its scripts ran, or a screenshot.

Every call is one short-lived browser with its own profile dir (removed after), no background network,
no component updates: nothing but the page under test is fetched. Skips the test when chromium is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

__all__ = ["chromium", "dump_dom", "screenshot"]

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian package `chromium`)")
    return exe


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def dump_dom(url: str, *extra: str) -> str:
    """The serialized DOM after the page loaded and its (deferred) scripts ran."""
    proc = _run(*extra, "--dump-dom", url)
    assert proc.returncode == 0 and "<html" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    return proc.stdout


def screenshot(url: str, path: Path, width: int = 412, height: int = 915) -> Path:
    """A PNG of the page at a `width`x`height` window (default: a phone's CSS viewport)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = _run(f"--window-size={width},{height}", f"--screenshot={path}", url)
    assert proc.returncode == 0 and path.exists(), (proc.returncode, proc.stderr[-2000:])
    return path
