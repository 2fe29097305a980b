"""Step one of loading: the only module that touches files.

It reads fleet.yaml, every apps/*/app.yaml (YAML -> data with the line of every key) and every lockfile,
find_links directory, secret, template and source file those documents name, in their base form or through an override, with each
path checked to stay inside the checkout boundary (symlinks resolved). What it cannot read becomes a
problem, never an exception; the validate step then works on this snapshot alone.
"""

from __future__ import annotations

import os
from dataclasses import field
from pathlib import Path
from typing import Any, Iterator

from agent.core._record import record
from agent.core.errors import InvalidState, Problem
from agent.core.load._yaml import Located, parse
from agent.core.load.options import APP_FILE, APPS_DIR, FLEET_FILE, MAX_APPS, LoadOptions
from agent.core.load.overrides import split_path
from agent.core.load.problems import Collector

__all__ = ["Ref", "RawTree", "read_tree", "rel_to"]

LOCKFILE, DIRECTORY = "lockfile", "find_links"
SECRET, TEMPLATE, SOURCE = "secret", "template", "source"
MAX_FILE_BYTES = 1024 * 1024      # a secret, template or source file: config, not data
_WHAT = {LOCKFILE: "lockfile", SECRET: "secret file", TEMPLATE: "template", SOURCE: "source file"}


@record
class Ref:
    """A path named in a document, as found on disk: resolved inside the boundary, or why not."""

    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)     # a file's bytes (lockfile, secret, template...)
    display: str = ""                    # the path relative to the state dir, for problems inside the file
    problem: str | None = None


@record
class RawTree:
    """Everything the validate step needs, read once: documents, referenced files, read problems."""

    root: Path
    fleet: Located | None
    apps: tuple[Located, ...]
    refs: dict[tuple[str, str, str], Ref] = field(default_factory=dict, hash=False)
    problems: tuple[Problem, ...] = ()

    def lockfile(self, doc: Located, rel: str) -> Ref:
        return self.refs[(doc.file, LOCKFILE, rel)]

    def directory(self, doc: Located, rel: str) -> Ref:
        return self.refs[(doc.file, DIRECTORY, rel)]

    def file(self, doc: Located, kind: str, rel: str) -> Ref:
        """A secret, template or source file the document names."""
        return self.refs[(doc.file, kind, rel)]


