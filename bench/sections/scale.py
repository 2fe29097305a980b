"""Section 1: the daemon's no-op reconcile in-process, by number of apps, and its growth per app."""

from __future__ import annotations

import time

from harness import (
    CLEANUP,
    Context,
    Figure,
    Section,
    distinct_port,
    samples_ms,
    verdict,
)

# isort: split
from fixtures import DemoRepo, converge_in_process, settings_for, write_app

__all__ = ["SECTION", "TEN_APPS"]

TEN_APPS = "no-op reconcile in-process, 10 apps"

HOW = """\
1. A state repo of N apps (each: one environment `envNNN`, one service `svcNNN`, a tiny hand-made
   demoapp wheel from tests/wheelfactory.py, ONE shared lockfile content, `installer: uv` so setup
   builds take ~0.2 s instead of ~3.6 s with pip; every service is a real `demoapp-server` on its own
   127.0.0.1 port under the embedded supervisord). Converged in-process, then one `Reconciler` (as
   the daemon holds it) times `.reconcile()` with nothing changed: git resolve, load & validate,
   facts (venv markers, program files, supervisord over XML-RPC), plan, record status. Apps are
   added to the same repo and root between sizes (1 -> 10 -> 50 -> 200). Growth per app is the
   slope between the smallest and largest size; "linear" compares the marginal cost per app of the
   top range with that of the range below it (PASS when not above 1.5x).
"""


def run(ctx: Context) -> None:
    from agent.service.reconciler import Reconciler

    sizes = [1, 10] if ctx.quick else [1, 10, 50, 200]
    runs = 10 if ctx.quick else 30
    res = ctx.res
    repo = DemoRepo(ctx.work / "scale-repo")
    lock = repo.lock_text("1.0.0")      # ONE lock shared by every app (each app still has its own env/venv)
    root = CLEANUP.root(ctx.work / "scale-root")
    settings = settings_for(repo.url, root, health_wait_s=30.0)
    points: list[tuple[int, float]] = []
    made = 0
    for n in sizes:
        for i in range(made, n):
            write_app(repo, f"app{i:03d}", f"env{i:03d}", lock, {f"svc{i:03d}": distinct_port()})
        made = n
        repo.commit(f"{n} apps")
        converge_in_process(settings, f"scale: {n} apps")
        rec = Reconciler(settings)       # what the daemon holds: one reconciler, many reconciles
        time.sleep(1.0)                  # let the services just started settle
        for _ in range(5):
            rec.reconcile()
        samples = []
        for _ in range(runs if n < 200 else max(5, runs // 2)):
            t0 = time.perf_counter()
            r = rec.reconcile()
            samples.append(time.perf_counter() - t0)
            if r.result != "converged" or r.outcomes:
                raise RuntimeError(f"scale {n}: no-op reconcile was not a no-op: {r.result} {r.error}")
        fig = Figure("1", f"no-op reconcile in-process, {n} app{'s' if n > 1 else ''}", "ms", samples_ms(samples))
        if n == 10:
            fig.target, fig.verdict = "<= 10 ms", verdict(fig.median <= 10.0)
        res.add(fig)
        points.append((n, fig.median))
    if len(points) >= 2:
        res.add(_growth(points))


def _growth(points: list[tuple[int, float]]) -> Figure:
    """The slope from the smallest to the largest size; linear when the top range's marginal cost per app
    is not above 1.5x the range below it (needs 4 sizes)."""
    (n0, t0_), (n1, t1_) = points[0], points[-1]
    slope = (t1_ - t0_) / (n1 - n0)
    fig = Figure("1", f"growth per app ({n0} -> {n1} apps)", "ms/app", [slope],
                 note=f"fixed part ~{t0_ - slope * n0:.2f} ms")
    if len(points) >= 4:
        lo = (points[2][1] - points[1][1]) / (points[2][0] - points[1][0])
        hi = (points[3][1] - points[2][1]) / (points[3][0] - points[2][0])
        fig.target = "linear"
        fig.verdict = verdict(hi <= 1.5 * lo + 0.02)
        fig.note = (f"marginal {lo:.3f} ms/app ({points[1][0]}->{points[2][0]}), {hi:.3f} ms/app "
                    f"({points[2][0]}->{points[3][0]}); " + fig.note)
    else:
        fig.target, fig.verdict = "linear", "n/a"
        fig.note = "linearity needs the 50 and 200 app points (full mode); " + fig.note
    return fig


SECTION = Section("1", run, HOW)
