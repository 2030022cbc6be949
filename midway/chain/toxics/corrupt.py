"""``corrupt`` (midway's own): flip one bit in a given fraction of the bytes, to
test how a protocol's parser copes with damaged input.

Each byte is corrupted independently with probability ``probability``; a
corrupted byte has exactly one of its eight bits flipped, the bit chosen
uniformly.  Length, order, timing and chunk boundaries are unchanged, and the end
of the stream passes on.  Positions and bits come from the connection's random
source (see :mod:`midway.chain.toxics.base`), so a ``seed`` makes the damage
repeat exactly from run to run for the same bytes in the same chunks.  (Chunk
boundaries do not matter either: the draws depend only on the byte count.)

Drawing one number per byte would cost a Python call per byte; instead the gap to
the next corrupted byte is drawn from the geometric distribution, so the cost is
one draw per *corrupted* byte (``probability`` 0.001 on 1 MiB: about a thousand
draws).  The gap left over at the end of a chunk carries into the next one.

Attributes: ``probability`` (0 to 1, a number, default 0: nothing corrupted).
Removal: nothing is held.  Memory: one copy of the chunk being corrupted.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage, attribute

__all__ = ["CorruptAttributes", "CorruptToxic", "CorruptStage", "next_gap"]


@dataclass(frozen=True)
class CorruptAttributes(Attributes):
    toxic_type = "corrupt"

    probability: float = attribute(0.0, "share of bytes, 0 to 1",
                                   "chance that each byte gets one bit flipped",
                                   maximum=1.0, kind=float)


def next_gap(probability: float, rng: random.Random) -> int:
    """Bytes left untouched before the next corrupted one: geometric with success
    ``probability`` (0 when every byte is corrupted)."""
    if probability >= 1.0:
        return 0
    # Inverse transform: floor(log(U) / log(1 - p)) for U uniform in (0, 1].
    u = 1.0 - rng.random()
    return int(math.log(u) / math.log1p(-probability))


class CorruptStage(ToxicStage[CorruptAttributes]):
    def __init__(self, toxic: Toxic[CorruptAttributes]) -> None:
        super().__init__(toxic)
        self.gap: int | None = None
        """Untouched bytes before the next corrupted one, across chunks."""

    def corrupt(self, data: bytes) -> bytes:
        """``data`` with this connection's next corruptions applied."""
        p = self.attributes.probability
        if p <= 0.0:
            return data
        if self.gap is None:
            self.gap = next_gap(p, self.rng)
        if self.gap >= len(data):
            self.gap -= len(data)
            return data
        out = bytearray(data)
        pos = self.gap
        while pos < len(out):
            out[pos] ^= 1 << self.rng.randrange(8)
            pos += 1 + next_gap(p, self.rng)
        self.gap = pos - len(out)
        return bytes(out)

    async def data(self, data: bytes, out: Output) -> None:
        await out.send(self.corrupt(data))


class CorruptToxic(Toxic[CorruptAttributes]):
    type = "corrupt"
    attributes_class = CorruptAttributes

    def make_stage(self) -> CorruptStage:
        return CorruptStage(self)
