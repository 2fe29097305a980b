"""Schema-valid app documents -> typed model values, with the reference checks the schema cannot make.

Pure: lockfile bytes and resolved paths come from the read step's snapshot (`RawTree`). Every builder
takes a document that passed the App schema, so a wrong shape here is a bug, never a user error.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace

from agent.core.load._yaml import Located
from agent.core.load.conflicts import bind_of_listen, own_conflicts
from agent.core.load.hints import defined
from agent.core.load.options import LoadOptions
from agent.core.load.problems import Collector
from agent.core.load.read import RawTree
from agent.core.load.salvage import Salvaged
from agent.core.lockfile import parse_lock, venv_identity
from agent.core.load.read import SECRET, SOURCE, TEMPLATE
from agent.core.model import (
    App, Canary, Chaos, DataDir, EnvValue, Environment, FileRef, FileSpec, Gate, HealthCheck, IndexCredentials, Job,
    JobRun, Rollout, SecretFile, SecretRef, Service, Traffic, Wave,
)
from agent.core.errors import InvalidState
from agent.core.render.supervisor import ProgramSpec, UnsafeValue, render_program

__all__ = ["build_app", "environments", "services", "traffic", "rollout", "rollout_of", "chaos", "duration_s", "env_value",
           "secrets", "files", "jobs"]


def build_app(doc: Located, tree: RawTree, fleet_defaults: dict, opts: LoadOptions, out: Collector,
              salvaged: Salvaged | None = None) -> App:
    """`salvaged`: `doc` is the sound part of an invalid document; a name that was cut is still declared
    (not "undefined"), and a service that lost a field is not judged by it (its traffic checks)."""
    if salvaged is None:
        env_names, svc_names = frozenset(doc.data.get("environments") or {}), frozenset(doc.data.get("services") or {})
    else:
        env_names, svc_names = salvaged.declared_environments, salvaged.declared_services
    envs = environments(doc, tree, fleet_defaults, opts, out)
    svcs = services(doc, env_names, opts, out)
    ports: dict[int, str] = {}
    for svc in svcs:
        if svc.port is not None:
            if svc.port in ports:
                out.add(doc, ("services", svc.name, "port"), f"port {svc.port} is also used by service {ports[svc.port]!r}")
            ports[svc.port] = svc.name
    app_secrets, app_files = secrets(doc, tree, out), files(doc, tree, out)
    app_jobs = jobs(doc, env_names, opts, out)
    svcs = _ordered(doc, svcs, svc_names, out)
    app = App(doc.data["name"], doc.data.get("mode"), tuple(envs), tuple(svcs),
              traffic(doc, {s.name: s for s in svcs if not salvaged or s.name not in salvaged.damaged_services},
                      svc_names, out), rollout=rollout(doc, out), chaos=chaos(doc),
              secrets=app_secrets, files=app_files, jobs=app_jobs, windows=windows(doc, out))
    _check_references(doc, app, out, salvaged)
    out.extend(own_conflicts(app, lambda path: (doc.file, doc.line(path))))
    return app


def environments(doc: Located, tree: RawTree, fleet_defaults: dict, opts: LoadOptions, out: Collector) -> list[Environment]:
    app = doc.data["name"]
    envs = []
    for name, spec in (doc.data.get("environments") or {}).items():
        here = ("environments", name)
        lock = tree.lockfile(doc, spec["lockfile"])
        if lock.problem is not None:
            out.add(doc, here + ("lockfile",), lock.problem)
            continue
        links = []
        for i, link in enumerate(spec.get("find_links", [])):
            ref = tree.directory(doc, link)
            if ref.problem is not None:
                out.add(doc, here + ("find_links", i), ref.problem)
            else:
                links.append(ref.path)
        try:
            reqs = parse_lock(lock.data.decode("utf-8", "replace"), lock.display)
        except InvalidState as exc:
            out.extend(exc.problems)
            continue
        python = spec.get("python") or fleet_defaults.get("python") or opts.default_python
        installer = spec.get("installer") or fleet_defaults.get("installer") or opts.default_installer
        options = () if spec.get("index", True) else ("--no-index",)
        # Not part of the venv's identity: the lock's hashes decide what is installed, whichever index serves it.
        index_url = spec.get("index_url")
        creds = spec.get("index_credentials")
        if creds and not index_url:
            out.add(doc, here + ("index_credentials",), "index_credentials need index_url (the index they are for)")
        envs.append(Environment(
            app=app, name=name, python=python, lockfile=lock.path,
            lock_sha256=hashlib.sha256(lock.data).hexdigest(),
            requirements=tuple(sorted((r.name, r.version) for r in reqs)),
            find_links=tuple(links), installer=installer, options=options,
            identity=venv_identity(python, lock.data, installer, options),
            index_url=index_url,
            index_credentials=IndexCredentials(creds["username"], env_value(creds["password"])) if creds else None,
        ))
    return envs


def _may_run(doc: Located, here: tuple, spec: dict, env_names: frozenset[str], opts: LoadOptions,
             out: Collector) -> bool:
    """A service or job names an environment of its app, and runs as root only where the agent allows it."""
    if spec["environment"] not in env_names:
        out.add(doc, here + ("environment",), f"environment {spec['environment']!r} is not defined in this app"
                                              + defined(spec["environment"], env_names, "environment"))
        return False
    if spec.get("user") == "root" and not opts.allow_root:
        out.add(doc, here + ("user",), f"{here[0]} may not run as root unless the agent's config allows it "
                                       "(--allow-root-services)")
        return False
    return True


def services(doc: Located, env_names: frozenset[str], opts: LoadOptions, out: Collector) -> list[Service]:
    app = doc.data["name"]
    result = []
    for name, spec in (doc.data.get("services") or {}).items():
        here = ("services", name)
        if not _may_run(doc, here, spec, env_names, opts, out):
            continue
        unsafe = _unrenderable(spec)
        if unsafe is not None:
            out.add(doc, here + unsafe[0], unsafe[1])
            continue
        health = spec.get("health")
        processes = spec.get("processes", 1)
        if processes > 1 and spec.get("port") is not None:
            out.add(doc, here + ("processes",), f"processes: {processes} cannot share port {spec['port']}: a service "
                                                "with several processes has no port (put a load balancer's backends "
                                                "in separate services instead)")
            continue
        result.append(Service(
            app=app, name=name, environment=spec["environment"], command=tuple(spec["command"]),
            port=spec.get("port"), env=env_pairs(spec.get("env")), user=spec.get("user"),
            startsecs=spec.get("startsecs", 1), stopwaitsecs=spec.get("stopwaitsecs", 10),
            health=_health(health) if health else None,
            depends_on=tuple(spec.get("depends_on") or ()), processes=processes,
        ))
    return result


def _health(spec: dict) -> HealthCheck:
    return HealthCheck(url=spec.get("http", ""), timeout_s=float(spec.get("timeout_s", 2.0)), tcp=spec.get("tcp", ""),
                       command=tuple(spec.get("command") or ()))


def env_value(value: object) -> EnvValue:
    """A schema-valid env value as a model value: a literal, or a reference resolved on the host."""
    if isinstance(value, str):
        return value
    if "secret" in value:
        name, _, key = value["secret"].partition("/")
        return SecretRef(name, key)
    if "file" in value:
        return FileRef(value["file"])
    return DataDir()


def env_pairs(spec: dict | None) -> tuple[tuple[str, EnvValue], ...]:
    return tuple(sorted((k, env_value(v)) for k, v in (spec or {}).items()))


def secrets(doc: Located, tree: RawTree, out: Collector) -> tuple[SecretFile, ...]:
    found = []
    for name, rel in (doc.data.get("secrets") or {}).items():
        ref = tree.file(doc, SECRET, rel)
        if ref.problem is not None:
            out.add(doc, ("secrets", name), ref.problem)
            continue
        if not _looks_like_age(ref.data):
            out.add(doc, ("secrets", name), f"{ref.display} is not an age-encrypted file (it must start with "
                                            "'age-encryption.org/v1' or be armored): encrypt it with "
                                            "`age -a -r <host recipient> -o FILE.age FILE`; never commit plaintext")
            continue
        found.append(SecretFile(name, ref.display, ref.data))
    return tuple(found)


def _looks_like_age(data: bytes) -> bool:
    head = data.lstrip()[:64]
    return head.startswith(b"age-encryption.org/v1") or head.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----")


def files(doc: Located, tree: RawTree, out: Collector) -> tuple[FileSpec, ...]:
    found = []
    for name, spec in (doc.data.get("files") or {}).items():
        here = ("files", name)
        kind = TEMPLATE if "template" in spec else SOURCE
        ref = tree.file(doc, kind, spec[kind])
        if ref.problem is not None:
            out.add(doc, here + (kind,), ref.problem)
            continue
        mode = int(spec.get("mode", "600"), 8)
        if kind == SOURCE:
            found.append(FileSpec(name, ref.display, source=ref.data, mode=mode))
            continue
        try:
            text = ref.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.file(ref.display, f"a template must be UTF-8 text (byte {exc.start} is not)")
            continue
        uses = _uses_secrets(text)
        if uses and mode & 0o077:
            out.add(doc, here + ("mode",), f"mode {mode:04o} would let others read the secrets template "
                                           f"{ref.display} renders: use 0600 (or 0400)")
            continue
        found.append(FileSpec(name, ref.display, template=text, mode=mode, uses_secrets=uses))
    return tuple(found)


def _uses_secrets(text: str) -> bool:
    """Whether a template reads `secrets` (it then may hold plaintext: mode 0600). A template that does not
    parse counts as using them; its syntax error is reported by the template check."""
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        return "secrets" in meta.find_undeclared_variables(Environment().parse(text))
    except TemplateSyntaxError:
        return True


def jobs(doc: Located, env_names: frozenset[str], opts: LoadOptions, out: Collector) -> tuple[Job, ...]:
    app = doc.data["name"]
    found = []
    for name, spec in (doc.data.get("jobs") or {}).items():
        here = ("jobs", name)
        if not _may_run(doc, here, spec, env_names, opts, out):
            continue
        found.append(Job(app, name, spec["environment"], tuple(spec["command"]), env_pairs(spec.get("env")),
                         JobRun(spec.get("run", "before")), float(spec.get("timeout_s", 300)), spec.get("user")))
    return tuple(found)


def _env_refs(app: App):
    """(field path, env value) of every reference an app's env values and index credentials make."""
    for svc in app.services:
        for key, value in svc.env:
            yield ("services", svc.name, "env", key), value
    for job in app.jobs:
        for key, value in job.env:
            yield ("jobs", job.name, "env", key), value
    for env in app.environments:
        if env.index_credentials is not None:
            yield ("environments", env.name, "index_credentials", "password"), env.index_credentials.password


