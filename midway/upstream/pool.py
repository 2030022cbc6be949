"""The upstreams of one proxy and the order in which to try them.

This is the seam for load balancing: a balancer gives, for each new connection, the
order in which to try the upstreams.  Round-robin rotates the starting point; on a
connect failure the session tries the next one in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config.addresses import Address

__all__ = ["UpstreamPool"]


class UpstreamPool:
    def __init__(self, upstreams: Sequence[Address], balance: str = "round_robin") -> None:
        if not upstreams:
            raise ValueError("an upstream pool needs at least one upstream")
        self.upstreams = tuple(upstreams)
        self.balance = balance
        self._next = 0

    def candidates(self) -> list[Address]:
        """Every upstream, in the order to try them for one new connection."""
        n = len(self.upstreams)
        if n == 1:
            return [self.upstreams[0]]
        start = self._next % n
        self._next = start + 1
        return [self.upstreams[(start + i) % n] for i in range(n)]
