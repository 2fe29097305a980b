"""Straightforward pure-Python escape-time renderer.

`render(params)` returns the image as rows of iteration counts: `max_iter` means "did not escape"
(inside the set). `mandelbrot.mp` and `mandelbrot.fast` reuse the exact same arithmetic.
"""

from __future__ import annotations

from .params import Params

__all__ = ["escape_count", "render_rows", "render"]


def escape_count(cr: float, ci: float, max_iter: int) -> int:
    """Iterations of z <- z*z + c (from z = 0) before |z| > 2; `max_iter` if it never escapes."""
    zr = zi = 0.0
    for n in range(max_iter):
        zr2 = zr * zr
        zi2 = zi * zi
        if zr2 + zi2 > 4.0:
            return n
        zi = 2.0 * zr * zi + ci
        zr = zr2 - zi2 + cr
    return max_iter


def render_rows(params: Params, start: int, stop: int) -> list[list[int]]:
    """Iteration counts for rows start..stop-1."""
    xs, ys = params.axes()
    max_iter = params.max_iter
    return [[escape_count(cr, ci, max_iter) for cr in xs] for ci in ys[start:stop]]


def render(params: Params) -> list[list[int]]:
    return render_rows(params, 0, params.height)
