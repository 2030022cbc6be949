"""What every balancer shares: the view of an upstream it reads, the contract it
keeps, and the one rule of which upstreams may take a new connection.

Theory of operation
-------------------
A balancer answers one question per new connection: *in which order should the
session try the upstreams?*  The session dials the first; on a failed or timed-out
connect it tries the next, up to ``retries`` more.  So a balancer returns an order,
not a single pick, and the first entry is its pick.

Which upstreams are in the order at all is the same for every policy
(:func:`eligible`), so that no balancer can get it wrong:

* an upstream that is **down** (health checks, passive ejection) is left out;
* an upstream with **weight 0** is *drained*: it keeps its connections but gets no
  new ones, so it is left out too;
* **backups** take connections only while no non-backup upstream is usable (up
  and weight > 0).  This is HAProxy's rule: a backup server is used when every
  active server is unusable, and a drained server (weight 0, HAProxy's ``drain``
  state) does not count as usable, so draining every primary sends traffic to the
  backups rather than refusing it.  Backups are never mixed with primaries in one
  order, so a retry does not spill onto a backup while a primary is up.

When nothing is eligible the order is empty and the session closes the client with
reason ``no_upstream``.

A balancer reads upstreams through :class:`UpstreamView` (address, weight, backup,
up, active connections) and returns the same objects, so the caller gets back its
own state objects (:class:`midway.upstream.state.UpstreamState`).  It may keep
state between calls (round-robin position, current weights) keyed by address, so
that state survives a reconfigure that keeps the address; it never keeps a
reference to the upstream objects themselves.  Balancers are pure logic: no I/O,
no clock, and randomness only from an injected :class:`random.Random`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from ...config.addresses import Address

__all__ = ["UpstreamView", "Balancer", "U", "eligible", "MAX_WEIGHT"]

MAX_WEIGHT = 256
"""Largest upstream weight, as HAProxy's ``weight`` (0-256)."""


class UpstreamView(Protocol):
    """What a balancer may read of one upstream."""

    @property
    def address(self) -> Address: ...

    @property
    def weight(self) -> int:
        """0-256; 0 = drained (no new connections)."""

    @property
    def backup(self) -> bool: ...

    @property
    def up(self) -> bool: ...

    @property
    def active(self) -> int:
        """Connections currently open to this upstream."""


U = TypeVar("U", bound=UpstreamView)


class Balancer(Protocol):
    """The contract of every balancer in :mod:`midway.upstream.balancers`."""

    name: str
    """The ``balance`` value that selects it."""

    def order(self, upstreams: Sequence[U], key: str) -> list[U]:
        """The eligible upstreams (see :func:`eligible`), each exactly once, in the
        order to try them for one new connection; empty when none is eligible.
        ``key`` is the client's IP address as text (normalised: an IPv4-mapped IPv6
        address written as IPv4); only ``hash_source`` reads it."""
        ...

    def connect_failed(self, address: Address) -> None:
        """Feedback: a connect to ``address`` failed.  Most balancers ignore it."""
        ...


def eligible(upstreams: Sequence[U]) -> list[U]:
    """The upstreams that may take a new connection, in the given order: the usable
    (up, weight > 0) non-backups, or, when there is none, the usable backups."""
    primaries: list[U] = []
    backups: list[U] = []
    for u in upstreams:
        if u.up and u.weight > 0:
            (backups if u.backup else primaries).append(u)
    return primaries or backups
