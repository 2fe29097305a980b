"""Gather a host's facts (`agent.core.facts`): asks the venv manager and supervisord, once each, and
reads the program include dir. Nothing here decides anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from agent.core.facts import Facts, ProgramFact, VenvFact

__all__ = ["collect", "read_verified"]


def read_verified(directory: Path) -> dict[str, str]:
    """name -> digest of the program config that last passed its health gate."""
    try:
        return {p.name: p.read_text().strip() for p in Path(directory).iterdir() if not p.name.startswith(".")}
    except FileNotFoundError:
        return {}



class _Venvs(Protocol):
    def list(self, name: str | None = None) -> list: ...
    def current(self, name: str) -> Path | None: ...
    def installed(self, path: Path) -> dict[str, str]: ...


def _venv_facts(venvs: _Venvs, envs_dir: Path) -> dict[str, VenvFact]:
    infos = venvs.list(None)
    names = {i.name for i in infos}
    if envs_dir.is_dir():
        names |= {p.name for p in envs_dir.iterdir() if p.is_symlink() and not p.name.startswith(".")}
    out = {}
    for name in sorted(names):
        mine = [i for i in infos if i.name == name]
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


def collect(venvs: _Venvs, envs_dir: Path, program_files: dict[str, str], client, lb=None,
            verified: dict[str, str] | None = None, reload_config=None) -> Facts:
    """Gather facts. `client` is a connected SupervisorClient, or None when supervisord is not running;
    `lb` a load-balancer driver whose `facts()` reads what it really serves (None: no traffic managed)."""
    programs: dict[str, ProgramFact] = {}
    supervisor = "stopped"
    info: dict[str, dict] = {}
    pending: dict[str, str] = {}
    if client is not None:
        from agent.core.errors import SupervisorError

        try:
            info = client.process_info()
            added, changed, removed = (reload_config or client.reload_config)()
            pending = {**{n: "added" for n in added}, **{n: "changed" for n in changed}, **{n: "removed" for n in removed}}
            supervisor = "running"
        except SupervisorError as exc:
            supervisor = f"unreachable: {exc}"
    for name in sorted(set(program_files) | set(info) | set(pending)):
        if name not in program_files and name not in pending:
            continue   # a program supervisord runs that the agent does not manage (external supervisord)
        p = info.get(name, {})
        programs[name] = ProgramFact(
            name=name,
            file_text=program_files.get(name),
            state=p.get("statename"),
            pid=p.get("pid") or None,
            pending=pending.get(name),
            spawnerr=p.get("spawnerr", "") or "",
            verified=(verified or {}).get(name),
        )
    traffic = lb.facts() if lb is not None and (lb.program_name in program_files or lb.has_config()) else None
    return Facts(supervisor=supervisor, venvs=_venv_facts(venvs, envs_dir), programs=programs, traffic=traffic)
