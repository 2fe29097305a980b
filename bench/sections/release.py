"""Section 8: the real app's release with the daemon running (issues 13 and 17): a new lock for the shop,
its migration job, the gunicorn restart, the health gate; from `git commit` to the new version serving,
and where that time goes, from the agent's own log.

Each run commits the next release (1.1.0, 1.2.0, ...: a new wheel, a new lock, a new migration), so
every run is a whole release: a new venv, a migration with work to do, a restart. Going back and forth
between two versions would not be: the second time a version comes, its venv is a kept one (a switch,
section 5) and its migration is already applied.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import time
from pathlib import Path

from harness import (
    CLEANUP,
    Context,
    Figure,
    Section,
    agent_cmd,
    distinct_port,
    log,
    when,
)

# isort: split
from conftest import git
from daemon_helpers import start_daemon
from fixtures import IDENTITY
from shoprelease import (
    ShopRepo,
    build_release_wheels,
    place_orders,
    release_version,
    shop_version,
)

__all__ = ["SECTION", "action_times"]

HOW = """\
8. The example's shop (Django 5.2 under gunicorn with 2 workers, the migrate job, 2 shop-worker
   processes after shop-web, templates, the age secret) in a local state repo, deployed by
   `gitops-agent run --installer uv --age-identity keys/demo-host.agekey --log-format json`. Set-up
   (not timed): the shop wheels of releases 1.1.0..1.N.0 built first (examples/shop/build.py from a
   scratch copy holding the release's migrations: each adds a nullable column to Order and back-fills
   it), the daemon's first converge of 1.0.0 (fills uv's cache under the root with Django and
   gunicorn), 50 orders placed. Each run commits the next release's wheel and lock; timed from just
   before `git commit` until GET /version answers the new version (polled every 10 ms), and until
   /metrics shows the commit applied (the reconcile done: workers back, startsecs confirmed). The
   breakdown is the daemon's own JSON log: an action's time is its log line's timestamp minus the
   previous line's (actions run one after another); "commit -> checked out" ends at the last line
   before the first action (the checkout), so load, secrets, templates, facts and plan are counted
   with the first action, the venv build. Each run checks the release's migration is applied.
"""

SERVING = "shop release: commit -> new version serving (/version)"

# The rows of the breakdown, in the order a release runs them: (row, the log's action names [resource]).
_ROWS = [
    ("commit -> checked out (watch trigger, fetch, checkout)", ("before",)),
    ("load, plan + venv build (uv: venv, install, bytecode, checks)", ("build_venv",)),
    ("migrate job (shop-migrate)", ("run_job",)),
    ("restart shop-web (stop old gunicorn, start new)", ("update_program shop-web",)),
    ("health gate (shop-web /healthz 200)", ("check_health",)),
    ("restart shop-worker (2 processes)", ("update_program shop-worker",)),
    ("await running (startsecs=1 confirmation)", ("await_running",)),
    ("prune the oldest venv (retention 3; the releases that prune)", ("prune_venvs",)),
    ("other (switch venv, program files, status)", ("switch_venv", "write_program", "after")),
]


def action_times(log_file: Path, since: float, revision: str) -> dict[str, float]:
    """Seconds per action kind (plus "before the first action" and "reconcile") of the reconcile that
    applied `revision`, from the daemon's JSON log lines written after `since` (a time.time())."""
    lines = []
    for raw in log_file.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("ts", 0) >= since - 0.001:
            lines.append(entry)
    end = next((e for e in lines if e.get("revision") == revision and e.get("msg", "").startswith("reconcile ")), None)
    if end is None:
        raise RuntimeError(f"no 'reconcile ...' line for {revision[:12]} in {log_file}")
    seconds = float(end["msg"].split(" in ", 1)[1].split("s", 1)[0])
    start = end["ts"] - seconds
    inside = [e for e in lines if start - 0.002 <= e["ts"] <= end["ts"]]
    actions = [e for e in inside if "action" in e]
    if not actions:
        raise RuntimeError(f"the reconcile of {revision[:12]} logged no action")
    before = [e for e in inside if e["ts"] <= actions[0]["ts"] and "action" not in e]
    first_start = before[-1]["ts"] if before else start
    out: dict[str, float] = {"reconcile": seconds, "before": first_start - since}
    previous = first_start
    for e in actions:
        kind = e["action"]
        if kind == "update_program":
            kind += " " + e.get("resource", "").partition(":")[2]
        out[kind] = out.get(kind, 0.0) + max(0.0, e["ts"] - previous)
        previous = e["ts"]
    out["after"] = end["ts"] - previous
    return out