def _check_references(doc: Located, app: App, out: Collector, salvaged: Salvaged | None) -> None:
    """Every {secret: NAME/KEY} names a declared secret and every {file: NAME} a declared file (the keys of a
    secret are checked where it can be decrypted: on the host)."""
    secret_names = frozenset(doc.data.get("secrets") or {})
    file_names = frozenset(doc.data.get("files") or {})
    for path, value in _env_refs(app):
        if isinstance(value, SecretRef) and path[-1].startswith("SUPERVISOR_"):
            out.add(doc, path, "SUPERVISOR_* names are supervisord's own: a secret cannot be passed under one")
        elif isinstance(value, SecretRef) and value.name not in secret_names:
            out.add(doc, path, f"secret {value.name!r} is not declared under secrets:" + defined(value.name, secret_names, "secret"))
        elif isinstance(value, FileRef) and value.name not in file_names:
            out.add(doc, path, f"file {value.name!r} is not declared under files:" + defined(value.name, file_names, "file"))


def _ordered(doc: Located, svcs: list[Service], declared: frozenset[str], out: Collector) -> list[Service]:
    """Services in dependency order (a service after those it depends_on), with supervisord priorities so its
    own start at boot follows the same order; an unknown name or a cycle is a problem."""
    by_name = {s.name: s for s in svcs}
    for svc in svcs:
        for dep in svc.depends_on:
            if dep == svc.name:
                out.add(doc, ("services", svc.name, "depends_on"), "a service cannot depend on itself")
            elif dep not in declared:
                out.add(doc, ("services", svc.name, "depends_on"),
                        f"depends on {dep!r}, which is not a service of this app" + defined(dep, declared, "service"))
    depth: dict[str, int] = {}
    visiting: list[str] = []

    def walk(name: str) -> int:
        if name in depth:
            return depth[name]
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            out.add(doc, ("services", name, "depends_on"), "depends_on makes a cycle: " + " -> ".join(cycle))
            return 0
        visiting.append(name)
        deps = [d for d in by_name[name].depends_on if d in by_name and d != name]
        depth[name] = 1 + max((walk(d) for d in deps), default=-1)
        visiting.pop()
        return depth[name]

    for svc in svcs:
        walk(svc.name)
    related = {s.name for s in svcs if s.depends_on} | {d for s in svcs for d in s.depends_on}
    ordered = sorted(svcs, key=lambda s: depth.get(s.name, 0))     # stable: file order within a depth
    return [replace(s, priority=100 + 10 * depth.get(s.name, 0)) if s.name in related else s for s in ordered]


