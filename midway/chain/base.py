"""The chain element protocol: how hooks, dumps, captures and toxics see the bytes.

Theory of operation
-------------------
A proxy holds an ordered list of :class:`Element` objects: shared, long-lived
settings (a latency toxic's 200 ms, a hook's module).  When a connection opens, each
element is asked to :meth:`Element.attach` to it and may return an
:class:`Attachment`: per-connection state, with at most one :class:`Stage` per
direction.  ``upstream`` is client → server and ``downstream`` is server → client, as
in Toxiproxy.  An element that does not apply to this connection (toxicity, a
condition) returns ``None`` and costs that connection nothing.

Each direction of a connection runs its stages in the proxy's element order.  A stage
receives a chunk in :meth:`Stage.data` and passes bytes on with ``await
out.send(...)``: unchanged, changed, split, delayed, or not at all.  ``out.send``
waits while the next stage or the socket is full, so back-pressure reaches the
reader and memory stays bounded.  The chain runner (:mod:`midway.chain.runner`)
feeds one chunk at a time through a direction's chain, in order; a stage may
``await`` (sleep, call async user code) and order is still kept.

With no stage in a direction, that direction never enters this machinery: bytes take
the relay's fast path, and the chain costs nothing.

Elements can be added to and removed from a live proxy; open connections follow.  A
stage being removed has its pending :meth:`Output.sleep` cut short (it returns
``False``) and then :meth:`Stage.flush` is called so it can pass on anything it holds:
no byte is lost, duplicated or reordered.

Ownership: the relay owns the sockets.  A stage never touches them; it acts only
through its :class:`Output`.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from ..layers.proxy_protocol import ProxyHeader

from ..config.addresses import format_sockaddr

__all__ = [
    "UPSTREAM",
    "DOWNSTREAM",
    "DIRECTIONS",
    "Direction",
    "ConnectionInfo",
    "Output",
    "Stage",
    "Attachment",
    "Element",
]

Direction = Literal["upstream", "downstream"]
UPSTREAM: Direction = "upstream"
"""Client → server bytes (Toxiproxy's name for this direction)."""
DOWNSTREAM: Direction = "downstream"
"""Server → client bytes."""
DIRECTIONS: tuple[Direction, Direction] = (UPSTREAM, DOWNSTREAM)


class _Named(Protocol):
    def getsockname(self) -> object: ...


class ConnectionInfo:
    """What an element may know about one connection.  Filled in by the relay;
    ``upstream`` is set once the upstream is connected.

    A plain class with slots rather than a dataclass so that what nobody may read
    costs nothing until read: ``client`` is formatted from the accepted address
    (``peer``) on first access, and ``extra`` is made on first access (an idle
    connection with no element attached holds neither string nor dict)."""

    __slots__ = ("id", "proxy", "_client", "_peer", "listener", "upstream", "client_addr",
                 "local_addr", "upstream_addr", "_upstream_local", "_upstream_sock", "started_at",
                 "sequence", "_extra", "first_close", "close_detail", "reset", "reset_by", "alpn",
                 "proxy_header", "sni", "route")

    def __init__(
        self,
        id: int,
        proxy: str,
        client: str | None = None,
        listener: str = "",
        upstream: str | None = None,
        client_addr: tuple[str, int] | None = None,
        local_addr: tuple[str, int] | None = None,
        upstream_addr: tuple[str, int] | None = None,
        upstream_local_addr: tuple[str, int] | None = None,
        started_at: float = 0.0,
        sequence: int = 0,
        extra: dict[str, object] | None = None,
        first_close: str | None = None,
        close_detail: str = "",
        reset: bool = False,
        *,
        reset_by: str | None = None,
        peer: object = None,
        alpn: str | None = None,
        proxy_header: ProxyHeader | None = None,
        sni: str | None = None,
        route: str | None = None,
    ) -> None:
        self.id = id
        """Process-unique connection number, starting at 1."""
        self.proxy = proxy
        """Name of the proxy that accepted it."""
        self._client = client
        self._peer = peer
        """The address ``accept`` returned, ``client`` is made from when not given."""
        self.listener = listener
        """The local address that accepted it."""
        self.upstream = upstream
        """The upstream address it is connected to (``host:port`` as configured, resolved)."""
        self.client_addr = client_addr
        """The client's (host, port) for IP connections; ``None`` for unix sockets."""
        self.local_addr = local_addr
        """The listener-side (host, port) of this connection for IP connections."""
        self.upstream_addr = upstream_addr
        """The remote (host, port) actually connected upstream, for IP connections."""
        self._upstream_local = upstream_local_addr
        self._upstream_sock: _Named | None = None
        self.started_at = started_at
        """Wall-clock (``time.time()``) time the connection was accepted."""
        self.sequence = sequence
        """1-based count of connections this proxy has accepted, this one included
        (for conditions such as "only the first N connections")."""
        self._extra = extra
        self.first_close = first_close
        """Set when the connection has ended, before any ``on_close`` callback runs:
        which side ended it first (``client``, ``upstream`` or ``proxy``)."""
        self.close_detail = close_detail
        """Set when the connection has ended: what the close reason alone does not
        say (``client: connection reset by peer``, a toxic's or a hook's message)."""
        self.reset = reset
        """Set when the connection has ended: ``True`` when its sockets were aborted
        with a TCP RST rather than closed with a FIN."""
        self.reset_by = reset_by
        """Set when the connection has ended with a reset: whose reset it was,
        ``client`` or ``upstream`` (that peer reset its socket) or ``proxy``
        (midway's own: a timeout, a toxic, a hook); ``None`` when not reset.  Not
        always :attr:`first_close`: a server may send its FIN, then the client reset."""
        self.alpn = alpn
        """The application protocol agreed with the client by ALPN (``h2``): by
        midway's own handshake when it terminates TLS (``None`` when none was
        agreed), else the ALPN TLV of a received PROXY v2 header (the balancer's
        handshake); ``None`` when neither names one."""
        self.proxy_header = proxy_header
        """The PROXY protocol header the connection began with (``proxy_protocol_in``),
        with every v2 TLV (``alpn``, ``authority``, ``ssl``, ``unique_id``, raw
        ``tlvs``); ``None`` without one.  ``client``/``client_addr`` already carry
        its source address."""
        self.sni = sni
        """The TLS server name, once the route phase has run: from the ClientHello
        peek (SNI routes), a terminated handshake, or the received PROXY header's
        AUTHORITY TLV; ``None`` when none was seen."""
        self.route = route
        """The SNI route chosen (its name); ``None`` for the proxy's own upstreams."""

    @property
    def client(self) -> str:
        """The client's address as text (``1.2.3.4:5678``, ``[::1]:5678`` or ``unix:...``)."""
        text = self._client
        if text is None:
            text = self._client = format_sockaddr(self._peer)
        return text

    @client.setter
    def client(self, value: str) -> None:
        self._client = value

    @property
    def upstream_local_addr(self) -> tuple[str, int] | None:
        """midway's own (host, port) on the upstream connection, for IP connections."""
        sock = self._upstream_sock
        if sock is not None:
            self._upstream_sock = None
            try:
                addr = sock.getsockname()
            except OSError:  # closed: nobody read it while it was open
                addr = None
            if isinstance(addr, tuple) and len(addr) >= 2:
                self._upstream_local = (str(addr[0]), int(addr[1]))
        return self._upstream_local

    @upstream_local_addr.setter
    def upstream_local_addr(self, value: tuple[str, int] | None) -> None:
        self._upstream_sock = None
        self._upstream_local = value

    def upstream_local_from(self, sock: _Named) -> None:
        """Take :attr:`upstream_local_addr` from ``sock`` when it is first read
        (a ``getsockname`` per connection saved when nobody does).  The caller
        reads it at once instead where it may be read after the socket closes."""
        self._upstream_sock = sock

    @property
    def extra(self) -> dict[str, object]:
        """Free space for elements to share per-connection facts."""
        extra = self._extra
        if extra is None:
            extra = self._extra = {}
        return extra

    def __repr__(self) -> str:
        return (f"ConnectionInfo(id={self.id}, proxy={self.proxy!r}, client={self.client!r}, "
                f"listener={self.listener!r}, upstream={self.upstream!r})")


class Output(Protocol):
    """What a stage uses to act: given to every :meth:`Stage.data` call."""

    @property
    def direction(self) -> Direction:
        """Which direction this output belongs to."""

    @property
    def info(self) -> ConnectionInfo:
        """The connection."""

    @property
    def received_at(self) -> float:
        """Clock time at which the chunk now being processed was read from its socket
        (or, after a stage that delayed it, the time that stage released it)."""

    @received_at.setter
    def received_at(self, value: float) -> None:
        """A stage that holds a chunk back moves its stamp forward by the time it
        held it (as Toxiproxy's latency toxic does), so that later delays add up."""

    @property
    def received_wall(self) -> float:
        """Wall-clock time (``time.time()``) at which the chunk now being processed
        was read from its socket, to the microsecond, whatever the loop: for dating
        it (a capture).  ``received_at`` is on the loop's clock, which uvloop keeps
        in whole milliseconds, so a wall time derived from it may be up to 1 ms off
        either way.  No stage moves it."""

    def now(self) -> float:
        """The connection's clock (monotonic seconds)."""

    async def sleep(self, seconds: float) -> bool:
        """Wait; return ``True`` when the full time passed, ``False`` when cut short
        because this stage is being removed or the connection is closing."""

    async def send(self, data: bytes) -> None:
        """Pass bytes on to the next stage (or the socket).  Waits for room."""

    async def send_eof(self) -> None:
        """Pass a half-close (FIN) on.  Nothing may be sent in this direction after."""

    async def reply(self, data: bytes) -> None:
        """Send bytes the other way, back to the side this direction reads from,
        straight to its socket (it does not pass through the other direction's chain)."""

    def close(self, reason: str = "closed by element") -> None:
        """Close the whole connection gracefully: reading stops both ways, bytes
        already passed on are still delivered, then FIN both ways."""

    def reset(self, reason: str = "reset by element") -> None:
        """Abort the whole connection: both sockets get a TCP RST."""


class Stage:
    """Per-connection, per-direction processing.  The defaults pass everything on
    unchanged, so a subclass overrides only what it changes."""

    def start(self, out: Output) -> None:
        """Called once when the stage is installed in a live direction, before any
        data: the place to arm timers that must run even if no byte ever arrives
        (start them as tasks; ``out.sleep`` is cut short when the stage is removed)."""

    async def data(self, data: bytes, out: Output) -> None:
        """One chunk arrived (any size ≥ 1 byte; TCP boundaries are not messages)."""
        await out.send(data)

    async def eof(self, out: Output) -> None:
        """The reading side half-closed.  Default: pass the FIN on."""
        await out.send_eof()

    async def flush(self, out: Output) -> None:
        """This stage is being removed from a live connection: pass on anything held
        back (default: nothing held)."""

    def close(self) -> None:
        """The connection is over.  Release resources; no more calls follow."""


@dataclass
class Attachment:
    """One element's per-connection state: up to one stage per direction, and
    optional callbacks around the connection's life."""

    upstream: Stage | None = None
    downstream: Stage | None = None
    on_open: Callable[[ConnectionInfo], Awaitable[None]] | None = None
    """Awaited once the upstream is connected, before any byte is relayed.  Raise
    :class:`midway.errors.Rejected` (or anything) to refuse the connection."""
    on_close: Callable[[ConnectionInfo, str], None] | None = None
    """Called once when the connection ends, with the close reason."""

    def stage(self, direction: Direction) -> Stage | None:
        return self.upstream if direction == UPSTREAM else self.downstream


class Element(abc.ABC):
    """Shared, proxy-wide settings of one chain element."""

    name: str = ""
    """Unique within a proxy (a toxic's name, a hook's ``module:attr``)."""

    keep_last: bool = False
    """Stay at the end of the chain: an element added later without a position
    goes before this one (a capture of the bytes as they leave the proxy)."""

    @abc.abstractmethod
    def attach(self, info: ConnectionInfo) -> Attachment | None:
        """Make this element's state for a new (or already open) connection, or
        ``None`` if it does not apply to this one.  Must not block or do I/O."""

    def close(self) -> None:
        """The proxy holding this element has stopped and its connections have
        ended: release what the element shares (files, threads).  Called once by
        the runtime; the default holds nothing."""
        return None
