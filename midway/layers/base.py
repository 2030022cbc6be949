"""What a connection layer is: code that runs on one connection before the relay.

Theory of operation
-------------------
A connection goes through named phases (:class:`midway.service.Phase`): accept →
admission → inbound layers → route → choose upstream → dial → outbound layers →
relay → close.  Layers are the two phases a proxy may add code to:

* An :class:`InboundLayer` runs after accept and **before any upstream is dialled**
  (a PROXY header must be read before midway knows who the client is; an SNI name
  before it knows where to go).  Its :meth:`~InboundLayer.accept` may read from the
  client, replace the client's (and the listener-side) address in the connection's
  :class:`~midway.chain.base.ConnectionInfo`, set route keys, and hand back bytes it
  read that belong to the stream (:meth:`LayerConnection.unread`): they reach the
  upstream first, in order, before anything the relay reads, and a later layer
  reads them first (the ClientHello peek after a PROXY header's layer, which may
  have read past the header).  A layer that only needs to look (the peek) hands
  back all it read.
* An :class:`OutboundLayer` runs once the upstream is connected and before the
  relay starts: it may write to the upstream first (a PROXY header).

A layer that changes the bytes themselves (TLS, :mod:`.tls`) takes the socket
(:attr:`LayerConnection.client_socket`, ``upstream_socket``), does its handshake on
it, and hands the relay a :class:`~midway.core.streams.Stream` in its place
(:meth:`LayerConnection.replace_client`, ``replace_upstream``); bytes earlier layers
handed back are then its input, taken with :meth:`LayerConnection.take_unread`.
From then on the socket is the stream's: layers after it read and write through
the stream (``recv_client``, ``send_upstream`` do), and it is closed with it.

With no inbound layer a proxy dials at accept, as server-first protocols (SMTP,
MySQL, SSH) need: the upstream speaks first and the client waits for it.

A layer is shared by every connection of its proxy; per-connection state lives in
the coroutine.  A layer bounds its own waits (a client that never sends its PROXY
header must not hold a slot for ever); the service cancels a layer still running
when the proxy stops.  An exception ends that one connection: :class:`OSError`
(the client reset or went away) closes it as a reset, :class:`LayerRefused` with
its own close reason, :class:`~midway.errors.Rejected` as refused, anything else
as an error, logged.

The layers built from a proxy's configuration (:mod:`.registry`): receiving a
PROXY header (:mod:`.proxy_in`), the ClientHello peek for SNI routes
(:mod:`.sni`), sending a PROXY header (:mod:`.proxy_out`).

This module holds the contracts only; the I/O behind :class:`LayerConnection` is
the service's (:mod:`midway.service`), and the wire formats are sans-I/O modules of
this package (:mod:`.proxy_protocol`, :mod:`.clienthello`).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Protocol

from ..core.observer import CloseReason
from ..errors import Rejected

if TYPE_CHECKING:
    from ..chain.base import ConnectionInfo
    from ..config.addresses import Address
    from ..core.streams import Stream

__all__ = ["LayerConnection", "InboundLayer", "OutboundLayer", "LayerRefused"]


class LayerRefused(Rejected):
    """Raised by a layer to close its connection with a close reason of its own
    (``bad_proxy_header``, ``no_route``, ...) instead of ``rejected``.  The message
    is the access log's ``detail`` and the log line's; ``level`` is that line's
    (``logging.WARNING`` for what an operator must fix, ``INFO`` otherwise)."""

    def __init__(self, reason: CloseReason, detail: str, level: int = logging.INFO) -> None:
        super().__init__(detail)
        self.reason = reason
        self.level = level


class LayerConnection(Protocol):
    """The connection as a layer sees it (the service's per-connection object)."""

    @property
    def info(self) -> ConnectionInfo:
        """What elements, hooks and the access log will see of this connection."""

    @property
    def route(self) -> dict[str, str]:
        """Route keys set by inbound layers (``sni``, ...) for the route phase."""

    async def recv_client(self, max_bytes: int) -> bytes:
        """Read up to ``max_bytes`` from the client (``b""``: it closed its side):
        bytes an earlier layer handed back (:meth:`unread`) first, then the
        socket's.  Raises :class:`OSError` when the client reset.  No timeout of
        its own."""

    def unread(self, data: bytes) -> None:
        """Hand back bytes read from the client that must still reach the upstream:
        they go first, before anything the relay reads, in the order handed back."""

    def take_unread(self) -> bytes:
        """Take back (and clear) the bytes handed back so far: the input of a layer
        that replaces the client's stream (TLS reads them as the first ciphertext)."""

    @property
    def client_socket(self) -> socket.socket:
        """The client's non-blocking socket, for a layer that wraps it."""

    def replace_client(self, stream: Stream) -> None:
        """The relay (and later layers) use ``stream`` as the client's end; it owns
        the socket from now on."""

    @property
    def upstream_socket(self) -> socket.socket:
        """The upstream's non-blocking socket (outbound layers only)."""

    @property
    def upstream_address(self) -> Address:
        """The upstream as configured (its host name, for TLS's SNI); outbound only."""

    def replace_upstream(self, stream: Stream) -> None:
        """The relay uses ``stream`` as the upstream's end (outbound layers only)."""

    def set_client(self, host: str, port: int) -> None:
        """The client is really ``host:port`` (from a PROXY header): what the
        access log, the hooks and the balancer's key see from now on."""

    def set_local(self, host: str, port: int) -> None:
        """The address the client really connected to (a PROXY header's destination)."""

    async def send_upstream(self, data: bytes) -> None:
        """Write ``data`` to the upstream before the relay starts (outbound layers
        only: there is no upstream before the dial phase)."""


class InboundLayer(Protocol):
    """Runs on the client side before the dial (see the module's theory)."""

    name: str

    async def accept(self, conn: LayerConnection) -> None: ...


class OutboundLayer(Protocol):
    """Runs on the upstream side after the dial, before the relay."""

    name: str

    async def connect(self, conn: LayerConnection) -> None: ...
