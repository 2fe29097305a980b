"""The JSON Schemas in `schemas/`, and their errors as problems a user can act on."""

from __future__ import annotations

import json
from functools import lru_cache

from agent.core.load._yaml import Located
from agent.core.load.hints import did_you_mean
from agent.core.load.problems import Collector

__all__ = ["validator", "app_schema", "schema_errors", "schema_problems"]


@lru_cache(maxsize=None)
def validator(kind: str):
    from importlib import resources

    from jsonschema import Draft202012Validator

    # A source checkout reads its own schemas/ (the package `agent.schemas` maps to it only when installed
    # from this checkout: an editable install of another checkout would hand in that one's schemas).
    from pathlib import Path

    own = Path(__file__).resolve().parents[3] / "schemas" / f"{kind}.schema.json"
    if own.is_file() and (own.parent.parent / "agent" / "__init__.py").is_file():
        text = own.read_text()
    else:
        text = resources.files("agent.schemas").joinpath(f"{kind}.schema.json").read_text()
    return Draft202012Validator(json.loads(text))


@lru_cache(maxsize=None)
def app_schema() -> dict:
    return validator("app").schema


def schema_errors(data: object, kind: str) -> list:
    return sorted(validator(kind).iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))


def schema_problems(doc: Located, kind: str, out: Collector) -> bool:
    """Validate against the JSON Schema; True when the document is valid."""
    errors = schema_errors(doc.data, kind)
    for err in errors:
        path = tuple(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = set(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - allowed):
                out.add(doc, path + (key,), f"unknown field {key!r}" + did_you_mean(key, allowed))
            continue
        out.add(doc, path, _short(err))
    return not errors


def _short(err) -> str:
    path = tuple(err.absolute_path)
    if err.validator == "pattern" and path[-2:] == ("command", 0) and isinstance(err.instance, str):
        if "/" in err.instance or "\\" in err.instance:
            return (f"{err.instance!r} is not allowed here: argv[0] is a console script name from the venv, not a "
                    f"path (write {err.instance.replace(chr(92), '/').rsplit('/', 1)[-1]!r}; the agent runs "
                    "<venv>/bin/<name>)")
        return (f"{err.instance!r} is not allowed here: argv[0] is a console script name from the venv "
                "(letters, digits and _ . + -; options go after it)")
    if err.validator == "pattern":
        return f"{err.instance!r} is not allowed here (must match {err.validator_value})"
    if err.validator in ("oneOf", "anyOf"):
        return f"{err.instance!r} matches none of the allowed forms"
    msg = err.message
    return msg if len(msg) < 300 else msg[:300] + "..."
