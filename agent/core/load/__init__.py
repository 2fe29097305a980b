"""Load a checkout of the state repo: YAML -> JSON Schema -> references -> DesiredState.

Validation collects every problem (file, line, field, message) before failing, so a user fixes a
revision in one round trip. Nothing here touches the host: it only reads the checkout.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from agent.core.load._yaml import Located, parse
from agent.core.errors import InvalidState, Problem
from agent.core.lockfile import parse_lock, venv_identity
from agent.core.model import (App, Canary, Chaos, DesiredState, Environment, Gate, HealthCheck, Rollout, Service, Traffic,
                    Wave)
from agent.core.render.supervisor import ProgramSpec, UnsafeValue, render_program

__all__ = ["LoadOptions", "load_desired", "validate_tree", "FLEET_FILE", "APPS_DIR"]

FLEET_FILE = "fleet.yaml"
APPS_DIR = "apps"
APP_FILE = "app.yaml"
MAX_APPS = 1000


@dataclass(frozen=True)
class LoadOptions:
    """What the agent's own config decides about how a revision is read."""

    default_python: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    default_installer: str = "pip"
    allow_root: bool = False
    allow_chaos: bool = False           # act on apps' `chaos:` blocks (else they are ignored, with a note)
    boundary: Path | None = None        # paths may reach up to here (the checkout, when the state is a tier's
                                        # subdirectory: tiers share one wheelhouse); default: the state dir


@dataclass(frozen=True)
class _Host:
    name: str
    groups: frozenset[str]
    labels: dict[str, str]


