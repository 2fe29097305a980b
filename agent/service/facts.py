"""Gather a host's facts (`agent.core.facts`): asks the venv manager and supervisord, once each, and
reads the program include dir. Nothing here decides anything.

Which programs are the agent's: those whose file is in its include dir, and (once that file is gone)
those whose running config logs into its logs dir, as every program it writes does. A shared
supervisord runs others too -- the agent itself among them (deploy/supervisor/) -- and reports
their unapplied edits in the same `reloadConfig` answer; those are not facts about the agent's host
state, and a program listed here that is not wished for gets removed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from agent.core.facts import DOWN_STATES, Facts, ProgramFact, VenvFact
from agent.drivers.supervisor import daemonized

__all__ = ["collect", "read_verified", "owned_pending", "app_file_facts"]


def read_verified(directory: Path) -> dict[str, str]:
    """name -> "digest pid": the program config that last passed its health gate, and the process that
    passed it (older agents wrote the digest alone). os.scandir and open: pathlib's per-file objects were
    half the cost of reading 10 of these on every reconcile."""
    out = {}
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if not e.name.startswith(".")]
        for name in names:
            with open(os.path.join(directory, name)) as fh:
                out[name] = fh.read().strip()
    except FileNotFoundError:
        return {}
    return out



class _Venvs(Protocol):
    def list(self, name: str | None = None) -> list: ...
    def current(self, name: str) -> Path | None: ...
    def installed(self, path: Path) -> dict[str, str]: ...


def _venv_facts(venvs: _Venvs, envs_dir: Path) -> dict[str, VenvFact]:
    infos = venvs.list(None)
    by_name: dict[str, list] = {}
    for info in infos:      # newest first, as listed
        by_name.setdefault(info.name, []).append(info)
    names = set(by_name)
    try:
        with os.scandir(envs_dir) as entries:      # the d_type tells a symlink: no lstat per entry
            names |= {e.name for e in entries if e.is_symlink() and not e.name.startswith(".")}
    except (FileNotFoundError, NotADirectoryError):
        pass
    out = {}
    for name in sorted(names):
        mine = by_name.get(name, [])
        current = venvs.current(name)
        cur_info = next((i for i in mine if current is not None and i.path == current), None)
        installed = None
        if cur_info is not None and cur_info.complete:
            installed = tuple(sorted(venvs.installed(cur_info.path).items()))
        out[name] = VenvFact(
            name=name,
            current=cur_info.identity if cur_info else (current.name if current else None),
            complete=tuple(i.identity for i in mine if i.complete),
            incomplete=tuple(i.identity for i in mine if not i.complete),
            installed=installed,
        )
    return out


def owned_pending(pending: dict[str, str], program_files: dict[str, str], info: dict[str, dict],
                  logs_dir: Path) -> dict[str, str]:
    """The part of reloadConfig's pending changes that concerns programs the agent wrote.

    Added or changed: its file is in our include dir. Removed (its file is gone, so the include dir no
    longer says): supervisord's running config logs it into our logs dir.
    """
    logs = str(Path(logs_dir)) + "/"

    def ours(name: str, change: str) -> bool:
        if change != "removed":
            return name in program_files
        p = info.get(name, {})
        return any(str(p.get(k) or "").startswith(logs) for k in ("stdout_logfile", "stderr_logfile"))

    return {name: change for name, change in pending.items() if ours(name, change)}


def collect(venvs: _Venvs, envs_dir: Path, program_files: dict[str, str], client, lb=None,
            verified: dict[str, str] | None = None, reload_config=None, logs_dir: Path | None = None) -> Facts:
    """Gather facts. `client` is a connected SupervisorClient, or None when supervisord is not running;
    `lb` a load-balancer driver whose `facts()` reads what it really serves (None: no traffic managed).
    `logs_dir`: the root's logs dir (`Layout.logs`; default: next to `envs_dir`), which tells the agent's
    removed-but-still-loaded programs from others (`owned_pending`)."""
    programs: dict[str, ProgramFact] = {}
    supervisor = "stopped"
    info: dict[str, dict] = {}
    pending: dict[str, str] = {}
    later = None
    if client is not None:
        from agent.core.errors import SupervisorError

        try:
            later = client.process_info_later()     # supervisord answers while the venvs are read
        except SupervisorError as exc:
            supervisor = f"unreachable: {exc}"
    try:
        venv_facts = _venv_facts(venvs, envs_dir)
    except BaseException:
        if later is not None:
            later.close()
        raise
    if later is not None:
        try:
            info = later.result()
            added, changed, removed = (reload_config or client.reload_config)()
            pending = {**{n: "added" for n in added}, **{n: "changed" for n in changed}, **{n: "removed" for n in removed}}
            pending = owned_pending(pending, program_files, info,
                                    Path(logs_dir) if logs_dir is not None else Path(envs_dir).parent / "logs")
            supervisor = "running"
        except SupervisorError as exc:
            supervisor = f"unreachable: {exc}"
    for name in sorted(set(program_files) | set(info) | set(pending)):
        if name not in program_files and name not in pending:
            continue   # a program supervisord runs that the agent does not manage (external supervisord)
        p = info.get(name, {})
        digest, _, gated_pid = ((verified or {}).get(name) or "").partition(" ")
        programs[name] = ProgramFact(
            name=name,
            file_text=program_files.get(name),
            state=p.get("statename"),
            pid=p.get("pid") or None,
            pending=pending.get(name),
            spawnerr=p.get("spawnerr", "") or "",
            verified=digest or None,
            gated_pid=int(gated_pid) if gated_pid.isdigit() else None,
            daemonized=(daemonized(client, name, p) or "") if p.get("statename") in DOWN_STATES else "",
        )
    traffic = lb.facts() if lb is not None and (lb.program_name in program_files or lb.has_config()) else None
    return Facts(supervisor=supervisor, venvs=venv_facts, programs=programs, traffic=traffic)


def app_file_facts(layout, key: bytes) -> dict:
    """What the agent wrote for apps (DESIGN §3a), as Facts fields: every rendered file version and secret env
    file with the keyed digest of its content (a hand edit shows as another digest), the files/<name>
    symlinks, the existing data dirs, the launcher, and each job's last successful inputs digest."""
    from agent.core.materials import digest

    files: dict[str, str] = {}
    links: dict[str, str] = {}
    data_dirs: set[str] = set()

    def read(path: Path) -> None:
        try:
            files[str(path)] = digest(key, path.read_bytes())
        except OSError:
            files[str(path)] = "unreadable"

    for app_dir in _subdirs(layout.apps):
        if (app_dir / "data").is_dir():
            data_dirs.add(str(app_dir / "data"))
        for version in _subdirs(app_dir / "files" / ".v"):
            for path in _entries(version):
                read(path)
        for path in _entries(app_dir / "files"):
            if path.is_symlink():
                links[str(path)] = str(Path(path.readlink()))
        for path in _entries(app_dir / "env"):
            if path.name.endswith(".env"):
                read(path)
    if layout.launcher.is_file():
        read(layout.launcher)
    jobs = {f"{app.name}/{job.name}": job.read_text().strip()
            for app in _subdirs(layout.jobs) for job in _entries(app) if job.is_file()}
    return {"files": files, "links": links, "data_dirs": frozenset(data_dirs), "jobs": jobs}


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in Path(directory).iterdir() if not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subdirs(directory: Path) -> list[Path]:
    return [p for p in _entries(directory) if p.is_dir() and not p.is_symlink()]
