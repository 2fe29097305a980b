"""What a person (the status page), a script (`GET /api/status`) and `gitops-agent status` read: pure.

Two halves, both without I/O (time is an argument):

- `recorded(...)`: after a reconcile, the facts the status file keeps beyond the resources: each app's
  services, environments and frontend (what the page groups by), the split the load balancer serves now,
  since when each resource has drifted (a resource's `at` is the last reconcile that saw it), and the last
  events (applied, failed, drift found, drift corrected, canary steps). Derived from the reconcile's values
  (`resource_states`, outcomes, facts), never from message text.
- `report(status, now, waves)`: the documented JSON shape (docs/status-page.md), from the status file
  alone: the page, the API and the CLI all call this one function, so they cannot disagree.
"""

from __future__ import annotations

from typing import Mapping

__all__ = ["recorded", "report", "short_sha", "human_age", "REPORT_VERSION", "MAX_EVENTS"]

REPORT_VERSION = 1
MAX_EVENTS = 50
_DRIFTED = ("drift", "failed")


def short_sha(sha: str | None) -> str:
    return (sha or "")[:12]


def human_age(seconds: float | None) -> str:
    """'42s', '5m', '3h12m', '2d4h': short enough for a phone."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


# -- after a reconcile: what the status file keeps -------------------------------------------------


def apps_of(desired) -> dict[str, dict]:
    """Each app's shape, as plain JSON: services (environment, port, health URL), environments, frontend."""
    out: dict[str, dict] = {}
    for app in desired.apps:
        t = app.traffic
        traffic = None
        if t is not None:
            traffic = {"listen": t.listen, "strategy": t.strategy, "weights": dict(t.weights),
                       "ab": {"variant": t.ab_variant, "percent": t.ab_percent} if t.ab_variant else None,
                       "canary": ({"service": t.canary.service, "steps": list(t.canary.steps),
                                   "pause_s": t.canary.pause_s} if t.canary else None)}
        notes = [n for n in desired.notes if n.startswith(f"app {app.name}:")]
        out[app.name] = {
            "services": {s.name: {"environment": s.environment, "port": s.port,
                                  "health": s.health.url if s.health else None} for s in app.services},
            "environments": [e.name for e in app.environments],
            "traffic": traffic,
            "notes": notes,
            "mode": app.mode,
            "windows": [{"days": list(w.days), "start": w.start, "end": w.end, "timezone": w.timezone}
                        for w in getattr(app, "windows", ())],
        }
    return out


def _window(specs: list | None, now: float) -> dict | None:
    """An app's release window now: open or not, and when it next opens (apps without windows: None)."""
    if not specs:
        return None
    from datetime import datetime, timezone

    from agent.core.windows import Window, is_open, next_open

    windows = [Window(tuple(w.get("days") or ()), w.get("start", "00:00"), w.get("end", "00:00"),
                      w.get("timezone", "UTC")) for w in specs]
    at = datetime.fromtimestamp(now, timezone.utc)
    if is_open(windows, at):
        return {"open": True, "opens_at": None}
    nxt = next_open(windows, at)
    return {"open": False, "opens_at": nxt.timestamp() if nxt else None}


def _control(control: Mapping | None, app: str) -> tuple[dict | None, dict | None]:
    """(suspension, quarantine) of `app` from control.json's dict: a host-wide suspension counts for every app."""
    suspended = (control or {}).get("suspended") or {}
    quarantined = (control or {}).get("quarantined") or {}
    sus = suspended.get(app) or suspended.get("*")
    q = quarantined.get(app)
    return ({"reason": sus.get("reason", ""), "at": sus.get("at"), "host_wide": app not in suspended} if sus else None,
            {"revision": short_sha(q.get("sha")), "reason": q.get("reason", ""), "at": q.get("at")} if q else None)


def live_split(facts, outcomes) -> dict[str, dict[str, int]]:
    """{frontend: {backend: weight}} the load balancer serves after this reconcile: what an applied
    traffic change set, else what the facts read from it."""
    split = {fe: dict(bes) for fe, bes in (((facts.traffic or {}).get("weights") or {}) if facts else {}).items()}
    for o in outcomes:
        if o.ok and o.action.kind == "configure_traffic":
            split = {fe.name: {be.name: be.weight for be in fe.backends} for fe in o.action.frontends}
    return split


def with_since(resources: Mapping[str, dict], previous: Mapping[str, dict], now: float) -> dict[str, dict]:
    """The resources, each drifted (or failed) one with `since`: kept from the previous status while it
    stays drifted, else now."""
    out = {}
    for key, res in resources.items():
        res = dict(res)
        if res.get("state") in _DRIFTED:
            old = previous.get(key) or {}
            res["since"] = old.get("since") if old.get("state") in _DRIFTED and old.get("since") else now
        else:
            res.pop("since", None)
        out[key] = res
    return out