@lru_cache(maxsize=None)
def _validator(kind: str):
    from importlib import resources

    from jsonschema import Draft202012Validator

    text = resources.files("agent.schemas").joinpath(f"{kind}.schema.json").read_text()
    return Draft202012Validator(json.loads(text))


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class _Collector:
    """Accumulates problems; `check()` raises them all at once."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, doc: Located, path: tuple, message: str) -> None:
        self.problems.append(Problem(doc.file, doc.line(path), ".".join(str(p) for p in path), message))

    def extend(self, problems: Iterable[Problem]) -> None:
        self.problems.extend(problems)

    def check(self) -> None:
        if self.problems:
            raise InvalidState(self.problems)


def _schema_problems(doc: Located, kind: str, out: _Collector) -> bool:
    """Validate against the JSON Schema; True when the document is valid."""
    errors = sorted(_validator(kind).iter_errors(doc.data), key=lambda e: list(map(str, e.absolute_path)))
    for err in errors:
        path = tuple(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = set(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - allowed):
                out.add(doc, path + (key,), f"unknown field {key!r}")
            continue
        out.add(doc, path, _short(err))
    return not errors


def _short(err) -> str:
    if err.validator == "pattern":
        return f"{err.instance!r} is not allowed here (must match {err.validator_value})"
    if err.validator in ("oneOf", "anyOf"):
        return f"{err.instance!r} matches none of the allowed forms"
    msg = err.message
    return msg if len(msg) < 300 else msg[:300] + "..."


def _inside(root: Path, base: Path, rel: str) -> Path | None:
    """Resolve `rel` against `base`; None if it is absolute or escapes `root` (symlinks included)."""
    if os.path.isabs(rel) or "\\" in rel:
        return None
    target = (base / rel).resolve()
    real_root = root.resolve()
    if target != real_root and real_root not in target.parents:
        return None
    return target


def _read_docs(root: Path, out: _Collector) -> tuple[Located | None, list[tuple[Located, bool]]]:
    fleet = None
    fleet_path = root / FLEET_FILE
    if fleet_path.is_symlink() and _inside(root, root, FLEET_FILE) is None:
        out.problems.append(Problem(FLEET_FILE, None, "", "is a symlink that points outside the state repo"))
    elif fleet_path.is_file():
        try:
            fleet = parse(fleet_path.read_bytes(), FLEET_FILE)
            _schema_problems(fleet, "fleet", out)
        except InvalidState as exc:
            out.extend(exc.problems)
    else:
        out.problems.append(Problem(FLEET_FILE, None, "", "missing: a state repo needs a fleet.yaml at its root"))
    apps: list[tuple[Located, bool]] = []
    app_files = sorted((root / APPS_DIR).glob(f"*/{APP_FILE}")) if (root / APPS_DIR).is_dir() else []
    if len(app_files) > MAX_APPS:
        out.problems.append(Problem(APPS_DIR, None, "", f"more than {MAX_APPS} apps"))
        app_files = app_files[:MAX_APPS]
    for path in app_files:
        rel = _rel(path, root)
        if _inside(root, root, rel) is None:
            out.problems.append(Problem(rel, None, "", "is a symlink that points outside the state repo"))
            continue
        try:
            doc = parse(path.read_bytes(), rel)
        except InvalidState as exc:
            out.extend(exc.problems)
            continue
        valid = _schema_problems(doc, "app", out)
        apps.append((doc, valid))
    return fleet, apps


def _hosts(fleet: Located | None) -> dict[str, _Host]:
    if fleet is None or not isinstance(fleet.data, dict):
        return {}
    hosts = {}
    for name, spec in (fleet.data.get("hosts") or {}).items():
        spec = spec or {}
        hosts[name] = _Host(name, frozenset(spec.get("groups", [])), dict(spec.get("labels", {})))
    return hosts


def _selects(selector: dict | None, host: _Host) -> bool:
    """An app runs on a host named in `names`, OR in one of `groups`, OR matching the label selector.

    The label selector (Kubernetes semantics) holds when every `matchLabels` pair and every
    `matchExpressions` entry holds; a selector with neither never matches by labels. No selector (or
    an empty one) selects every host.
    """
    if not selector:
        return True
    if host.name in selector.get("names", []):
        return True
    if host.groups & set(selector.get("groups", [])):
        return True
    labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not labels and not expressions:
        return False
    return (all(host.labels.get(k) == v for k, v in labels.items())
            and all(_expression_holds(e, host.labels) for e in expressions))


def _expression_holds(expr: dict, labels: dict[str, str]) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values") or []
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    raise ValueError(f"unknown operator {op!r}")


def _environments(doc: Located, root: Path, fleet_defaults: dict, opts: LoadOptions, out: _Collector) -> list[Environment]:
    app = doc.data["name"]
    app_dir = (root / doc.file).parent
    envs = []
    for name, spec in (doc.data.get("environments") or {}).items():
        here = ("environments", name)
        lock = _inside(opts.boundary or root, app_dir, spec["lockfile"])
        if lock is None:
            out.add(doc, here + ("lockfile",), f"{spec['lockfile']!r} is absolute or escapes the state repo")
            continue
        if not lock.is_file():
            out.add(doc, here + ("lockfile",), f"lockfile {spec['lockfile']!r} does not exist")
            continue
        links = []
        for i, link in enumerate(spec.get("find_links", [])):
            resolved = _inside(opts.boundary or root, app_dir, link)
            if resolved is None:
                out.add(doc, here + ("find_links", i), f"{link!r} is absolute or escapes the state repo")
            elif not resolved.is_dir():
                out.add(doc, here + ("find_links", i), f"find_links directory {link!r} does not exist")
            else:
                links.append(resolved)
        lock_bytes = lock.read_bytes()
        try:
            reqs = parse_lock(lock_bytes.decode("utf-8", "replace"), _rel(lock, root.resolve()))
        except InvalidState as exc:
            out.extend(exc.problems)
            continue
        python = spec.get("python") or fleet_defaults.get("python") or opts.default_python
        installer = spec.get("installer") or fleet_defaults.get("installer") or opts.default_installer
        options = () if spec.get("index", True) else ("--no-index",)
        envs.append(Environment(
            app=app, name=name, python=python, lockfile=lock,
            lock_sha256=hashlib.sha256(lock_bytes).hexdigest(),
            requirements=tuple(sorted((r.name, r.version) for r in reqs)),
            find_links=tuple(links), installer=installer, options=options,
            identity=venv_identity(python, lock_bytes, installer, options),
        ))
    return envs


def _services(doc: Located, env_names: set[str], opts: LoadOptions, out: _Collector) -> list[Service]:
    app = doc.data["name"]
    services = []
    for name, spec in (doc.data.get("services") or {}).items():
        here = ("services", name)
        if spec["environment"] not in env_names:
            out.add(doc, here + ("environment",), f"environment {spec['environment']!r} is not defined in this app")
            continue
        if spec.get("user") == "root" and not opts.allow_root:
            out.add(doc, here + ("user",), "services may not run as root unless the agent's config allows it (--allow-root-services)")
            continue
        unsafe = _unrenderable(spec)
        if unsafe is not None:
            out.add(doc, here + unsafe[0], unsafe[1])
            continue
        health = spec.get("health")
        services.append(Service(
            app=app, name=name, environment=spec["environment"], command=tuple(spec["command"]),
            port=spec.get("port"), env=tuple(sorted((spec.get("env") or {}).items())), user=spec.get("user"),
            startsecs=spec.get("startsecs", 1), stopwaitsecs=spec.get("stopwaitsecs", 10),
            health=HealthCheck(health["http"], float(health.get("timeout_s", 2.0))) if health else None,
        ))
    return services


def _unrenderable(spec: dict) -> tuple[tuple, str] | None:
    """(field path, reason) if supervisord's config cannot carry this service's values exactly.

    The schema refuses control characters; what is left are the limits of supervisord's own syntax
    (an environment value that starts or ends with a quote, holds both quote kinds, `;`/`#` after
    whitespace, `%(here)s`; Unicode line separators). Refusing them here makes the revision invalid
    as a whole, instead of a planner error after the revision was accepted.
    """
    command, env, user = spec.get("command"), spec.get("env") or {}, spec.get("user")
    if not (isinstance(command, list) and command and all(isinstance(a, str) for a in command)
            and isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
            and (user is None or isinstance(user, str))):
        return None     # wrong types: the schema reports them
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


def _traffic(doc: Located, services: dict[str, Service], out: _Collector) -> Traffic | None:
    spec = doc.data.get("traffic")
    if not spec:
        return None
    for svc in spec["weights"]:
        where = ("traffic", "weights", svc)
        if svc not in (doc.data.get("services") or {}):
            out.add(doc, where, f"weight for unknown service {svc!r}")
        elif svc in services and services[svc].port is None:
            out.add(doc, where, f"service {svc!r} has no port, so it cannot receive traffic")
    strategy = spec.get("strategy", "weighted")
    weights = spec["weights"]
    if strategy == "blue-green" and sum(1 for w in weights.values() if w > 0) != 1:
        out.add(doc, ("traffic", "weights"), "blue-green sends all traffic to one colour: exactly one weight must be > 0")
    ab = spec.get("ab")
    if strategy == "ab":
        if not ab:
            out.add(doc, ("traffic",), "strategy ab needs ab: {variant: SERVICE, percent: N}")
        elif ab["variant"] not in weights:
            out.add(doc, ("traffic", "ab", "variant"), f"variant {ab['variant']!r} is not one of the weighted services")
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
            out.add(doc, ("traffic", "canary", "service"), f"canary {canary['service']!r} is not one of the weighted services")
        elif len(weights) < 2:
            out.add(doc, ("traffic", "weights"), "a canary needs at least one stable service beside it")
        elif canary["service"] in services and services[canary["service"]].health is None:
            out.add(doc, ("traffic", "canary", "service"), "the canary needs a health check: the gate probes it")
        if list(steps) != sorted(set(steps)) or steps[-1] != 100:
            out.add(doc, ("traffic", "canary", "steps"), "steps must increase and end at 100")
        canary = Canary(canary["service"], tuple(steps), float(canary.get("pause_s", 30)),
                        float(canary.get("max_error_rate", 0.05)), int(canary.get("probes", 10)))
    if not canary and strategy != "ab" and not any(w > 0 for w in weights.values()):
        out.add(doc, ("traffic", "weights"), "at least one weight must be > 0 (else the frontend serves nothing)")
    return Traffic(spec["listen"], strategy, tuple(sorted(weights.items())),
                   ab_variant=ab["variant"] if ab else None, ab_percent=ab["percent"] if ab else 0,
                   canary=canary or None)


def _app(doc: Located, root: Path, fleet_defaults: dict, opts: LoadOptions, out: _Collector) -> App:
    envs = _environments(doc, root, fleet_defaults, opts, out)
    declared_envs = set((doc.data.get("environments") or {}))
    services = _services(doc, declared_envs, opts, out)
    ports: dict[int, str] = {}
    for svc in services:
        if svc.port is not None:
            if svc.port in ports:
                out.add(doc, ("services", svc.name, "port"), f"port {svc.port} is also used by service {ports[svc.port]!r}")
            ports[svc.port] = svc.name
    traffic = _traffic(doc, {s.name: s for s in services}, out)
    return App(doc.data["name"], doc.data.get("mode"), tuple(envs), tuple(services), traffic,
               rollout=_rollout(doc, out), chaos=_chaos(doc))


_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EXPECT = re.compile(r"^(<=|>=|==|!=|<|>) *(-?[0-9]+(?:\.[0-9]+)?)$")


def duration_s(value: float | int | str) -> float:
    """90 / "90s" / "10m" / "2h" / "1d" -> seconds (the schema has checked the form)."""
    if isinstance(value, (int, float)):
        return float(value)
    number, unit = _DURATION.match(value).groups()
    return float(number) * _UNITS[unit]


def _rollout(doc: Located, out: _Collector) -> Rollout | None:
    spec = doc.data.get("rollout") or {}
    waves = spec.get("waves")
    if not waves:
        return None
    if waves[-1].get("percent") != 100:
        out.add(doc, ("rollout", "waves", len(waves) - 1), "the last wave must have percent: 100 (every host gets the change)")
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


def _chaos(doc: Located) -> Chaos | None:
    spec = doc.data.get("chaos")
    if not spec:
        return None
    kill, disable = spec.get("kill") or {}, spec.get("disable_backend") or {}
    return Chaos(float(kill.get("rate_per_hour", 0)), float(disable.get("rate_per_hour", 0)),
                 duration_s(disable.get("duration", 30)))


def _conflicts(apps: list[tuple[Located, App]], scope: str, out: _Collector) -> None:
    """Names that share one namespace on a host: apps, supervisord programs, venvs, ports."""
    seen: dict[tuple[str, Any], str] = {}

    def claim(kind: str, key: Any, doc: Located, path: tuple) -> None:
        owner = seen.get((kind, key))
        if owner is not None and owner != doc.file:
            out.add(doc, path, f"{kind} {key!r} is also defined in {owner}{scope}")
        seen.setdefault((kind, key), doc.file)

    for doc, app in apps:
        claim("app", app.name, doc, ("name",))
        for env in app.environments:
            claim("environment", env.name, doc, ("environments", env.name))
        for svc in app.services:
            claim("service", svc.name, doc, ("services", svc.name))
            if svc.port is not None:
                claim("port", svc.port, doc, ("services", svc.name, "port"))
        if app.traffic:
            claim("listen address", app.traffic.listen, doc, ("traffic", "listen"))


def _load(root: Path, opts: LoadOptions) -> tuple[dict[str, _Host], list[tuple[Located, App]], _Collector, "_Variants"]:
    out = _Collector()
    fleet, docs = _read_docs(root, out)
    defaults = (fleet.data.get("defaults") or {}) if fleet is not None and isinstance(fleet.data, dict) else {}
    apps = []
    variants = _Variants(root, defaults, opts, out)
    for doc, valid in docs:
        if not valid:
            _best_effort(doc, root, defaults, opts, out)
            continue
        expected = Path(doc.file).parent.name
        if doc.data["name"] != expected:
            out.add(doc, ("name",), f"app name {doc.data['name']!r} must match its directory {expected!r}")
        if not _override_paths_ok(doc, out):
            variants.broken.add(doc.file)
        apps.append((doc, _app(doc, root, defaults, opts, out)))
    return _hosts(fleet), apps, out, variants


# -- overrides ----------------------------------------------------------------------------------------

OVERRIDABLE = ("environments", "services", "traffic", "mode")


def _schema_child(node: dict, key: str) -> dict | None:
    """The schema of field `key` inside an object/array schema `node`; None if the schema has no such field."""
    while "$ref" in node:
        node = _app_schema()["$defs"][node["$ref"].rsplit("/", 1)[1]]
    if key in node.get("properties", {}):
        return node["properties"][key]
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and "object" in _types(node):
        pattern = (node.get("propertyNames") or {}).get("pattern")
        if pattern is None or re.search(pattern, key):
            return extra
        return None
    if key.isdigit() and "array" in _types(node):
        prefix = node.get("prefixItems", [])
        return prefix[int(key)] if int(key) < len(prefix) else node.get("items")
    return None


def _types(node: dict) -> tuple:
    kind = node.get("type", ())
    return (kind,) if isinstance(kind, str) else tuple(kind)


@lru_cache(maxsize=None)
def _app_schema() -> dict:
    return _validator("app").schema


def _split_path(data: Any, path: str) -> list[str] | None:
    """`path`'s parts, matching names that contain dots against the keys the document has (longest first)."""
    parts: list[str] = []
    rest = path
    while rest:
        key = None
        if isinstance(data, dict):
            for k in sorted((k for k in data if isinstance(k, str)), key=len, reverse=True):
                if rest == k or rest.startswith(k + "."):
                    key = k
                    break
        if key is None:
            key = rest.split(".", 1)[0]
        parts.append(key)
        rest = rest[len(key) + 1:]
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        else:
            data = None
    return parts


