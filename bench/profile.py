"""Profile the no-op paths and the shop's release with pyinstrument (`pip install pyinstrument`); see
bench/PROFILE.md.

    python bench/profile.py [--apps 10] [--iterations 50]     # 1 and 2
    python bench/profile.py --release [--releases 2]            # 3 only

1. the daemon's in-process no-op reconcile on a converged root of N demo apps (as in bench/run.py §1);
2. `gitops-agent once` no-op on the bundled example, whole process (pyinstrument around cli.main, plus
   `python -X importtime` for the import share);
3. a release of the example's shop (bench/run.py §8) as the daemon's `Reconciler` runs it in-process:
   pyinstrument over the reconcile that applies a new release (wall time: the waits on uv, the migration,
   supervisord and the health gate are where they happen), and each action's own seconds (its Outcome).
Reports go to bench/profile-out/ (text, gitignored); every supervisord started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# harness first: it puts the agent and tests/ (the shared helpers) on sys.path
from harness import BENCH, CLEANUP, agent_cmd, distinct_port

# isort: split
from fixtures import (
    IDENTITY,
    DemoRepo,
    converge_in_process,
    example_args,
    example_repo,
    settings_for,
    write_app,
)
from shoprelease import (
    ShopRepo,
    build_release_wheels,
    place_orders,
    release_version,
    shop_version,
)

OUT = BENCH / "profile-out"


def profile_inprocess(work: Path, apps: int, iterations: int) -> None:
    from pyinstrument import Profiler

    from agent.service.reconciler import Reconciler

    repo = DemoRepo(work / "repo")
    lock = repo.lock_text("1.0.0")
    for i in range(apps):
        write_app(repo, f"app{i:03d}", f"env{i:03d}", lock, {f"svc{i:03d}": distinct_port()})
    repo.commit(f"{apps} apps")
    root = CLEANUP.root(work / "root")
    settings = settings_for(repo.url, root)
    converge_in_process(settings, f"profile: {apps} apps")
    rec = Reconciler(settings)
    for _ in range(3):
        rec.reconcile()
    prof = Profiler(interval=0.0005)
    t0 = time.perf_counter()
    with prof:
        for _ in range(iterations):
            rec.reconcile()
    per = (time.perf_counter() - t0) / iterations * 1000
    text = prof.output_text(unicode=False, color=False, show_all=False)
    (OUT / f"inprocess-{apps}apps.txt").write_text(f"{iterations} no-op reconciles, {per:.1f} ms each "
                                                   f"(profiled)\n\n{text}")
    print(f"in-process, {apps} apps: {per:.1f} ms per reconcile (profiled) -> {OUT}/inprocess-{apps}apps.txt")


def profile_once(work: Path) -> None:
    repo, _ = example_repo(work)
    root = CLEANUP.root(work / "example-root")
    args = ["once", *example_args(repo, root), "--installer", "uv"]
    subprocess.run([*agent_cmd(), *args], check=True, capture_output=True)
    subprocess.run([*agent_cmd(), *args], check=True, capture_output=True)
    code = ("import sys; from pyinstrument import Profiler; p = Profiler(interval=0.0005); p.start(); "
            "from agent.cli import main; rc = main(sys.argv[1:]); p.stop(); "
            f"open({str(OUT / 'once.txt')!r}, 'w').write(p.output_text(unicode=False, color=False)); sys.exit(rc)")
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)
    imp = subprocess.run([sys.executable, "-X", "importtime", "-c",
                          "from agent.cli import main; import sys; sys.exit(main(sys.argv[1:]))", *args],
                         capture_output=True, text=True, check=False)
    rows = []
    for line in imp.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            head, cum_us, name = line.split("|")
            self_us = head.split(":")[1].strip()
            if cum_us.strip().isdigit():
                rows.append((int(cum_us), int(self_us), name.rstrip()))
    # top level = one space after the bar; nested imports are indented further
    top = sorted((r for r in rows if not r[2].startswith("  ")), reverse=True)[:40]
    lines = [f"{c / 1000:8.1f} ms cumulative {s / 1000:7.1f} ms self  {n}" for c, s, n in top]
    (OUT / "once-importtime.txt").write_text("top-level imports of `once` (python -X importtime)\n"
                                             + "\n".join(lines) + "\n")
    print(f"once: {OUT}/once.txt, {OUT}/once-importtime.txt")


def _timed_steps() -> list[tuple[str, float]]:
    """Time the venv build's subprocesses (by what they do), its os.sync() and each venv deletion (prune):
    pyinstrument sees them all as one `subprocess.run`. Wrappers in this profiling process only."""
    import os

    from agent.drivers import venv

    steps: list[tuple[str, float]] = []

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                steps.append((label(*args, **kwargs), time.perf_counter() - t0))
        return wrapper

    venv._run = timed(lambda *a, what="", **k: what, venv._run)
    venv.os.sync = timed(lambda: "os.sync()", os.sync)
    venv.VenvManager._delete = timed(lambda self, path: f"delete {path.name} (prune)", venv.VenvManager._delete)
    return steps


def profile_release(work: Path, releases: int) -> None:
    """The shop's releases 1.1.0.. applied by one in-process Reconciler, the last one under pyinstrument."""
    from pyinstrument import Profiler

    from agent.service.reconciler import Reconciler

    wheels = build_release_wheels(releases, work / "shop-wheels", work)
    port = distinct_port()
    repo = ShopRepo(work / "shop-repo", port)
    repo.commit("shop 1.0.0")
    root = CLEANUP.root(work / "shop-root")
    settings = settings_for(repo.url, root, age_identity=str(IDENTITY), health_wait_s=60.0)
    converge_in_process(settings, "profile: shop 1.0.0")
    place_orders(port, 50)
    rec = Reconciler(settings)
    report = []
    steps = _timed_steps()
    for n in range(1, releases + 1):
        repo.stage_release(wheels[n])
        repo.commit(f"shop {release_version(n)}")
        steps.clear()
        prof = Profiler(interval=0.001) if n == releases else None
        t0 = time.perf_counter()
        if prof:
            prof.start()
        result = rec.reconcile()
        if prof:
            prof.stop()
        wall = time.perf_counter() - t0
        if result.result != "applied" or shop_version(port) != release_version(n):
            raise RuntimeError(f"release {release_version(n)}: {result.result} {result.error}")
        lines = [(f"release {release_version(n)}: reconcile {wall:.2f} s{' (profiled)' if prof else ''}; "
                  f"actions {sum(o.seconds for o in result.outcomes):.2f} s")]
        lines += [f"  {o.seconds:7.3f} s  {o.action.describe()}: {o.message[:90]}" for o in result.outcomes]
        lines += ["  inside build_venv and prune_venvs:"] + [f"    {s:7.3f} s  {what}" for what, s in steps]
        report.append("\n".join(lines))
        print(report[-1])
    text = prof.output_text(unicode=False, color=False, show_all=False)
    (OUT / "release.txt").write_text("\n\n".join(report) + "\n\n" + text)
    print(f"release: {OUT}/release.txt")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--apps", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--release", action="store_true", help="profile the shop's release (3) instead of 1 and 2")
    ap.add_argument("--releases", type=int, default=3,
                    help="with --release: releases applied, the last one profiled (3: it prunes a venv too)")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gitops-profile-"))
    try:
        if args.release:
            profile_release(work, args.releases)
            return 0
        if args.apps:
            profile_inprocess(work, args.apps, args.iterations)
        profile_once(work)
    finally:
        CLEANUP.run()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
