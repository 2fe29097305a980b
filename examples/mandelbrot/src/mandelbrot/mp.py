"""Parallel renderer: rows are split into contiguous bands, one task per band, over a
multiprocessing pool. Each band is computed by `mandelbrot.simple.render_rows`, so the image is
identical to the single-process one.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from multiprocessing.pool import Pool

from .params import Params
from .simple import render_rows

__all__ = ["bands", "render", "make_pool"]

# "spawn" is safe from threaded parents (the HTTP server) and behaves the same on every OS.
_CONTEXT = "spawn"


def bands(height: int, parts: int) -> list[tuple[int, int]]:
    """Split range(height) into at most `parts` contiguous (start, stop) bands of near-equal size."""
    parts = max(1, min(parts, height))
    size, extra = divmod(height, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _ignore_sigint() -> None:
    # Workers leave interrupts to the parent, which terminates the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_pool(processes: int | None = None) -> Pool:
    ctx = multiprocessing.get_context(_CONTEXT)
    return ctx.Pool(processes or os.cpu_count() or 1, initializer=_ignore_sigint)


def _band(task: tuple[Params, int, int]) -> list[list[int]]:
    return render_rows(*task)


def render(params: Params, processes: int | None = None, pool: Pool | None = None) -> list[list[int]]:
    """Render with `pool` if given (it is left open), else with a pool of `processes` made for this call."""
    workers = processes or os.cpu_count() or 1
    # A few bands per worker balance the load: rows through the set cost far more than the rest.
    tasks = [(params, a, b) for a, b in bands(params.height, workers * 4)]
    if pool is not None:
        chunks = pool.map(_band, tasks)
    else:
        with make_pool(min(workers, len(tasks))) as own:
            chunks = own.map(_band, tasks)
    return [row for chunk in chunks for row in chunk]
