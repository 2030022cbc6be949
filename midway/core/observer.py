"""What a proxy reports about its connections, and who listens.

An :class:`Observer` is told four things, by the service that runs the connection
phases (:mod:`midway.service`): a connection was accepted
(:meth:`~Observer.connection_opened`), one attempt to reach an upstream failed
(:meth:`~Observer.connect_failed`, any number of times per connection),
exactly once, the connection ended (:meth:`~Observer.connection_closed`, with a
:class:`CloseRecord`), and, apart from any connection, an upstream's health is
known or changed (:meth:`~Observer.upstream_health`, and
:meth:`~Observer.route_upstream_health` for an SNI route's).  The access log
(and later metrics) are observers; the relay never knows which ones exist.  :class:`Observers` is the list a runtime holds: it
tells each observer in turn, and one that raises is logged and skipped, never
allowed to break the connection.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import asdict, dataclass
from typing import Protocol

__all__ = ["CloseReason", "CloseRecord", "Observer", "Observers"]

log = logging.getLogger("midway")


class CloseReason(enum.StrEnum):
    """Why a connection ended (the ``reason`` field of the access log)."""

    EOF = "eof"
    """Both sides finished normally (FIN each way)."""
    RESET = "reset"
    """One side reset (RST) or failed; the other side was reset in turn."""
    IDLE_TIMEOUT = "idle_timeout"
    HALF_CLOSE_TIMEOUT = "half_close_timeout"
    CONNECT_FAILED = "connect_failed"
    """Every upstream tried failed to connect; the client was closed."""
    NO_UPSTREAM = "no_upstream"
    """No upstream was up (health checks, passive ejection) or all were drained:
    nothing was dialled and the client was closed at once."""
    DENIED = "denied"
    """The client's address is refused by the proxy's ``allow``/``deny`` rules:
    closed at accept, before any upstream was dialled."""
    SOURCE_LIMIT = "source_limit"
    """The client's address already had ``max_connections_per_source`` connections
    open: closed at accept."""
    SHUTDOWN = "shutdown"
    """midway was stopping and the drain timeout passed, a second signal came, or the
    proxy was removed or disabled; a connection cut mid-transfer was reset."""
    REJECTED = "rejected"
    """A chain element refused the connection."""
    ELEMENT = "element"
    """A chain element (a toxic, a hook) closed or reset the connection."""
    ERROR = "error"
    """A chain element raised; see the log for its traceback."""
    BAD_PROXY_HEADER = "bad_proxy_header"
    """With ``proxy_protocol_in``: a trusted peer sent no PROXY header, a malformed
    one, or not all of it within ``proxy_protocol_timeout_s``."""
    UNTRUSTED_PEER = "untrusted_peer"
    """With ``proxy_protocol_in``: the peer is not in ``proxy_protocol_trusted``
    (closed before anything is read from it)."""
    NO_ROUTE = "no_route"
    """With SNI routes: the server name matched no route and the proxy has no
    ``upstreams`` of its own (the default route)."""
    PEEK_TIMEOUT = "peek_timeout"
    """With SNI routes: the client sent no complete ClientHello within
    ``sni_peek_timeout_s``."""
    TLS_FAILED = "tls_failed"
    """A TLS handshake failed, with the client (termination) or the upstream
    (origination); the log line says why (docs/tls.md)."""
    KILLED = "killed"
    """Closed through the admin API (``DELETE /connections/ID``): a FIN where
    nothing was in flight, else (or with ``?reset=true``) a reset."""
    UPSTREAM_DOWN = "upstream_down"
    """With ``on_marked_down = "reset"``: the upstream was marked down (health
    checks or passive ejection) and its open connections were reset."""


@dataclass
class CloseRecord:
    """One finished connection, as written to the access log."""

    proxy: str
    id: int
    """The connection's number, as in ``conn N`` log lines and ``ctx.id``: unique in
    the process, across workers too (see :mod:`midway.workers`)."""
    client: str
    listener: str
    upstream: str | None
    connect_time_s: float | None
    """Time to connect upstream (name lookup included); ``None`` when it failed."""
    bytes_up: int
    """Bytes delivered to the upstream: accepted by the kernel's send on the
    upstream socket (or moved there by splice), less what a reset of that socket
    discarded unsent (on a TLS endpoint: the plaintext it accepted).  Bytes
    written by chain elements count; midway's own (an outbound PROXY header) do
    not."""
    bytes_down: int
    """Bytes delivered to the client, likewise; includes what an upstream-direction
    element replied to the client."""
    bytes_up_read: int
    """Bytes read from the client.  Differs from ``bytes_up`` when an element
    dropped or injected bytes, or the connection ended with bytes held."""
    bytes_down_read: int
    """Bytes read from the upstream; as ``bytes_up_read`` for the other way."""
    duration_s: float
    first_close: str
    """Which side ended first: ``client``, ``upstream`` or ``proxy``."""
    reason: str
    detail: str
    path: str
    """How the bytes moved: ``splice``, ``copy``, ``chain`` or ``none``."""
    started_at: float
    worker: int = 1
    """The worker process that served it: 1 to N with ``workers = N``, 1 for a
    single process.  ``id`` is unique across the workers."""
    pid: int = 0
    """That process's id."""
    attempts: int = 0
    """Upstreams dialled for this connection: 1 when the first one accepted, more
    after a failover, 0 when none was dialled."""
    failures: tuple[dict[str, str], ...] = ()
    """The failed attempts, in order: ``{"upstream": ..., "failure": ..., "detail":
    ...}`` with ``failure`` a :class:`midway.upstream.dial.DialFailure` value
    (``refused``, ``timed_out``, ``resolve_failed``, ...)."""
    route: str | None = None
    """The SNI route chosen (its ``name``, by default its first pattern); ``None``
    for the proxy's own upstreams, or when the proxy has no routes."""
    sni: str | None = None
    """The TLS server name the client asked for (from its ClientHello, a
    terminated handshake, or a received PROXY v2 header's AUTHORITY); ``None``
    when none was seen."""
    upstream_addr: str | None = None
    """The address connected to: for an upstream given by name, the one it resolved
    to that accepted (nginx's ``$upstream_addr``); as ``upstream`` for an IP
    address; ``None`` for a unix socket or when none accepted."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class OpenedConnection(Protocol):
    """What an observer is told of a connection as it opens (the chain's
    ``ConnectionInfo`` is one; core knows it by these fields only)."""

    id: int
    proxy: str
    client: str


class Observer:
    """The events of a connection's life; every method does nothing, so an observer
    overrides only what it needs.  Called on the event loop: an observer must not
    block (queue the work, as the access log's writes are short and buffered)."""

    def connection_opened(self, info: OpenedConnection) -> None:
        """A client was accepted (before any upstream is dialled; an inbound layer
        may still replace ``info.client``)."""

    def connect_failed(self, proxy: str, upstream: str, failure: str, detail: str) -> None:
        """One attempt to reach ``upstream`` failed; ``failure`` is a
        :class:`midway.upstream.dial.DialFailure` value, ``detail`` says more
        (``connection refused``, ``connect timed out after 5 s``)."""

    def connection_closed(self, record: CloseRecord) -> None:
        """The connection ended (once per accepted connection)."""

    counts_only = False
    """True for an observer that needs only what :meth:`connection_counted` is
    told of a closed connection (the metrics): while every observer says so, no
    :class:`CloseRecord` is made, and each is told :meth:`connection_counted`
    instead of :meth:`connection_closed` (a quarter of the Python a short
    connection runs)."""

    def connection_counted(self, proxy: str, reason: str, bytes_up: int, bytes_down: int,
                           connect_time_s: float | None, duration_s: float) -> None:
        """The connection ended, told to an observer whose :attr:`counts_only` is
        True (instead of :meth:`connection_closed`, when every observer's is): the
        :class:`CloseRecord` fields of the same names."""

    def upstream_health(self, proxy: str, upstream: str, up: bool) -> None:
        """``upstream`` (its address as configured) of ``proxy`` is now up (or
        down): told when a proxy starts, for each upstream a reconfigure adds, and on
        every change of health (``midway_upstream_up``).  The upstreams of an SNI
        route are told by :meth:`route_upstream_health` instead."""

    def route_upstream_health(self, proxy: str, route: str, upstream: str, up: bool) -> None:
        """``upstream`` of the SNI route ``route`` (its ``name``) of ``proxy`` is
        now up (or down), each route's upstreams having their own health: told as
        :meth:`upstream_health` is (``midway_route_upstream_up``)."""


class Observers(list[Observer]):
    """The observers of a runtime, told in turn.  An observer that raises is
    logged and the others are still told.  An object with only some of the
    methods (duck-typed, not an :class:`Observer`) is told only those."""

    def connection_opened(self, info: OpenedConnection) -> None:
        for observer in self:
            method = getattr(observer, "connection_opened", None)
            if method is not None:
                try:
                    method(info)
                except Exception:
                    log.exception("an observer failed on connection %d", info.id)

    def connect_failed(self, proxy: str, upstream: str, failure: str, detail: str) -> None:
        self._tell("connect_failed", (proxy, upstream, failure, detail),
                   f"a connect failure of {proxy}")

    def upstream_health(self, proxy: str, upstream: str, up: bool) -> None:
        self._tell("upstream_health", (proxy, upstream, up),
                   f"the health of {upstream} of {proxy}")

    def route_upstream_health(self, proxy: str, route: str, upstream: str, up: bool) -> None:
        self._tell("route_upstream_health", (proxy, route, upstream, up),
                   f"the health of {upstream} of route {route} of {proxy}")

    def _tell(self, event: str, args: tuple[object, ...], what: str) -> None:
        """Call ``event`` with ``args`` on each observer that has it (not the hot
        path: per failure or health change); one that raises is logged, naming
        ``what`` it was told."""
        for observer in self:
            method = getattr(observer, event, None)
            if method is not None:
                try:
                    method(*args)
                except Exception:
                    log.exception("an observer failed on %s", what)

    def connection_closed(self, record: CloseRecord) -> None:
        for observer in self:
            try:
                observer.connection_closed(record)
            except Exception:
                log.exception("an observer failed on connection %d", record.id)

    def counts_only(self) -> bool:
        """Whether every observer needs only :meth:`connection_counted`."""
        for observer in self:
            if not getattr(observer, "counts_only", False):
                return False
        return True

    def connection_counted(self, proxy: str, reason: str, bytes_up: int, bytes_down: int,
                           connect_time_s: float | None, duration_s: float) -> None:
        for observer in self:
            try:
                observer.connection_counted(proxy, reason, bytes_up, bytes_down,
                                            connect_time_s, duration_s)
            except Exception:
                log.exception("an observer failed on a connection of %s", proxy)
