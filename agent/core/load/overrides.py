"""Per-host overrides: the engine that walks the App schema to check `set` paths and applies them.

An override changes fields of an app for the hosts its selector picks; it never adds an environment or
a service. Paths are dotted, matched against the names the document has (names may contain dots).
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from agent.core.load._yaml import Located
from agent.core.load.hints import defined
from agent.core.load.problems import Collector
from agent.core.load.schema import app_schema
from agent.core.load.selectors import describe_selector

__all__ = ["OVERRIDABLE", "split_path", "locate", "override_paths_ok", "with_overrides", "describe_override"]

OVERRIDABLE = ("environments", "services", "traffic", "mode")
_NAMED = ("environments", "services")


def schema_child(node: dict, key: str) -> dict | None:
    """The schema of field `key` inside an object/array schema `node`; None if the schema has no such field."""
    while "$ref" in node:
        node = app_schema()["$defs"][node["$ref"].rsplit("/", 1)[1]]
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


def split_path(data: Any, path: str) -> list[str]:
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


def locate(data: Any, parts: list[str], create: bool = False) -> tuple[Any, Any] | None:
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


def override_paths_ok(doc: Located, out: Collector) -> bool:
    """Every `set` path names a field of the App schema under an overridable section, inside what exists."""
    ok = True
    for i, entry in enumerate(doc.data.get("overrides") or []):
        for path in entry["set"]:
            where = ("overrides", i, "set", path)
            parts = split_path(doc.data, path)
            if parts[0] not in OVERRIDABLE:
                out.add(doc, where, f"only fields under {', '.join(OVERRIDABLE)} can be overridden")
                ok = False
                continue
            node: dict | None = app_schema()
            for part in parts:
                node = schema_child(node, part)
                if node is None:
                    break
            if node is None:
                out.add(doc, where, f"{path!r} is not a field of an App (see schemas/app.schema.json)")
                ok = False
            elif locate(copy.deepcopy(doc.data), parts, create=True) is None:
                names = doc.data.get(parts[0]) if parts[0] in _NAMED and len(parts) > 1 else None
                hint = defined(parts[1], names, parts[0][:-1]) if isinstance(names, dict) and parts[1] not in names else ""
                out.add(doc, where, f"{'.'.join(parts[:2])!r} is not defined in this app (or an index is out of "
                                    f"range): overrides change an app's environments and services, never add them{hint}")
                ok = False
    return ok


def with_overrides(data: dict, entries: list[dict]) -> dict:
    data = copy.deepcopy(data)
    for entry in entries:
        for path, value in entry["set"].items():
            container, key = locate(data, split_path(data, path), create=True)
            container[key] = copy.deepcopy(value)
    return data


def describe_override(i: int, entry: dict) -> str:
    sets = ", ".join(f"{p}={json.dumps(v)}" for p, v in entry["set"].items())
    return f"overrides[{i}] (hosts: {describe_selector(entry['hosts'])}) set {sets}"
