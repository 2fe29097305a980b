"""Files the agent reads at run time that are not Python modules: the JSON Schemas and the deploy assets.

They ship inside the wheel as the packages `agent.schemas` and `agent.deploy` (pyproject.toml maps the
checkout's `schemas/` and `deploy/` onto them), so an installed agent never reads the source tree. A
checkout on `sys.path` without an install that maps them (PYTHONPATH=checkout) falls back to the
checkout's own directories, which are the same files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["asset_text", "AssetMissing"]

_CHECKOUT = Path(__file__).resolve().parent.parent
_DIRS = {"agent.schemas": "schemas", "agent.deploy": "deploy"}


class AssetMissing(FileNotFoundError):
    """A packaged file is not there: a broken install (a wheel built without its package data)."""


def asset_text(package: str, relative: str) -> str:
    """The text of `relative` (a '/'-separated path) in `package` ("agent.schemas" or "agent.deploy")."""
    try:
        node = resources.files(package)
        for part in relative.split("/"):     # one part at a time: a namespace package's path takes one
            node = node.joinpath(part)
        if node.is_file():
            return node.read_text(encoding="utf-8")
    except ModuleNotFoundError:
        pass
    fallback = _CHECKOUT / _DIRS[package] / relative
    if fallback.is_file():
        return fallback.read_text(encoding="utf-8")
    raise AssetMissing(f"{relative} is missing from {package}: reinstall gitops-agent")
