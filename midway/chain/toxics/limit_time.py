"""``limit_time`` (midway's own; Toxiproxy's open PR #195): close the connection
``after_s`` seconds after it opened.

Data passes unchanged until the deadline; then the whole connection is closed
gracefully (what was already passed on is delivered, then FIN both ways), as
``limit_data`` does at its byte limit.  Unlike ``timeout``, which drops data and
restarts its clock on every chunk, this is a fixed lifetime: a connection that
is busy the whole time is closed all the same (the bug reported on PR #195,
where steady traffic kept the connection alive, cannot happen here: the close
comes from a timer, not from the data loop).

The clock starts when the stage is installed: when the connection opens for a
toxic present then, when the toxic is added for a connection already open, and
when the toxic becomes active for one behind a condition (``after_s``,
``match``).  A relay that does not call ``start`` starts it on the first chunk or
end of stream (see :mod:`midway.chain.toxics.base`).  The end of the stream in
this direction passes on and does not stop the timer: the other direction may go
on, and the limit is on the connection.

Attributes: ``after_s`` (seconds, a number, default 0: the connection is closed at
once).  Removal cancels the timer; nothing is held.  Memory: nothing held.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage, attribute, spawn

__all__ = ["LimitTimeAttributes", "LimitTimeToxic", "LimitTimeStage"]


@dataclass(frozen=True)
class LimitTimeAttributes(Attributes):
    toxic_type = "limit_time"

    after_s: float = attribute(0.0, "seconds", "close the connection this long after it opened",
                               kind=float)


class LimitTimeStage(ToxicStage[LimitTimeAttributes]):
    def __init__(self, toxic: Toxic[LimitTimeAttributes]) -> None:
        super().__init__(toxic)
        self.deadline: float | None = None
        self.timer: asyncio.Task[None] | None = None
        self.closed = False

    def start(self, out: Output) -> None:
        if self.deadline is not None or self.bypass:
            return
        self.deadline = out.now() + self.attributes.after_s
        self.timer = spawn(self._watch(out))

    async def _watch(self, out: Output) -> None:
        assert self.deadline is not None
        if await self.pause(out, self.deadline - out.now()):
            self._close(out)

    def _close(self, out: Output) -> None:
        if not self.closed:
            self.closed = True
            out.close(f"limit_time toxic {self.toxic.name!r}: {self.attributes.after_s:g} s")

    def _expired(self, out: Output) -> bool:
        """Arm the timer if no one did; whether the deadline has passed (a chunk
        read after it is dropped even if the timer task has not run yet)."""
        self.start(out)
        if not self.bypass and self.deadline is not None and out.now() >= self.deadline:
            self._close(out)
        return self.closed

    async def data(self, data: bytes, out: Output) -> None:
        if not self._expired(out):
            await out.send(data)

    async def eof(self, out: Output) -> None:
        if not self._expired(out):
            await out.send_eof()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class LimitTimeToxic(Toxic[LimitTimeAttributes]):
    type = "limit_time"
    attributes_class = LimitTimeAttributes

    def make_stage(self) -> LimitTimeStage:
        return LimitTimeStage(self)