def events_of(previous: Mapping, result, resources: Mapping[str, dict], rollouts: Mapping | None,
              now: float) -> list[dict]:
    """New events of this reconcile, oldest first: {at, kind, app, message}. A failure repeated on every
    poll is one event (the same kind and message as the newest event is not added again)."""
    events: list[dict] = []
    app_of = _app_index(previous.get("apps") or {})

    def add(kind: str, message: str, app: str = "") -> None:
        events.append({"at": now, "kind": kind, "app": app, "message": message})

    old = previous.get("resources") or {}
    applied_keys = {o.action.key for o in result.outcomes if o.ok}
    planned: dict[str, str] = {}
    for action in (result.plan.actions if result.plan is not None else ()):
        planned.setdefault(action.key, action.reason)
    for key, reason in planned.items():
        state, was = (resources.get(key) or {}).get("state"), (old.get(key) or {}).get("state")
        if state == "drift" and was not in _DRIFTED:
            add("drift", f"{key}: {reason}", app_of.get(key, ""))
        elif state == "ok" and key in applied_keys and not result.new_commit:
            add("corrected", f"{key}: {reason}", app_of.get(key, ""))
    for key, res in old.items():
        if res.get("state") in _DRIFTED and key not in planned and (resources.get(key) or {}).get("state") == "ok":
            add("corrected", f"{key}: no longer drifted", app_of.get(key, ""))
    for o in result.outcomes:
        if o.failed:
            add("rolled_back" if o.verdict.value == "rolled_back" else "failed",
                f"{o.action.describe()}: {o.message}", app_of.get(o.action.key, ""))
    value = result.result.value
    rev = result.revision
    if value == "applied" and rev is not None:
        done = sum(1 for o in result.outcomes if o.ok)
        add("applied", f"{short_sha(rev.sha)} {rev.summary} ({done} action{'s' * (done != 1)})")
    elif value in ("invalid", "error") and result.error:
        add(value, result.error.splitlines()[0])
    for app, progress in (rollouts or {}).items():
        before = (previous.get("rollouts") or {}).get(app) or {}
        if (progress.get("state"), progress.get("step")) != (before.get("state"), before.get("step")) \
                or progress.get("id") != before.get("id"):
            add("canary", f"canary {progress.get('state')} at step {int(progress.get('step', 0)) + 1}"
                          + (f": {progress['reason']}" if progress.get("reason") else ""), app)
    kept = list(previous.get("events") or [])
    for event in events:
        if kept and (kept[-1]["kind"], kept[-1]["message"]) == (event["kind"], event["message"]):
            continue
        kept.append(event)
    return kept[-MAX_EVENTS:]


def recorded(previous: Mapping, result, now: float) -> dict:
    """The status fields this module owns after `result` (agent.service.reconciler.Result): apps, traffic,
    resources with `since`, events. `previous` is the status file as it was (a dict)."""
    out: dict = {}
    desired = getattr(result, "desired", None)
    if desired is not None:
        out["apps"] = apps_of(desired)
    if result.facts is not None:
        out["traffic"] = live_split(result.facts, result.outcomes)
    if result.plan is not None:
        out["resources"] = with_since(result.resources, previous.get("resources") or {}, now)
    context = {**previous, "apps": out.get("apps", previous.get("apps") or {})}
    out["events"] = events_of(context, result, out.get("resources", previous.get("resources") or {}),
                              result.rollouts, now)
    return out


def _app_index(apps: Mapping[str, dict]) -> dict[str, str]:
    """resource key -> app name."""
    index = {}
    for name, app in apps.items():
        for svc in app.get("services") or {}:
            index[f"program:{svc}"] = name
        for env in app.get("environments") or ():
            index[f"venv:{env}"] = name
    return index


# -- the report ------------------------------------------------------------------------------------


def _revision(rec: Mapping | None, now: float) -> dict | None:
    if not rec:
        return None
    committed = rec.get("committed_at") or None
    return {"sha": rec.get("sha", ""), "short": short_sha(rec.get("sha")), "ref": rec.get("ref", ""),
            "subject": (rec.get("summary") or "").splitlines()[0] if rec.get("summary") else "",
            "committed_at": committed, "age_s": (now - committed) if committed else None,
            "applied_at": rec.get("at") or None,
            "summary": rec.get("summary", ""), "at": rec.get("at") or None}     # the names status --json had before


def _resource(key: str, res: Mapping, app: str, now: float) -> dict:
    kind, _, name = key.partition(":")
    since = res.get("since")
    return {"key": key, "kind": kind if name else key, "name": name or key, "app": app,
            "state": res.get("state", ""), "message": res.get("message", ""), "at": res.get("at"),
            "drift_since": since, "drift_age_s": (now - since) if since else None}