def _locate(data: Any, parts: list[str], create: bool = False) -> tuple[Any, Any] | None:
    """(container, key) for the last part. The environment or service a path names must exist; with
    `create`, other missing objects along the path are made (e.g. a service's `env`)."""
    for i, part in enumerate(parts[:-1]):
        if isinstance(data, dict) and part not in data and create and not (i == 1 and parts[0] in _NAMED):
            data[part] = {}
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    last = parts[-1]
    if isinstance(data, dict):
        return data, last
    if isinstance(data, list) and last.isdigit() and int(last) < len(data):
        return data, int(last)
    return None


_NAMED = ("environments", "services")


def _override_paths_ok(doc: Located, out: _Collector) -> bool:
    """Every `set` path names a field of the App schema under an overridable section, inside what exists."""
    ok = True
    for i, entry in enumerate(doc.data.get("overrides") or []):
        for path in entry["set"]:
            where = ("overrides", i, "set", path)
            parts = _split_path(doc.data, path)
            if parts[0] not in OVERRIDABLE:
                out.add(doc, where, f"only fields under {', '.join(OVERRIDABLE)} can be overridden")
                ok = False
                continue
            node: dict | None = _app_schema()
            for part in parts:
                node = _schema_child(node, part)
                if node is None:
                    break
            if node is None:
                out.add(doc, where, f"{path!r} is not a field of an App (see schemas/app.schema.json)")
                ok = False
            elif _locate(copy.deepcopy(doc.data), parts, create=True) is None:
                out.add(doc, where, f"{'.'.join(parts[:2])!r} is not defined in this app (or an index is out of "
                                    "range): overrides change an app's environments and services, never add them")
                ok = False
    return ok


