"""Which notifications one reconcile earns (DESIGN §4 `--notify`). Pure: a Result and what was already
sent in, the events and the new memory out.

A failing state is announced once, when it starts (or changes: another revision, another cause), and a
"recovered" event once when it clears; it is not repeated on every poll. The memory is a small dict of
{topic: fingerprint} the caller persists, so a restarted agent (or the next cron `once`) does not send
the same failure again.
"""

from __future__ import annotations

from agent.core._record import record
from agent.core.outcome import ReconcileResult, Verdict

__all__ = ["Event", "events_for", "upgrade_events", "UPGRADE_TOPIC"]

UPGRADE_TOPIC = "agent-upgrade"          # the self-upgrade's memory key: not a reconcile's to clear


@record
class Event:
    kind: str               # applied | failed | rolled back | invalid revision | drift found | drift corrected |
                            # canary aborted | window waiting | suspended | quarantined | recovered |
                            # agent upgrade failed
    host: str
    app: str                # "*": the host as a whole
    revision: str
    reason: str             # one line

    @property
    def title(self) -> str:
        return f"gitops-agent {self.host}: {self.kind}" + ("" if self.app == "*" else f" ({self.app})")

    @property
    def body(self) -> str:
        return f"host {self.host}, app {self.app}, revision {self.revision[:12] or '-'}: {self.reason}"

    @property
    def severity(self) -> str:
        """Apprise's notify type."""
        if self.kind in ("failed", "rolled back", "invalid revision", "canary aborted", "quarantined",
                         "agent upgrade failed"):
            return "failure"
        if self.kind in ("drift found", "window waiting", "suspended"):
            return "warning"
        return "success"


def _line(text: str | None) -> str:
    first = (text or "").strip().splitlines()
    return first[0][:300] if first else ""


