"""``limit_data``: pass at most ``bytes`` bytes, then close the connection.

Toxiproxy semantics (``toxics/limit_data.go``): a per-connection count of bytes
passed; a chunk that would cross the limit is cut to fit and the rest dropped; as
soon as the count reaches ``bytes`` the whole connection is closed (gracefully:
what was passed is delivered first).  ``bytes`` 0: the first chunk closes the
connection and none of it passes.  The end of the stream before the limit passes
on unchanged.

Attributes: ``bytes`` (bytes, default 0).

Removal: nothing is held, nothing to flush; the count is per stage and goes with
it.  Memory: nothing held.
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
    def __init__(self, toxic: Toxic[LimitDataAttributes]) -> None:
        super().__init__(toxic)
        self.passed = 0
        self.closed = False

    async def data(self, data: bytes, out: Output) -> None:
        if self.closed:
            return
        remaining = self.attributes.bytes - self.passed
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
