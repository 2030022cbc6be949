"""Sending the PROXY protocol: the outbound layer of ``proxy_protocol_out``.

Theory of operation
-------------------
Once the upstream has accepted, and before the relay moves any client byte,
:class:`ProxyProtocolOut` writes one header
(:meth:`~midway.layers.base.LayerConnection.send_upstream`) carrying:

* the source: the client's address as midway knows it, which is the one a
  received PROXY header gave when midway is itself behind a balancer
  (``proxy_protocol_in``), so a chain of proxies passes the real client on;
* the destination: the address the client connected to (a received header's
  destination, else midway's listener-side address);
* in v2, the AUTHORITY TLV (the TLS server name: from the ClientHello peek, a
  terminated handshake, or the received header) and the ALPN TLV when the
  protocol is *known*: the received header's, or the route key ``alpn`` that a
  TLS-terminating layer sets after its handshake.  The offer a peek sees is not
  the choice, so it is not sent (nor does HAProxy send it).

A client without an IP address (a unix-socket listener) is sent as ``PROXY
UNKNOWN`` (v1) or family ``AF_UNSPEC`` (v2), which tell the receiver to keep the
connection's own addresses, as HAProxy writes them.

The bytes are HAProxy's own for the same addresses (see
:func:`~midway.layers.proxy_protocol.build_v1`); the write is bounded by the
service (the idle timeout) and a failure closes the connection as an upstream
reset.
"""

from __future__ import annotations

from typing import Literal

from .base import LayerConnection
from .proxy_protocol import build_v1, build_v2

__all__ = ["ProxyProtocolOut"]


class ProxyProtocolOut:
    """The ``proxy_protocol_out`` layer (one per proxy): ``version`` 1 or 2."""

    name = "proxy_protocol_out"

    def __init__(self, version: Literal[1, 2]) -> None:
        if version not in (1, 2):
            raise ValueError(f"PROXY protocol version must be 1 or 2, not {version!r}")
        self.version = version

    def header(self, conn: LayerConnection) -> bytes:
        """The header for this connection (what :meth:`connect` writes)."""
        info = conn.info
        source, destination = info.client_addr, info.local_addr
        if self.version == 1:
            return build_v1(source, destination)
        received = info.proxy_header
        route = conn.route
        authority = route.get("sni") or info.sni
        alpn: bytes | str | None = route.get("alpn")
        if alpn is None and received is not None:
            alpn = received.alpn
        return build_v2(source, destination, alpn=alpn or None, authority=authority or None)

    async def connect(self, conn: LayerConnection) -> None:
        await conn.send_upstream(self.header(conn))