def _split(weights: Mapping[str, int] | None, traffic: Mapping | None) -> list[dict]:
    """Backends with weight and percent of the weighted traffic (A/B: the variant's bucket share)."""
    if not weights:
        return []
    ab = (traffic or {}).get("ab") or None
    variant = ab.get("variant") if ab else None
    bucket = int(ab.get("percent", 0)) if ab else 0
    rest_total = sum(w for b, w in weights.items() if b != variant)
    rows = []
    for backend, weight in sorted(weights.items()):
        if backend == variant:
            pct = float(bucket)
        else:
            share = weight / rest_total if rest_total else 0.0
            pct = share * (100 - bucket)
        rows.append({"backend": backend, "weight": weight, "percent": round(pct, 1)})
    return rows


def _canary(traffic: Mapping | None, progress: Mapping | None, now: float) -> dict | None:
    canary = (traffic or {}).get("canary")
    if not canary or not progress:
        return None
    steps = list(canary.get("steps") or [])
    step = min(int(progress.get("step", 0)), max(len(steps) - 1, 0))
    state = progress.get("state", "")
    percent = 0 if state == "failed" else 100 if state == "complete" else (steps[step] if steps else 0)
    since = progress.get("since") or None
    return {"service": canary.get("service"), "state": state, "step": step + 1, "steps": steps, "percent": percent,
            "since": since, "age_s": (now - since) if since else None, "probes": progress.get("probes", 0),
            "errors": progress.get("errors", 0), "reason": progress.get("reason", ""),
            "analysis": progress.get("analysis")}


def report(status: Mapping, now: float, waves: Mapping | None = None, agent_version: str = "",
           control: Mapping | None = None) -> dict:
    """The documented status (docs/status-page.md) from the status file's dict (`Status.to_json()`), the
    staged-waves record (`<root>/state/waves.json`, if any) and the suspend/quarantine record
    (`<root>/state/control.json`, `Control.to_json()`)."""
    apps_raw: Mapping[str, dict] = status.get("apps") or {}
    resources: Mapping[str, dict] = status.get("resources") or {}
    rollouts: Mapping[str, dict] = status.get("rollouts") or {}
    split: Mapping[str, dict] = status.get("traffic") or {}
    index = _app_index(apps_raw)
    rows = [_resource(k, r, index.get(k, ""), now) for k, r in sorted(resources.items())]
    apps = []
    for name in sorted(apps_raw):
        raw = apps_raw[name]
        traffic = raw.get("traffic")
        services = []
        for svc, spec in sorted((raw.get("services") or {}).items()):
            res = next((r for r in rows if r["key"] == f"program:{svc}"), None)
            services.append({"name": svc, "environment": spec.get("environment"), "port": spec.get("port"),
                             "state": res["state"] if res else "unknown",
                             "process": res["message"] if res and res["state"] == "ok" else "",
                             "message": res["message"] if res else "", "drift_since": res["drift_since"] if res else None,
                             "drift_age_s": res["drift_age_s"] if res else None})
        environments = [r for r in rows if r["kind"] == "venv" and r["name"] in (raw.get("environments") or ())]
        frontend = None
        if traffic:
            live = split.get(name)
            frontend = {"listen": traffic.get("listen"), "url": f"http://{traffic.get('listen')}/",
                        "strategy": traffic.get("strategy"), "ab": traffic.get("ab"),
                        "live": live is not None, "split": _split(live if live is not None else traffic.get("weights"),
                                                                   traffic)}
        wave = (waves or {}).get(name)
        suspended, quarantined = _control(control, name)
        apps.append({
            "name": name, "mode": raw.get("mode"), "services": services, "environments": environments,
            "frontend": frontend, "canary": _canary(traffic, rollouts.get(name), now),
            "wave": ({"change": short_sha(wave.get("change")), "state": wave.get("state"),
                      "wave": int(wave.get("wave", 0)) + 1, "reason": wave.get("reason", "")} if wave else None),
            "notes": list(raw.get("notes") or ()),
            "drifted": sum(1 for r in rows if r["app"] == name and r["state"] in _DRIFTED),
            "suspended": suspended,
            "quarantined": quarantined,
            "window": _window(raw.get("windows"), now),
        })
    last = status.get("last_reconcile_at") or None
    events = sorted(status.get("events") or (), key=lambda e: e.get("at") or 0, reverse=True)
    return {
        "version": REPORT_VERSION,
        "generated_at": now,
        "agent_version": agent_version,
        "host": status.get("host", ""),
        "result": status.get("result", ""),
        "last_reconcile_at": last,
        "last_reconcile_age_s": (now - last) if last else None,
        "applied": _revision(status.get("applied"), now),
        "attempted": _revision(status.get("attempted"), now),
        "last_error": status.get("last_error"),
        "last_error_at": status.get("last_error_at"),
        "drifted": sum(1 for r in rows if r["state"] in _DRIFTED),
        "apps": apps,
        "resources": {r["key"]: {k: v for k, v in r.items() if k != "key"} for r in rows},
        "rollouts": dict(rollouts),
        "events": [dict(e) for e in events],
        "host_suspended": _control(control, "*")[0],
    }

