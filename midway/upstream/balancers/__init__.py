"""Load-balancing policies, one small module each, selected by name.

``create(name)`` builds the balancer a proxy's ``balance`` names; ``available()``
lists the names for error messages and the reference docs.  To add a policy, write
a module with a class that keeps the :class:`~.base.Balancer` contract (pure logic,
returns an order of eligible upstreams) and add one line to ``_FACTORIES``.

::

    balancer = create("least_connections")
    for upstream in balancer.order(states, key=client_ip)[: retries + 1]:
        ...  # dial it; on failure, balancer.connect_failed(upstream.address)
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .base import MAX_WEIGHT, Balancer, UpstreamView, eligible
from .hash_source import HashSource
from .least_connections import LeastConnections
from .random_two import RandomTwo
from .round_robin import RoundRobin

__all__ = [
    "Balancer",
    "UpstreamView",
    "eligible",
    "MAX_WEIGHT",
    "DEFAULT_BALANCE",
    "create",
    "available",
    "RoundRobin",
    "LeastConnections",
    "RandomTwo",
    "HashSource",
]

DEFAULT_BALANCE = "round_robin"
"""What midway did before balancers existed (rotation), and nginx's default."""

_FACTORIES: dict[str, Callable[[random.Random | None], Balancer]] = {
    RoundRobin.name: lambda rng: RoundRobin(),
    LeastConnections.name: lambda rng: LeastConnections(),
    RandomTwo.name: lambda rng: RandomTwo(rng),
    HashSource.name: lambda rng: HashSource(),
}


def available() -> list[str]:
    """The balancer names, in a stable order (for error messages and docs)."""
    return sorted(_FACTORIES)


def create(name: str, *, rng: random.Random | None = None) -> Balancer:
    """A new balancer of policy ``name``.  ``rng`` is the random source of the
    policies that draw (default: a fresh :class:`random.Random`).  Raises
    :class:`ValueError` naming the choices when ``name`` is unknown."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown balance {name!r}; choose one of: {', '.join(available())}") from None
    return factory(rng)