def _with_overrides(data: dict, entries: list[dict]) -> dict:
    data = copy.deepcopy(data)
    for entry in entries:
        for path, value in entry["set"].items():
            container, key = _locate(data, _split_path(data, path), create=True)
            container[key] = copy.deepcopy(value)
    return data


def _describe_selector(selector: dict) -> str:
    parts = []
    for field in ("names", "groups"):
        if selector.get(field):
            parts.append(f"{field} {','.join(selector[field])}")
    if selector.get("matchLabels"):
        parts.append("labels " + ",".join(f"{k}={v}" for k, v in selector["matchLabels"].items()))
    for e in selector.get("matchExpressions") or []:
        parts.append(f"{e['key']} {e['operator']} {','.join(e.get('values') or [])}".rstrip())
    return "; ".join(parts) or "every host"


def _describe_override(i: int, entry: dict) -> str:
    sets = ", ".join(f"{p}={json.dumps(v)}" for p, v in entry["set"].items())
    return f"overrides[{i}] (hosts: {_describe_selector(entry['hosts'])}) set {sets}"


class _Variants:
    """An app as a given host sees it: its base, or with the overrides that select the host applied.

    Hosts selecting the same overrides share one build, so a fleet of thousands of hosts costs one
    build per distinct override combination. Problems are reported once, naming the overrides.
    """

    def __init__(self, root: Path, defaults: dict, opts: LoadOptions, out: _Collector):
        self.root, self.defaults, self.opts, self.out = root, defaults, opts, out
        self.broken: set[str] = set()           # docs whose override paths are invalid: no variants
        self._cache: dict[tuple[str, tuple[int, ...]], App | None] = {}

    def of(self, doc: Located, base: App, host: _Host) -> App | None:
        """None when this host's variant is invalid (its problems are in `out`)."""
        entries = doc.data.get("overrides") or []
        key = tuple(i for i, e in enumerate(entries) if _selects(e["hosts"], host))
        if not key or doc.file in self.broken:
            return base
        cache_key = (doc.file, key)
        if cache_key not in self._cache:
            self._cache[cache_key] = self._build(doc, key)
        return self._cache[cache_key]

    def _build(self, doc: Located, key: tuple[int, ...]) -> App | None:
        entries = doc.data["overrides"]
        variant = Located(_with_overrides(doc.data, [entries[i] for i in key]), doc.lines, doc.file)
        sub = _Collector()
        app = None
        if _schema_problems(variant, "app", sub):
            app = _app(variant, self.root, self.defaults, self.opts, sub)
        suffix = f" (with {', '.join(f'overrides[{i}]' for i in key)} applied)"
        self.out.extend(dataclasses.replace(p, message=p.message + suffix) for p in sub.problems)
        if sub.problems or app is None:
            return None
        return dataclasses.replace(app, overrides=tuple(_describe_override(i, entries[i]) for i in key))


