"""Console scripts `mandelbrot` (pure Python) and `mandelbrot_mp` (multiprocessing): render a PNG."""

from __future__ import annotations

import argparse
import sys
import time

from . import image, palette
from ._release import PALETTE, __version__
from .params import CLI_LIMITS, InvalidParams, Params

__all__ = ["main_simple", "main_mp", "build_parser"]


def build_parser(prog: str, parallel: bool) -> argparse.ArgumentParser:
    d = Params()
    p = argparse.ArgumentParser(prog=prog, description="Render the Mandelbrot set to a PNG file.")
    p.add_argument("--width", type=int, default=d.width, help="pixels (default %(default)s)")
    p.add_argument("--height", type=int, default=d.height, help="pixels (default %(default)s)")
    p.add_argument("--cx", type=float, default=d.cx, help="centre, real part (default %(default)s)")
    p.add_argument("--cy", type=float, default=d.cy, help="centre, imaginary part (default %(default)s)")
    p.add_argument("--zoom", type=float, default=d.zoom, help="1 = 4 units wide (default %(default)s)")
    p.add_argument("--max-iter", type=int, default=d.max_iter, help="default %(default)s")
    p.add_argument("--palette", choices=sorted(palette.PALETTES), default=PALETTE,
                   help="default: this release's, %(default)s")
    p.add_argument("-o", "--output", default="mandelbrot.png", help="PNG file (default %(default)s)")
    if parallel:
        p.add_argument("--processes", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} (palette {PALETTE})")
    return p


def _main(argv: list[str] | None, prog: str, parallel: bool) -> int:
    parser = build_parser(prog, parallel)
    args = parser.parse_args(argv)
    try:
        params = Params(args.width, args.height, args.cx, args.cy, args.zoom, args.max_iter).validate(CLI_LIMITS)
    except InvalidParams as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    if parallel:
        from . import mp

        counts = mp.render(params, processes=args.processes)
    else:
        from . import simple

        counts = simple.render(params)
    png = image.to_png(counts, params.max_iter, args.palette)
    with open(args.output, "wb") as f:
        f.write(png)
    print(f"{args.output}: {params.width}x{params.height}, {time.perf_counter() - started:.2f}s", file=sys.stderr)
    return 0


def main_simple(argv: list[str] | None = None) -> int:
    return _main(argv, "mandelbrot", parallel=False)


def main_mp(argv: list[str] | None = None) -> int:
    return _main(argv, "mandelbrot_mp", parallel=True)