def rel_to(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def inside(root: Path, base: Path, rel: str) -> Path | None:
    """Resolve `rel` against `base`; None if it is absolute or escapes `root` (symlinks included)."""
    if os.path.isabs(rel) or "\\" in rel:
        return None
    target = (base / rel).resolve()
    real_root = root.resolve()
    if target != real_root and real_root not in target.parents:
        return None
    return target


def read_tree(root: Path, opts: LoadOptions) -> RawTree:
    root = Path(root)
    out = Collector()
    fleet = _read_fleet(root, out)
    apps = _read_apps(root, out)
    refs: dict[tuple[str, str, str], Ref] = {}
    boundary = opts.boundary or root
    for doc in apps:
        app_dir = (root / doc.file).parent
        for kind, rel in _named_paths(doc):
            key = (doc.file, kind, rel)
            if key not in refs:
                refs[key] = _ref(kind, rel, boundary, app_dir, root)
    return RawTree(root, fleet, tuple(apps), refs, tuple(out.problems))


def _read_fleet(root: Path, out: Collector) -> Located | None:
    path = root / FLEET_FILE
    if path.is_symlink() and inside(root, root, FLEET_FILE) is None:
        out.file(FLEET_FILE, "is a symlink that points outside the state repo")
        return None
    if not path.is_file():
        has_apps = any((root / APPS_DIR).glob(f"*/{APP_FILE}")) if (root / APPS_DIR).is_dir() else False
        hint = "" if has_apps else f" (and there is no {APPS_DIR}/*/{APP_FILE} either: is this the state repo's root?)"
        out.file(FLEET_FILE, f"missing: a state repo needs a {FLEET_FILE} at its root{hint}")
        return None
    return _parse(path, FLEET_FILE, out)


def _read_apps(root: Path, out: Collector) -> list[Located]:
    apps_dir = root / APPS_DIR
    if not apps_dir.is_dir():
        return []
    app_files = sorted(apps_dir.glob(f"*/{APP_FILE}"))
    for lookalike in sorted(set(apps_dir.glob("*/app.yml")) | set(apps_dir.glob("*/[Aa][Pp][Pp].[Yy][Aa][Mm][Ll]"))):
        if not (lookalike.parent / APP_FILE).is_file():
            out.file(rel_to(lookalike, root), f"is not read: an app is defined by {APPS_DIR}/<app>/{APP_FILE} "
                                              f"(rename it to {APP_FILE})")
    if len(app_files) > MAX_APPS:
        out.file(APPS_DIR, f"more than {MAX_APPS} apps")
        app_files = app_files[:MAX_APPS]
    docs = []
    for path in app_files:
        rel = rel_to(path, root)
        if inside(root, root, rel) is None:
            out.file(rel, "is a symlink that points outside the state repo")
            continue
        doc = _parse(path, rel, out)
        if doc is not None:
            docs.append(doc)
    return docs


def _parse(path: Path, rel: str, out: Collector) -> Located | None:
    try:
        text = path.read_bytes()
    except OSError as exc:
        out.file(rel, f"cannot be read: {exc.strerror or exc}")
        return None
    try:
        return parse(text, rel)
    except InvalidState as exc:
        out.extend(exc.problems)
        return None


def _ref(kind: str, rel: str, boundary: Path, app_dir: Path, root: Path) -> Ref:
    resolved = inside(boundary, app_dir, rel)
    if resolved is None:
        return Ref(problem=f"{rel!r} is absolute or escapes the state repo")
    display = rel_to(resolved, root.resolve())
    if kind == DIRECTORY:
        if not resolved.is_dir():
            return Ref(problem=f"find_links directory {rel!r} does not exist")
        return Ref(resolved, display=display)
    what = _WHAT[kind]
    if not resolved.is_file():
        return Ref(problem=f"{what} {rel!r} does not exist")
    try:
        if kind != LOCKFILE and resolved.stat().st_size > MAX_FILE_BYTES:
            return Ref(problem=f"{what} {rel!r} is larger than {MAX_FILE_BYTES // 1024} KiB")
        return Ref(resolved, resolved.read_bytes(), display)
    except OSError as exc:
        return Ref(problem=f"{what} {rel!r} cannot be read: {exc.strerror or exc}")


def _named_paths(doc: Located) -> Iterator[tuple[str, str]]:
    """Every lockfile and find_links path the document names, in its base and in every override.

    The document is not schema-checked yet: anything of the wrong shape is passed over here (the
    schema reports it), never assumed.
    """
    data = doc.data if isinstance(doc.data, dict) else {}
    yield from _env_paths(data.get("environments"))
    yield from _app_file_paths(data)
    overrides = data.get("overrides")
    for entry in overrides if isinstance(overrides, list) else []:
        sets = entry.get("set") if isinstance(entry, dict) else None
        for path, value in sets.items() if isinstance(sets, dict) else ():
            if not isinstance(path, str) or not path:
                continue
            parts = split_path(data, path)
            nested: Any = value
            for part in reversed(parts):
                nested = {part: nested}
            yield from _env_paths(nested.get("environments"))
            yield from _app_file_paths(nested)


def _app_file_paths(data: dict) -> Iterator[tuple[str, str]]:
    """Secrets, templates and sources (their base form, or as an override sets them)."""
    secrets = data.get("secrets")
    for rel in secrets.values() if isinstance(secrets, dict) else ():
        if isinstance(rel, str):
            yield SECRET, rel
    files = data.get("files")
    for spec in files.values() if isinstance(files, dict) else ():
        for kind in (TEMPLATE, SOURCE):
            if isinstance(spec, dict) and isinstance(spec.get(kind), str):
                yield kind, spec[kind]


def _env_paths(envs: Any) -> Iterator[tuple[str, str]]:
    for spec in envs.values() if isinstance(envs, dict) else ():
        if not isinstance(spec, dict):
            continue
        if isinstance(spec.get("lockfile"), str):
            yield LOCKFILE, spec["lockfile"]
        links = spec.get("find_links")
        for link in links.values() if isinstance(links, dict) else links if isinstance(links, list) else ():
            if isinstance(link, str):
                yield DIRECTORY, link
