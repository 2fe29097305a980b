"""Optional numpy renderer (`pip install mandelbrot[fast]`).

Same arithmetic, in the same order, as `mandelbrot.simple.escape_count`, on float64 arrays: IEEE
multiplication and addition are exactly rounded and numpy does not fuse them, so the counts are
identical to the pure-Python ones. Pixels are dropped from the working arrays as they escape.
"""

from __future__ import annotations

from .params import Params

__all__ = ["available", "render"]

try:
    import numpy as np
except ImportError:  # pure Python still works without numpy
    np = None


def available() -> bool:
    return np is not None


def render(params: Params) -> list[list[int]]:
    if np is None:
        raise RuntimeError("numpy is not installed: pip install 'mandelbrot[fast]'")
    xs, ys = params.axes()
    w, h = params.width, params.height
    cr = np.tile(np.array(xs, dtype=np.float64), h)
    ci = np.repeat(np.array(ys, dtype=np.float64), w)
    idx = np.arange(w * h)
    counts = np.full(w * h, params.max_iter, dtype=np.int64)
    zr = np.zeros_like(cr)
    zi = np.zeros_like(cr)
    for n in range(params.max_iter):
        zr2 = zr * zr
        zi2 = zi * zi
        escaped = zr2 + zi2 > 4.0
        if escaped.any():
            counts[idx[escaped]] = n
            keep = ~escaped
            idx, cr, ci, zr, zi, zr2, zi2 = (a[keep] for a in (idx, cr, ci, zr, zi, zr2, zi2))
            if idx.size == 0:
                break
        zi = 2.0 * zr * zi + ci
        zr = zr2 - zi2 + cr
    return counts.reshape(h, w).tolist()
