"""The I/O around staged waves: Git history for the change time and the previous revision of an app,
Prometheus for the gates, a small state file for what this host already decided. Decisions: `agent.core.waves`.

`Stager.stage(rev, desired)` runs right after a revision's desired state is loaded: every app with
`rollout.waves` whose newest change is not yet due on this host is replaced by its previous version
(the app as loaded from the newest commit before the change; absent when the app is new), with a note
saying why. What a host decided is kept in `<root>/state/waves.json`: a change once due stays due, a
failed gate stays failed until a new commit changes the app.

`read_only=True` is for `plan` (DESIGN §6: read-only commands write nothing under the root and probe
nothing): the recorded decisions are read and used, nothing is written, and Prometheus is never asked. A
change whose gates would have to be queried (no recorded decision yet) is reported as not evaluated in the
plan and not due, so the plan shows what the host keeps until the agent itself checks the gates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

from agent.drivers.git import GitSource, Revision
from agent.drivers.prometheus import instant_query
from agent.core.errors import AgentError
from agent.drivers.fsutil import atomic_write
from agent.core.load import APPS_DIR, LoadOptions, load_desired
from agent.core.model import App, DesiredState, Rollout
from agent.core.waves import FAIL, PASS, Decision, decide, gate_verdict, timing

__all__ = ["Stager"]

log = logging.getLogger("gitops_agent.waves")


class Stager:
    def __init__(self, source: GitSource, state_path: str, host: str, load_opts: LoadOptions, state_file: Path,
                 state_dir_of: Callable[[Revision], Path], clock: Callable[[], float] = time.time,
                 query: Callable[[str, str, float], list[float] | None] = instant_query, *, read_only: bool = False):
        self.source, self.state_path, self.host, self.load_opts = source, state_path.strip("/"), host, load_opts
        self.state_file, self.state_dir_of, self.clock, self.query = state_file, state_dir_of, clock, query
        self.read_only = read_only                      # plan: read waves.json, never write it, never query
        self._history: dict[tuple[str, str], list[tuple[str, float]]] = {}
        self._previous: dict[tuple[str, str], App | None] = {}
        self.gates: dict[tuple[str, int], str] = {}     # (app, wave 1-based) -> pass | fail | pause (last check)
        self.due: dict[str, bool] = {}                  # app -> this host runs the app's newest change

    def app_dir(self, app: str) -> str:
        return f"{self.state_path}/{APPS_DIR}/{app}" if self.state_path else f"{APPS_DIR}/{app}"

    def stage(self, rev: Revision, desired: DesiredState) -> DesiredState:
        if not any(a.rollout for a in desired.apps):
            self.due = {}
            return desired
        records = self._load_records()
        apps, notes, due = [], list(desired.notes), {}
        for app in desired.apps:
            if app.rollout is None:
                apps.append(app)
                continue
            try:
                history = self._changes(rev.sha, app.name)
            except AgentError as exc:
                log.error("app %s: cannot read its history (%s): applying the newest revision", app.name, exc)
                apps.append(app)
                continue
            if not history:
                apps.append(app)
                continue
            change, changed_at = history[0]
            decision = self._decision(app.name, app.rollout, change, changed_at, records)
            due[app.name] = decision.due
            if decision.due:
                apps.append(app)
                continue
            previous = self._previous_app(history, app.name)
            kept = f"keeping its previous revision {history[1][0][:12]}" if previous else "not deployed until then"
            notes.append(f"app {app.name}: change {change[:12]} not due on this host yet: {decision.reason}; {kept}")
            if previous is not None:
                apps.append(previous)
        self.due = due
        if not self.read_only:
            self._save_records(records)
        _check_mixed(apps)
        return desired.with_apps(tuple(apps), tuple(notes))

    # -- steps ---------------------------------------------------------------------------------------

    def decide_path(self, name: str, rollout: Rollout, sha: str, path: str) -> Decision:
        """Whether the newest change of `path` (relative to the repo root) at commit `sha` is due on this host,
        by `rollout`'s waves, recorded under `name` like an app's: the agent's own lock (agent.service.selfupgrade)."""
        history = self.source.path_history(sha, path, 1)
        if not history:
            return Decision(True, 0, f"{path} has no history", state="due")
        records = self._load_records()
        decision = self._decision(name, rollout, *history[0], records)
        self.due[name] = decision.due
        if not self.read_only:
            self._save_records(records)
        return decision

    def _decision(self, name: str, rollout: Rollout, change: str, changed_at: float, records: dict) -> Decision:
        record = records.get(name)
        if record and record.get("change") == change and record.get("state") in ("due", "failed"):
            return Decision(record["state"] == "due", record.get("wave", 0), record.get("reason", ""),
                            state=record["state"])
        now = self.clock()
        first = timing(rollout, self.host, changed_at, now)
        if self.read_only and first.gates:
            return Decision(False, first.wave, f"{first.reason}: not evaluated in plan (a read-only command does "
                            "not query Prometheus; the agent checks them on its next reconcile)",
                            first.gates, first.state)
        verdicts = {}
        for g in first.gates:
            gate = rollout.waves[g].gate
            verdicts[g] = gate_verdict(gate, self.query(gate.prometheus, gate.query, gate.timeout_s))
            self.gates[(name, g + 1)] = verdicts[g][0]
            log.info("app %s: gate of wave %d: %s (%s)", name, g + 1, *verdicts[g])
            if verdicts[g][0] != PASS:
                break
        decision = decide(rollout, self.host, changed_at, now, verdicts)
        if decision.state in ("due", "failed"):
            records[name] = {"change": change, "state": decision.state, "wave": decision.wave,
                                 "reason": decision.reason, "at": now}
            level = logging.ERROR if decision.state == FAIL + "ed" else logging.INFO
            log.log(level, "app %s: change %s %s on this host: %s", name, change[:12],
                    "due" if decision.due else "stopped", decision.reason)
        else:
            log.info("app %s: change %s not due yet: %s", name, change[:12], decision.reason)
        return decision

    def _changes(self, sha: str, app: str) -> list[tuple[str, float]]:
        key = (sha, app)
        if key not in self._history:
            self._history[key] = self.source.path_history(sha, self.app_dir(app), 2)
        return self._history[key]

    def _previous_app(self, history: list[tuple[str, float]], name: str) -> App | None:
        if len(history) < 2:
            return None
        key = (history[1][0], name)
        if key not in self._previous:
            app = None
            try:
                rev = Revision(history[1][0], history[1][0], history[1][1], f"previous revision of {name}")
                opts = dataclasses.replace(self.load_opts, boundary=self.source.checkout(rev))
                previous = load_desired(self.state_dir_of(rev), self.host, opts)
                app = next((a for a in previous.apps if a.name == name), None)
            except AgentError as exc:
                log.warning("app %s: its previous revision %s cannot be loaded (%s): not deployed until due",
                            name, history[1][0][:12], str(exc).splitlines()[0])
            self._previous[key] = app
        return self._previous[key]

    def _load_records(self) -> dict:
        try:
            data = json.loads(self.state_file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_records(self, records: dict) -> None:
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.state_file, json.dumps(records, indent=1, sort_keys=True))
        except OSError as exc:
            log.error("cannot write %s: %s", self.state_file, exc)


def _check_mixed(apps: list[App]) -> None:
    """Apps at different revisions (some kept back by their wave) may still not share a host's names:
    each revision was validated alone, so a new app taking a port a kept-back app still holds is caught
    here, and the revision is refused on this host (the last good one stays) until the waves line up.
    The check is the loader's own (agent.core.load.conflicts), so both agree on what clashes."""
    from agent.core.errors import InvalidState
    from agent.core.load.conflicts import conflicts

    def locate(app: App):
        return lambda path: (f"{APPS_DIR}/{app.name}/app.yaml", None)

    problems = conflicts([(app, locate(app)) for app in apps], " at its kept-back wave revision", "held by app {app!r}")
    if problems:
        raise InvalidState(problems)
