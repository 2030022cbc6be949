"""``reset_peer``: abort the connection with a TCP RST ``timeout`` ms after the
first data.

Toxiproxy semantics (``toxics/reset_peer.go``): the toxic waits for the first
thing to arrive on its stream (a chunk, or the end of the stream), then waits
``timeout`` ms, then closes both sockets with ``SO_LINGER`` 0, which sends a RST
("connection reset by peer").  ``timeout`` 0: reset as soon as the first chunk
arrives.  The chunk that triggered it is never delivered, and nothing after it is
read while waiting (the sender is back-pressured).  The wait is measured from the
chunk's arrival (``out.received_at``).

Attributes: ``timeout`` (ms, default 0).

Deliberate difference: Toxiproxy's wait cannot be interrupted, so removing the toxic
during it still resets the connection and loses the held chunk.  In midway removal
cancels the pending reset and passes the held chunk (or end of stream) on, so no
byte is lost.  Toxiproxy also sets ``SO_LINGER`` 0 only when a connection starts
with a ``reset_peer`` on the proxy, so one added to an open connection closes it
with a FIN, and a connection that started with one ends with an RST however it
closes (toxicity 0, never fired, removed); midway sends the RST when the toxic
fires, and only then.  Memory: one chunk held.
"""

from __future__ import annotations

from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage, attribute

__all__ = ["ResetPeerAttributes", "ResetPeerToxic", "ResetPeerStage"]


@dataclass(frozen=True)
class ResetPeerAttributes(Attributes):
    toxic_type = "reset_peer"

    timeout: int = attribute(0, "milliseconds", "wait after the first data before the reset")


class ResetPeerStage(ToxicStage[ResetPeerAttributes]):
    def __init__(self, toxic: Toxic[ResetPeerAttributes]) -> None:
        super().__init__(toxic)
        self.done = False
        """The reset was sent; anything still arriving is dropped."""

    async def _reset_after(self, out: Output, since: float) -> bool:
        """Wait out the timeout from ``since``, then reset; ``False`` if cut short."""
        if self.done:
            return True
        if not await self.pause(out, since + self.attributes.timeout / 1000.0 - out.now()):
            return False
        self.done = True
        out.reset(f"reset_peer toxic {self.toxic.name!r}")
        return True

    async def data(self, data: bytes, out: Output) -> None:
        if self.bypass or not await self._reset_after(out, out.received_at):
            await out.send(data)

    async def eof(self, out: Output) -> None:
        if self.bypass or not await self._reset_after(out, out.now()):
            await out.send_eof()


class ResetPeerToxic(Toxic[ResetPeerAttributes]):
    type = "reset_peer"
    attributes_class = ResetPeerAttributes

    def make_stage(self) -> ResetPeerStage:
        return ResetPeerStage(self)
