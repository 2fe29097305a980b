"""Pure traffic decisions: from an app's `traffic:` block to the frontends a load balancer must serve.

Strategies (app.yaml `traffic.strategy`):
- weighted:   the weights as written.
- blue-green: exactly one colour has weight > 0 (validated): it gets all traffic; the idle colour keeps
              running, so switching back is one weight change.
- canary:     without `canary:`, the weights as written are the current split (a person moves them
              commit by commit); with `canary:`, the agent walks the steps itself (`canary_step`):
              each step lasts at least `pause_s` and needs probe evidence under `max_error_rate`
              (and, with `analysis:`, a passing Prometheus query); a failed gate aborts to 0% and
              stays failed until a commit changes the canary.
- ab:         sticky buckets: `ab.percent`% of clients (hash of a cookie + client address) go to
              `ab.variant`, the rest by weight to the others; a header override pins one variant.
"""

from __future__ import annotations

from dataclasses import replace

from agent.core._record import record
from agent.core.render.lb import ABSplit, Backend, Frontend
from agent.core.model import Canary, DesiredState, Traffic

__all__ = ["frontends_of", "effective_weights", "CanaryProgress", "canary_step", "canary_percent", "with_canary"]


@record
class CanaryProgress:
    """Where an app's canary stands; persisted in the status file so it survives agent restarts."""

    id: str                     # identity of the canary's desired config: a new one restarts the walk
    step: int = 0
    since: float = 0.0          # when the current step began
    probes: int = 0             # evidence gathered during this step
    errors: int = 0
    state: str = "progressing"  # progressing | complete | failed
    reason: str = ""
    analysis: str = ""          # the last verdict of `canary.analysis` (pass|fail|pause: why), if it has one


def canary_step(canary: Canary, progress: CanaryProgress | None, canary_id: str, now: float,
                probe: tuple[int, int] | None, analysis: tuple[str, str] | None = None) -> CanaryProgress:
    """The next progress from the last one, this reconcile's probe (probes, errors) and the verdict of the
    canary's Prometheus analysis (`agent.core.waves.gate_verdict`), each None if it did not run.

    An analysis that fails aborts to 0% like a failed probe; one that pauses (no data, by the no_data
    policy, or Prometheus not answering) holds the step; a canary with an analysis advances only on a pass."""
    if progress is None or progress.id != canary_id:
        return CanaryProgress(canary_id, 0, now)
    if progress.state != "progressing":
        return progress
    probes = progress.probes + (probe[0] if probe else 0)
    errors = progress.errors + (probe[1] if probe else 0)
    step = min(progress.step, len(canary.steps) - 1)   # progress recorded under longer steps
    verdict = f"{analysis[0]}: {analysis[1]}" if analysis else progress.analysis
    if probes and errors / probes > canary.max_error_rate:
        return replace(progress, probes=probes, errors=errors, state="failed", analysis=verdict,
                       reason=f"step {step + 1} ({canary.steps[step]}%): error rate "
                              f"{errors}/{probes} above {canary.max_error_rate:g}; aborted to 0%")
    if analysis is not None and analysis[0] == "fail":
        return replace(progress, probes=probes, errors=errors, state="failed", analysis=verdict,
                       reason=f"step {step + 1} ({canary.steps[step]}%): analysis failed: {analysis[1]}; aborted to 0%")
    if canary.analysis is not None and (analysis is None or analysis[0] != "pass"):
        return replace(progress, probes=probes, errors=errors, analysis=verdict)     # held: no pass this time
    if probes and now - progress.since >= canary.pause_s:
        if step + 1 < len(canary.steps):
            return CanaryProgress(canary_id, step + 1, now, analysis=verdict)
        return replace(progress, probes=probes, errors=errors, state="complete", reason="all steps passed",
                       analysis=verdict)
    return replace(progress, probes=probes, errors=errors, analysis=verdict)


def canary_percent(canary: Canary, progress: CanaryProgress) -> int:
    if progress.state == "failed":
        return 0
    if progress.state == "complete":
        return 100
    return canary.steps[min(progress.step, len(canary.steps) - 1)]


def with_canary(traffic: Traffic, percent: int) -> Traffic:
    """The traffic block with the canary at `percent`; the stable services share the rest by their weights
    (largest remainder: the shares add up to exactly the rest, a heavier service never gets less than a
    lighter one, and a service weighted 0 gets nothing while another has weight)."""
    canary = traffic.canary.service
    others = {n: w for n, w in traffic.weights if n != canary}
    if not others:
        return replace(traffic, weights=((canary, percent),))
    if not sum(others.values()):
        others = {n: 1 for n in others}      # all drained: share evenly rather than send the rest nowhere
    total = sum(others.values())
    rest = 100 - percent
    shares = {n: rest * w // total for n, w in others.items()}
    by_remainder = sorted(others, key=lambda n: (-(rest * others[n] % total), -others[n], n))
    for name in by_remainder[:rest - sum(shares.values())]:
        shares[name] += 1
    weights = {**shares, canary: percent}
    return replace(traffic, weights=tuple(sorted(weights.items())))


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
