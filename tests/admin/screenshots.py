"""The README's pictures as small PNGs, with no image library: Chromium's
screenshot (8-bit RGB or RGBA, any of PNG's five row filters) is read back with
:mod:`zlib`, its colours cut to the most common ones (a page of text on plain
backgrounds has a few hundred, nearly all anti-aliasing shades; the rest go to
the nearest kept one), and it is written again as an indexed (palette) PNG,
which is a third of the size or less and looks the same."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from pathlib import Path

__all__ = ["decode", "encode_indexed", "save_small_png"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOURS = 32
"""Enough for text, its anti-aliasing and the graphs' two colours."""

Pixels = list[list[bytes]]
"""Rows of pixels, each ``bytes`` of 3 (RGB) or 4 (RGBA)."""


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == SIGNATURE, "not a PNG"
    out, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        out.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def _unfilter(kind: int, line: bytearray, prev: bytes | bytearray, bpp: int) -> None:
    if kind == 0:
        return
    for i in range(len(line)):
        a = line[i - bpp] if i >= bpp else 0
        b = prev[i]
        if kind == 1:
            line[i] = (line[i] + a) & 255
        elif kind == 2:
            line[i] = (line[i] + b) & 255
        elif kind == 3:
            line[i] = (line[i] + (a + b) // 2) & 255
        elif kind == 4:
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        else:
            raise ValueError(f"PNG row filter {kind}")


def decode(data: bytes) -> Pixels:
    """The pixels of an 8-bit RGB or RGBA, non-interlaced PNG."""
    chunks = _chunks(data)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"PNG of depth {depth}, colour type {colour}, interlace {interlace}")
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * bpp
    rows: Pixels = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = bytearray(raw[start + 1:start + 1 + stride])
        _unfilter(raw[start], line, prev, bpp)
        rows.append([bytes(line[x:x + bpp]) for x in range(0, stride, bpp)])
        prev = line
    return rows


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_indexed(rows: Pixels, colours: int = COLOURS) -> bytes:
    """An indexed PNG of the ``colours`` most common colours of ``rows`` (RGB:
    an alpha channel is dropped), each other colour drawn as the nearest of them."""
    counts = Counter(pixel[:3] for row in rows for pixel in row)
    palette = [colour for colour, _ in counts.most_common(colours)]
    index = {colour: i for i, colour in enumerate(palette)}
    for colour in counts:
        if colour not in index:
            index[colour] = min(range(len(palette)), key=lambda i: sum(
                (x - y) ** 2 for x, y in zip(colour, palette[i], strict=True)))
    raw = b"".join(b"\0" + bytes(index[pixel[:3]] for pixel in row) for row in rows)
    header = struct.pack(">IIBBBBB", len(rows[0]), len(rows), 8, 3, 0, 0, 0)
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"PLTE", b"".join(palette))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def save_small_png(png: bytes, path: Path, colours: int = COLOURS) -> None:
    """Chromium's screenshot ``png`` saved to ``path`` as a small indexed PNG."""
    path.write_bytes(encode_indexed(decode(png), colours))
