"""Logging setup: text by default, one JSON object per line with --log-format json. Credentials redacted."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

__all__ = ["setup_logging", "scrub", "remember_secrets", "MIN_SECRET_LENGTH"]

_CRED = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
# Secret values this process has decrypted (DESIGN §3a): every log line, at any level, hides them. Process-wide
# like logging itself, so a line from any module or library (a traceback too) is covered.
_SECRETS: tuple[str, ...] = ()


# Values shorter than this are not hidden: a dotenv's `DEBUG=1` or `PORT=5432` is no secret, and hiding every
# "1" would make each line unreadable while its pattern of *** told the value. Real secrets are longer.
MIN_SECRET_LENGTH = 6


def remember_secrets(values) -> None:
    """Add decrypted secret values to what log output hides (longest first: a value holding another is hidden whole)."""
    global _SECRETS
    _SECRETS = tuple(sorted(set(_SECRETS) | {v for v in values if len(v) >= MIN_SECRET_LENGTH}, key=len, reverse=True))


def scrub(text: str) -> str:
    """Hide userinfo in URLs (https://user:token@host -> https://***@host) and known secret values (each spelling)."""
    if _SECRETS:
        from agent.core.redact import redact

        text = redact(text, _SECRETS)
    return _CRED.sub(r"\g<scheme>***@", text)


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key in ("action", "resource", "reason", "result", "revision"):
            if hasattr(record, key):
                data[key] = scrub(str(getattr(record, key)))
        if record.exc_info:
            data["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(data)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if fmt == "json" else _Text("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
