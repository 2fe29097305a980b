"""Section 17b (issue 17): release of a new lock in the daemon, from `git commit` to the new version serving.

    python bench/sections/lock_release.py [--runs N]     # this section alone, prints its figures

A local state repo, the daemon (`gitops-agent run`, its local-repo watch) on a converged root; each run
commits a lock that pins a new demoapp version (a uv build from a warm cache, a restart, the health gate)
and the clock stops at the first answer of the new version from the service's own port (polled every
5 ms), the applied_revision_info metric after that.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __name__ == "__main__":        # run alone: the bench's import paths, as bench/run.py has them
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "tests"),
                    str(Path(__file__).resolve().parents[2])]

from harness import CLEANUP, Context, Figure, Section, agent_cmd, distinct_port, run_alone, verdict, when

# isort: split
from conftest import git, served_version
from daemon_helpers import start_daemon

from fixtures import DemoRepo, write_app

__all__ = ["SECTION", "RELEASE"]

RELEASE = "release of a new lock, commit to new version serving (daemon, local repo)"
TARGET_S = 0.7

HOW = """\
17b. Release (issue 17): `gitops-agent run --poll-interval 30` on a local repo of one health-gated demoapp
   service (installer uv, warm cache). Each run commits a lock pinning a new version; the figure is from
   just before `git commit` to the first answer of that version on the service's port (polled every 5 ms).
"""


def run(ctx: Context, runs: int | None = None) -> None:
    res, work = ctx.res, ctx.work
    runs = runs or (1 if ctx.quick else 7)
    repo = DemoRepo(work / "lock-release-repo")
    port = distinct_port()
    for i in range(runs + 1):
        repo.lock_text(f"1.{i}.0")        # every wheel made up front: the clock runs for the agent only
    write_app(repo, "demo", "demo", repo.lock_text("1.0.0"), {"demo-web": port})
    sha = repo.commit("demo 1.0.0")
    root = CLEANUP.root(work / "lock-release-root")
    daemon = start_daemon(CLEANUP, repo.url, root, work, poll=30.0, port=distinct_port(), command=agent_cmd())
    sample = f'gitops_agent_applied_revision_info{{revision="{sha}"}} 1.0'
    when(lambda: sample in daemon.metrics_text(), 180, "first converge", 0.1, daemon.log)
    walls = []
    for i in range(1, runs + 1):
        repo.write("apps/demo/demo.lock", repo.lock_text(f"1.{i}.0"))
        git(repo.path, "add", "-A")
        t0 = time.perf_counter()
        git(repo.path, "commit", "-q", "-m", f"demo 1.{i}.0")
        walls.append(when(lambda: served_version(port) == f"1.{i}.0", 120, f"1.{i}.0 serving", 0.005,
                          daemon.log) - t0)
        new = git(repo.path, "rev-parse", "HEAD")
        sample = f'gitops_agent_applied_revision_info{{revision="{new}"}} 1.0'
        when(lambda: sample in daemon.metrics_text(), 120, "applied", 0.05, daemon.log)
        time.sleep(0.3)
    fig = res.add(Figure("17b", RELEASE, "s", walls, f"<= {TARGET_S} s"))
    fig.verdict = verdict(fig.median <= TARGET_S)


SECTION = Section("17b", run, HOW)


if __name__ == "__main__":
    run_alone(run, "bench-release-", 5)
