"""Receiving the PROXY protocol: the inbound layer of ``proxy_protocol_in``.

Theory of operation
-------------------
A load balancer in front of midway (HAProxy ``send-proxy``/``send-proxy-v2``,
an AWS NLB, nginx ``proxy_protocol on``) writes one header before the client's
first byte; :class:`ProxyProtocolIn` reads it, makes its source the client's
address and its destination the listener-side address
(:meth:`~midway.layers.base.LayerConnection.set_client`/``set_local``), keeps the
whole header with its v2 TLVs on ``info.proxy_header``, and hands back whatever it
read past the header (:meth:`~midway.layers.base.LayerConnection.unread`).

Who may send one.  A header lets its sender choose the address every later
decision trusts (access lists, ``hash_source``, logs), so only the networks in
``proxy_protocol_trusted`` may connect at all: any other peer is closed before a
byte is read from it (``untrusted_peer``), whether or not it would have sent a
header.  That is HAProxy's ``accept-proxy``: a listener that expects the protocol
refuses a connection without it, rather than guessing which clients are direct
(a client that wants to reach the service directly needs a listener without
``proxy_protocol_in``).  A unix-socket peer is trusted: the socket file's
permissions decide who connects.

What is refused.  From a trusted peer: no header, a malformed one, or not all of
it within ``proxy_protocol_timeout_s``: ``bad_proxy_header``, with the parser's
reason in the log line and the access log's ``detail``.  A peer that resets is a
reset, as anywhere else.  ``LOCAL`` (a balancer's health check), ``UNKNOWN`` and
an unspecified family are served with the peer's own addresses; so is an
``AF_UNIX`` source, which has no (host, port) to give (it is on
``info.proxy_header``).

Reads.  The parser says how much it can take (:attr:`ProxyProtocolParser.wanted`):
a v2 header is read exactly (its 16 fixed bytes, then its length), so nothing of
the client's stream passes through Python; a v1 line ends at its CRLF, which can
only be found by reading, so up to the 107-byte cap is read and what follows the
line is handed back, exactly.  Nothing is buffered beyond the parser's cap.

The AUTHORITY TLV (the client's SNI, as the balancer saw it) becomes the route
key ``sni``: a proxy with SNI routes behind a balancer that terminated TLS routes
by it; a ClientHello peek after this layer, which reads the client's own bytes,
overrides it.  The ALPN TLV (the protocol the balancer agreed with the client)
becomes ``info.alpn``, for hooks; when midway terminates TLS itself, its own
handshake's protocol (or none) replaces it.
"""

from __future__ import annotations

import asyncio
import logging

from ..core.observer import CloseReason
from ..upstream.access import AccessList
from .base import LayerConnection, LayerRefused
from .proxy_protocol import (
    V2_DEFAULT_MAX_LENGTH,
    Mode,
    ProxyHeader,
    ProxyProtocolError,
    ProxyProtocolParser,
)

__all__ = ["ProxyProtocolIn"]

log = logging.getLogger("midway")


class ProxyProtocolIn:
    """The ``proxy_protocol_in`` layer: one per proxy, shared by its connections.

    ``trusted`` are the peers allowed to send a header (None: no IP peer is;
    unix-socket peers always are); ``timeout_s`` bounds the whole header."""

    name = "proxy_protocol_in"

    def __init__(self, mode: Mode, trusted: AccessList | None, timeout_s: float,
                 max_length: int = V2_DEFAULT_MAX_LENGTH) -> None:
        ProxyProtocolParser(mode, max_length)  # checks both now, not per connection
        self.mode: Mode = mode
        self.trusted = trusted
        self.timeout_s = timeout_s
        self.max_length = max_length

    def trusts(self, host: str) -> bool:
        """Whether a peer at IP ``host`` may send a PROXY header."""
        if self.trusted is None:
            return False
        try:
            return self.trusted.allows(host)
        except ValueError:  # not an IP address: nothing to match
            return False

    async def accept(self, conn: LayerConnection) -> None:
        peer = conn.info.client_addr
        if peer is not None and not self.trusts(peer[0]):
            raise LayerRefused(CloseReason.UNTRUSTED_PEER,
                               f"peer {peer[0]} is not in proxy_protocol_trusted",
                               logging.WARNING)
        header, rest = await self._read(conn)
        if rest:
            conn.unread(rest)
        self._apply(conn, header)

    async def _read(self, conn: LayerConnection) -> tuple[ProxyHeader, bytes]:
        parser = ProxyProtocolParser(self.mode, self.max_length)
        got = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    chunk = await conn.recv_client(parser.wanted)
                    if not chunk:
                        # Nothing at all: a TCP health check (connect, close) needs no
                        # fixing: info, not warning (HAProxy's dontlognull logs none).
                        raise LayerRefused(
                            CloseReason.BAD_PROXY_HEADER,
                            "the peer closed before sending a PROXY header" if not got else
                            f"the peer closed after {got} bytes of a PROXY header",
                            logging.WARNING if got else logging.INFO)
                    got += len(chunk)
                    header = parser.feed(chunk)
                    if header is not None:
                        return header, parser.rest
        except TimeoutError:
            raise LayerRefused(
                CloseReason.BAD_PROXY_HEADER,
                f"no complete PROXY header within {self.timeout_s:g} s ({got} bytes came)",
                logging.WARNING) from None
        except ProxyProtocolError as exc:
            raise LayerRefused(CloseReason.BAD_PROXY_HEADER, str(exc), logging.WARNING) from None

    @staticmethod
    def _apply(conn: LayerConnection, header: ProxyHeader) -> None:
        info = conn.info
        info.proxy_header = header
        source, destination = header.source, header.destination
        if isinstance(source, tuple) and isinstance(destination, tuple):
            conn.set_client(*source)
            conn.set_local(*destination)
        if header.authority:
            # In the form a ClientHello's name takes (clienthello.py): DNS names
            # are case-insensitive, and HAProxy passes the client's as typed.
            conn.route["sni"] = header.authority.lower().removesuffix(".")
        if header.alpn:
            # The protocol the balancer agreed with the client, when it terminated
            # TLS; a TLS termination after this layer sets its own (even none).
            # Not a route key: proxy_protocol_out sends the header's bytes as they came.
            info.alpn = header.alpn.decode("utf-8", "backslashreplace")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("conn %d (%s): PROXY v%d %s from %s", info.id, info.proxy,
                      header.version, header.command, info.client)
