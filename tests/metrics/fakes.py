"""What the metrics tests feed the observer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Opened:
    """A connection as an observer is told of it when it opens."""

    proxy: str
    id: int = 0
    client: str = "127.0.0.1:50000"


def opened(proxy: str) -> Opened:
    return Opened(proxy)
