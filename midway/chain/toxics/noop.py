"""``noop``: does nothing (Toxiproxy registers it as a real toxic type, and some
clients and tests add one to check that toxics can be added at all).

It never attaches to a connection, so it costs nothing and leaves the fast path
alone.  Attributes: none.
"""

from __future__ import annotations

from dataclasses import dataclass

from midway.chain.base import Attachment, ConnectionInfo
from midway.chain.toxics.base import Attributes, Toxic, ToxicStage

__all__ = ["NoopAttributes", "NoopToxic"]


@dataclass(frozen=True)
class NoopAttributes(Attributes):
    toxic_type = "noop"


class NoopToxic(Toxic[NoopAttributes]):
    type = "noop"
    attributes_class = NoopAttributes

    def attach(self, info: ConnectionInfo) -> Attachment | None:
        return None

    def make_stage(self) -> ToxicStage[NoopAttributes]:
        return ToxicStage(self)