def _unrenderable(spec: dict) -> tuple[tuple, str] | None:
    """(field path, reason) if supervisord's config cannot carry this service's values exactly.

    The schema refuses control characters; what is left are the limits of supervisord's own syntax
    (an environment value that starts or ends with a quote, holds both quote kinds, `;`/`#` after
    whitespace, `%(here)s`; Unicode line separators). Refusing them here makes the revision invalid
    as a whole, instead of a planner error after the revision was accepted.
    """
    command, user = spec["command"], spec.get("user")
    # references are paths, or (secrets) go through the launcher: their keys must still be valid program env keys
    env = {k: v if isinstance(v, str) else "reference" for k, v in (spec.get("env") or {}).items()}
    try:
        render_program(ProgramSpec(name="check", command=("/venv/bin/" + command[0], *command[1:]),
                                   environment=tuple(env.items()), user=user))
    except UnsafeValue as exc:
        field, _, index = exc.field.partition("[")
        if field == "command" and index:
            return ("command", int(index.rstrip("]"))), exc.reason
        if field.startswith("environment"):
            return ("env", *field.split(".", 1)[1:]), exc.reason
        return (field,), exc.reason
    return None


def traffic(doc: Located, svcs: dict[str, Service], declared: frozenset[str], out: Collector) -> Traffic | None:
    spec = doc.data.get("traffic")
    if not spec:
        return None
    for svc in spec["weights"]:
        where = ("traffic", "weights", svc)
        if svc not in declared:
            out.add(doc, where, f"weight for unknown service {svc!r}" + defined(svc, declared, "service"))
        elif svc in svcs and svcs[svc].port is None:
            out.add(doc, where, f"service {svc!r} has no port, so it cannot receive traffic")
    bind = bind_of_listen(spec["listen"])
    if bind is None or not 1 <= bind.port <= 65535:
        out.add(doc, ("traffic", "listen"), f"{spec['listen']!r}: the port must be 1..65535")
    strategy = spec.get("strategy", "weighted")
    weights = spec["weights"]
    if strategy == "blue-green" and sum(1 for w in weights.values() if w > 0) != 1:
        out.add(doc, ("traffic", "weights"), "blue-green sends all traffic to one colour: exactly one weight must be > 0")
    ab = spec.get("ab")
    if strategy == "ab":
        if not ab:
            out.add(doc, ("traffic",), "strategy ab needs ab: {variant: SERVICE, percent: N}")
        elif ab["variant"] not in weights:
            out.add(doc, ("traffic", "ab", "variant"), f"variant {ab['variant']!r} is not one of the weighted services"
                                                       + defined(ab["variant"], weights, "weighted service"))
        elif not any(w > 0 for s, w in weights.items() if s != ab["variant"]):
            out.add(doc, ("traffic", "weights"), "strategy ab needs a weight > 0 on a service other than the variant")
    elif ab:
        out.add(doc, ("traffic", "ab"), "ab: is only used with strategy: ab")
    canary = spec.get("canary")
    if canary:
        steps = canary.get("steps", [5, 25, 50, 100])
        if strategy != "canary":
            out.add(doc, ("traffic", "canary"), "canary: is only used with strategy: canary")
        elif canary["service"] not in weights:
            out.add(doc, ("traffic", "canary", "service"), f"canary {canary['service']!r} is not one of the weighted services"
                                                           + defined(canary["service"], weights, "weighted service"))
        elif len(weights) < 2:
            out.add(doc, ("traffic", "weights"), "a canary needs at least one stable service beside it")
        elif canary["service"] in svcs and svcs[canary["service"]].health is None:
            out.add(doc, ("traffic", "canary", "service"), "the canary needs a health check: the gate probes it")
        if list(steps) != sorted(set(steps)) or steps[-1] != 100:
            out.add(doc, ("traffic", "canary", "steps"), "steps must increase and end at 100")
        analysis = canary.get("analysis")
        if analysis:   # "above max aborts": every sample must be <= max, the wave gates' verdict rules
            analysis = Gate(analysis["prometheus"].rstrip("/"), analysis["query"], "<=", float(analysis["max"]),
                            analysis.get("no_data", "pause"), float(analysis.get("timeout_s", 5.0)))
        canary = Canary(canary["service"], tuple(steps), float(canary.get("pause_s", 30)),
                        float(canary.get("max_error_rate", 0.05)), int(canary.get("probes", 10)), analysis or None)
    if not canary and strategy != "ab" and not any(w > 0 for w in weights.values()):
        out.add(doc, ("traffic", "weights"), "at least one weight must be > 0 (else the frontend serves nothing)")
    return Traffic(spec["listen"], strategy, tuple(sorted(weights.items())),
                   ab_variant=ab["variant"] if ab else None, ab_percent=ab["percent"] if ab else 0,
                   canary=canary or None)


