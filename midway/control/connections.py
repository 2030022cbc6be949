"""One worker's open connections, as the admin API shows and steers them
(``/connections``): read from its runtime's services, answered as plain data.

A connection is in one of two places in a :class:`~midway.service.ProxyService`:
``connecting`` (accepted, not relaying yet: state ``connecting``, path ``none``)
or ``live`` (a :class:`~midway.core.relay.Relay` and its record).  Its state
comes from the relay's two directions (:meth:`~midway.core.relay.Relay.ends`): a
client that sent its FIN has half-closed, and so has an upstream that did.  Byte counts are the relay's delivered counts, as in the access log
(one ioctl per direction per connection listed: for a listing, not a loop).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from ..chain.base import ConnectionInfo, Element
from ..chain.toxics.base import Toxic
from ..config.addresses import format_sockaddr
from ..core.observer import CloseReason
from ..core.relay import Relay
from ..runtime import Runtime
from ..service import Connection, ProxyService

__all__ = ["connection_json", "list_connections", "find_connection", "close_connection",
           "KILLED_DETAIL"]

KILLED_DETAIL = "closed through the admin API"
"""The access log's ``detail`` of a connection closed by ``DELETE /connections/ID``."""

Found = tuple[ProxyService, Relay[ConnectionInfo] | Connection]


def _state(relay: Relay[ConnectionInfo]) -> str:
    up, down, first = relay.ends()
    if up and down:  # both ended: closing; name who ended first
        return "half-closed by upstream" if first == "upstream" \
            else "half-closed by client"
    if up:
        return "half-closed by client"
    if down:
        return "half-closed by upstream"
    return "open"


def _toxics(elements: Iterator[Element]) -> list[str]:
    return [e.name for e in elements if isinstance(e, Toxic)]


def connection_json(service: ProxyService, item: Relay[ConnectionInfo] | Connection,
                    worker: int, now: float | None = None) -> dict[str, Any]:
    """One connection as ``GET /connections`` shows it (docs/faults.md)."""
    info = item.info
    now = time.time() if now is None else now
    if isinstance(item, Relay):
        rec = service.live[item]
        attached = [e for e in (*service.elements, *rec.own) if e in rec.attached]
        return {"id": info.id, "proxy": service.name, "worker": worker, "client": info.client,
                "upstream": info.upstream, "upstream_addr": info.upstream_addr and format_sockaddr(info.upstream_addr),
                "age_s": round(now - info.started_at, 3), "bytes_up": item.bytes_up, "bytes_down": item.bytes_down,
                "state": _state(item), "path": item.path, "toxics": _toxics(iter(attached))}
    return {"id": info.id, "proxy": service.name, "worker": worker, "client": info.client,
            "upstream": info.upstream, "upstream_addr": None,
            "age_s": round(now - info.started_at, 3), "bytes_up": 0, "bytes_down": 0, "state": "connecting", "path": "none",
            "toxics": _toxics(iter(item.attached))}


def _all(runtime: Runtime, proxy: str = "") -> Iterator[Found]:
    for service in runtime.all_services():
        if proxy and service.name != proxy:
            continue
        for conn in service.connecting:
            yield service, conn
        for relay in service.live:
            yield service, relay


def list_connections(runtime: Runtime, worker: int, proxy: str = "",
                     id: int = 0) -> list[dict[str, Any]]:
    """Every open connection of ``runtime`` (of ``proxy`` only, when given; of
    id ``id`` only, when not 0), oldest first."""
    now = time.time()
    found = [connection_json(service, item, worker, now) for service, item in _all(runtime, proxy)
             if not id or item.info.id == id]
    return sorted(found, key=lambda c: c["id"])


def find_connection(runtime: Runtime, id: int) -> Found | None:
    """The service and the relay (or the connecting :class:`Connection`) of
    connection ``id``, or None."""
    for service, item in _all(runtime):
        if item.info.id == id:
            return service, item
    return None


def close_connection(runtime: Runtime, id: int, reset: bool) -> bool:
    """Close connection ``id`` with the reason ``killed``: a FIN to a side
    where nothing is in flight, else a reset (docs/guarantees.md); with
    ``reset`` an RST both ways.  False when there is no such connection."""
    found = find_connection(runtime, id)
    if found is None:
        return False
    _, item = found
    if isinstance(item, Relay):
        if reset:
            item.abort(CloseReason.KILLED, KILLED_DETAIL)
        else:
            item.close(CloseReason.KILLED, KILLED_DETAIL)
    else:
        item.cancel(CloseReason.KILLED, KILLED_DETAIL, reset=reset)
    return True
