"""Which hosts an app (an override, a wave) selects: names OR groups OR a Kubernetes-style label selector."""

from __future__ import annotations

from dataclasses import field

from agent.core._record import record

__all__ = ["Host", "hosts_of", "selects", "expression_holds", "describe_selector"]


@record
class Host:
    """A host as fleet.yaml defines it."""

    name: str
    groups: frozenset[str]
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    decommission: bool = False          # fleet.yaml says this host may be emptied (DESIGN §3d)


def hosts_of(fleet_data: object) -> dict[str, Host]:
    """The hosts of a schema-valid fleet document (None or a broken document: no hosts)."""
    if not isinstance(fleet_data, dict):
        return {}
    hosts = {}
    for name, spec in (fleet_data.get("hosts") or {}).items():
        spec = spec or {}
        hosts[name] = Host(name, frozenset(spec.get("groups", [])), dict(spec.get("labels", {})),
                           bool(spec.get("decommission", False)))
    return hosts


def selects(selector: dict | None, host: Host) -> bool:
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
            and all(expression_holds(e, host.labels) for e in expressions))


def expression_holds(expr: dict, labels: dict[str, str]) -> bool:
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


def describe_selector(selector: dict) -> str:
    parts = []
    for name in ("names", "groups"):
        if selector.get(name):
            parts.append(f"{name} {','.join(selector[name])}")
    if selector.get("matchLabels"):
        parts.append("labels " + ",".join(f"{k}={v}" for k, v in selector["matchLabels"].items()))
    for e in selector.get("matchExpressions") or []:
        parts.append(f"{e['key']} {e['operator']} {','.join(e.get('values') or [])}".rstrip())
    return "; ".join(parts) or "every host"
