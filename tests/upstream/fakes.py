"""Plain upstream records for driving balancers and health logic directly."""

from __future__ import annotations

from dataclasses import dataclass

from midway.config.addresses import Address


@dataclass(eq=False)
class Up:
    """Keeps the balancers' ``UpstreamView`` contract; every field settable."""

    address: Address
    weight: int = 1
    backup: bool = False
    up: bool = True
    active: int = 0

    def __repr__(self) -> str:
        return f"Up({self.address}, w={self.weight}, b={self.backup}, up={self.up}, a={self.active})"


def ups(*weights: int, backup: tuple[int, ...] = ()) -> list[Up]:
    """Upstreams 10.0.0.1:80, 10.0.0.2:80, ... with these weights; ``backup``
    names the 0-based indices that are backups."""
    return [Up(Address(f"10.0.0.{i + 1}", 80), w, i in backup) for i, w in enumerate(weights)]


class ManualClock:
    """now() for the synchronous state machines: moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t
