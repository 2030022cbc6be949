"""``latency``: delay every chunk by ``latency`` ± ``jitter`` milliseconds.

Toxiproxy semantics (``toxics/latency.go``): each chunk leaves ``latency + j`` ms
after it was *read*, where ``j`` is drawn per chunk uniformly from the integers
``[-jitter, jitter)`` (Go: ``rand.Int63n(2*jitter) - jitter``).  The delay is
measured from the chunk's arrival (``out.received_at``), not from the previous
chunk's departure, so a steady stream is shifted, not slowed: chunks read at
t = 0, 50, 100 ms under 200 ms latency leave at 200, 250, 300 ms.  A delay already
past (negative jitter larger than the latency, or a chunk that queued behind a
slower one) sends at once; order is always kept.

Attributes: ``latency`` (ms, default 0), ``jitter`` (ms, default 0).

Removal: a chunk being delayed is sent at once (Toxiproxy: "don't drop any data on
the floor").  Memory: one chunk held.

Stacking: like Toxiproxy, a delayed chunk is re-stamped with the time it was
released (``out.received_at`` moves forward by the sleep), so two latency toxics on
one stream add up.
"""

from __future__ import annotations

from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage, attribute

__all__ = ["LatencyAttributes", "LatencyToxic", "LatencyStage"]


@dataclass(frozen=True)
class LatencyAttributes(Attributes):
    toxic_type = "latency"

    latency: int = attribute(0, "milliseconds", "delay added to every chunk")
    jitter: int = attribute(0, "milliseconds", "random ± variation of each chunk's delay")


class LatencyStage(ToxicStage[LatencyAttributes]):
    def delay_s(self) -> float:
        """This chunk's delay in seconds (one jitter draw)."""
        delay_ms = self.attributes.latency
        jitter = self.attributes.jitter
        if jitter > 0:
            delay_ms += self.rng.randrange(2 * jitter) - jitter
        return delay_ms / 1000.0

    async def data(self, data: bytes, out: Output) -> None:
        if not self.bypass:
            sleep = out.received_at + self.delay_s() - out.now()
            if await self.pause(out, sleep) and sleep > 0:
                # Re-stamp, as Toxiproxy does (c.Timestamp.Add(sleep)): a second
                # latency toxic on the stream then adds its delay to this one's.
                out.received_at += sleep
        await out.send(data)


class LatencyToxic(Toxic[LatencyAttributes]):
    type = "latency"
    attributes_class = LatencyAttributes

    def make_stage(self) -> LatencyStage:
        return LatencyStage(self)
