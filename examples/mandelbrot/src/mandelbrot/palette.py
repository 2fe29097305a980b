"""Palettes: iteration count -> RGB.

A palette is a cycle of anchor colours; escape counts walk the cycle with linear interpolation
(`PERIOD` iterations per full turn); points inside the set (count == max_iter) are black.
Integer arithmetic only, so colours are exact and identical everywhere.
"""

from __future__ import annotations

__all__ = ["PALETTES", "PERIOD", "colour", "lookup_table", "to_rgb"]

RGB = tuple[int, int, int]

PERIOD = 48
INSIDE: RGB = (0, 0, 0)

PALETTES: dict[str, tuple[RGB, ...]] = {
    # 1.0.0: deep blue -> sky -> white -> gold
    "classic": ((0, 7, 100), (32, 107, 203), (237, 255, 255), (255, 170, 0), (0, 2, 0)),
    # 1.1.0: violet -> crimson -> orange -> yellow -> cream
    "ember": ((25, 0, 40), (130, 10, 70), (225, 55, 20), (255, 165, 0), (255, 245, 190)),
}


def colour(name: str, n: int, max_iter: int) -> RGB:
    if n >= max_iter:
        return INSIDE
    anchors = PALETTES[name]
    k = len(anchors)
    pos = (n % PERIOD) * k  # position on the cycle, in units of 1/PERIOD anchor
    i, frac = divmod(pos, PERIOD)
    a, b = anchors[i], anchors[(i + 1) % k]
    return tuple(ca + (cb - ca) * frac // PERIOD for ca, cb in zip(a, b))  # type: ignore[return-value]


def lookup_table(name: str, max_iter: int) -> list[bytes]:
    """RGB bytes for every count 0..max_iter."""
    if name not in PALETTES:
        raise KeyError(f"unknown palette {name!r}; known: {', '.join(sorted(PALETTES))}")
    return [bytes(colour(name, n, max_iter)) for n in range(max_iter + 1)]


def to_rgb(counts: list[list[int]], name: str, max_iter: int) -> bytes:
    """Raw RGB bytes (row-major, 3 bytes per pixel) for an image of iteration counts."""
    lut = lookup_table(name, max_iter)
    return b"".join(lut[n] for row in counts for n in row)
