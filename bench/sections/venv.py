"""Section 4: a venv build of the example's real lock through the agent's build path, pip vs uv."""

from __future__ import annotations

import os
import shutil
import statistics
import time

from harness import Context, Figure, Section, verdict

# isort: split
from fixtures import EXAMPLE

__all__ = ["SECTION"]

HOW = """\
4. `VenvManager(root).build(VenvSpec(installer=...))` of desired-state-example/apps/mandelbrot/
   blue.lock (numpy, pillow, mandelbrot), full agent build path (venv, install, check, entry
   points, marker), bytecode left to the first import by both (`--no-compile` / no `--compile-bytecode`:
   the agent's default since issue 17; the entry point check compiles what the console scripts import). Cold
   uv = a fresh UV_CACHE_DIR per run; warm = a primed one. pip uses its normal cache.
"""


def run(ctx: Context) -> None:
    from agent.drivers.venv import VenvManager, VenvSpec

    res, work, quick = ctx.res, ctx.work, ctx.quick
    runs = 3
    lock = EXAMPLE / "apps" / "mandelbrot" / "blue.lock"
    wheelhouse = EXAMPLE / "wheelhouse"

    def build(installer: str, tag: str) -> float:
        root = work / f"venv-{tag}"
        spec = VenvSpec(name="blue", python="3.11", lockfile=lock, find_links=(wheelhouse,), installer=installer)
        t0 = time.perf_counter()
        VenvManager(root).build(spec)
        dt = time.perf_counter() - t0
        shutil.rmtree(root, ignore_errors=True)
        return dt

    saved = os.environ.get("UV_CACHE_DIR")
    try:
        cold = []
        for i in range(1 if quick else runs):
            os.environ["UV_CACHE_DIR"] = str(work / f"uv-cache-cold-{i}")
            cold.append(build("uv", f"uv-cold-{i}"))
            shutil.rmtree(work / f"uv-cache-cold-{i}", ignore_errors=True)
        os.environ["UV_CACHE_DIR"] = str(work / "uv-cache-warm")
        build("uv", "uv-prime")
        warm = [build("uv", f"uv-warm-{i}") for i in range(2 if quick else runs)]
    finally:
        if saved is None:
            os.environ.pop("UV_CACHE_DIR", None)
        else:
            os.environ["UV_CACHE_DIR"] = saved
    res.add(Figure("4", "venv build, real lock, uv cold cache", "s", cold,
                   note="fresh UV_CACHE_DIR per run: downloads numpy + pillow"))
    w = res.add(Figure("4", "venv build, real lock, uv warm cache", "s", warm))
    if quick:
        res.add(Figure("4", "venv build, real lock, pip", "s", text="skipped in quick mode"))
        return
    pip = res.add(Figure("4", "venv build, real lock, pip", "s",
                         [build("pip", f"pip-{i}") for i in range(runs)], note="pip's own (warm) http/wheel cache"))
    r = pip.median / w.median
    res.add(Figure("4", "ratio pip / uv warm", "x", [r], ">= 5x", verdict(r >= 5)))
    rc = pip.median / statistics.median(cold)
    res.add(Figure("4", "ratio pip / uv cold", "x", [rc]))


SECTION = Section("4", run, HOW)
