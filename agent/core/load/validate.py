"""Step two of loading: the read snapshot -> schema -> references -> typed apps, per host. Pure.

Validation collects every problem (file, line, field, message) before failing, so a user fixes a
revision in one round trip. A revision is judged as a whole, for every host of the fleet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path

from agent.core._record import record
from agent.core.errors import Problem
from agent.core.load._yaml import Located
from agent.core.load.builders import build_app, rollout
from agent.core.load.conflicts import conflicts
from agent.core.load.options import LoadOptions
from agent.core.load.overrides import describe_override, override_paths_ok, with_overrides
from agent.core.load.problems import Collector
from agent.core.load.read import RawTree
from agent.core.load.salvage import salvage
from agent.core.load.schema import schema_errors, schema_problems
from agent.core.load.selectors import Host, hosts_of, selects
from agent.core.materials import template_problems
from agent.core.model import App

__all__ = ["Validated", "Variants", "validate"]

# Templates are rendered for at most this many of the hosts an app runs on (host names, groups and labels may
# steer them); each host renders them again, with its real secrets, before anything is written.
_TEMPLATE_HOSTS = 50


@record
class Validated:
    """The outcome of validating a revision: its hosts, its apps (base form), every problem."""

    hosts: dict[str, Host] = field(hash=False)
    apps: tuple[tuple[Located, App], ...]
    problems: tuple[Problem, ...]
    variants: "Variants"
    fleet: Located | None = None


class Variants:
    """An app as a given host sees it: its base, or with the overrides that select the host applied.

    Hosts selecting the same overrides share one build, so a fleet of thousands of hosts costs one
    build per distinct override combination. Problems are reported once, naming the overrides.
    """

    def __init__(self, tree: RawTree, defaults: dict, opts: LoadOptions, out: Collector):
        self.tree, self.defaults, self.opts, self.out = tree, defaults, opts, out
        self.broken: set[str] = set()           # docs whose override paths are invalid: no variants
        self._cache: dict[tuple[str, tuple[int, ...]], App | None] = {}

    def of(self, doc: Located, base: App, host: Host) -> App | None:
        """None when this host's variant is invalid (its problems are in `out`)."""
        entries = doc.data.get("overrides") or []
        key = tuple(i for i, e in enumerate(entries) if selects(e["hosts"], host))
        if not key or doc.file in self.broken:
            return base
        cache_key = (doc.file, key)
        if cache_key not in self._cache:
            self._cache[cache_key] = self._build(doc, key)
        return self._cache[cache_key]

    def _build(self, doc: Located, key: tuple[int, ...]) -> App | None:
        entries = doc.data["overrides"]
        variant = Located(with_overrides(doc.data, [entries[i] for i in key]), doc.lines, doc.file)
        sub = Collector()
        app = None
        if schema_problems(variant, "app", sub):
            app = build_app(variant, self.tree, self.defaults, self.opts, sub)
        suffix = f" (with {', '.join(f'overrides[{i}]' for i in key)} applied)"
        self.out.extend(dataclasses.replace(p, message=p.message + suffix) for p in sub.problems)
        if sub.problems or app is None:
            return None
        return dataclasses.replace(app, overrides=tuple(describe_override(i, entries[i]) for i in key))


def _sound_hosts(fleet: Located | None) -> dict[str, Host]:
    """The host entries of an invalid fleet.yaml that are valid themselves, so the apps on them are still
    checked against each other (a typo in one host entry must not hide a port clash on the others)."""
    entries = fleet.data.get("hosts") if fleet is not None and isinstance(fleet.data, dict) else None
    if not isinstance(entries, dict):
        return {}
    sound = {name: spec for name, spec in entries.items()
             if not schema_errors({"apiVersion": "gitops-agent/v1", "kind": "Fleet", "hosts": {name: spec}}, "fleet")}
    return hosts_of({"hosts": sound})


def _locator(doc: Located):
    return lambda path: (doc.file, doc.line(path))


def validate(tree: RawTree, opts: LoadOptions) -> Validated:
    out = Collector()
    out.extend(tree.problems)
    fleet = tree.fleet
    fleet_ok = fleet is not None and schema_problems(fleet, "fleet", out)
    defaults = (fleet.data.get("defaults") or {}) if fleet_ok else {}
    hosts = hosts_of(fleet.data) if fleet_ok else _sound_hosts(fleet)
    if fleet_ok and fleet.data.get("agent"):
        rollout(fleet, out, ("agent",))         # the agent's own waves: checked like an app's
    variants = Variants(tree, defaults, opts, out)
    apps: list[tuple[Located, App]] = []
    partial: list[tuple[Located, App]] = []     # the sound part of invalid apps: checked, never loaded
    for doc in tree.apps:
        valid = schema_problems(doc, "app", out)
        saved = None if valid else salvage(doc)
        work = doc if valid else saved.doc if saved else None
        if work is None:
            continue
        expected = Path(doc.file).parent.name
        if work.data["name"] != expected:
            out.add(doc, ("name",), f"app name {work.data['name']!r} must match its directory {expected!r}")
        if valid and not override_paths_ok(doc, out):
            variants.broken.add(doc.file)
        app = build_app(work, tree, defaults, opts, out, saved)
        if valid:
            apps.append((doc, app))
        elif saved.hosts_intact:
            partial.append((work, app))
    for doc, app in apps:
        if any(f.template is not None for f in app.files):
            mine = [h for h in hosts.values() if selects(doc.data.get("hosts"), h)][:_TEMPLATE_HOSTS]
            out.extend(template_problems(app, [(h.name, tuple(sorted(h.groups)), h.labels) for h in mine] or
                                         [("HOST", (), {})], f"/ROOT/apps/{app.name}/data"))
    if hosts:
        for host in hosts.values():
            mine = [(d, variants.of(d, a, host)) for d, a in apps if selects(d.data.get("hosts"), host)]
            mine += [(d, a) for d, a in partial if selects(d.data.get("hosts"), host)]
            out.extend(conflicts([(a, _locator(d)) for d, a in mine if a is not None],
                                 f" (both run on host {host.name})"))
    else:
        out.extend(conflicts([(a, _locator(d)) for d, a in apps + partial]))
    return Validated(hosts, tuple(apps), tuple(out.unique()), variants, fleet)
