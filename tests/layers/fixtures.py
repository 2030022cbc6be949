"""The captured byte fixtures of tests/layers/data (see data/README.md) and the
ways every parser test feeds them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from midway.layers.fuzz import read_hex

DATA = Path(__file__).with_name("data")

# What the captured clients sent after the header (capture_fixtures.py).
CLIENT_PAYLOAD = b"hello from the client\n"


def load(name: str) -> bytes:
    return read_hex(DATA / f"{name}.hex")


def whole(data: bytes) -> Iterator[list[bytes]]:
    yield [data]


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def every_split(data: bytes) -> Iterator[list[bytes]]:
    """The input as two pieces, at every split point."""
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
