"""The README pictures' shrinking (tests/admin/screenshots.py): a PNG using each
of the five row filters reads back pixel for pixel, and the indexed PNG written
from it shows the same pixels (the rarest colour, past the palette's size, as the
nearest kept one)."""

from __future__ import annotations

import struct
import zlib

from .screenshots import decode, encode_indexed

WHITE, GREY, BLUE, NEAR_BLUE = b"\xff\xff\xff", b"\x80\x80\x80", b"\x20\x60\xe0", b"\x22\x5e\xe0"


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(rows: list[list[bytes]], alpha: bool = False) -> bytes:
    """An RGB (RGBA) PNG whose row y uses filter y % 5, as Chromium's mix them."""
    bpp = 4 if alpha else 3
    raw = b""
    prev = bytes(len(rows[0]) * bpp)
    for y, row in enumerate(rows):
        line = b"".join(pixel + (b"\xff" if alpha else b"") for pixel in row)
        kind = y % 5
        out = bytearray()
        for i, x in enumerate(line):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            predicted = [0, a, b, (a + b) // 2, paeth(a, b, c)][kind]
            out.append((x - predicted) & 255)
        raw += bytes([kind]) + out
        prev = line
    header = struct.pack(">IIBBBBB", len(rows[0]), len(rows), 8, 6 if alpha else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def read_indexed(data: bytes) -> list[list[bytes]]:
    chunks, pos = {}, 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks[kind] = data[pos + 8:pos + 8 + length]
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 3)
    palette = [chunks[b"PLTE"][i:i + 3] for i in range(0, len(chunks[b"PLTE"]), 3)]
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = []
    for y in range(height):
        line = raw[y * (width + 1):(y + 1) * (width + 1)]
        assert line[0] == 0
        rows.append([palette[i] for i in line[1:]])
    return rows


IMAGE = [[WHITE, WHITE, GREY, BLUE, WHITE, GREY, WHITE]] * 3 + [
    [BLUE, GREY, WHITE, WHITE, NEAR_BLUE, WHITE, GREY],
    [GREY, GREY, BLUE, WHITE, WHITE, BLUE, WHITE],
    [WHITE, BLUE, BLUE, GREY, WHITE, WHITE, BLUE]]


def test_every_row_filter_reads_back() -> None:
    assert decode(png(IMAGE)) == IMAGE
    assert decode(png(IMAGE, alpha=True)) == [[p + b"\xff" for p in row] for row in IMAGE]


def test_the_indexed_png_shows_the_same_picture() -> None:
    assert read_indexed(encode_indexed(decode(png(IMAGE)), 4)) == IMAGE
    assert read_indexed(encode_indexed(decode(png(IMAGE, alpha=True)), 4)) == IMAGE
    # Three colours kept: the one pixel of the fourth is drawn as the nearest.
    near = [[BLUE if p == NEAR_BLUE else p for p in row] for row in IMAGE]
    assert read_indexed(encode_indexed(decode(png(IMAGE)), 3)) == near
