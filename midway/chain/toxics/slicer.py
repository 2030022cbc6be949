"""``slicer``: cut each chunk into smaller pieces, optionally pausing between them.

Toxiproxy semantics (``toxics/slicer.go``): a chunk of ``n`` bytes is split
recursively: if ``n - average_size <= size_variation`` it is one piece; otherwise
it is cut at ``n/2 + r`` with ``r`` drawn uniformly from ``[-size_variation,
size_variation)`` and both halves are split the same way (left first, so pieces
come out in order).  Every piece is therefore at most ``average_size +
size_variation`` bytes.  After each piece (the last one included) the toxic waits
``delay`` microseconds.  Slicing never changes the bytes, only where TCP segments
may end.

Attributes: ``average_size`` (bytes, default 0), ``size_variation`` (bytes,
default 0), ``delay`` (µs, default 0).

Deliberate difference: Toxiproxy accepts ``average_size`` 0 and ``size_variation >=
average_size`` and then panics or loops when data arrives (Go's ``rand.Intn(0)``, a
negative slice bound).  midway rejects both when the toxic is made: ``average_size``
must be at least 1 and ``size_variation`` smaller than it, which guarantees every
piece is at least one byte.  ``size_variation`` 0 cuts exactly in halves.

Removal: the rest of the chunk is sent at once, in one piece.  Memory: one chunk
held; the cut points are drawn as the pieces go (a stack of about
``log2(n / average_size)`` ranges), not listed in advance.

Cost: 64 KiB cut into single bytes is 65 536 sends.  Between two pieces the stage
yields to the event loop once its turn has run for
:data:`~midway.core.cooperate.SLICE_S` (without a ``delay`` it would otherwise hold
the loop, and every other connection of the process, for the whole chunk).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicError, ToxicStage, attribute
from midway.core.cooperate import cooperate

__all__ = ["SlicerAttributes", "SlicerToxic", "SlicerStage", "slice_points"]


@dataclass(frozen=True)
class SlicerAttributes(Attributes):
    toxic_type = "slicer"

    average_size: int = attribute(0, "bytes", "average size of a piece", minimum=1)
    size_variation: int = attribute(0, "bytes", "± variation of a piece; below average_size")
    delay: int = attribute(0, "microseconds", "wait after each piece")

    def check(self) -> None:
        if self.size_variation >= self.average_size:
            raise ToxicError(
                "attributes.size_variation",
                f"must be smaller than average_size ({self.average_size}),"
                f" got {self.size_variation}",
            )


def slice_points(size: int, average: int, variation: int, rng: random.Random) -> Iterator[int]:
    """The end offset of every piece of a ``size``-byte chunk, in order (the last is
    ``size``), each drawn when asked for.  Same recursion and random draws, in the
    same order, as Toxiproxy's ``chunk()``: a depth-first walk, left half first."""
    stack = [(0, size)] if size > 0 else []
    while stack:
        start, end = stack.pop()
        if (end - start) - average <= variation:
            yield end
            continue
        mid = start + (end - start) // 2
        if variation > 0:
            mid += rng.randrange(2 * variation) - variation
        stack.append((mid, end))
        stack.append((start, mid))


class SlicerStage(ToxicStage[SlicerAttributes]):
    async def data(self, data: bytes, out: Output) -> None:
        if self.bypass:
            await out.send(data)
            return
        attrs = self.attributes
        start = 0
        for end in slice_points(
            len(data), attrs.average_size, attrs.size_variation, self.rng
        ):
            await out.send(data[start:end])
            start = end
            if attrs.delay <= 0:
                await cooperate()
            elif not await self.pause(out, attrs.delay / 1_000_000):
                break
        if start < len(data):
            await out.send(data[start:])


class SlicerToxic(Toxic[SlicerAttributes]):
    type = "slicer"
    attributes_class = SlicerAttributes

    def make_stage(self) -> SlicerStage:
        return SlicerStage(self)
