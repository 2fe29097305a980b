"""One check for names and addresses that share a namespace on a host.

Apps, supervisord programs, venvs, service ports and frontend listen addresses must be unique among
the apps that land on one host. The loader runs it per host of the fleet (the apps as each host sees
them, overrides applied); staging runs it again on a mix of revisions (apps kept back by their wave).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from agent.core.errors import Problem
from agent.core.model import App

__all__ = ["Claim", "Locate", "claims", "conflicts"]

Locate = Callable[[tuple], tuple[str, int | None]]     # a field path in an app's document -> (file, line)


@dataclass(frozen=True)
class Claim:
    """App `owner` holds `key` of `kind`; `path` is the field that says so in its document."""

    kind: str
    key: Any
    owner: str
    path: tuple


def claims(app: App) -> list[Claim]:
    out = [Claim("app", app.name, app.name, ("name",))]
    out += [Claim("environment", e.name, app.name, ("environments", e.name)) for e in app.environments]
    for svc in app.services:
        out.append(Claim("service", svc.name, app.name, ("services", svc.name)))
        if svc.port is not None:
            out.append(Claim("port", svc.port, app.name, ("services", svc.name, "port")))
    if app.traffic is not None:
        out.append(Claim("listen address", app.traffic.listen, app.name, ("traffic", "listen")))
    return out


def conflicts(apps: Iterable[tuple[App, Locate]], scope: str = "", holder: str = "defined in {file}") -> list[Problem]:
    """A problem for every claim that an earlier app already holds.

    Each message says `<kind> <key> is also <holder><scope>`; `holder` may name the other app's `{file}`
    or `{app}`. Apps are told apart by their file (two documents may claim one app name).
    """
    seen: dict[tuple[str, Any], tuple[str, str]] = {}      # (kind, key) -> (file, app) of the holder
    problems = []
    for app, locate in apps:
        for claim in claims(app):
            file, line = locate(claim.path)
            held_file, held_app = seen.setdefault((claim.kind, claim.key), (file, claim.owner))
            if held_file != file:
                also = holder.format(file=held_file, app=held_app)
                problems.append(Problem(file, line, ".".join(map(str, claim.path)),
                                        f"{claim.kind} {claim.key!r} is also {also}{scope}"))
    return problems
