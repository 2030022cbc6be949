"""``least_connections``: the upstream with the fewest active connections per unit
of weight, as nginx's ``least_conn``.

Theory of operation
-------------------
Each eligible upstream's load is ``active / weight``; the least loaded is picked.
Weights make a weight-2 upstream count as "as busy" as a weight-1 upstream with half
its connections, so it is given twice as many at equilibrium.

Ties are common (every upstream idle when connections are short) and are broken by
rotation, weighted: among the tied upstreams nginx's smooth weighted round-robin
(:class:`~.round_robin.SmoothWeighted`) picks, exactly as ``least_conn`` does in
nginx (src/http/modules/ngx_http_upstream_least_conn_module.c).  So short
connections are spread by weight, and a long-lived connection load is evened out
by counts.  A plain rotation would ignore the weights whenever all are idle.

The rest of the order (what retries try) is by load, least first, ties by the
rotation's current weights.

When to use it: connections of very different lengths (database sessions, long
polls), where round-robin would pile long ones onto one upstream by chance.

Loads are compared as floats: ``active`` and ``weight`` are small integers and IEEE
division is correctly rounded, so equal ratios (1/3 and 2/6) compare equal and
different ones never collide at these magnitudes.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...config.addresses import Address
from .base import U, eligible
from .round_robin import SmoothWeighted

__all__ = ["LeastConnections"]


class LeastConnections:
    __slots__ = ("_swrr",)
    name = "least_connections"

    def __init__(self) -> None:
        self._swrr = SmoothWeighted()

    def order(self, upstreams: Sequence[U], key: str) -> list[U]:
        candidates = eligible(upstreams)
        if len(candidates) <= 1:
            return candidates
        self._swrr.forget_except(upstreams)
        loads = [u.active / u.weight for u in candidates]
        least = min(loads)
        tied = [u for u, load in zip(candidates, loads, strict=True) if load == least]
        first = tied[self._swrr.pick(tied)] if len(tied) > 1 else tied[0]
        current = self._swrr.current
        rest = [u for u in candidates if u is not first]
        rest.sort(key=lambda u: (u.active / u.weight, -current(u.address)))
        return [first, *rest]

    def connect_failed(self, address: Address) -> None:
        """Ignored: a failed connect does not change the active counts."""
