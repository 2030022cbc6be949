"""One worker's open connections, as the admin API shows and steers them
(``/connections``): read from its runtime's services, answered as plain data.

A connection is in one of two places in a :class:`~midway.service.ProxyService`:
``connecting`` (accepted, not relaying yet: path ``none``, its state what it
waits for, from its phase and layer: :data:`WAITING`) or ``live`` (a
:class:`~midway.core.relay.Relay` and its record).  A live one's state
comes from the relay's two directions (:meth:`~midway.core.relay.Relay.ends`): a
client that sent its FIN has half-closed, and so has an upstream that did.  Byte counts are the relay's delivered counts, as in the access log
(one ioctl per direction per connection listed: for a listing, not a loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from ..chain.base import ConnectionInfo, Element
from ..chain.toxics.base import Toxic
from ..chain.toxics.live import ToxicExists, ToxicHandle
from ..config.addresses import format_sockaddr
from ..core.observer import CloseReason
from ..core.relay import Relay
from ..errors import MidwayError, at_callers_line
from ..runtime import Runtime
from ..service import Connection, Phase, ProxyService

__all__ = ["connection_json", "WAITING", "list_connections", "find_connection", "close_connection",
           "add_connection_toxic", "connection_toxics", "ConnectionNotFound", "StillConnecting",
           "ConnectionToxicHandle", "KILLED_DETAIL"]

KILLED_DETAIL = "closed through the admin API"
"""The access log's ``detail`` of a connection closed by ``DELETE /connections/ID``."""

Found = tuple[ProxyService, Relay[ConnectionInfo] | Connection]

WAITING = {"proxy_protocol_in": "reading PROXY header", "sni": "reading ClientHello",
           "tls": "TLS handshake", "proxy_protocol_out": "sending PROXY header",
           "upstream_tls": "upstream TLS handshake"}
"""The ``state`` of a connection in the inbound or outbound phase, by the name
of the layer it is in.  In *dial* it is ``connecting`` (to an upstream), in
*open* ``opening`` (the chain elements' ``on_open``)."""


def _waiting(conn: Connection) -> str:
    if conn.phase is Phase.INBOUND or conn.phase is Phase.OUTBOUND:
        return WAITING.get(conn.layer.name, conn.layer.name) if conn.layer else conn.phase.value
    return "opening" if conn.phase is Phase.OPEN else "connecting"


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
        upstream_addr = info.upstream_addr and format_sockaddr(info.upstream_addr)
        return {"id": info.id, "proxy": service.name, "worker": worker, "client": info.client,
                "upstream": info.upstream, "upstream_addr": upstream_addr,
                "age_s": round(now - info.started_at, 3), "bytes_up": item.bytes_up,
                "bytes_down": item.bytes_down, "state": _state(item), "phase": Phase.RELAY.value,
                "path": item.path, "toxics": _toxics(iter(attached)), "sni": info.sni,
                "route": info.route}
    return {"id": info.id, "proxy": service.name, "worker": worker, "client": info.client,
            "upstream": info.upstream, "upstream_addr": None,
            "age_s": round(now - info.started_at, 3), "bytes_up": 0, "bytes_down": 0,
            "state": _waiting(item), "phase": item.phase.value, "path": "none",
            "toxics": _toxics(iter(item.attached)), "sni": info.sni, "route": info.route}


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


class ConnectionNotFound(MidwayError, LookupError):
    """No open connection of that id (it ended, or never was); the admin API's
    404 ``connection not found``."""

    def __init__(self, id: int, proxy: str) -> None:
        self.id = id
        super().__init__(f"connection not found: {id} is not an open connection of proxy "
                         f"{proxy!r} (it has ended, or never was; see list_connections())")


class StillConnecting(MidwayError):
    """The connection has no relay yet (layers, dial, ``on_open``): a toxic of its
    own can be added once it relays."""

    def __init__(self, id: int) -> None:
        super().__init__(f"connection {id} is still connecting: add its toxic once it relays")


def add_connection_toxic(found: Found, name: str, make: Callable[[], Toxic[Any]],
                         ) -> tuple[Relay[ConnectionInfo], Toxic[Any]]:
    """Attach the toxic ``make()`` builds (called once nothing stands in its way)
    and that is called ``name``, to the connection ``found`` alone, live (see
    :meth:`~midway.service.ProxyService.add_connection_element`); returns the
    relay and the toxic.  Raises :class:`StillConnecting`,
    :class:`~midway.chain.toxics.live.ToxicExists` when the proxy or the
    connection has an element of that name, or what ``make`` raises (and
    changes nothing)."""
    service, item = found
    if not isinstance(item, Relay):
        raise StillConnecting(item.info.id)
    if any(e.name == name for e in (*service.elements, *service.live[item].own)):
        raise ToxicExists(name)
    toxic = make()
    service.add_connection_element(item, toxic)
    return item, toxic


def connection_toxics(found: Found) -> list[Toxic[Any]]:
    """The toxics of the connection's own (not its proxy's), in the order added."""
    service, item = found
    own = service.live[item].own if isinstance(item, Relay) else ()
    return [e for e in own if isinstance(e, Toxic)]


class _OwnChain:
    """One open connection's own elements, as the chain a :class:`ToxicHandle`
    works on: empty once the connection (or its proxy) ended."""

    def __init__(self, service: ProxyService, relay: Relay[ConnectionInfo]) -> None:
        self._service = service
        self._relay = relay

    @property
    def elements(self) -> list[Element]:
        rec = self._service.live.get(self._relay)
        return list(rec.own) if rec is not None else []

    def add_element(self, element: Element, index: int | None = None) -> None:
        self._service.add_connection_element(self._relay, element)

    def remove_element(self, element: Element) -> None:
        self._service.remove_connection_element(self._relay, element)

    def replace_element(self, old: Element, new: Element) -> None:
        raise MidwayError("a connection's own toxic has no update")  # update() says so first


class ConnectionToxicHandle(ToxicHandle):
    """A toxic added to one connection from Python: :meth:`remove` it (it does
    nothing once the toxic, the connection or the proxy is gone), or use the
    handle as a context manager.  There is no :meth:`update`, as in the admin
    API: remove it and add it again."""

    def __init__(self, service: ProxyService, relay: Relay[ConnectionInfo],
                 toxic: Toxic[Any]) -> None:
        super().__init__(_OwnChain(service, relay), toxic)
        self.connection = relay.info.id
        """The id of the connection it is on."""

    @at_callers_line
    def update(self, *, toxicity: float | None = None, **attributes: Any) -> Toxic[Any]:
        raise MidwayError(f"toxic {self.name!r} is connection {self.connection}'s own: it has "
                          "no update; remove it and add it again")

    def __repr__(self) -> str:
        return f"<ConnectionToxicHandle {self.toxic!r} on connection {self.connection}>"
