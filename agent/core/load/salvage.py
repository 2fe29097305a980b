"""The part of a schema-invalid app document that is still sound, so one run reports every problem.

An app with one typo must still have its references and ports checked (a port clash reported next to
the typo, not after it is fixed). Instead of running the builders on data of unknown shape (and
swallowing what breaks), this cuts the document down to what the schema accepts: unknown fields are
dropped, then every environment or service (or other top-level section) that still fails is left out.
The builders then see only schema-valid data; what was cut is reported by the schema already.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from agent.core._record import record
from agent.core.load._yaml import Located
from agent.core.load.schema import schema_errors

__all__ = ["Salvaged", "salvage"]

_ITEMS = ("environments", "services")       # sections cut item by item
_REQUIRED = {"environments": ("lockfile",), "services": ("environment", "command")}
_ROUNDS = 8


@record
class Salvaged:
    doc: Located                            # schema-valid; without overrides (they may name what was cut)
    declared_environments: frozenset[str]   # names the original declares, so a cut one is not "undefined"
    declared_services: frozenset[str]
    damaged_services: frozenset[str]        # services that lost a field: no checks that would need it
    hosts_intact: bool                      # the `hosts` selector survived: the app can be placed on hosts


def salvage(doc: Located) -> Salvaged | None:
    """None when nothing sound is left (not a mapping, or no usable name)."""
    if not isinstance(doc.data, dict):
        return None
    data: dict[str, Any] = copy.deepcopy(doc.data)
    data.pop("overrides", None)
    declared = {s: frozenset(k for k in data[s] if isinstance(k, str)) if isinstance(data.get(s), dict) else frozenset()
                for s in _ITEMS}
    cut: set[tuple] = set()
    for _ in range(_ROUNDS):
        errors = schema_errors(data, "app")
        if not errors:
            damaged = frozenset(p[1] for p in cut if len(p) > 2 and p[0] == "services")
            return Salvaged(Located(data, doc.lines, doc.file), declared["environments"], declared["services"],
                            damaged, "hosts" in data or "hosts" not in doc.data)
        unknown = [_unknown(err) for err in errors]
        cuts = [c for group in unknown if group for c in group] or [_section(tuple(e.absolute_path)) for e in errors]
        cut.update(cuts)
        for path in sorted(set(cuts), key=len, reverse=True):
            if not path:
                if not _fill_root(data, doc.file):
                    return None
                continue
            _cut(data, path)
    return None


def _unknown(err) -> list[tuple] | None:
    """Paths of the fields an error says are unknown (or badly named keys), if it says that."""
    path = tuple(err.absolute_path)
    if err.validator == "additionalProperties" and err.validator_value is False and isinstance(err.instance, dict):
        allowed = set(err.schema.get("properties", {}))
        return [path + (k,) for k in err.instance if k not in allowed]
    if "propertyNames" in err.relative_schema_path:
        return [path + (err.instance,)]
    return None


def _section(path: tuple) -> tuple:
    """What to leave out for an error at `path`: one optional field of an environment or service, or
    the whole item when the field is required; elsewhere the top-level field."""
    if len(path) >= 3 and path[0] in _ITEMS and path[2] not in _REQUIRED[path[0]]:
        return path[:3]
    if len(path) >= 2 and path[0] in _ITEMS:
        return path[:2]
    return path[:1]


def _fill_root(data: dict, file: str) -> bool:
    """Give the root what it requires, so what is under it can still be checked."""
    data.setdefault("apiVersion", "gitops-agent/v1")
    data.setdefault("kind", "App")
    if "name" not in data:
        data["name"] = Path(file).parent.name
    return not schema_errors({"apiVersion": data["apiVersion"], "kind": data["kind"], "name": data["name"]}, "app")


def _cut(data: Any, path: tuple) -> None:
    *parents, last = path
    for part in parents:
        data = data[part]
    if isinstance(data, dict):
        data.pop(last, None)
    elif isinstance(data, list) and isinstance(last, int) and last < len(data):
        del data[last]
