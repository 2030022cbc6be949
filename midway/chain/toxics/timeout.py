"""``timeout``: stop all data; close the connection after ``timeout`` milliseconds.

Toxiproxy semantics (``toxics/timeout.go``): every chunk is read and dropped (the
sender is not slowed).  After ``timeout`` ms the whole connection is closed.  The
timer starts when the toxic starts on the connection and, because Toxiproxy arms a
fresh ``time.After`` on every loop turn, *restarts on every dropped chunk*: the
close comes ``timeout`` ms after the last chunk, so a sender that never pauses for
that long is never closed.  midway mirrors that.  ``timeout`` 0: never close; data
is dropped for as long as the toxic stays.  When the stream ends (EOF) the end is
passed on (Toxiproxy closes the socket) and the timer stops.

Attributes: ``timeout`` (ms, default 0).

Removal closes the connection (Toxiproxy's ``Cleanup``, covered by its test
``TestTimeoutToxicClosesConnectionOnRemove``): bytes were dropped, so the stream
could not go on intact.  Only connections the toxic applied to are closed: one
that its toxicity or conditions left out stays open (Toxiproxy's ``Cleanup`` runs
on every connection's stub, noop or not, and closes them all).  This is the one
toxic whose removal ends connections, and the only one that drops data on purpose.  An update does not close them
(Toxiproxy's link update interrupts the toxic and runs the new one, with no
``Cleanup``): the new settings apply from the update, the timer armed afresh, and
an update to toxicity 0 lets data through again (what was dropped stays lost).

The timer: a task owned by the stage, armed by ``start(out)`` if the relay calls it
when the stage is installed, else by the first chunk or EOF (see
:mod:`midway.chain.toxics.base`).  In the latter case a direction that never sees a
byte is never closed by this toxic.  Memory: nothing held.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage, attribute, spawn

__all__ = ["TimeoutAttributes", "TimeoutToxic", "TimeoutStage"]


@dataclass(frozen=True)
class TimeoutAttributes(Attributes):
    toxic_type = "timeout"

    timeout: int = attribute(0, "milliseconds", "close after this long without data; 0 never")


class TimeoutStage(ToxicStage[TimeoutAttributes]):
    def __init__(self, toxic: Toxic[TimeoutAttributes]) -> None:
        super().__init__(toxic)
        self.deadline: float | None = None
        self.timer: asyncio.Task[None] | None = None
        self.ended = False

    def start(self, out: Output) -> None:
        if self.ended or self.deadline is not None or self.attributes.timeout == 0:
            return
        self.deadline = out.now() + self.attributes.timeout / 1000.0
        self.timer = spawn(self._watch(out))

    async def _watch(self, out: Output) -> None:
        while self.deadline is not None:
            wait = self.deadline - out.now()
            if wait <= 0:
                self.ended = True
                out.close(f"timeout toxic {self.toxic.name!r}: {self.attributes.timeout} ms")
                return
            if not await self.pause(out, wait):
                return

    async def data(self, data: bytes, out: Output) -> None:
        if self.deadline is None:
            self.start(out)
        elif not self.ended:
            self.deadline = out.now() + self.attributes.timeout / 1000.0
        # The data is dropped, as in Toxiproxy.

    async def eof(self, out: Output) -> None:
        self._stop()
        await out.send_eof()

    async def flush(self, out: Output) -> None:
        self._stop()
        if not self.toxic.superseded:  # removed, not updated: the stream is not whole
            out.close(f"timeout toxic {self.toxic.name!r} removed")

    def _stop(self) -> None:
        self.ended = True
        self.deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self._stop()


class TimeoutToxic(Toxic[TimeoutAttributes]):
    type = "timeout"
    attributes_class = TimeoutAttributes

    def make_stage(self) -> TimeoutStage:
        return TimeoutStage(self)
