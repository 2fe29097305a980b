"""What a reconcile did, as values: per-action `Outcome`s, the reconcile's `ReconcileResult`, what to do
next (`Retry`), and each resource's state after it. Nothing here is parsed back out of a message.

Why a separate module: the executor, the reconciler, status, metrics and the CLI all read these; deriving
them once here (`resource_states`) is what keeps `status` and `/metrics` from disagreeing about drift.
"""

from __future__ import annotations

from typing import Iterable

from agent.core._enum import StrEnum as _StrEnum
from agent.core._record import record

__all__ = ["Verdict", "Outcome", "ReconcileResult", "Retry", "ResourceState", "resource_states", "verdict_for"]


class Verdict(_StrEnum):
    """How one action ended."""

    APPLIED = "applied"
    UNCHANGED = "unchanged"                 # the driver found nothing to do
    FAILED_PERMANENT = "failed_permanent"   # the error type says a person must act (Permanent)
    FAILED_TEMPORARY = "failed_temporary"   # may pass on a retry
    ROLLED_BACK = "rolled_back"             # failed, and the service is back on its previous config
    SKIPPED_BLOCKED = "skipped_blocked"     # not run: something it needs failed

    @property
    def ok(self) -> bool:
        return self in (Verdict.APPLIED, Verdict.UNCHANGED)

    @property
    def failed(self) -> bool:
        return self in (Verdict.FAILED_PERMANENT, Verdict.FAILED_TEMPORARY, Verdict.ROLLED_BACK)

    @property
    def word(self) -> str:
        """The three-valued `result` of the JSON output and the actions_total label (kept as they were)."""
        return "ok" if self.ok else "skipped" if self is Verdict.SKIPPED_BLOCKED else "failed"


def verdict_for(exc: BaseException, rolled_back: bool) -> Verdict:
    """The error's type decides: Permanent needs a person; everything else may pass on its own."""
    from agent.core.errors import Permanent

    if rolled_back:
        return Verdict.ROLLED_BACK
    return Verdict.FAILED_PERMANENT if isinstance(exc, Permanent) else Verdict.FAILED_TEMPORARY


@record
class Outcome:
    action: object              # agent.core.actions.Action
    verdict: Verdict
    message: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    @property
    def failed(self) -> bool:
        return self.verdict.failed

    @property
    def result(self) -> str:
        return self.verdict.word

    def to_json(self) -> dict:
        return {"action": self.action.kind, "key": self.action.key, "result": self.result,
                "outcome": self.verdict.value, "message": self.message, "seconds": round(self.seconds, 4)}


class ReconcileResult(_StrEnum):
    CONVERGED = "converged"     # nothing to do
    APPLIED = "applied"         # changes made, all of them worked
    DRIFT = "drift"             # drift found and left (plan, or warn mode)
    FAILED = "failed"           # some action failed (rolled back where it could be)
    INVALID = "invalid"         # the revision was rejected whole; the last good one stays desired
    ERROR = "error"             # the reconcile could not run (source, facts, an internal error)

    @property
    def success(self) -> bool:
        """The reconcile did its job (drift: warn mode or plan reported it)."""
        return self in (ReconcileResult.CONVERGED, ReconcileResult.APPLIED, ReconcileResult.DRIFT)


class Retry(_StrEnum):
    """When the daemon should look again, decided by the failure's type, not its text."""

    POLL = "poll"               # success, or a Permanent failure: a retry cannot help before the input changes
    BACKOFF = "backoff"         # a Temporary failure: retry soon, backing off


class ResourceState(_StrEnum):
    OK = "ok"
    DRIFT = "drift"             # planned but not applied
    FAILED = "failed"

    @property
    def drifted(self) -> bool:
        return self is not ResourceState.OK


_REMOVALS = ("remove_program", "remove_environment")


def resource_states(facts, plan, outcomes: Iterable[Outcome], now: float) -> dict[str, dict]:
    """Every managed resource after a reconcile that made `plan`: {key: {state, message, at}}. The one
    place drift is derived: status.json and the drift metrics both read this."""
    out: dict[str, dict] = {}
    if facts is not None:
        for name in facts.venvs:
            out[f"venv:{name}"] = _entry(ResourceState.OK, "", now)
        for name, program in facts.programs.items():
            out[f"program:{name}"] = _entry(ResourceState.OK, program.state or "", now)
    for action in plan.actions:
        out[action.key] = _entry(ResourceState.DRIFT, action.reason, now)
    outcomes = tuple(outcomes)
    for o in outcomes:
        if o.ok:
            out[o.action.key] = _entry(ResourceState.OK, o.message, now)
    failed: set[str] = set()
    for o in outcomes:                      # the first failure of a resource says why
        if not o.ok and o.action.key not in failed:
            failed.add(o.action.key)
            out[o.action.key] = _entry(ResourceState.FAILED, o.message, now)
    for o in outcomes:
        if o.ok and o.action.kind in _REMOVALS:
            out.pop(o.action.key, None)
    return dict(sorted(out.items()))


def _entry(state: ResourceState, message: str, now: float) -> dict:
    return {"state": state.value, "message": message, "at": now}
