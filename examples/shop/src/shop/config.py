"""The shop's configuration, read once from the process environment and the SHOP_CONFIG TOML file.

Why a module of its own: settings.py, the worker and the tests read the same values, and every error
must name the variable or key at fault without ever echoing a value (SECRET_KEY and the orders API
token are secrets; a config file may hold more). Nothing here imports Django.

Environment:
  SECRET_KEY     required, non-empty (Django's signing key; from the agent's secret)
  SHOP_DATA      required: a directory; the SQLite database and the worker's heartbeats live there
  SHOP_CONFIG    optional: a TOML file (see settings.toml.j2 in the state repo)
  SHOP_GREETING  optional: a UTF-8 text file whose content the front page shows
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ConfigError", "ShopConfig", "load", "DEFAULT_GREETING"]

DEFAULT_GREETING = "Welcome to the shop."
_MAX_GREETING = 4096


class ConfigError(ValueError):
    """The environment or the config file is unusable. The message names what, never a value."""


@dataclass(frozen=True)
class ShopConfig:
    secret_key: str = field(repr=False)
    data_dir: Path
    greeting: str = DEFAULT_GREETING
    title: str = "Demo shop"
    host: str = ""
    public_url: str = ""
    api_token: str = field(default="", repr=False)
    worker_interval_s: float = 5.0

    @property
    def database(self) -> Path:
        return self.data_dir / "shop.sqlite3"

    @property
    def heartbeat_dir(self) -> Path:
        return self.data_dir / "heartbeats"


def _table(doc: Mapping, name: str, path: str) -> Mapping:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return value


def _string(table: Mapping, key: str, where: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{key} must be a string")
    return value


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"SHOP_CONFIG {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:   # its message has the line and column, not the line's text
        raise ConfigError(f"SHOP_CONFIG {path}: not valid TOML: {e}") from None


def _read_greeting(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"SHOP_GREETING {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"SHOP_GREETING {path}: not UTF-8 text") from None
    return text.strip()[:_MAX_GREETING] or DEFAULT_GREETING


def load(environ: Mapping[str, str] | None = None) -> ShopConfig:
    """The configuration from `environ` (default: os.environ). Unknown TOML keys are ignored, so a
    newer config file does not stop an older release that is being rolled back to."""
    env = os.environ if environ is None else environ
    secret_key = env.get("SECRET_KEY", "")
    if not secret_key:
        raise ConfigError("SECRET_KEY is not set (or empty): the shop refuses to start without it")
    data = env.get("SHOP_DATA", "")
    if not data:
        raise ConfigError("SHOP_DATA is not set: the directory for the database and heartbeats")
    kwargs: dict = {}
    if env.get("SHOP_GREETING"):
        kwargs["greeting"] = _read_greeting(env["SHOP_GREETING"])
    if env.get("SHOP_CONFIG"):
        path = env["SHOP_CONFIG"]
        doc = _read_toml(path)
        shop = _table(doc, "shop", path)
        kwargs["title"] = _string(shop, "title", "shop", "Demo shop")
        kwargs["host"] = _string(shop, "host", "shop", "")
        kwargs["public_url"] = _string(shop, "public_url", "shop", "")
        kwargs["api_token"] = _string(_table(doc, "orders", path), "api_token", "orders", "")
        interval = _table(doc, "worker", path).get("interval_s", 5.0)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval <= 3600:
            raise ConfigError(f"SHOP_CONFIG {path}: worker.interval_s must be a number in (0, 3600]")
        kwargs["worker_interval_s"] = float(interval)
    return ShopConfig(secret_key=secret_key, data_dir=Path(data), **kwargs)