def _best_effort(doc: Located, root: Path, defaults: dict, opts: LoadOptions, out: _Collector) -> None:
    """Reference checks on a document that failed its schema, so one run reports every problem.

    The shape is not guaranteed here: whatever a wrong type breaks is skipped, and any problem found
    twice (schema and reference) is reported once.
    """
    data = doc.data if isinstance(doc.data, dict) else {}
    expected = Path(doc.file).parent.name
    if isinstance(data.get("name"), str) and data["name"] != expected:
        out.add(doc, ("name",), f"app name {data['name']!r} must match its directory {expected!r}")
    for section in ("environments", "services"):
        items = data.get(section)
        if not isinstance(items, dict):
            continue
        for name, spec in list(items.items()):
            probe = Located({"name": str(data.get("name", "?")), section: {name: spec},
                             "environments": data.get("environments") if section == "services" else {name: spec}},
                            doc.lines, doc.file)
            try:
                if section == "environments":
                    _environments(probe, root, defaults, opts, out)
                else:
                    _services(probe, set(data.get("environments") or {}), opts, out)
            except (KeyError, TypeError, AttributeError, ValueError):
                continue


def _validated(root: Path, opts: LoadOptions) -> tuple[dict[str, _Host], list[tuple[Located, App]], list[Problem], _Variants | None]:
    try:
        hosts, apps, out, variants = _load(Path(root), opts)
    except InvalidState as exc:
        return {}, [], list(exc.problems), None
    if hosts:
        for host in hosts.values():
            mine = [(d, variants.of(d, a, host)) for d, a in apps if _selects(d.data.get("hosts"), host)]
            _conflicts([(d, a) for d, a in mine if a is not None], f" (both run on host {host.name})", out)
    else:
        _conflicts(apps, "", out)
    return hosts, apps, list(dict.fromkeys(out.problems)), variants


