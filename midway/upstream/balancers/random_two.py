"""``random_two``: the power of two random choices, by active connections.

Theory of operation
-------------------
Draw two different upstreams at random, with probability proportional to weight,
and take the one with fewer active connections per unit of weight (the first
drawn on a tie).  Mitzenmacher ("The Power of Two Choices in Randomized Load
Balancing", 2001) showed that this small step from one random choice to two cuts
the maximum load from O(log n / log log n) to O(log log n); it is what nginx's
``random two least_conn`` and Envoy's ``LEAST_REQUEST`` (choice_count 2) do.

Compared with ``least_connections`` it needs no global view that is exact at the
instant of the pick: with several midway workers, each sees only its own
connections, and an exact "least" makes every worker stampede the same upstream,
while two random choices keep them apart.  With every upstream idle the pick is the
first draw, so the spread follows the weights.

The rest of the order (what retries try) is the other drawn upstream, then the
remaining ones by load, least first.

The random source is injected (:class:`random.Random`), so tests are reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ...config.addresses import Address
from .base import U, eligible

__all__ = ["RandomTwo"]


class RandomTwo:
    __slots__ = ("_rng",)
    name = "random_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def order(self, upstreams: Sequence[U], key: str) -> list[U]:
        candidates = eligible(upstreams)
        if len(candidates) <= 1:
            return candidates
        weights = [u.weight for u in candidates]
        i = self._draw(weights)
        weights[i] = 0  # without replacement
        j = self._draw(weights)
        a, b = candidates[i], candidates[j]
        if b.active / b.weight < a.active / a.weight:
            a, b = b, a
        rest = [u for k, u in enumerate(candidates) if k != i and k != j]
        rest.sort(key=lambda u: u.active / u.weight)
        return [a, b, *rest]

    def _draw(self, weights: list[int]) -> int:
        """An index drawn with probability proportional to ``weights``."""
        point = self._rng.random() * sum(weights)
        for k, w in enumerate(weights):
            point -= w
            if point < 0 and w > 0:
                return k
        # Float rounding can leave ``point`` a hair above 0: take the last non-zero.
        return max(k for k, w in enumerate(weights) if w > 0)

    def connect_failed(self, address: Address) -> None:
        """Ignored: a failed connect does not change the active counts."""
