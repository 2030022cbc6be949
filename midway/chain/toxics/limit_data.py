"""``limit_data``: pass at most ``bytes`` bytes, then close the connection.

Toxiproxy semantics (``toxics/limit_data.go``): a per-connection count of bytes
passed; a chunk that would cross the limit is cut to fit and the rest dropped; as
soon as the count reaches ``bytes`` the whole connection is closed (gracefully:
what was passed is delivered first).  ``bytes`` 0: the first chunk closes the
connection and none of it passes.  The end of the stream before the limit passes
on unchanged.

Attributes: ``bytes`` (bytes, default 0).

Update: the count goes on, as in Toxiproxy (whose ``LimitDataToxicState`` lives
in the connection's stub): a limit lowered below what already passed closes the
connection at its next chunk, with none of it passed.  So it does when a reload
replaces the toxic for a new seed or conditions (same type and stream:
:func:`~midway.chain.toxics.live.replace_toxic`).  Removal: nothing is held,
nothing to flush; the count goes with the toxic (one added again counts from 0).
Memory: nothing held.
"""

from __future__ import annotations

from dataclasses import dataclass

from midway.chain.base import Output
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage, attribute

__all__ = ["LimitDataAttributes", "LimitDataToxic", "LimitDataStage"]


@dataclass(frozen=True)
class LimitDataAttributes(Attributes):
    toxic_type = "limit_data"

    bytes: int = attribute(0, "bytes", "bytes to pass before closing the connection")


class LimitDataStage(ToxicStage[LimitDataAttributes]):
    stateful = True

    def __init__(self, toxic: Toxic[LimitDataAttributes]) -> None:
        super().__init__(toxic)
        self.state: dict[str, object] = {}
        self.closed = False

    def adopt_state(self, state: dict[str, object]) -> None:
        self.state = state

    @property
    def passed(self) -> int:
        """Bytes passed on this connection, over every update of the toxic."""
        passed = self.state.get("passed", 0)
        assert isinstance(passed, int)
        return passed

    @passed.setter
    def passed(self, value: int) -> None:
        self.state["passed"] = value

    async def data(self, data: bytes, out: Output) -> None:
        if self.closed:
            return
        remaining = max(0, self.attributes.bytes - self.passed)
        if remaining < len(data):
            data = data[:remaining]
        if data:
            await out.send(data)
            self.passed += len(data)
        if self.passed >= self.attributes.bytes:
            self.closed = True
            out.close(f"limit_data toxic {self.toxic.name!r}: {self.attributes.bytes} bytes")

    async def eof(self, out: Output) -> None:
        if not self.closed:
            await out.send_eof()


class LimitDataToxic(Toxic[LimitDataAttributes]):
    type = "limit_data"
    attributes_class = LimitDataAttributes

    def make_stage(self) -> LimitDataStage:
        return LimitDataStage(self)
