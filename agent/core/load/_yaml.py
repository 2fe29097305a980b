"""Strict YAML: plain data plus the line of every key, so errors can say file:line.

PyYAML's composer gives nodes with marks; we construct the data ourselves so that duplicate
keys, non-string keys, tags and alias bombs become clear errors instead of silent surprises.

Plain scalars are typed by the YAML 1.2 core schema, not PyYAML's YAML 1.1 one: only true/false
(True/TRUE/False/FALSE) are booleans, so `country: no` or `mode: on` stay strings; `0777` is the
decimal 777 (`0o777` is octal), `1:30` is a string, not 5400; dates stay the text written.
"""

from __future__ import annotations

from typing import Any

import math
import re

import yaml

from agent.core.errors import InvalidState, Problem

__all__ = ["MAX_BYTES", "MAX_NODES", "Located", "parse"]

MAX_BYTES = 1024 * 1024       # a state file larger than this is a mistake or an attack
MAX_NODES = 100_000           # bounds alias expansion ("billion laughs")

Path_ = tuple[Any, ...]


class Located:
    """Parsed data and the 1-based line of every path in it."""

    __slots__ = ("data", "lines", "file")

    def __init__(self, data: Any, lines: dict[Path_, int], file: str):
        self.data = data
        self.lines = lines
        self.file = file

    def line(self, path: Path_) -> int | None:
        """Line of the deepest existing prefix of `path` (an error on a missing key points at its parent)."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)


class _Builder:
    def __init__(self, file: str):
        self.file = file
        self.lines: dict[Path_, int] = {}
        self.count = 0

    def fail(self, node: yaml.Node, field: str, message: str) -> None:
        raise InvalidState([Problem(self.file, node.start_mark.line + 1, field, message)])

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            self.fail(node, _dotted(path), f"document expands to more than {MAX_NODES} nodes (alias bomb?)")
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _COLLECTION_TAGS:
            self.fail(node, _dotted(path), f"unsupported YAML tag {node.tag}")
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            out = []
            for i, item in enumerate(node.value):
                self.lines.setdefault(path + (i,), item.start_mark.line + 1)
                out.append(self.build(item, path + (i,)))
            return out
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.fail(key_node, _dotted(path), "merge keys (<<) are not supported")
            key = self._scalar(key_node, path)
            if not isinstance(key, str):
                self.fail(key_node, _dotted(path), f"keys must be strings, got {type(key).__name__} {key!r}")
            if key in out:
                self.fail(key_node, _dotted(path + (key,)), f"duplicate key {key!r}")
            self.lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, path + (key,))
        return out

    def _scalar(self, node: yaml.Node, path: Path_) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, _dotted(path), "a key must be a plain scalar")
        tag = node.tag
        if tag.startswith("tag:yaml.org,2002:"):
            kind = tag.rsplit(":", 1)[1]
            if kind in ("str", "timestamp"):  # a date stays the text the user wrote
                return _LOADER.construct_scalar(node)
            if kind in _SAFE:
                value = _SAFE[kind](node)
                if value is _NOT_CORE:
                    self.fail(node, _dotted(path), f"{node.value!r} is not a {kind} (YAML 1.2 core schema)")
                return value
        self.fail(node, _dotted(path), f"unsupported YAML tag {tag}")


_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_LOADER = yaml.SafeLoader("")
_T = "tag:yaml.org,2002:"

# The YAML 1.2 core schema (yaml.org/spec/1.2.2 §10.3.2), in resolution order.
_CORE = (
    ("null", re.compile(r"^(?:~|null|Null|NULL|)$"), list("~nN") + [""]),
    ("bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")),
    ("float", re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                         r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+.0123456789")),
)


# libyaml's composer when PyYAML was built with it (3x faster); nodes and marks are the same either way.
class _Composer(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Resolves plain scalars by the YAML 1.2 core schema (merge keys still resolve, to be refused)."""

    yaml_implicit_resolvers: dict = {}


_Composer.add_implicit_resolver(_T + "merge", re.compile(r"^(?:<<)$"), ["<"])
for _kind, _regexp, _first in _CORE:
    _Composer.add_implicit_resolver(_T + _kind, _regexp, _first)

_COMPOSER = _Composer


def _core(kind: str):
    """A constructor that accepts only the core schema's forms of `kind` (also for explicit `!!kind` tags)."""
    regexp = next(r for k, r, _ in _CORE if k == kind)

    def construct(node: yaml.ScalarNode) -> Any:
        value = node.value
        if not regexp.match(value):
            return _NOT_CORE
        if kind == "null":
            return None
        if kind == "bool":
            return value.lower() == "true"
        if kind == "int":
            if value.startswith(("0o", "0x")):
                return int(value[2:], 8 if value[1] == "o" else 16)
            return int(value)
        if value.lstrip("+-").lower() == ".inf":
            return -math.inf if value.startswith("-") else math.inf
        if value.lower() == ".nan":
            return math.nan
        return float(value)

    return construct


_NOT_CORE = object()
_SAFE = {kind: _core(kind) for kind, _, _ in _CORE}


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def parse(text: bytes | str, file: str) -> Located:
    """Parse one YAML document; raise InvalidState (file, line, what) on anything but plain data."""
    if len(text) > MAX_BYTES:
        raise InvalidState([Problem(file, None, "", f"file is {len(text)} bytes, more than the limit of {MAX_BYTES}")])
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidState([Problem(file, None, "", f"not UTF-8: {exc}")]) from None
    try:
        nodes = list(yaml.compose_all(text, Loader=_COMPOSER))
    except yaml.MarkedYAMLError as exc:
        raise InvalidState([_syntax_problem(exc, file)]) from None
    except yaml.YAMLError as exc:
        raise InvalidState([Problem(file, None, "", f"YAML error: {exc}")]) from None
    if len(nodes) != 1:
        raise InvalidState([Problem(file, None, "", f"expected exactly one YAML document, found {len(nodes)}")])
    builder = _Builder(file)
    data = builder.build(nodes[0], ())
    builder.lines.setdefault((), nodes[0].start_mark.line + 1)
    return Located(data, builder.lines, file)


def _syntax_problem(exc: yaml.MarkedYAMLError, file: str) -> Problem:
    """file:line of the failure, and the line where the bracket, quote or block it is inside opened
    (the unclosed `[` is usually the mistake, far above where the parser gave up)."""
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    problem = exc.problem or str(exc)
    context = exc.context or ""
    if exc.context_mark is not None and exc.problem_mark is not None and context:
        opened, column = exc.context_mark.line + 1, exc.context_mark.column + 1
        check = "is it closed?" if ("flow" in context or "quoted" in context) else "check the indentation"
        return Problem(file, line, "", f"YAML syntax error: {problem}, {context} that opened at line {opened}, "
                                       f"column {column} ({check})")
    return Problem(file, line, "", f"YAML syntax error: {' '.join(filter(None, [context, problem]))}")
