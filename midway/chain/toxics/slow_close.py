"""``slow_close``: hold the end of the stream back for ``delay`` milliseconds.

Toxiproxy semantics (``toxics/slow_close.go``): data passes unchanged; when the
stream ends, the close is passed on only ``delay`` ms later.  Toxiproxy closes the
whole socket; midway passes the half-close (FIN) on, as every stage does, so the
other direction is unaffected.

Attributes: ``delay`` (ms, default 0).

Removal during the delay: the FIN is passed on at once (Toxiproxy's link removal
does the same: the stream had already ended).  Memory: nothing held but the FIN.
"""

from __future__ import annotations

from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage, attribute

__all__ = ["SlowCloseAttributes", "SlowCloseToxic", "SlowCloseStage"]


@dataclass(frozen=True)
class SlowCloseAttributes(Attributes):
    toxic_type = "slow_close"

    delay: int = attribute(0, "milliseconds", "wait before passing the close on")


class SlowCloseStage(ToxicStage[SlowCloseAttributes]):
    async def eof(self, out: Output) -> None:
        await self.pause(out, self.attributes.delay / 1000.0)
        await out.send_eof()


class SlowCloseToxic(Toxic[SlowCloseAttributes]):
    type = "slow_close"
    attributes_class = SlowCloseAttributes

    def make_stage(self) -> SlowCloseStage:
        return SlowCloseStage(self)