def _row_values(breakdowns: list[dict[str, float]]) -> list[tuple[str, list[float]]]:
    """Each row of _ROWS with its seconds per run (0 where a run had none of it); kinds _ROWS does not
    name get a row of their own, so no time is lost from the breakdown."""
    named = {kind for _row, kinds in _ROWS for kind in kinds} | {"reconcile"}
    rows = [(row, [sum(b.get(k, 0.0) for k in kinds) for b in breakdowns
                   if kinds != ("prune_venvs",) or "prune_venvs" in b]) for row, kinds in _ROWS]
    rows = [(row, values) for row, values in rows if values]
    extra = sorted({k for b in breakdowns for k in b} - named)
    return rows + [(kind.replace("_", " "), [b.get(kind, 0.0) for b in breakdowns]) for kind in extra]


def _check_migrated(root: Path, n: int) -> None:
    """The release's own migration is recorded as applied: its migrate job did real work."""
    with sqlite3.connect(root / "apps" / "shop" / "data" / "shop.sqlite3") as db:
        names = {row[0] for row in db.execute("SELECT name FROM django_migrations WHERE app = 'shop'")}
    if f"{n + 1:04d}_note_{n + 1}" not in names:
        raise RuntimeError(f"release {release_version(n)}: its migration is not applied ({sorted(names)})")


def run(ctx: Context) -> None:
    res, work = ctx.res, ctx.work
    if ctx.quick:
        res.add(Figure("8", SERVING, "s", text="skipped in quick mode (several minutes: builds, releases)"))
        return
    runs = 5
    wheels = build_release_wheels(runs, work / "shop-wheels", work)
    port = distinct_port()
    repo = ShopRepo(work / "release-repo", port)
    sha = repo.commit("shop 1.0.0")
    root = CLEANUP.root(work / "release-root")
    daemon = start_daemon(CLEANUP, repo.url, root, work, "--installer", "uv", "--age-identity", str(IDENTITY),
                          "--log-format", "json", poll=30.0, port=distinct_port(), command=agent_cmd())

    def applied(s: str) -> bool:
        return f'gitops_agent_applied_revision_info{{revision="{s}"}} 1.0' in daemon.metrics_text()

    serving, done, gaps, breakdowns = [], [], [], []
    load_before = os.getloadavg()[0]
    try:
        t0 = time.perf_counter()
        when(lambda: applied(sha), 600, "the shop's first converge", 0.2, daemon.log)
        log(f"release: shop 1.0.0 converged in {time.perf_counter() - t0:.1f}s (uv cache warmed)")
        place_orders(port, 50)
        for n in range(1, runs + 1):
            version, old = release_version(n), shop_version(port)
            repo.stage_release(wheels[n])
            git(repo.path, "add", "-A")
            since, t0 = time.time(), time.perf_counter()
            git(repo.path, "commit", "-q", "-m", f"shop {version}")
            new = git(repo.path, "rev-parse", "HEAD")
            last_old = t0
            while True:
                answer, at = shop_version(port, 2.0), time.perf_counter()
                if answer == version:
                    break
                if answer == old:
                    last_old = at
                if at - t0 > 600:
                    raise RuntimeError(f"shop {version} not serving 600 s after its commit")
                time.sleep(0.01)
            serving.append(at - t0)
            gaps.append(at - last_old)
            done.append(when(lambda s=new: applied(s), 600, f"shop {version} applied", 0.02, daemon.log) - t0)
            breakdowns.append(action_times(daemon.log, since, new))
            _check_migrated(root, n)
            log(f"release: {version} serving after {serving[-1]:.2f}s, applied after {done[-1]:.2f}s; "
                + ", ".join(f"{k} {v:.2f}s" for k, v in breakdowns[-1].items()))
            time.sleep(1.0)
    except Exception:
        log("daemon log (tail):\n" + "\n".join(daemon.log_text().splitlines()[-60:]))
        raise
    finally:
        daemon.stop()
    res.notes.append(f"Section 8 ran at a 1-minute load average of {load_before:.1f} (start) and "
                     f"{os.getloadavg()[0]:.1f} (end) on {os.cpu_count()} cores: its figures wait on uv, the disk "
                     "(a venv of ~7,500 files written, one deleted) and process starts, so they grow with the load.")
    res.add(Figure("8", SERVING, "s", serving,
                   note="a new wheel + lock, uv venv build, migrate job, gunicorn restart, health gate"))
    res.add(Figure("8", "shop release: commit -> applied (workers back, startsecs confirmed)", "s", done))
    res.add(Figure("8", "shop release: no answer from the old version to the new one", "s", gaps,
                   note="last /version answered by the old release -> first by the new one (restart window)"))
    rows = _row_values(breakdowns)
    for row, values in rows:
        res.add(Figure("8", f"release step: {row}", "s", values))
    total = statistics.median(b["reconcile"] + b["before"] for b in breakdowns)
    shares = sorted(((row.split(" (")[0], statistics.median(v)) for row, v in rows), key=lambda rv: -rv[1])
    res.notes.append(f"Section 8, where a release's {total:.1f} s (median, commit -> reconcile done) go, by "
                     "median: " + ", ".join(f"{row} {v:.2f} s ({v / total:.0%})" for row, v in shares if v >= 0.005))


SECTION = Section("8", run, HOW)