_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EXPECT = re.compile(r"^(<=|>=|==|!=|<|>) *(-?[0-9]+(?:\.[0-9]+)?)$")


def duration_s(value: float | int | str) -> float:
    """90 / "90s" / "10m" / "2h" / "1d" -> seconds (the schema has checked the form)."""
    if isinstance(value, (int, float)):
        return float(value)
    number, unit = _DURATION.match(value).groups()
    return float(number) * _UNITS[unit]


def rollout(doc: Located, out: Collector, at: tuple = ()) -> Rollout | None:
    """`rollout.waves` of an app, or (`at=("agent",)`) of fleet.yaml's `agent:` block: the agent's own
    upgrade is staged by the same waves as an app's change."""
    spec = doc.data
    for key in at:
        spec = spec.get(key) or {}
    waves = (spec.get("rollout") or {}).get("waves")
    if not waves:
        return None
    if waves[-1].get("percent") != 100:
        out.add(doc, (*at, "rollout", "waves", len(waves) - 1),
                "the last wave must have percent: 100 (every host gets the change)")
    return rollout_of(waves)


def rollout_of(waves: list[dict]) -> Rollout:
    """Schema-valid wave specs -> Rollout (`Wave.selected` is set per host by the caller)."""
    parsed = []
    for w in waves:
        gate = None
        if w.get("gate"):
            g = w["gate"]
            op, threshold = _EXPECT.match(g["expect"]).groups()
            gate = Gate(g["prometheus"].rstrip("/"), g["query"], op, float(threshold), g.get("on_no_data", "pause"),
                        float(g.get("timeout_s", 5.0)))
        parsed.append(Wave(percent=w.get("percent"), after_s=duration_s(w.get("after", 0)), gate=gate))
    return Rollout(tuple(parsed))


def windows(doc: Located, out: Collector) -> tuple:
    """rollout.windows (DESIGN §3b); the schema checked the shapes, here the zone names are resolved."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from agent.core.windows import Window

    parsed = []
    for i, w in enumerate((doc.data.get("rollout") or {}).get("windows") or ()):
        zone = w.get("timezone", "UTC")
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            out.add(doc, ("rollout", "windows", i, "timezone"), f"{zone!r} is not an IANA time zone (e.g. Europe/Berlin)")
            continue
        parsed.append(Window(tuple(w["days"]), w["start"], w["end"], zone))
    return tuple(parsed)


def chaos(doc: Located) -> Chaos | None:
    spec = doc.data.get("chaos")
    if not spec:
        return None
    kill, disable = spec.get("kill") or {}, spec.get("disable_backend") or {}
    return Chaos(float(kill.get("rate_per_hour", 0)), float(disable.get("rate_per_hour", 0)),
                 duration_s(disable.get("duration", 30)))
