"""Render parameters, their validation, and the pixel -> complex-plane mapping.

Every implementation takes its coordinates from `axes()`, so they all iterate on the very same
floating-point values and therefore produce identical iteration counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Limits", "Params", "InvalidParams", "SERVER_LIMITS", "CLI_LIMITS"]


class InvalidParams(ValueError):
    """Bad render parameters; `errors` lists every problem found, not just the first."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Limits:
    max_width: int
    max_height: int
    max_iter: int
    max_zoom: float = 1e13  # past this float64 runs out of precision
    max_abs_centre: float = 4.0


SERVER_LIMITS = Limits(max_width=1024, max_height=1024, max_iter=2000)
CLI_LIMITS = Limits(max_width=16384, max_height=16384, max_iter=1_000_000)


@dataclass(frozen=True, slots=True)
class Params:
    width: int = 640
    height: int = 480
    cx: float = -0.5
    cy: float = 0.0
    zoom: float = 1.0
    max_iter: int = 256

    def validate(self, limits: Limits) -> "Params":
        errors = []
        if not 1 <= self.width <= limits.max_width:
            errors.append(f"width must be in 1..{limits.max_width}, got {self.width}")
        if not 1 <= self.height <= limits.max_height:
            errors.append(f"height must be in 1..{limits.max_height}, got {self.height}")
        if not 1 <= self.max_iter <= limits.max_iter:
            errors.append(f"max_iter must be in 1..{limits.max_iter}, got {self.max_iter}")
        if not (math.isfinite(self.zoom) and 0 < self.zoom <= limits.max_zoom):
            errors.append(f"zoom must be > 0 and <= {limits.max_zoom:g}, got {self.zoom}")
        for name in ("cx", "cy"):
            value = getattr(self, name)
            if not (math.isfinite(value) and abs(value) <= limits.max_abs_centre):
                errors.append(f"{name} must be finite with |{name}| <= {limits.max_abs_centre:g}, got {value}")
        if errors:
            raise InvalidParams(errors)
        return self

    @property
    def scale(self) -> float:
        """Complex-plane units per pixel: at zoom 1 the image is 4 units wide."""
        return 4.0 / (self.zoom * self.width)

    def axes(self) -> tuple[list[float], list[float]]:
        """(real part of each column, imaginary part of each row); row 0 is the top."""
        s = self.scale
        xs = [self.cx + (x - self.width / 2) * s for x in range(self.width)]
        ys = [self.cy - (y - self.height / 2) * s for y in range(self.height)]
        return xs, ys
