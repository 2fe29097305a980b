"""Staged waves across hosts: pure decisions (no I/O; time and gate answers are passed in).

Every agent decides alone whether the newest revision of an app is due on its host:

- its **wave** is the first one that includes it: a `hosts:` selector wave it matches (resolved by the
  loader into `Wave.selected`), or a `percent:` wave whose percent is above its **bucket**, a stable hash of
  the host name into 0..99 (the same host is always in the same bucket, on every agent, in every release);
- the wave **starts** `after` seconds past the committer time of the commit that last changed the app's
  directory (every agent reads the same commit, so no coordinator is needed; clocks must be roughly in sync);
- every **gate** of the waves up to and including its own must pass (a Prometheus query over what the
  earlier waves report); a failed gate stops its wave and all later ones, until a new commit changes the app.

Until then the host keeps the app's previous revision (computed from Git history by `agent.service.staging`).
Once a host found a change due it stays due (recorded), so a gate that turns bad later never rolls a
host back: that is a new commit's job.
"""

from __future__ import annotations

import hashlib
import operator

from agent.core._record import record
from agent.core.model import Gate, Rollout

__all__ = ["bucket", "wave_of", "Decision", "timing", "gate_verdict", "decide", "PASS", "FAIL", "PAUSE"]

PASS, FAIL, PAUSE = "pass", "fail", "pause"
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}


def bucket(host: str) -> int:
    """A stable bucket 0..99 for a host name (sha256, so it is the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(host.encode()).digest()[:8], "big") % 100


def wave_of(rollout: Rollout, host: str) -> int:
    """Index of the first wave that includes `host`; the last wave (percent 100, validated) takes the rest."""
    b = bucket(host)
    for i, wave in enumerate(rollout.waves):
        if wave.selected or (wave.percent is not None and b < wave.percent):
            return i
    return len(rollout.waves) - 1


@record
class Decision:
    due: bool
    wave: int                           # 0-based
    reason: str
    gates: tuple[int, ...] = ()         # waves whose gates must (still) pass before this host starts
    state: str = "waiting"              # waiting | gating | due | failed | paused


def _human(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def timing(rollout: Rollout, host: str, changed_at: float, now: float) -> Decision:
    """Whether the host's wave has started; which gates it then needs."""
    w = wave_of(rollout, host)
    wave = rollout.waves[w]
    age = now - changed_at
    who = "hosts selector" if wave.selected else f"bucket {bucket(host)} < {wave.percent}%"
    if age < wave.after_s:
        return Decision(False, w, f"wave {w + 1} ({who}) starts in {_human(wave.after_s - age)}")
    gates = tuple(i for i in range(w + 1) if rollout.waves[i].gate is not None)
    if gates:
        return Decision(False, w, f"wave {w + 1} ({who}) started; gates of wave(s) "
                                  f"{', '.join(str(g + 1) for g in gates)} to check", gates, "gating")
    return Decision(True, w, f"wave {w + 1} ({who}) started {_human(age - wave.after_s)} ago", (), "due")


def gate_verdict(gate: Gate, samples: list[float] | None) -> tuple[str, str]:
    """(pass|fail|pause, why) from a query's sample values; None means Prometheus could not be asked."""
    if samples is None:
        return PAUSE, "Prometheus did not answer"
    if not samples:
        return gate.on_no_data, f"no data (on_no_data: {gate.on_no_data})"
    bad = [v for v in samples if not _OPS[gate.op](v, gate.threshold)]
    if bad:
        return FAIL, f"{len(bad)}/{len(samples)} sample(s) not {gate.op} {gate.threshold:g} (e.g. {bad[0]:g})"
    return PASS, f"{len(samples)} sample(s) {gate.op} {gate.threshold:g}"


def decide(rollout: Rollout, host: str, changed_at: float, now: float,
           verdicts: dict[int, tuple[str, str]]) -> Decision:
    """The final decision, given the verdicts of the gates `timing` asked for (checked in wave order;
    the caller may stop asking after the first one that did not pass)."""
    first = timing(rollout, host, changed_at, now)
    if first.state != "gating":
        return first
    for g in first.gates:
        result, why = verdicts.get(g, (PAUSE, "not checked"))
        if result == FAIL:
            return Decision(False, first.wave, f"gate of wave {g + 1} failed: {why}; later waves stopped",
                            first.gates, "failed")
        if result == PAUSE:
            return Decision(False, first.wave, f"gate of wave {g + 1} paused: {why}", first.gates, "paused")
    return Decision(True, first.wave, f"wave {first.wave + 1} started; gates passed", first.gates, "due")
