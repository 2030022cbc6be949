"""SNI routing without terminating: the inbound layer that peeks at the ClientHello.

Theory of operation
-------------------
With ``[[proxy.NAME.routes]]`` and no TLS termination, :class:`SniPeek` reads the
client's first bytes up to the end of its TLS ClientHello, hands the parser
(:class:`~midway.layers.clienthello.ClientHelloParser`) each piece as it comes (a
ClientHello split over any number of TCP segments or TLS records), sets the route
key ``sni`` to the server name, and hands back **every byte it read, unchanged**
(:meth:`~midway.layers.base.LayerConnection.unread`): the chosen upstream does the
TLS handshake with the client itself.  The route phase
(:meth:`midway.service.Connection.choose_and_dial`) then picks the route.

Bounds: the parser holds at most 16 KiB (``CLIENTHELLO_MAX_BYTES``) and this layer
never reads more than the parser can still take, so a connection in this phase
costs at most that; the whole ClientHello must come within
``sni_peek_timeout_s``, else the connection is closed (``peek_timeout``): a
client on a TLS port speaks first, and one that does not must not hold a slot.

Verdicts other than a name go to the proxy's own upstreams (the default route;
closed with ``no_route`` when it has none), as nginx's ``ssl_preread`` leaves its
variables empty and HAProxy's ``req.ssl_sni`` matches nothing:

* not TLS at all (the first byte is not a handshake record: a plain-text client);
* a ClientHello without a server name (a client connecting by IP address);
* a malformed ClientHello, or one over the cap: the parser refuses it rather than
  guess a name from broken bytes (logged at info level with its reason);
* the client half-closed before the ClientHello was complete.

ALPN: the peek sees the protocols the client *offers*, not the one the server
will choose, so it sets no ``alpn`` key (a PROXY v2 header sent upstream carries
an ALPN TLV only when it is known: HAProxy does the same).
"""

from __future__ import annotations

import asyncio
import logging

from ..core.observer import CloseReason
from .base import LayerConnection, LayerRefused
from .clienthello import CLIENTHELLO_MAX_BYTES, ClientHello, ClientHelloError, ClientHelloParser

__all__ = ["SniPeek"]

log = logging.getLogger("midway")


class SniPeek:
    """The ClientHello peek of a proxy with SNI routes (one per proxy)."""

    name = "sni"

    def __init__(self, timeout_s: float, max_bytes: int = CLIENTHELLO_MAX_BYTES) -> None:
        ClientHelloParser(max_bytes)  # checks the cap now, not per connection
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    async def accept(self, conn: LayerConnection) -> None:
        parser = ClientHelloParser(self.max_bytes)
        seen = bytearray()  # handed back once, at the end, whatever happens
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    chunk = await conn.recv_client(parser.cap - parser.buffered)
                    if not chunk:
                        return  # half-closed: route without a name
                    seen += chunk
                    verdict = parser.feed(chunk)
                    if verdict is not None:
                        break
        except TimeoutError:
            raise LayerRefused(
                CloseReason.PEEK_TIMEOUT,
                f"no complete TLS ClientHello within {self.timeout_s:g} s "
                f"({len(seen)} bytes came)") from None
        except ClientHelloError as exc:
            log.info("conn %d (%s) from %s: %s; routed as if it named no server",
                     conn.info.id, conn.info.proxy, conn.info.client, exc)
            return
        finally:
            if seen:
                conn.unread(bytes(seen))
        if isinstance(verdict, ClientHello) and verdict.server_name is not None:
            conn.route["sni"] = verdict.server_name
