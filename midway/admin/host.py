"""What the admin API needs from whoever runs the proxies: the seam between the
routes (:mod:`midway.admin.routes`) and the control plane (:mod:`midway.control`).

The routes never touch a live proxy.  They read the *target* (the configuration
every worker runs, as plain data), describe a change as a function from one
target to the next, and read live state (bound addresses, the toxics actually on
each proxy) as :class:`ProxyView` snapshots.  The control plane applies a change
on every worker before it answers, so the same routes serve one process or a
supervisor with N workers.  This module is all of the admin package that the
control plane implements; the admin package imports nothing of the control
plane.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config.schema import ToxicSpec
from ..config.target import Edit, Target
from ..errors import MidwayError

__all__ = ["AdminHost", "ProxyView", "HostError"]


@dataclass(frozen=True)
class ProxyView:
    """One proxy as a worker runs it, reported as plain data."""

    name: str
    enabled: bool
    bound: tuple[str, ...]
    """The listen addresses as bound (real ports), while listening."""
    toxics: tuple[dict[str, Any], ...] = field(default=())
    """The toxics on the proxy now (Toxiproxy's JSON, plus ``conditions`` when
    set), in Toxiproxy's order: the configuration's, the API's and those a
    timeline added."""
    elements: tuple[str, ...] = ()
    """The name of every chain element (toxics, hooks, dump, capture): a new
    toxic may take none of them."""
    upstreams: tuple[dict[str, Any], ...] = ()
    """Each upstream as this worker sees it: address, weight, backup, up/down,
    active connections, last check (docs/balancing.md)."""


class HostError(MidwayError):
    """A change or a query that failed; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class AdminHost(Protocol):
    """The control plane as the routes use it."""

    @property
    def target(self) -> Target:
        """The target in force (every worker runs it)."""
        ...

    async def change(self, edit: Callable[[Target], Edit]) -> Target:
        """Apply ``edit(current target)`` on every worker, one change at a time
        (``edit`` runs under the control plane's lock, so it sees the latest
        target; it raises to refuse).  Returns the target in force afterwards
        (ports asked as 0 replaced by the bound ones).  Raises
        :class:`HostError` when a worker could not apply it."""
        ...

    async def views(self, *, merged: bool = False) -> dict[str, ProxyView]:
        """Every proxy's live state, from a running worker; ``merged``: with
        each proxy's ``upstreams`` added up over every worker (what the API
        shows), which asks every worker rather than one."""
        ...

    async def reload(self) -> dict[str, Any]:
        """Re-read and apply the configuration file (as SIGHUP does).  Returns
        what happened (JSON-able); raises :class:`HostError` (nothing changed)."""
        ...

    async def metrics(self) -> str:
        """The Prometheus text of every worker's metrics, summed."""
        ...

    async def connections(self, proxy: str = "") -> list[dict[str, Any]]:
        """Every worker's open connections (of ``proxy`` only, if given), each
        as ``GET /connections`` shows it, by id."""
        ...

    async def connection(self, id: int) -> dict[str, Any] | None:
        """Connection ``id`` from whichever worker has it; None if none has."""
        ...

    async def close_connection(self, id: int, reset: bool) -> bool:
        """Close connection ``id`` (reason ``killed``; ``reset``: with an RST);
        False if no worker has it."""
        ...

    async def add_connection_toxic(self, id: int, spec: ToxicSpec) -> dict[str, Any] | None:
        """Attach the toxic ``spec`` to connection ``id`` alone; its JSON, or
        None if no worker has it.  Raises :class:`HostError` (409: the
        connection has an element of that name, or is still connecting)."""
        ...

    async def connection_toxics(self, id: int) -> list[dict[str, Any]] | None:
        """The toxics of connection ``id``'s own (those
        :meth:`add_connection_toxic` attached), as Toxiproxy's JSON; None if no
        worker has it."""
        ...

    async def remove_connection_toxic(self, id: int, name: str) -> bool:
        """Remove the toxic ``name`` of connection ``id``'s own, live (held
        bytes flushed); False if no worker has the connection.  Raises
        :class:`HostError` (404: it has no toxic of its own by that name, 409:
        ``name`` is its proxy's)."""
        ...