def validate_tree(root: Path, opts: LoadOptions = LoadOptions()) -> list[Problem]:
    """Every problem in a checkout, for every host of the fleet (the state repo's own CI)."""
    return _validated(root, opts)[2]


def load_desired(root: Path, host: str, opts: LoadOptions = LoadOptions()) -> DesiredState:
    """The desired state of `host`; InvalidState (with every problem) if any part of the revision is invalid.

    The whole revision is validated, not only what targets this host: a revision is accepted or
    rejected as a unit, the same on every host. Overrides that select this host are applied (in
    list order: a later entry wins) and named in the notes.
    """
    hosts, apps, problems, variants = _validated(root, opts)
    if problems:
        raise InvalidState(problems)
    me = hosts.get(host, _Host(host, frozenset(), {}))
    mine, notes = [], []
    for doc, base in apps:
        if not _selects(doc.data.get("hosts"), me):
            continue
        app = variants.of(doc, base, me)
        if app is None:      # only possible for a host missing from fleet.yaml (listed hosts were checked)
            raise InvalidState(list(dict.fromkeys(variants.out.problems)))
        notes += [f"app {app.name}: {o}" for o in app.overrides]
        if app.rollout is not None:
            waves = (doc.data.get("rollout") or {}).get("waves") or []
            app = dataclasses.replace(app, rollout=Rollout(tuple(
                dataclasses.replace(w, selected="hosts" in spec and _selects(spec["hosts"], me))
                for w, spec in zip(app.rollout.waves, waves))))
        if app.chaos is not None and not opts.allow_chaos:
            notes.append(f"app {app.name}: chaos block ignored (this agent does not allow chaos: --allow-chaos)")
            app = dataclasses.replace(app, chaos=None)
        mine.append(app)
    return DesiredState.of(host, tuple(mine), known_host=host in hosts, notes=tuple(notes))
