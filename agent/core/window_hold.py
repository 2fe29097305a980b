"""A closed release window (DESIGN §3b) as a desired state: pure.

Outside its window an app's new revision waits, but what the app already runs is still the desired state:
a service stopped by hand, a weight or a program file changed by hand is healed, back to the revision the
app last applied. So the reconcile plans twice: once against the host's desired state with every held app
at its deployed version (`compose`: what is applied now, drift healing included), once against the new
revision (`split`: its venv builds run ahead, so opening the window is a switch; the rest waits, reported).
"""

from __future__ import annotations

from typing import Mapping

from agent.core._record import record
from agent.core.control import AHEAD, Held, app_of, inputs_digest
from agent.core.model import App, DesiredState

__all__ = ["WindowParts", "waiting_apps", "compose", "split"]


@record
class WindowParts:
    """One reconcile's actions, by what a closed window lets happen to them."""

    heal: tuple                 # the plan against what is applied now (waiting apps at their deployed version)
    ahead: tuple = ()           # the new revision's venv builds of the waiting apps: run now
    waiting: tuple = ()         # Held: the rest of the new revision's changes of the waiting apps


def waiting_apps(new: DesiredState, deployed: Mapping[str, App | None], closed: Mapping[str, str]) -> dict[str, str]:
    """The apps of `closed` (app -> why its window holds it) whose new version differs from the one they run
    (`deployed`: app -> its last applied version, None when it never ran here): only those wait. An app the
    new commit does not change has nothing to wait for."""
    out = {}
    for name, why in closed.items():
        app, old = new.app_of(name), deployed.get(name)
        if app is not None and (old is None or inputs_digest(old) != inputs_digest(app)):
            out[name] = why
    return out


def compose(new: DesiredState, deployed: Mapping[str, App | None], waiting: Mapping[str, str]) -> DesiredState:
    """The desired state applied now: every waiting app at its deployed version (an app that never ran here
    is left out: it starts when its window opens), the others at the new revision."""
    if not waiting:
        return new
    apps, notes = [], list(new.notes)
    for app in new.apps:
        if app.name not in waiting:
            apps.append(app)
            continue
        old = deployed.get(app.name)
        if old is not None:
            apps.append(old)
        notes.append(f"app {app.name}: its new revision {waiting[app.name]}; "
                     + ("the deployed one is kept (and healed) until then" if old is not None else "not deployed until then"))
    return new.with_apps(tuple(apps), tuple(notes))


def split(heal: tuple, new_actions: tuple, new: DesiredState, target: DesiredState,
          waiting: Mapping[str, str]) -> WindowParts:
    """The actions that heal what runs, the new revision's venv builds to run ahead, and the rest of the new
    revision's changes of the waiting apps, held. `heal`: the plan against `compose(...)`; `new_actions`: the
    plan against the new revision.

    From the heal plan, the housekeeping that would undo the builds ahead is dropped for the waiting apps:
    their venv pruning (a venv built ahead is not the deployed one, and retention would delete it) and the
    removal of an environment only the new revision has (built ahead, not yet used)."""
    if not waiting:
        return WindowParts(tuple(heal))
    new_envs = set(new.environments)
    kept = []
    for action in heal:
        app = app_of(action.key, target)
        if action.kind == "prune_venvs" and app in waiting:
            continue
        if action.kind == "remove_environment" and action.key.partition(":")[2] in new_envs:
            continue
        kept.append(action)
    ahead, held = [], []
    for action in new_actions:
        app = app_of(action.key, new)
        if app is None and action not in kept and action.kind not in AHEAD:
            # a host-wide action (the load balancer's config: every frontend) that only the new revision needs:
            # the other apps are the same in both plans, so the waiting apps make the difference
            why = "; ".join(f"app {name}: {w}" for name, w in sorted(waiting.items()))
            held.append(Held(action, next(iter(waiting)) if len(waiting) == 1 else None, "window", why))
            continue
        if app not in waiting:
            continue
        if action.kind in AHEAD:
            ahead.append(action)
        elif action not in kept:
            held.append(Held(action, app, "window", f"app {app}: {waiting[app]}"))
    return WindowParts(tuple(kept), tuple(ahead), tuple(held))
