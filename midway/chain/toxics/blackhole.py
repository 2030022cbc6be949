"""``blackhole`` (midway's own, not in Toxiproxy): an unplugged cable.

Nothing passes, nothing is lost, and the connection stays open.  A real unplugged
cable does not destroy data: the sender's TCP keeps it and retransmits, its window
fills and its writes block, and the receiver sees silence, including no FIN.  When
the cable is plugged back, everything arrives, in order.  This toxic does exactly
that: it holds the first chunk (or the end of the stream) that reaches it and does
not return, so the relay stops reading and back-pressure reaches the sender.  When
the toxic is removed, the held chunk or FIN is passed on and traffic resumes.

Compare: ``timeout`` with ``timeout`` 0 (Toxiproxy's way to "drop everything")
reads and discards data, lets the FIN through, and closes the connection when it is
removed; ``bandwidth`` with ``rate`` 0 also stalls, like this one.

Attributes: none.  Memory: one chunk held (plus the relay's bounded buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage

__all__ = ["BlackholeAttributes", "BlackholeToxic", "BlackholeStage"]


@dataclass(frozen=True)
class BlackholeAttributes(Attributes):
    toxic_type = "blackhole"


class BlackholeStage(ToxicStage[BlackholeAttributes]):
    async def data(self, data: bytes, out: Output) -> None:
        await self.hold(out)
        await out.send(data)

    async def eof(self, out: Output) -> None:
        await self.hold(out)
        await out.send_eof()


class BlackholeToxic(Toxic[BlackholeAttributes]):
    type = "blackhole"
    attributes_class = BlackholeAttributes

    def make_stage(self) -> BlackholeStage:
        return BlackholeStage(self)
