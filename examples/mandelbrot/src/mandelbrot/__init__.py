"""Mandelbrot set renderer: pure Python (`simple`), multiprocessing (`mp`), optional numpy (`fast`)."""

from ._release import PALETTE, __version__
from .params import Limits, Params

__all__ = ["PALETTE", "Limits", "Params", "__version__"]
