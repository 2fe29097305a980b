"""Section 2: `gitops-agent once` no-op on the bundled example, as a whole process."""

from __future__ import annotations

from pathlib import Path

from harness import (
    CLEANUP,
    Context,
    Figure,
    Section,
    agent_cmd,
    agent_python,
    log,
    timed_proc,
    verdict,
)

# isort: split
from fixtures import EXAMPLE_PORTS, example_args, example_repo

__all__ = ["SECTION", "WALL"]

WALL = "`once` no-op, whole process, example (wall)"
FLOOR = "floor: a Python process doing only a no-op's I/O, none of the agent (bench/floor_noop.py, wall)"

HOW = """\
2. desired-state-example committed into a temp git repo; `gitops-agent once --path
   desired-state-example --host localhost --age-identity keys/demo-host.agekey` converges it (the
   default installer, uv), then each timed run is the console script as a fresh process, exit 0 and
   "result: converged" checked. Both apps: mandelbrot (two venvs, HAProxy) and the shop (one venv,
   an age secret, three templates, a job, shop-web and two shop-worker processes): a no-op compares the
   secret and templates by their sealed digests (state/materials.memo: no `age`, no rendering). The agent
   runs from its own venv on the host's python3 (harness.agent_cmd, host_python). Beside each timed run,
   bench/floor_noop.py on the same root, with the agent venv's interpreter: argparse, logging, `git ls-remote`, supervisord's
   getAllProcessInfo and reloadConfig, HAProxy's `show servers state`, the venv markers, program files and
   status.json read, a status file written; no agent module, no YAML, no plan. What Python and this
   machine cost before the agent does anything of its own.
"""


def run(ctx: Context) -> None:
    res, work, quick = ctx.res, ctx.work, ctx.quick
    runs = 5 if quick else 15
    repo, ports = example_repo(work)
    root = CLEANUP.root(work / "example-root")
    base = [*agent_cmd(), "once", *example_args(repo, root)]
    if ports != EXAMPLE_PORTS:
        res.notes.append(f"Some of the example's ports {EXAMPLE_PORTS} were taken on this host: the bench's copy "
                         f"uses {ports}.")
    log("once: converging the example (uv, the default installer)")
    wall, _, proc = timed_proc(base, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"once (converge) failed:\n{proc.stdout}\n{proc.stderr}")
    log(f"once: converged in {wall:.1f}s")
    floor = [agent_python(), str(Path(__file__).resolve().parents[1] / "floor_noop.py"), str(root), f"file://{repo}",
             "main"]
    walls, cpus, floors = [], [], []
    for _ in range(runs):
        wall, cpu, proc = timed_proc(base, timeout=120)
        if proc.returncode != 0 or "result: converged" not in proc.stdout:
            raise RuntimeError(f"once no-op was not a no-op:\n{proc.stdout}\n{proc.stderr}")
        walls.append(wall)
        cpus.append(cpu)
        wall, _, proc = timed_proc(floor, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"floor_noop.py failed:\n{proc.stdout}\n{proc.stderr}")
        floors.append(wall)
    fig = res.add(Figure("2", WALL, "s", walls, "<= 0.15 s"))
    fig.verdict = verdict(fig.median <= 0.15)
    res.add(Figure("2", "`once` no-op, whole process, example (CPU user+sys)", "s", cpus))
    res.add(Figure("2", FLOOR, "s", floors))


SECTION = Section("2", run, HOW)
