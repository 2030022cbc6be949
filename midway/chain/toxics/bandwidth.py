"""``bandwidth``: pass data at no more than ``rate`` KB/s (1 KB = 1000 bytes).

Toxiproxy semantics (``toxics/bandwidth.go``): every chunk of ``n`` bytes adds
``n / (rate * 1000)`` s to a debt; a chunk larger than 100 ms' worth
(``rate * 100`` bytes) goes out in slices of ``rate * 100`` bytes, each after a
100 ms wait; the remainder goes after waiting out what is left of the debt.  The
debt is reduced by the time actually waited, so timer overshoot is paid back on
the next chunk.  Time spent idle between chunks earns no credit: like Toxiproxy,
each chunk pays its own transfer time after it arrives (this is a serialisation
delay, not a token bucket).

Attributes: ``rate`` (KB/s, default 0).

``rate`` 0: Toxiproxy means "unlimited" in one line of code but, in every
released version, spins forever in the slicing loop and never forwards the chunk
(users rely on that to stall a connection).  midway does what Toxiproxy actually
does: the first chunk is held, nothing passes, until the toxic is removed.  A
pending Toxiproxy pull request (#764) would make it "unlimited" instead.

Removal: whatever is left of the chunk is sent at once.  Memory: one chunk held.
"""

from __future__ import annotations

from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage, attribute

__all__ = ["BandwidthAttributes", "BandwidthToxic", "BandwidthStage", "SLICE_MS", "KB"]

KB = 1000
"""Toxiproxy's KB: ``time.Millisecond / rate`` per byte, i.e. 1000 bytes."""
SLICE_MS = 100
"""Toxiproxy splits large chunks into 100 ms slices (``rate * 100`` bytes each)."""
SLICE_S = SLICE_MS / 1000


@dataclass(frozen=True)
class BandwidthAttributes(Attributes):
    toxic_type = "bandwidth"

    rate: int = attribute(0, "KB/s", "maximum rate, 1 KB = 1000 bytes; 0 stalls")


class BandwidthStage(ToxicStage[BandwidthAttributes]):
    def __init__(self, toxic: Toxic[BandwidthAttributes]) -> None:
        super().__init__(toxic)
        self.debt_s = 0.0
        """Transfer time owed (seconds); may go slightly negative after an overshoot."""

    async def _wait(self, out: Output, seconds: float) -> bool:
        start = out.now()
        ok = await self.pause(out, seconds)
        self.debt_s -= out.now() - start
        return ok

    async def data(self, data: bytes, out: Output) -> None:
        rate = self.attributes.rate
        if rate == 0:
            await self.hold(out)
        if self.bypass:
            await out.send(data)
            return
        self.debt_s += len(data) / (rate * KB)
        slice_size = rate * KB * SLICE_MS // 1000
        offset = 0
        while len(data) - offset > slice_size:
            if not await self._wait(out, SLICE_S):
                break
            await out.send(data[offset : offset + slice_size])
            offset += slice_size
        else:
            await self._wait(out, self.debt_s)
        await out.send(data[offset:])


class BandwidthToxic(Toxic[BandwidthAttributes]):
    type = "bandwidth"
    attributes_class = BandwidthAttributes

    def make_stage(self) -> BandwidthStage:
        return BandwidthStage(self)
