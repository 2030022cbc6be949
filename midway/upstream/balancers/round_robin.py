"""``round_robin``: smooth weighted round-robin, as nginx does it.

Theory of operation
-------------------
This is the algorithm of nginx's ``ngx_http_upstream_get_peer``
(src/http/ngx_http_upstream_round_robin.c).  Every upstream has a
``current_weight`` (starts at 0) and an ``effective_weight`` (starts at its
weight).  For each pick:

1. every eligible upstream adds its ``effective_weight`` to its ``current_weight``;
2. the one with the largest ``current_weight`` is picked (the first on a tie);
3. the picked one subtracts the total of the effective weights.

Over any window of ``sum(weights)`` picks each upstream is picked exactly
``weight`` times, and the picks are *spread*: weights 5, 1, 1 give
``a a b a c a a`` rather than ``a a a a a b c``, so a heavy upstream never gets a
burst of consecutive connections.

``effective_weight`` is nginx's slow start after a failure: a failed connect
lowers it by the full weight (nginx's ``weight / max_fails`` with its default
``max_fails = 1``), and each pick that considers the upstream raises it by one
until it is back at the weight.  So an upstream that just refused a connection
gets few new ones for a while, then its full share again.

Only the first entry of the order moves the weights.  The rest of the order (the
upstreams a retry tries) follows the current weights after the pick, largest
first: the ones owed a connection the most.  nginx re-runs the pick for each retry
instead; doing it once keeps the distribution exact when retries are unused, which
is the common case.

State is kept per address, so a reconfigure that keeps an address keeps its place
in the rotation; an upstream whose weight changed starts afresh.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...config.addresses import Address
from .base import U, eligible

__all__ = ["RoundRobin", "SmoothWeighted"]


class _Weights:
    __slots__ = ("weight", "current", "effective")

    def __init__(self, weight: int) -> None:
        self.weight = weight
        self.current = 0
        self.effective = weight


class SmoothWeighted:
    """The nginx smooth weighted round-robin core, shared with
    ``least_connections`` (which uses it to break ties)."""

    __slots__ = ("_peers",)

    def __init__(self) -> None:
        self._peers: dict[Address, _Weights] = {}

    def _state(self, u: U) -> _Weights:
        w = self._peers.get(u.address)
        if w is None or w.weight != u.weight:
            w = self._peers[u.address] = _Weights(u.weight)
        return w

    def pick(self, candidates: Sequence[U]) -> int:
        """Index into ``candidates`` (non-empty, weights > 0) of the next pick."""
        best = -1
        best_current = 0
        total = 0
        for i, u in enumerate(candidates):
            w = self._state(u)
            w.current += w.effective
            total += w.effective
            if w.effective < w.weight:
                w.effective += 1
            if best < 0 or w.current > best_current:
                best, best_current = i, w.current
        self._peers[candidates[best].address].current -= total
        return best

    def current(self, address: Address) -> int:
        w = self._peers.get(address)
        return w.current if w is not None else 0

    def failed(self, address: Address) -> None:
        w = self._peers.get(address)
        if w is not None:
            w.effective = max(0, w.effective - w.weight)

    def forget_except(self, upstreams: Sequence[U]) -> None:
        """Drop the state of addresses that left the configuration."""
        if len(self._peers) > len(upstreams):
            keep = {u.address for u in upstreams}
            for address in [a for a in self._peers if a not in keep]:
                del self._peers[address]


class RoundRobin:
    """Smooth weighted round-robin (nginx's default)."""

    __slots__ = ("_swrr",)
    name = "round_robin"

    def __init__(self) -> None:
        self._swrr = SmoothWeighted()

    def order(self, upstreams: Sequence[U], key: str) -> list[U]:
        candidates = eligible(upstreams)
        if len(candidates) <= 1:
            return candidates
        self._swrr.forget_except(upstreams)
        first = candidates.pop(self._swrr.pick(candidates))
        current = self._swrr.current
        candidates.sort(key=lambda u: -current(u.address))
        return [first, *candidates]

    def connect_failed(self, address: Address) -> None:
        self._swrr.failed(address)
