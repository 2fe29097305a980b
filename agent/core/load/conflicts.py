"""One check for names and addresses that share a namespace on a host.

Apps, supervisord programs and venvs must have unique names among the apps that land on one host.
Addresses are compared as what they bind, not as text (DESIGN §3d): a service's `port` P binds
127.0.0.1:P; a frontend's `listen` binds its address, where `localhost` is 127.0.0.1 and ::1 and a
wildcard (0.0.0.0, *, empty, [::]) takes the port on every address. Two bindings of one port clash
when their addresses meet. The loader runs this per host of the fleet (the apps as each host sees them,
overrides applied); staging runs it again on a mix of revisions (apps kept back by their wave).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Iterable

from agent.core._record import record
from agent.core.errors import Problem
from agent.core.model import App

__all__ = ["Bind", "Claim", "Locate", "bind_of_listen", "bind_of_service", "claims", "conflicts", "own_conflicts"]

Locate = Callable[[tuple], tuple[str, int | None]]     # a field path in an app's document -> (file, line)

_WILDCARDS = ("", "*", "0.0.0.0", "::")
_LOOPBACK = "127.0.0.1"


@record
class Bind:
    """What a listening socket takes: `port` on `addresses` (None: on every address)."""

    addresses: frozenset[str] | None
    port: int

    def overlap(self, other: "Bind") -> str | None:
        """The address:port both take, described; None when they can listen side by side."""
        if self.port != other.port:
            return None
        if self.addresses is None or other.addresses is None:
            shared = other.addresses if self.addresses is None else self.addresses
        else:
            shared = self.addresses & other.addresses
        if shared is not None and not shared:
            return None
        if shared is None:
            return f"every address on port {self.port}"
        return " and ".join(f"[{a}]:{self.port}" if ":" in a else f"{a}:{self.port}" for a in sorted(shared))


def bind_of_listen(listen: str) -> Bind | None:
    """`host:port` (IPv6 in brackets) as what it binds; None if it is not host:port at all."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in _WILDCARDS:
        return Bind(None, int(port))
    if host.lower() == "localhost":
        return Bind(frozenset({_LOOPBACK, "::1"}), int(port))
    try:
        return Bind(frozenset({str(ipaddress.ip_address(host))}), int(port))
    except ValueError:          # a name, not an address: compared as written
        return Bind(frozenset({host.lower()}), int(port))


def bind_of_service(port: int) -> Bind:
    return Bind(frozenset({_LOOPBACK}), port)


@record
class Claim:
    """An app holds `key` of `kind` (a name), or binds `bind`; `path` is the field that says so."""

    kind: str
    key: Any
    owner: str
    path: tuple
    bind: Bind | None = None


def claims(app: App) -> list[Claim]:
    out = [Claim("app", app.name, app.name, ("name",))]
    out += [Claim("environment", e.name, app.name, ("environments", e.name)) for e in app.environments]
    for svc in app.services:
        out.append(Claim("service", svc.name, app.name, ("services", svc.name)))
        if svc.port is not None:
            out.append(Claim("port", svc.port, app.name, ("services", svc.name, "port"), bind_of_service(svc.port)))
    if app.traffic is not None:
        out.append(Claim("listen address", app.traffic.listen, app.name, ("traffic", "listen"),
                         bind_of_listen(app.traffic.listen)))
    return out


@record
class _Held:
    claim: Claim
    file: str
    line: int | None

    def where(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


def _clash(claim: Claim, held: _Held, shared: str) -> str:
    """Why `claim` cannot bind what `held` binds (the two may be a port and a frontend, in either order)."""
    other = held.claim
    if claim.kind == "port" and other.kind == "port":
        return ""       # the plain "port P is also ..." message
    if other.kind == "port":
        service = other.path[1]
        return (f"{claim.kind} {claim.key!r} takes {shared}, where service {service!r} of {held.where()} listens "
                f"(a service's port is 127.0.0.1:port)")
    if claim.kind == "port":
        return f"port {claim.key} ({shared}) is also taken by {other.kind} {other.key!r} of {held.where()}"
    return f"{claim.kind} {claim.key!r} overlaps {other.kind} {other.key!r} of {held.where()} (both take {shared})"


def conflicts(apps: Iterable[tuple[App, Locate]], scope: str = "", holder: str = "defined in {file}") -> list[Problem]:
    """A problem for every claim that an earlier app already holds, or a binding that meets one of its.

    A name clash says `<kind> <key> is also <holder><scope>`; `holder` may name the other app's `{file}`
    or `{app}`. An address clash names the other file and line and the address both would take. Apps
    are told apart by their file (two documents may claim one app name); clashes inside one app are
    `own_conflicts`'.
    """
    names: dict[tuple[str, Any], _Held] = {}
    binds: dict[int, list[_Held]] = {}
    problems = []
    for app, locate in apps:
        for claim in claims(app):
            file, line = locate(claim.path)
            field = ".".join(map(str, claim.path))
            if claim.bind is None:
                held = names.setdefault((claim.kind, claim.key), _Held(claim, file, line))
                if held.file != file:
                    also = holder.format(file=held.file, app=held.claim.owner)
                    problems.append(Problem(file, line, field, f"{claim.kind} {claim.key!r} is also {also}{scope}"))
                continue
            for held in binds.get(claim.bind.port, ()):
                shared = held.file != file and claim.bind.overlap(held.claim.bind)
                if shared:
                    message = _clash(claim, held, shared) or \
                        f"port {claim.key!r} is also {holder.format(file=held.file, app=held.claim.owner)}"
                    problems.append(Problem(file, line, field, message + scope))
                    break
            binds.setdefault(claim.bind.port, []).append(_Held(claim, file, line))
    return problems


def own_conflicts(app: App, locate: Locate) -> list[Problem]:
    """A frontend of an app that takes the address of one of its own services (service ports among
    themselves are checked where the services are built)."""
    mine = claims(app)
    ports = [c for c in mine if c.kind == "port"]
    problems = []
    for claim in mine:
        if claim.kind != "listen address" or claim.bind is None:
            continue
        for port in ports:
            shared = claim.bind.overlap(port.bind)
            if shared:
                file, line = locate(claim.path)
                held = _Held(port, *locate(port.path))
                problems.append(Problem(file, line, ".".join(map(str, claim.path)), _clash(claim, held, shared)))
    return problems