def _gist(text: str | None) -> str:
    """One line from a multi-line error (a build's output): its first line and its last, where the cause
    usually is (`RuntimeError: ...` at the end of a traceback)."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    if len(lines) < 2:
        return _line(text)
    return f"{lines[0][:150]} ... {lines[-1][:150]}"


def events_for(result, host: str, sent: dict[str, str]) -> tuple[list[Event], dict[str, str]]:
    """(events to send, the new memory). `result`: agent.service.reconciler.Result."""
    rev = result.revision.sha if result.revision is not None else ""
    owners = getattr(result, "owners", {}) or {}
    out: list[Event] = []
    memory = dict(sent)
    active: dict[str, tuple[str, Event]] = {}       # topic -> (fingerprint, event) of what is wrong now

    def problem(topic: str, fingerprint: str, event: Event) -> None:
        active[topic] = (fingerprint, event)

    r = result.result
    if r is ReconcileResult.INVALID:
        problem("invalid", rev, Event("invalid revision", host, "*", rev, _line(result.error)))
    elif r is ReconcileResult.ERROR:
        problem("error", "error", Event("failed", host, "*", rev, _line(result.error)))
    for o in result.outcomes:
        if o.failed:
            app = owners.get(o.action.key) or "*"
            kind = "rolled back" if o.verdict is Verdict.ROLLED_BACK else "failed"
            if f"failed:{app}" not in active or kind == "rolled back":
                problem(f"failed:{app}", rev, Event(kind, host, app, rev, f"{o.action.describe()}: {_line(o.message)}"))
    for h in getattr(result, "held", ()):
        app = h.app or "*"
        if h.cause == "quarantined" and f"failed:{app}" not in active:
            # the failure announced when it happened, still held: same topic and revision, so not sent again
            fp = memory.get(f"failed:{app}", rev)
            problem(f"failed:{app}", fp, Event("quarantined", host, app, rev, _line(h.why)))
        elif h.cause == "window":
            problem(f"window:{app}", _line(h.why), Event("window waiting", host, app, rev, _line(h.why)))
    # a suspension is announced once when it takes effect (whether or not its apps had anything to do), again
    # only when it is lifted and made anew (another reason or time)
    control = getattr(result, "control", None)
    if control is not None:
        apps = set(getattr(result, "apps", ()) or ())
        for app, sus in sorted(control.suspended.items()):
            if app == "*" or not apps or app in apps:
                scope = "the host" if app == "*" else f"app {app}"
                problem(f"suspended:{app}", f"{_line(sus.reason)}@{sus.at}",
                        Event("suspended", host, app, rev, _line(f"{scope} is suspended: {sus.reason}")))
    for app, progress in sorted((getattr(result, "rollouts", None) or {}).items()):
        if isinstance(progress, dict) and progress.get("state") == "failed":
            problem(f"canary:{app}", str(progress.get("id", "")),
                    Event("canary aborted", host, app, rev, _line(progress.get("reason"))))
    # drift a suspension holds is still drift (reported, never healed); a window's or a quarantine's is not
    held_keys = {h.action.key for h in getattr(result, "held", ()) if h.cause != "suspended"}
    unheld_drift = sorted(a.key for a in result.drift if a.key not in held_keys)
    if r is ReconcileResult.DRIFT and unheld_drift:
        problem("drift", ",".join(unheld_drift), Event("drift found", host, "*", rev,
                                                        f"{len(unheld_drift)} resource(s) differ: {', '.join(unheld_drift[:5])}"))

    for topic, (fingerprint, event) in active.items():
        if memory.get(topic) != fingerprint:
            out.append(event)
            memory[topic] = fingerprint
    # a reconcile that stopped early (no fetch, an invalid revision) says nothing about the apps' own failures
    cleared = [t for t in sent if t not in active and t != UPGRADE_TOPIC and r is not ReconcileResult.ERROR
               and (r is not ReconcileResult.INVALID or t == "error")]
    for topic in cleared:
        memory.pop(topic, None)
        if topic.split(":")[0] in ("failed", "invalid", "error", "canary"):
            app = topic.partition(":")[2] or "*"
            out.append(Event("recovered", host, app, rev, f"{topic.split(':')[0]} cleared"))
    held = getattr(result, "held", ())
    if r is ReconcileResult.DRIFT and any(h.cause == "window" for h in held) and not any(o.failed for o in result.outcomes):
        # outside a window: what was healed on the deployed revision (the builds ahead are no correction)
        keys = sorted({o.action.key for o in result.outcomes if o.ok and o.action.kind != "build_venv"})
        if keys:
            out.append(Event("drift corrected", host, "*", rev, f"healed {', '.join(keys[:5])}"))
    if r is ReconcileResult.APPLIED and result.outcomes and not any(o.failed for o in result.outcomes):
        if result.new_commit:
            out.append(Event("applied", host, "*", rev, _line(result.revision.summary) if result.revision else ""))
        else:
            keys = sorted({o.action.key for o in result.outcomes if o.ok})
            out.append(Event("drift corrected", host, "*", rev, f"healed {', '.join(keys[:5])}"))
    return out, memory


def upgrade_events(state: dict, host: str, running: str, sent: dict[str, str]) -> tuple[list[Event], dict[str, str]]:
    """(events, new memory) for the self-upgrade record `state` (`<root>/state/agent-upgrade.json`, see
    agent.service.selfupgrade) of an agent running version `running`.

    A failed upgrade is announced once per lock (its identity: a new lock that fails again is news, the
    same one seen by the next poll or a restarted agent is not); "recovered" once when the failure is gone
    (a later upgrade done, or fleet.yaml no longer asking for the failed version). A handover under way
    (or a lock waiting for this host's wave) changes nothing: its outcome decides."""
    memory = dict(sent)
    phase = state.get("phase")
    if phase == "failed":
        fingerprint = f"{state.get('to', '')}:{state.get('identity') or _line(state.get('reason'))}"
        if memory.get(UPGRADE_TOPIC) == fingerprint:
            return [], memory
        memory[UPGRADE_TOPIC] = fingerprint
        reason = f"upgrade to gitops-agent {state.get('to')} failed, {running} keeps running: {_gist(state.get('reason'))}"
        return [Event("agent upgrade failed", host, "*", "", reason)], memory
    if phase in ("handing-over", "waiting") or UPGRADE_TOPIC not in memory:
        return [], memory
    memory.pop(UPGRADE_TOPIC)
    why = (f"agent upgraded from {state.get('from')} to {state.get('to')}" if phase == "done"
           else f"agent upgrade no longer asked for; running gitops-agent {running}")
    return [Event("recovered", host, "*", "", why)], memory
