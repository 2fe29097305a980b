"""Pure traffic decisions: from an app's `traffic:` block to the frontends a load balancer must serve.

Strategies (app.yaml `traffic.strategy`):
- weighted:   the weights as written.
- blue-green: exactly one colour has weight > 0 (validated): it gets all traffic; the idle colour keeps
              running, so switching back is one weight change.
- canary:     the weights as written are the current split (a person moves them commit by commit).
- ab:         sticky buckets: `ab.percent`% of clients (hash of a cookie + client address) go to
              `ab.variant`, the rest by weight to the others; a header override pins one variant.
"""

from __future__ import annotations

from .lb_conf import ABSplit, Backend, Frontend
from .model import DesiredState, Traffic

__all__ = ["frontends_of", "effective_weights"]


def effective_weights(traffic: Traffic) -> dict[str, int]:
    weights = dict(traffic.weights)
    if traffic.strategy == "blue-green":
        live = [name for name, w in weights.items() if w > 0]
        return {name: (100 if name in live[:1] else 0) for name in weights}
    if traffic.strategy == "ab" and traffic.ab_variant:
        weights[traffic.ab_variant] = 0      # the variant only gets its buckets (and header overrides)
    return weights


def frontends_of(desired: DesiredState) -> tuple[Frontend, ...]:
    """One frontend per app with traffic, its backends on the services' loopback ports."""
    out = []
    for app in desired.apps:
        if app.traffic is None:
            continue
        weights = effective_weights(app.traffic)
        backends = tuple(Backend(name, f"127.0.0.1:{desired.services[name].port}", w)
                         for name, w in sorted(weights.items()) if name in desired.services)
        ab = None
        if app.traffic.strategy == "ab" and app.traffic.ab_variant:
            ab = ABSplit(app.traffic.ab_variant, app.traffic.ab_percent)
        out.append(Frontend(app.name, app.traffic.listen, backends, ab))
    return tuple(sorted(out, key=lambda f: f.name))
