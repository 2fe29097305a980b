"""Iteration counts -> PNG bytes.

Pillow (a declared dependency) does the encoding. When it is missing, which only happens when
running from a source checkout, a minimal stdlib encoder (zlib) writes an equivalent PNG.
"""

from __future__ import annotations

import io
import struct
import zlib

from . import palette

__all__ = ["to_png", "encode_png"]


def encode_png(rgb: bytes, width: int, height: int) -> bytes:
    try:
        from PIL import Image
    except ImportError:
        return _encode_png_stdlib(rgb, width, height)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), rgb).save(buf, format="PNG")
    return buf.getvalue()


def to_png(counts: list[list[int]], max_iter: int, palette_name: str) -> bytes:
    height = len(counts)
    width = len(counts[0]) if height else 0
    return encode_png(palette.to_rgb(counts, palette_name, max_iter), width, height)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _encode_png_stdlib(rgb: bytes, width: int, height: int) -> bytes:
    stride = 3 * width
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))
