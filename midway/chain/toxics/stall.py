"""``stall`` (midway's own): stop moving bytes in one direction for ``stall_s``
seconds, then resume, the "cable unplugged and plugged back" of Toxiproxy's #149.

When the stall begins, the first chunk (or end of stream) that reaches the stage is
held and the call does not return, so the relay stops reading and back-pressure
reaches the sender's TCP: nothing is lost, reordered or dropped, and nothing
passes, FIN included.  At ``stall_s`` seconds after the stall began, the held chunk
goes on and everything after it flows normally, for good.  A stall that ends with
no data waiting simply leaves the stream as it was.  Compare ``blackhole``, which
is the same stall without an end.

The stall begins when the stage is installed (the connection opens, or the toxic
is added to an open one, or a condition such as ``after_s`` or ``match`` makes it
active), or, with a relay that does not call ``start``, at the first chunk or end
of stream.  To stall a stream again, add the toxic again or put it on a timeline.

Attributes: ``stall_s`` (seconds, a number, default 0: no stall).  Removal during
the stall passes the held chunk (or FIN) on at once, in order.  Memory: one chunk
held (plus the relay's bounded buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage, attribute

__all__ = ["StallAttributes", "StallToxic", "StallStage"]


@dataclass(frozen=True)
class StallAttributes(Attributes):
    toxic_type = "stall"

    stall_s: float = attribute(0.0, "seconds", "how long nothing moves before the stream resumes",
                               kind=float)


class StallStage(ToxicStage[StallAttributes]):
    def __init__(self, toxic: Toxic[StallAttributes]) -> None:
        super().__init__(toxic)
        self.until: float | None = None
        """Clock time the stall ends; ``None`` until it begins."""

    def start(self, out: Output) -> None:
        if self.until is None:
            self.until = out.now() + self.attributes.stall_s

    async def _wait(self, out: Output) -> None:
        self.start(out)
        assert self.until is not None
        await self.pause(out, self.until - out.now())

    async def data(self, data: bytes, out: Output) -> None:
        await self._wait(out)
        await out.send(data)

    async def eof(self, out: Output) -> None:
        await self._wait(out)
        await out.send_eof()


class StallToxic(Toxic[StallAttributes]):
    type = "stall"
    attributes_class = StallAttributes

    def make_stage(self) -> StallStage:
        return StallStage(self)
