"""Ask Prometheus (its HTTP API, `GET /api/v1/query`) for an instant vector: the wave gates' evidence."""

from __future__ import annotations

import json
import logging
import math
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["instant_query"]

log = logging.getLogger(__name__)


def instant_query(base_url: str, query: str, timeout_s: float = 5.0) -> list[float] | None:
    """The sample values of `query` now (a vector's values, or a scalar's); None if Prometheus cannot be
    asked or answers an error (the caller treats that as 'pause', never as a pass). NaN samples are dropped."""
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = json.loads(resp.read(1 << 22))
    except (OSError, ValueError, urllib.error.URLError) as exc:
        log.warning("prometheus %s: query %r failed: %s", base_url, query, exc)
        return None
    if not isinstance(body, dict) or body.get("status") != "success":
        log.warning("prometheus %s: query %r: %s", base_url, query, body.get("error") if isinstance(body, dict) else body)
        return None
    data = body.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    try:
        if kind == "vector":
            values = [float(r["value"][1]) for r in result]
        elif kind == "scalar":
            values = [float(result[1])]
        else:
            log.warning("prometheus %s: query %r returned a %s, not a vector", base_url, query, kind)
            return None
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return [v for v in values if not math.isnan(v)]
