"""Load a checkout of the state repo in two steps: read (files -> raw documents, the only file access)
and validate (raw documents -> schema -> references -> typed model, pure), then select what targets a host.

Modules: `read` (files), `_yaml` (strict YAML with lines), `schema`, `validate` (the pipeline), `builders`
(environments, services, traffic, rollout, chaos), `selectors`, `overrides`, `conflicts` (also used by
staging), `problems`, `options`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agent.core.errors import InvalidState, Problem
from agent.core.load.builders import duration_s
from agent.core.load.hints import defined
from agent.core.load.options import APP_FILE, APPS_DIR, FLEET_FILE, MAX_APPS, LoadOptions
from agent.core.load.read import read_tree
from agent.core.load.selectors import Host, expression_holds, selects
from agent.core.load.validate import Validated, validate
from agent.core.model import DesiredState, Rollout

__all__ = ["LoadOptions", "load_desired", "validate_tree", "FLEET_FILE", "APPS_DIR", "APP_FILE", "MAX_APPS",
           "duration_s", "Host", "selects", "expression_holds"]

# the names tests and older callers used
_Host, _selects, _expression_holds = Host, selects, expression_holds


def _validated(root: Path, opts: LoadOptions) -> Validated:
    return validate(read_tree(Path(root), opts), opts)


def validate_tree(root: Path, opts: LoadOptions = LoadOptions()) -> list[Problem]:
    """Every problem in a checkout, for every host of the fleet (the state repo's own CI)."""
    return list(_validated(root, opts).problems)


def load_desired(root: Path, host: str, opts: LoadOptions = LoadOptions()) -> DesiredState:
    """The desired state of `host`; InvalidState (with every problem) if any part of the revision is invalid.

    The whole revision is validated, not only what targets this host: a revision is accepted or
    rejected as a unit, the same on every host. A host that fleet.yaml does not list is refused (the
    revision is invalid for it, DESIGN §3d). Overrides that select this host are applied (in list
    order: a later entry wins) and named in the notes.
    """
    result = _validated(root, opts)
    problems = list(result.problems)
    listed = result.fleet.data.get("hosts") if result.fleet is not None and isinstance(result.fleet.data, dict) else None
    if result.fleet is not None and host not in result.hosts and not (isinstance(listed, dict) and host in listed):
        problems.append(_unknown_host(host, result))
    if problems:
        raise InvalidState(problems)
    me = result.hosts[host]
    mine, notes = [], []
    for doc, base in result.apps:
        if not selects(doc.data.get("hosts"), me):
            continue
        app = result.variants.of(doc, base, me)
        if app is None:      # every listed host's variants were built and checked by validate()
            raise AssertionError(f"app {base.name}: no valid variant for host {host} in a valid revision")
        notes += [f"app {app.name}: {o}" for o in app.overrides]
        if app.rollout is not None:
            waves = (doc.data.get("rollout") or {}).get("waves") or []
            app = dataclasses.replace(app, rollout=Rollout(tuple(
                dataclasses.replace(w, selected="hosts" in spec and selects(spec["hosts"], me))
                for w, spec in zip(app.rollout.waves, waves))))
        if app.chaos is not None and not opts.allow_chaos:
            notes.append(f"app {app.name}: chaos block ignored (this agent does not allow chaos: --allow-chaos)")
            app = dataclasses.replace(app, chaos=None)
        mine.append(app)
    return DesiredState.of(host, tuple(mine), known_host=True, notes=tuple(notes), decommission=me.decommission,
                           groups=tuple(sorted(me.groups)), labels=tuple(sorted(me.labels.items())))


def _unknown_host(host: str, result: Validated) -> Problem:
    """A host fleet.yaml does not list gets nothing from this revision, rather than an empty desired state
    that would tear it down (a typo or a renamed entry must not empty a host: DESIGN §3d)."""
    return Problem(FLEET_FILE, result.fleet.line(("hosts",)), "hosts",
                   f"host {host!r} is not defined in {FLEET_FILE}, so this revision is not applied to it (a host "
                   f"the fleet does not list is never emptied){defined(host, result.hosts, 'host')}; add it under "
                   f"hosts: (or run the agent with the --host name it has there)")
