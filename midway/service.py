"""One proxy: its listeners, its upstreams, its layers and chain elements, and the
phases each of its connections goes through.

Theory of operation
-------------------
A connection is one :class:`Connection` object, which walks through named phases
(:class:`Phase`), each a small step with one owner:

========== ==================================================================
accept     the listener (:mod:`midway.core.listener`) accepts; the service
           makes the :class:`Connection` and its
           :class:`~midway.chain.base.ConnectionInfo`; observers hear
           ``connection_opened``
admit      limits: the listener asked the gate (:meth:`ProxyService._can_accept`:
           the proxy's and the process's) before accepting, so a full proxy
           leaves clients in the kernel's queue.  Then, on the accepted
           address: the ``allow``/``deny`` rules and the per-source limit
           (:mod:`midway.upstream.access`); a refused client is closed at once
           (``denied``, ``source_limit``), before any dial
inbound    the proxy's inbound layers (:mod:`midway.layers.base`: later a PROXY
           header, a TLS handshake, a ClientHello peek), in a task: they may read
           the client, replace its address and set route keys.  Skipped when the
           proxy has none: then the dial starts at accept, as server-first
           protocols need, with no task at all (the hot path of connection rate).
route      pick the upstream set from the route key ``sni`` (set by the ClientHello
           peek, a TLS handshake or a PROXY header): the matching SNI route's own
           set, else the proxy's (closed with ``no_route`` when it has none)
choose     the balancer's order of the eligible upstreams for the client IP
           (:class:`~midway.upstream.state.UpstreamSet`; ``info.client_addr``,
           so after a PROXY header), cut to ``retries`` + 1; none eligible: closed
           at once (``no_upstream``, logged once per outage by the set)
dial       :class:`~midway.upstream.dial.Dialer`: each upstream in that order,
           next on failure, every failure logged (rate-limited), counted in the
           upstream's state and told to observers; an IP literal by callbacks
           alone
outbound   the proxy's outbound layers (later: a PROXY header, TLS origination)
open       chain elements attach; their ``on_open`` run (in a task, if any)
relay      bytes that inbound layers read and handed back go to the upstream
           first; then :class:`~midway.core.relay.Relay` owns both sockets
closed     one :class:`~midway.core.observer.CloseRecord` for observers, the
           elements' ``on_close``, the upstream's ``closed`` feedback, the slot
           freed
========== ==================================================================

A connection that ends before the relay (no upstream reachable, refused by an
element or a layer, stopped while connecting) goes to *closed* from where it is,
through the same one place (:meth:`Connection.finish`).

A :class:`ProxyService` can be changed while live: its elements
(:meth:`~ProxyService.add_element`, :meth:`~ProxyService.remove_element`,
:meth:`~ProxyService.replace_element`) apply to open connections too, and
:meth:`~ProxyService.reconfigure` swaps settings and upstreams for new
connections, keeping each kept upstream's state (active connections, health).

A service owns one active health checker per upstream while
``health.interval_s`` > 0 (:func:`~midway.upstream.checker.run_checks`, a task
each, jittered): started when it starts accepting, kept across a reconfigure for
an upstream whose address and interval stay, cancelled when its listeners close.
Health changes are logged by the upstream set and told to observers
(``upstream_health``; ``route_upstream_health`` for an SNI route's upstream).

A service talks to what runs it only through :class:`ServiceHost` (connection
ids, the admission gate, observers, ``reuse_port``), which
:class:`~midway.runtime.Runtime` is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence, Set
from typing import Any, Protocol

from .chain.base import DIRECTIONS, Attachment, ConnectionInfo, Direction, Element, Stage
from .chain.runner import set_stages
from .config.addresses import Address, format_sockaddr
from .config.load import file_mode, health_settings
from .config.schema import ProxyConfig
from .core.clock import LoopClock
from .core.listener import (
    Listener,
    SocketOptions,
    keepalive_options,
    open_listening_socket,
    set_options,
)
from .core.observer import CloseReason, CloseRecord, Observers
from .core.poller import poller_for
from .core.relay import Relay, close_socket
from .core.streams import Endpoint, Stream
from .errors import ListenError, Rejected, TlsFailed, describe_oserror, traceback_of
from .layers.base import InboundLayer, LayerRefused, OutboundLayer
from .layers.registry import build_layers
from .layers.routes import SniRoutes
from .layers.tls import TlsOrigination
from .upstream.access import AccessList, SourceLimiter, client_ip
from .upstream.checker import Secure, check_once, run_checks
from .upstream.dial import Dialer, DialFailure, Resolver, loop_resolver
from .upstream.health import CheckSchedule, HealthMachine, HealthSettings
from .upstream.state import UpstreamSet, UpstreamSpec, UpstreamState

__all__ = ["ProxyService", "ServiceHost", "Connection", "Phase", "FAILURE_LOG_INTERVAL_S"]

log = logging.getLogger("midway")

Attached = dict[Element, Attachment]

FAILURE_LOG_INTERVAL_S = 10.0
"""A failing upstream is logged when its failure starts or changes kind, then at
most once per this many seconds (with the count of the ones not logged): a dead
upstream behind a busy proxy would otherwise log once per connection.  10 s is
nginx's ``fail_timeout``, the window over which it counts an upstream's failures."""

MARKED_DOWN_DETAIL = "the upstream was marked down"
"""The ``detail`` of a connection reset by ``on_marked_down = "reset"``."""

_MAPPED_PREFIX = "::ffff:"
"""An IPv4 client of a dual-stack listener: keyed as its IPv4 address."""


class ServiceHost(Protocol):
    """What a :class:`ProxyService` needs from what runs it (a
    :class:`~midway.runtime.Runtime`)."""

    reuse_port: bool
    """Bind listeners with SO_REUSEPORT (other workers share them)."""
    observers: Observers
    """Told of every connection's opening, connect failures and close."""
    worker: int
    """The worker process this is (1 to N; 1 for a single process)."""
    pid: int

    def next_connection_id(self) -> int: ...

    def has_room(self) -> bool:
        """The process-wide admission gate: may one more connection be accepted?"""

    def connection_opened(self) -> None:
        """A slot of the process-wide limit was taken (a client was accepted)."""

    def connection_closed(self) -> None:
        """That slot is free again."""


class Phase(enum.StrEnum):
    """Where a connection is (see the module's theory of operation)."""

    ACCEPT = "accept"
    ADMIT = "admit"
    INBOUND = "inbound"
    ROUTE = "route"
    CHOOSE = "choose"
    DIAL = "dial"
    OUTBOUND = "outbound"
    OPEN = "open"
    RELAY = "relay"
    CLOSED = "closed"


# The hot path stores phases from module globals: an enum member looked up on its
# class costs ten times as much (~60 ns, CPython 3.11).
_ACCEPT, _DIAL, _OPEN, _RELAY, _CLOSED = (Phase.ACCEPT, Phase.DIAL, Phase.OPEN, Phase.RELAY,
                                          Phase.CLOSED)


class ProxyService:
    """A named proxy inside a :class:`ServiceHost` (a :class:`~midway.runtime.Runtime`).

    Its connection layers (:mod:`midway.layers.base`) are built from the
    configuration (:func:`~midway.layers.registry.build_layers`), then the
    ``inbound`` and ``outbound`` given here (test layers) after them; ``resolve``
    looks up upstream host names (default: the loop's ``getaddrinfo``)."""

    def __init__(self, config: ProxyConfig, host: ServiceHost,
                 elements: Iterable[Element] = (), *,
                 inbound: Sequence[InboundLayer] = (),
                 outbound: Sequence[OutboundLayer] = (),
                 resolve: Resolver = loop_resolver) -> None:
        self.config = config
        self.host = host
        self.pool = UpstreamSet(config.name, _specs(config), balance=config.balance,
                                health=health_settings(config.health),
                                on_health=self._health_changed,
                                empty_ok=bool(config.routes))
        self.access: AccessList | None = _access(config)
        """The ``allow``/``deny`` rules; None when there are none (nothing to check)."""
        self.sources = SourceLimiter(config.max_connections_per_source)
        """Live connections per client IP (counted even while the limit is off)."""
        self.retries: int | None = None if config.retries < 0 else config.retries
        self.keepalive: SocketOptions = _keepalive(config)
        """The keepalive options of both sockets of a connection (``()``: off)."""
        self.check: Callable[[Address, HealthSettings, Secure | None],
                             Awaitable[str | None]] = check_once
        """One active health check (injectable for tests)."""
        self._secure: Secure | None = None
        """The TLS handshake of this proxy's upstream connections, which its
        active checks make too (``upstream_tls``); None without it."""
        self._checks: dict[tuple[str, Address],
                           tuple[asyncio.Task[None], HealthMachine, float]] = {}
        """The running checker of each checked upstream (by its set's name, the
        proxy's or a route's, and its address), its machine and interval."""
        self._given_layers = (tuple(inbound), tuple(outbound))
        self.inbound: tuple[InboundLayer, ...] = ()
        self.outbound: tuple[OutboundLayer, ...] = ()
        self.routes: SniRoutes[_Route] | None = None
        """The SNI routes (None: the proxy has none, and the route phase costs nothing)."""
        self._route_sets: dict[str, UpstreamSet] = {}
        self._configure_layers(config)
        self.resolve = resolve
        self.listeners: list[Listener] = []
        self.elements: list[Element] = list(elements)
        self.live: dict[Relay[ConnectionInfo], _Relayed] = {}
        self._connecting: set[Connection] = set()
        self._failing: dict[Address, _Failing] = {}
        """Upstreams whose last attempt failed, for rate-limited logging."""
        self.accepted = 0
        self.active = 0
        self.accepting = False
        self.gated = False
        """Whether the gate has said no since the listeners last resumed (only
        then can a freed slot have a listener to resume)."""
        self.enabled = True
        self.retired: set[Element] = set()
        """Elements a reload replaced (see :meth:`retire_elements`)."""
        self.relay_closed = self._relay_closed
        """Every relay's ``on_close``: one bound method, not one per connection."""

    @property
    def name(self) -> str:
        return self.config.name

    # -- listeners -------------------------------------------------------------

    def bind(self) -> None:
        """Open every listener (not yet accepting).  All or nothing: on failure the
        ones opened are closed and :class:`ListenError` names the address."""
        self.listeners = self._open(self.config.listen)

    def _open(self, addresses: Sequence[Address]) -> list[Listener]:
        """New listeners on ``addresses``, not yet accepting; all or nothing, as
        :meth:`bind`."""
        socks = []
        try:
            for address in addresses:
                socks.append((address, open_listening_socket(
                    address, self.config.backlog, reuse_port=self.host.reuse_port,
                    unix_mode=file_mode(self.config.unix_mode))))
        except ListenError:
            for _, sock in socks:
                sock.close()
            raise
        listeners = [
            Listener(address, sock, self._on_accept, self._can_accept) for address, sock in socks
        ]
        for listener in listeners:
            listener.set_nodelay(self.config.tcp_nodelay)
            if self.keepalive:
                listener.set_keepalive(self.keepalive)
        return listeners

    def relisten(self, listen: tuple[Address, ...]) -> list[Listener]:
        """Listen on ``listen`` instead of :attr:`config`'s addresses, and make it
        the configured list.  A listener whose address stays is left as it is:
        its socket and the clients in its accept queue are never closed, so not
        one connection to it is refused during the change.  Added addresses are
        opened, not yet accepting: they are returned for :meth:`announce` once
        the new settings are in (so their log line names the new upstreams);
        removed ones are closed.  An added address
        may overlap a removed one on the same port (``:8080`` replacing
        ``127.0.0.1:8080``): when it cannot be bound beside them, the removed
        ones are closed first and it is tried again.  All or nothing: on
        :class:`ListenError` the proxy listens where it did (a removed address
        taken meanwhile by another process is logged and left out)."""
        if not self.listeners:  # closed (midway is stopping): nothing to move
            self.config = dataclasses.replace(self.config, listen=listen)
            return []
        current = list(zip(self.config.listen, self.listeners, strict=True))
        spare = list(current)
        plan: list[Listener | Address] = []  # per new address: its kept listener, or itself
        for address in listen:
            match = next((pair for pair in spare if pair[0] == address), None)
            if match is None:
                plan.append(address)
            else:
                spare.remove(match)
                plan.append(match[1])
        removed = [listener for _, listener in spare]
        added = [a for a in plan if isinstance(a, Address)]
        try:
            opened = self._open(added)
        except ListenError:
            ports = {a.port for a in added if not a.is_unix}
            if not any(listener.port in ports for listener in removed):
                raise  # no overlap to make room for: the cause is elsewhere
            for listener in removed:
                listener.close()
            try:
                opened = self._open(added)
            except ListenError:
                self._reopen(current, removed)
                raise
        else:
            for listener in removed:
                listener.close()
        fresh = iter(opened)
        self.listeners = [next(fresh) if isinstance(a, Address) else a for a in plan]
        self.config = dataclasses.replace(self.config, listen=listen)
        return opened

    def _reopen(self, current: list[tuple[Address, Listener]], removed: list[Listener]) -> None:
        """After a failed :meth:`relisten`: open the removed addresses again."""
        pairs: list[tuple[Address, Listener]] = []
        reopened = []
        for address, listener in current:
            if listener in removed:
                try:
                    listener = self._open([address])[0]
                except ListenError as exc:
                    log.error("%s: cannot listen again on %s: %s", self.name, address, exc)
                    continue
                reopened.append(listener)
            pairs.append((address, listener))
        self.listeners = [listener for _, listener in pairs]
        self.config = dataclasses.replace(self.config, listen=tuple(a for a, _ in pairs))
        self.announce(reopened)

    def start_accepting(self) -> None:
        self.accepting = True
        self.announce(self.listeners)
        self._tell_health()
        self._sync_checks()

    def announce(self, listeners: Iterable[Listener]) -> None:
        """Start ``listeners`` accepting if the proxy is, saying so."""
        if not self.accepting:
            return
        for listener in listeners:
            listener.resume()
            log.info("%s: listening on %s, forwarding to %s%s", self.name, listener.bound,
                     _upstream_list(self.pool) or "nothing",
                     "".join(f"; SNI route {name} to {_upstream_list(pool)}"
                             for name, pool in self._route_sets.items()))

    def stop_accepting(self) -> None:
        self.accepting = False
        for listener in self.listeners:
            listener.pause()

    def close_listeners(self) -> None:
        self.accepting = False
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        self._sync_checks()

    def room_changed(self) -> None:
        """A slot may have freed up: resume listeners paused at a limit."""
        if self.gated and self.accepting and self._can_accept():
            self.gated = False
            for listener in self.listeners:
                listener.resume()

    def _can_accept(self) -> bool:
        """The admission gate, asked by the listener before each accept."""
        limit = self.config.max_connections
        if self.accepting and (limit == 0 or self.active < limit) and self.host.has_room():
            return True
        self.gated = True  # the listener pauses itself: room_changed resumes it
        return False

    @property
    def addresses(self) -> list[str]:
        """The bound listen addresses (real ports when 0 was configured)."""
        return [listener.bound for listener in self.listeners]

    # -- the phases: accept, admit, then inbound or straight to the dial ---------

    def _on_accept(self, client: socket.socket, addr: object, listener: Listener) -> None:
        self.accepted += 1
        self.active += 1
        self.host.connection_opened()
        conn = Connection(self, client, addr, listener)
        self._connecting.add(conn)
        observers = self.host.observers
        if observers:
            observers.connection_opened(conn.info)
        # admit: the gate ran before accept (limits); now the client's address --
        # unless a PROXY header will name the real client: then after the header
        # (admit_real_client), and proxy_protocol_trusted decides about the peer.
        if self.config.proxy_protocol_in == "off":
            refused = self._admit(conn)
            if refused is not None:
                conn.finish(*refused)
                return
        if self.inbound:
            conn.phase = Phase.INBOUND
            conn.work = conn.loop.create_task(conn.run_inbound())
        else:
            conn.choose_and_dial()

    # -- dial feedback -------------------------------------------------------

    def _attempt_failed(self, conn: Connection, target: UpstreamState, failure: DialFailure,
                        detail: str) -> None:
        if failure is not DialFailure.OUT_OF_DESCRIPTORS:
            # Out of descriptors is midway's shortage, not the upstream's fault:
            # ejecting a healthy upstream would refuse clients once descriptors free.
            target.connect_failed(detail)
        observers = self.host.observers
        if observers:
            observers.connect_failed(self.name, str(target.address), failure.value, detail)
        now = conn.loop.time()
        failing = self._failing.get(target.address)
        if failing is None or failing.failure is not failure \
                or now - failing.logged_at >= FAILURE_LOG_INTERVAL_S:
            more = f" ({failing.unlogged} more since)" if failing and failing.unlogged else ""
            then = "; trying the next one" if conn.candidates and failure is not DialFailure.RESET else ""
            log.warning("%s: upstream %s failed: %s (%s)%s%s", self.name, target.address,
                        detail, failure.value, more, then)
            self._failing[target.address] = _Failing(failure, now)
        else:
            failing.unlogged += 1

    def _upstream_recovered(self, target: UpstreamState) -> None:
        failing = self._failing.pop(target.address, None)
        if failing is not None:
            log.info("%s: upstream %s connects again", self.name, target.address)

    # -- the end: one place for every connection ---------------------------

    def _closed(self, info: ConnectionInfo, attached: Attached, target: UpstreamState | None,
                failures: Sequence[_Failure], reason: CloseReason, detail: str, first_close: str,
                reset: bool, relay: Relay[ConnectionInfo] | None,
                lease: str | None) -> None:
        """The *closed* phase, for every connection: fill in how it ended, tell the
        elements, the upstream's state and the observers, free the slot."""
        info.first_close = first_close
        info.close_detail = detail
        # The relay resets the sockets for RESET and ERROR, and for an element's
        # Output.reset, which it does not yet tell apart from Output.close.
        info.reset = reset
        info.reset_by = ((relay is not None and relay.failed_side) or "proxy") if reset else None
        for attachment in attached.values():
            if attachment.on_close is not None:
                try:
                    attachment.on_close(info, reason.value)
                except Exception:
                    log.exception("conn %d (%s): an element's on_close failed", info.id, self.name)
        if target is not None and info.upstream is not None:  # connected(): closed() too
            if reason is CloseReason.UPSTREAM_DOWN:  # cut by midway: no verdict
                target.abandoned()
            else:
                # The upstream's own socket failed (not the client's: an upstream that
                # half-closed first is not to blame for a client's reset).
                target.closed(reset_before_response=relay is not None
                              and reason is CloseReason.RESET
                              and relay.failed_side == "upstream" and relay.bytes_down == 0)
        observers = self.host.observers
        if observers:
            up, down, up_read, down_read = (0, 0, 0, 0) if relay is None else relay.counts()
            if observers.counts_only():  # the metrics alone: no record to make
                observers.connection_counted(
                    self.config.name, reason._value_, up, down,
                    None if relay is None else round(relay.connect_time_s, 6),
                    round(time.time() - info.started_at, 6))
                self._freed(lease)
                return
            upstream_addr = None  # as `upstream` for an IP address; for a name, what it resolved to
            if info.upstream_addr is not None and target is not None:
                upstream_addr = target.text if target.pair is not None \
                    else format_sockaddr(info.upstream_addr)
            observers.connection_closed(CloseRecord(
                proxy=self.config.name, id=info.id, client=info.client, listener=info.listener,
                upstream=info.upstream,
                connect_time_s=None if relay is None else round(relay.connect_time_s, 6),
                bytes_up=up, bytes_down=down, bytes_up_read=up_read, bytes_down_read=down_read,
                duration_s=round(time.time() - info.started_at, 6), first_close=first_close,
                reason=reason._value_, detail=detail,  # (.value: two calls more)
                path="none" if relay is None else relay.path, started_at=info.started_at,
                attempts=len(failures) + (info.upstream is not None),
                failures=tuple({"upstream": str(t.address), "failure": f.value, "detail": d}
                               for t, f, d in failures) if failures else (),
                worker=self.host.worker, pid=self.host.pid, route=info.route, sni=info.sni,
                upstream_addr=upstream_addr,
            ))
        self._freed(lease)

    def _freed(self, lease: str | None) -> None:
        """The end of *closed*: the connection's slots are free."""
        if lease is not None:
            self.sources.give_back(lease)
        self.active -= 1
        self.host.connection_closed()
        if self.retired:
            self._release_retired()

    def _relay_closed(self, relay: Relay[ConnectionInfo]) -> None:
        rec = self.live.pop(relay)
        reason = relay.reason or CloseReason.EOF
        self._closed(relay.info, rec.attached, rec.target, rec.failures or (), reason,
                     relay.detail, relay.first_close or "proxy", relay.reset, relay, rec.lease)
        for element in rec.own:  # this connection's own: they leave with it
            try:
                element.close()
            except Exception:
                log.exception("conn %d (%s): chain element %s failed to close",
                              relay.info.id, self.name, element.name)
        if reason in (CloseReason.RESET, CloseReason.ERROR):
            log.debug("conn %d (%s): %s %s", relay.info.id, self.name, reason.value, relay.detail)

    # -- live changes ------------------------------------------------------

    def add_element(self, element: Element, index: int | None = None) -> None:
        """Add a chain element, to new connections and to every open one.  With no
        ``index`` it goes last, but before elements that keep the last place."""
        if index is None:
            index = len(self.elements)
            while index and self.elements[index - 1].keep_last:
                index -= 1
        self.elements.insert(index, element)
        for relay, rec in list(self.live.items()):
            attachment = element.attach(relay.info)
            if attachment is not None:
                rec.own_attached()[element] = attachment
                self._restage(relay, rec)

    def add_connection_element(self, relay: Relay[ConnectionInfo], element: Element) -> bool:
        """Add ``element`` to the open connection ``relay`` alone (an admin
        ``POST /connections/ID/toxics``), live, after the proxy's elements but
        before those that keep the last place.  It leaves with the connection
        (closed then).  False when it does not apply to this connection (a
        ``noop``, or a toxicity roll that left it out): it is kept among the
        connection's own all the same, listed and removable, as Toxiproxy lists a
        toxic whatever its toxicity."""
        rec = self.live[relay]
        attachment = element.attach(relay.info)
        rec.own = (*rec.own, element)
        if attachment is None:
            return False
        rec.own_attached()[element] = attachment
        self._restage(relay, rec)
        return True

    def remove_connection_element(self, relay: Relay[ConnectionInfo], element: Element) -> None:
        """Remove ``element``, one of the open connection ``relay``'s own (see
        :meth:`add_connection_element`), live: held bytes are flushed, none
        lost; then it is closed, as at the connection's end."""
        rec = self.live[relay]
        rec.own = tuple(e for e in rec.own if e is not element)
        rec.attached.pop(element, None)
        self._restage(relay, rec)
        element.close()

    def remove_element(self, element: Element) -> None:
        """Remove a chain element everywhere; held bytes are flushed, none lost."""
        self.elements.remove(element)
        for relay, rec in list(self.live.items()):
            if rec.attached.pop(element, None) is not None:
                self._restage(relay, rec)

    def replace_element(self, old: Element, new: Element) -> None:
        """Swap ``old`` for ``new`` in place (same position), live."""
        index = self.elements.index(old)
        self.elements[index] = new
        for relay, rec in list(self.live.items()):
            rec.attached.pop(old, None)
            attachment = new.attach(relay.info)
            if attachment is not None:
                rec.own_attached()[new] = attachment
            self._restage(relay, rec)

    def retire_elements(self, chain: list[Element], retired: Iterable[Element]) -> None:
        """Take a rebuilt chain (a reload): ``chain`` is the new element list, in
        which each ``retired`` element keeps its place for the open connections
        attached to it.  No new connection attaches to a retired element; each is
        closed and dropped once no connection holds it any more."""
        self.elements = chain
        self.retired.update(retired)
        self._release_retired()

    def _release_retired(self) -> None:
        held = {e for rec in self.live.values() for e in rec.attached if e in self.retired}
        held.update(e for c in self._connecting for e in c.attached if e in self.retired)
        for element in [e for e in self.retired if e not in held]:
            self.retired.discard(element)
            self.elements.remove(element)
            try:
                element.close()
            except Exception:
                log.exception("%s: chain element %s failed to close", self.name, element.name)

    def _restage(self, relay: Relay[ConnectionInfo], rec: _Relayed) -> None:
        elements = _with_own(self.elements, rec.own)
        for direction in DIRECTIONS:
            set_stages(relay, direction, _stages(elements, rec.attached, direction))

    def upstream_sets(self) -> list[tuple[str | None, UpstreamSet]]:
        """The proxy's own upstream set (route None), then each SNI route's, by
        the route's name."""
        return [(None, self.pool), *self._route_sets.items()]

    def upstream_addresses(self) -> set[str]:
        """Every upstream's address as configured, the SNI routes' included
        (the ``upstream`` label of its metrics)."""
        return {u.text for _, pool in self.upstream_sets() for u in pool.upstreams}

    def upstream_views(self) -> list[dict[str, Any]]:
        """For the admin API's ``upstreams``: each upstream's state
        (:meth:`UpstreamSet.snapshot`) with its ``route``, the proxy's own first
        (``route`` None), then each SNI route's (its name)."""
        return [{"address": entry["address"], "route": route, **entry}
                for route, pool in self.upstream_sets() for entry in pool.snapshot()]

    def reconfigure(self, config: ProxyConfig) -> None:
        """Use new settings and upstreams for new connections.  An upstream whose
        address stays keeps its state (active connections, counters, health).
        Listen addresses must be rebound by the runtime (see
        :meth:`Runtime.update_proxy <midway.runtime.Runtime.update_proxy>`)."""
        before = self._told()
        self._configure_layers(config)  # first: certificates are read again, and may fail
        self.pool.reconfigure(_specs(config), balance=config.balance,
                              health=health_settings(config.health),
                              empty_ok=bool(config.routes))
        resize = config.backlog != self.config.backlog
        mode = file_mode(config.unix_mode) if config.unix_mode != self.config.unix_mode else None
        self.config = config
        keepalive = _keepalive(config)
        for listener in self.listeners:
            if listener.nodelay is not None and listener.nodelay != config.tcp_nodelay:
                listener.set_nodelay(config.tcp_nodelay)
            if keepalive != self.keepalive:
                listener.set_keepalive(keepalive or keepalive_options(0))
            if mode is not None and listener.address.path is not None:
                try:
                    os.chmod(listener.address.path, mode)
                except OSError as exc:
                    log.warning("%s: %s keeps its mode: %s", self.name, listener.bound,
                                describe_oserror(exc))
            if resize:  # listen() again on a listening socket resizes its queue
                try:
                    listener.sock.listen(config.backlog)
                except OSError as exc:
                    log.warning("%s: %s keeps its backlog: %s", self.name, listener.bound,
                                describe_oserror(exc))
        self.keepalive = keepalive
        self.access = _access(config)
        self.sources.limit = config.max_connections_per_source
        self.retries = None if config.retries < 0 else config.retries
        kept = {u.address for u in self.pool.upstreams}
        kept.update(u.address for pool in self._route_sets.values() for u in pool.upstreams)
        for address in [a for a in self._failing if a not in kept]:
            del self._failing[address]
        if self.accepting:
            self._tell_health(before)
        self._sync_checks()

    # -- health: active checks, and what observers hear ------------------------

    def _sync_checks(self) -> None:
        """Run one checker per checked upstream, of the proxy's own upstreams and
        of each SNI route's, while accepting, none otherwise.  A checker is kept
        while its upstream keeps its address in its set (so its state) and the
        interval stays; any other is cancelled (its check's socket closes), and a
        missing one started."""
        wanted: dict[tuple[str, Address], tuple[UpstreamState, float]] = {}
        if self.accepting:
            for pool in (self.pool, *self._route_sets.values()):
                wanted.update(((pool.proxy, u.address), (u, pool.health.interval_s))
                              for u in pool.checked())
        for key, (task, machine, every) in list(self._checks.items()):
            upstream, interval = wanted.get(key, (None, 0.0))
            if upstream is None or upstream.health is not machine or every != interval:
                task.cancel()
                del self._checks[key]
        if not wanted:
            return
        loop = asyncio.get_running_loop()
        clock = LoopClock()
        for key, (upstream, interval) in wanted.items():
            if key not in self._checks:
                where, address = key
                task = loop.create_task(run_checks(address, upstream.health,
                                                   CheckSchedule(interval), clock, self._check),
                                        name=f"check {address} of {where}")
                task.add_done_callback(self._checker_ended)
                self._checks[key] = (task, upstream.health, interval)

    async def _check(self, address: Address, settings: HealthSettings) -> str | None:
        # The layers of now, not of the checker's start: a reload may turn TLS on.
        return await self.check(address, settings, self._secure)

    def _checker_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A check never raises for a network failure; anything else is a bug:
            # say so (the upstream keeps its last state).
            log.error("%s: %s stopped: %s", self.name, task.get_name(), task.exception(),
                      exc_info=task.exception())

    @property
    def checkers(self) -> int:
        """Active health checkers running now."""
        return len(self._checks)

    def _health_changed(self, address: Address, up: bool) -> None:
        observers = self.host.observers
        if observers:
            observers.upstream_health(self.name, str(address), up)
        if not up:
            self._marked_down(self.pool, address)

    def _route_health(self, route: str) -> Callable[[Address, bool], None]:
        """The ``on_health`` of SNI route ``route``'s upstream set."""
        def changed(address: Address, up: bool) -> None:
            observers = self.host.observers
            if observers:
                observers.route_upstream_health(self.name, route, str(address), up)
            pool = self._route_sets.get(route)
            if not up and pool is not None:
                self._marked_down(pool, address)
        return changed

    def _marked_down(self, pool: UpstreamSet, address: Address) -> None:
        """With ``on_marked_down = "reset"``: reset every relayed connection to
        the upstream of ``pool`` at ``address``, which was just marked down, so
        that its clients reconnect to one that is up."""
        if self.config.health.on_marked_down != "reset":
            return
        target = next((u for u in pool.upstreams if u.address == address), None)
        cut = [relay for relay, rec in self.live.items() if rec.target is target]
        if not cut:
            return
        log.warning("%s: upstream %s is down: resetting its %d open connection%s "
                    "(on_marked_down = \"reset\")", self.name, address, len(cut),
                    "" if len(cut) == 1 else "s")
        for relay in cut:
            relay.abort(CloseReason.UPSTREAM_DOWN, MARKED_DOWN_DETAIL)

    def _told(self) -> set[tuple[str | None, Address]]:
        """Each upstream as (its route, None for the proxy's own; its address)."""
        return {(route, u.address) for route, pool in self.upstream_sets()
                for u in pool.upstreams}

    def _tell_health(self, told: Set[tuple[str | None, Address]] = frozenset()) -> None:
        """Tell the observers the health of every upstream, the SNI routes'
        included, but those in ``told`` (:meth:`_told`: they know them)."""
        observers = self.host.observers
        if not observers:
            return
        for route, pool in self.upstream_sets():
            for u in pool.upstreams:
                if (route, u.address) in told:
                    continue
                if route is None:
                    observers.upstream_health(self.name, u.text, u.up)
                else:
                    observers.route_upstream_health(self.name, route, u.text, u.up)

    def _configure_layers(self, config: ProxyConfig) -> None:
        """The layers and SNI routes of ``config``, for new connections.  A route
        keeps its upstream set (active connections, the balancer's rotation)
        across a reconfigure by its name."""
        inbound, outbound = build_layers(config)
        given_in, given_out = self._given_layers
        self.inbound, self.outbound = (*inbound, *given_in), (*outbound, *given_out)
        self._secure = next((layer.secure for layer in self.outbound
                             if isinstance(layer, TlsOrigination)), None)
        sets: dict[str, UpstreamSet] = {}
        for spec in config.routes:
            specs = [UpstreamSpec(address) for address in spec.upstreams]
            pool = self._route_sets.get(spec.name)
            if pool is None:
                pool = UpstreamSet(f"{config.name} route {spec.name}", specs,
                                   balance=spec.balance, health=health_settings(config.health),
                                   on_health=self._route_health(spec.name))
            else:
                pool.reconfigure(specs, balance=spec.balance,
                                 health=health_settings(config.health))
            sets[spec.name] = pool
        self._route_sets = sets
        self.routes = SniRoutes((pattern, _Route(spec.name, sets[spec.name]))
                                for spec in config.routes
                                for pattern in spec.sni) if config.routes else None

    def _admit(self, conn: Connection) -> tuple[CloseReason, str] | None:
        """``allow``/``deny`` and the per-source limit on the connection's client
        address: None to go on, else why to close it (a unix socket's clients have
        no address: no rule applies)."""
        addr = conn.info.client_addr
        if addr is None:
            return None
        host = addr[0]
        if self.access is not None and not self.access.allows(host):
            log.debug("conn %d (%s): %s is denied", conn.info.id, self.name, host)
            return CloseReason.DENIED, f"{host} is not allowed"
        lease = self.sources.take(host)
        if lease is None:
            log.debug("conn %d (%s): %s is at its limit", conn.info.id, self.name, host)
            return CloseReason.SOURCE_LIMIT, f"{host} has {self.sources.limit} connections open"
        conn.lease = lease
        return None

    def admit_real_client(self, conn: Connection) -> tuple[CloseReason, str] | None:
        """The admission check after the inbound layers, on the real client a PROXY
        header named (with ``proxy_protocol_in``, the check at accept is skipped:
        the peer is the load balancer, which ``proxy_protocol_trusted`` governs)."""
        if self.config.proxy_protocol_in == "off":
            return None
        return self._admit(conn)

    @property
    def connecting(self) -> Set[Connection]:
        """The connections not relaying yet (inbound, dial, outbound, open)."""
        return self._connecting

    def close_connections(self, reason: CloseReason = CloseReason.SHUTDOWN,
                          detail: str = "proxy stopping") -> None:
        """End every open connection now (a FIN where nothing is in flight, else a
        reset: see :meth:`Relay.close`), and cancel those not yet relaying."""
        for conn in list(self._connecting):
            conn.cancel()
        for relay in list(self.live):
            relay.close(reason, detail)


def _specs(config: ProxyConfig) -> list[UpstreamSpec]:
    return [UpstreamSpec(u.address, u.weight, u.backup) for u in config.upstreams]


def _upstream_list(pool: UpstreamSet) -> str:
    """The pool's upstreams for the start-up line, in the quick form's words:
    ``10.0.0.5:6379, 10.0.0.6:6379,weight=3, 10.0.0.7:6379,backup``."""
    return ", ".join(f"{u.address}{f',weight={u.weight}' if u.weight != 1 else ''}"
                     f"{',backup' if u.backup else ''}" for u in pool.upstreams)


def _access(config: ProxyConfig) -> AccessList | None:
    if not config.allow and not config.deny:
        return None
    return AccessList.parse(config.allow, config.deny)  # checked by the loader


def _key(host: str) -> str:
    """The balancer's key for a client IP: an IPv4-mapped address as its IPv4."""
    return str(client_ip(host)) if host.startswith(_MAPPED_PREFIX) else host


def _with_own(elements: list[Element], own: tuple[Element, ...]) -> list[Element]:
    """The chain order of a connection with elements of its own: the proxy's,
    then its own, then the proxy's that keep the last place (a capture)."""
    if not own:
        return elements
    index = len(elements)
    while index and elements[index - 1].keep_last:
        index -= 1
    return [*elements[:index], *own, *elements[index:]]


def _stages(elements: list[Element], attached: Attached,
            direction: Direction) -> list[tuple[object, Stage]]:
    out: list[tuple[object, Stage]] = []
    for element in elements:
        attachment = attached.get(element)
        if attachment is not None:
            stage = attachment.stage(direction)
            if stage is not None:
                out.append((element, stage))
    return out


class _Route:
    """One SNI route as the route phase sees it: its name and its upstreams."""

    __slots__ = ("name", "pool")

    def __init__(self, name: str, pool: UpstreamSet) -> None:
        self.name = name
        self.pool = pool


_Failure = tuple[UpstreamState, DialFailure, str]
"""One failed attempt: the upstream, why, and the detail."""


class _Relayed:
    """What the service keeps of a relayed connection (the relay keeps the rest):
    smaller than the :class:`Connection`, which is dropped once relaying, so an
    idle connection costs what it did before the phases existed."""

    __slots__ = ("attached", "target", "failures", "lease", "own")

    def __init__(self, attached: Attached, target: UpstreamState,
                 failures: list[_Failure] | None, lease: str | None) -> None:
        self.attached = attached
        self.target = target
        self.failures = failures
        self.lease = lease
        self.own: tuple[Element, ...] = ()
        """Elements of this connection alone (added through the admin API)."""

    def own_attached(self) -> Attached:
        """The attachments, as a dict of this connection's own (to add to)."""
        if self.attached is _NO_ATTACHMENTS:
            self.attached = {}
        return self.attached


class _Failing:
    """The last logged failure of one upstream (rate-limited logging)."""

    __slots__ = ("failure", "logged_at", "unlogged")

    def __init__(self, failure: DialFailure, logged_at: float) -> None:
        self.failure = failure
        self.logged_at = logged_at
        self.unlogged = 0


_NO_CANDIDATES: list[Any] = []
"""Shared stand-in once a connection has dialled (never appended to)."""


class Connection(Dialer):
    """One client connection, through its phases (see the module's theory).

    It is the dialer of its own upstream (a :class:`~midway.upstream.dial.Dialer`
    subclass), so the hot path allocates one object per connection besides its
    :class:`~midway.chain.base.ConnectionInfo`; it is the
    service's record of the connection until the relay starts (then a smaller
    ``_Relayed`` record replaces it).  To an inbound or outbound layer it is the
    :class:`~midway.layers.base.LayerConnection`."""

    __slots__ = ("service", "client", "info", "phase", "started", "attached", "failures",
                 "pending", "_route", "upstream", "work", "cancelled", "client_end",
                 "upstream_end", "lease", "spare", "layer")

    def __init__(self, service: ProxyService, client: socket.socket, addr: object,
                 listener: Listener) -> None:
        loop = listener.loop
        self.init_dial(loop, _NO_CANDIDATES, service.config.connect_timeout_s, service.resolve,
                       poller=listener.poller, deadlines=listener.deadlines)
        self.service = service
        self.client = client
        self.phase = _ACCEPT
        self.started = time.perf_counter()  # not the loop's: uvloop's counts whole ms
        local = listener.local
        if local is not None or listener.address.is_unix:
            text = listener.local_text  # one string for every connection
        else:  # a wildcard listener: this connection's own local address
            local = _ip_pair(_sockname(client))
            text = format_sockaddr(local) if local else listener.bound
        self.info = ConnectionInfo(
            id=service.host.next_connection_id(),
            proxy=service.config.name,
            peer=addr,  # ConnectionInfo.client is formatted from it when first read
            listener=text,
            started_at=time.time(),
            sequence=service.accepted,
            # _ip_pair, inline for an IPv4 address (accept's (str, int) already):
            client_addr=addr if type(addr) is tuple and len(addr) == 2 else _ip_pair(addr),
            local_addr=local,
        )
        client.setblocking(False)
        if service.config.tcp_nodelay and listener.nodelay is not True \
                and self.info.client_addr is not None:
            _nodelay(client)  # not inherited from the listener (see Listener.set_nodelay)
        if service.keepalive and listener.keepalive != service.keepalive \
                and self.info.client_addr is not None:
            _set_options(client, service.keepalive)  # not inherited (as TCP_NODELAY)
        self.attached: Attached = _NO_ATTACHMENTS
        self.failures: list[_Failure] | None = None
        """The failed attempts (made on the first failure)."""
        self.pending = b""
        """Client bytes inbound layers handed back, for the upstream first."""
        self._route: dict[str, str] | None = None
        self.upstream: socket.socket | None = None
        self.work: asyncio.Task[None] | None = None
        """The task of the inbound, outbound or open phase, when one runs."""
        self.cancelled = False
        self.client_end: Stream | None = None
        self.upstream_end: Stream | None = None
        """Streams that replaced the sockets for the relay (TLS), when a layer did."""
        self.lease: str | None = None
        """This connection's count against its source: the key
        :meth:`SourceLimiter.take` counted it under (given back at *closed*)."""
        self.spare: list[Any] = _NO_CANDIDATES
        """The upstreams not tried yet when one accepted, while an outbound layer
        runs: the next to try if its TLS handshake fails."""
        self.layer: InboundLayer | OutboundLayer | None = None
        """The layer running in the inbound or outbound phase: what the
        connection is waiting for (``GET /connections``' ``state``)."""

    # -- inbound, route, choose, dial ------------------------------------------

    async def run_inbound(self) -> None:
        """The *inbound* phase (in :attr:`work`), then on to *route* and the dial."""
        layer: InboundLayer | None = None
        try:
            for layer in self.service.inbound:
                self.layer = layer
                await layer.accept(self)
        except Exception as exc:
            self.work = None
            self._failed_before_dial(layer, exc)
            return
        self.work = None
        refused = self.service.admit_real_client(self)  # the real client is known now
        if refused is not None:
            self.finish(*refused)
            return
        self.choose_and_dial()

    def choose_and_dial(self) -> None:
        """*route*, *choose*, *dial*."""
        service = self.service
        # route, then choose: the balancer's order (both too short to be seen, so
        # the phase is not stored for them).
        pool: UpstreamSet | None = service.pool
        if self._route is not None:
            self.info.sni = self._route.get("sni")
        if service.routes is not None:
            pool = self._pick_route(service.routes)
        if pool is None:
            return
        addr = self.info.client_addr  # read now: a PROXY header may have replaced it
        if addr is None:
            key = ""
        else:  # _key, inline for the common case
            key = addr[0]
            if key.startswith(_MAPPED_PREFIX):
                key = _key(key)
        candidates = pool.order(key, service.retries)
        if not candidates:  # every upstream down or drained: logged once by the pool
            self.finish(CloseReason.NO_UPSTREAM, "no upstream is up")
            return
        self.candidates = candidates
        self.phase = _DIAL
        self.dial_next()

    def _pick_route(self, routes: SniRoutes[_Route]) -> UpstreamSet | None:
        """The *route* phase of a proxy with SNI routes: the matching route's
        upstreams, else the proxy's own; None (and the connection closed with
        ``no_route``) when it has none."""
        info = self.info
        route = routes.match(info.sni)
        if route is not None:
            info.route = route.name
            return route.pool
        if self.service.pool.upstreams:
            return self.service.pool
        detail = f"no route for {info.sni}" if info.sni else "the client named no server"
        log.info("conn %d (%s) from %s: %s (no_route)", info.id, self.service.name,
                 info.client, detail)
        self.finish(CloseReason.NO_ROUTE, detail)
        return None

    def dial_failed(self, target: UpstreamState, failure: DialFailure, detail: str) -> None:
        if self.failures is None:
            self.failures = []
        self.failures.append((target, failure, detail))
        self.service._attempt_failed(self, target, failure, detail)

    def dial_given_up(self, failure: DialFailure) -> None:
        service = self.service
        info = self.info
        if failure is DialFailure.RESET:
            # The upstream reset right after accepting: the client gets a reset too.
            self.finish(CloseReason.RESET, self.failures[-1][2] if self.failures else "upstream",
                        "upstream")
            return
        failures = self.failures or ()
        detail = "no upstream reachable"
        log.warning("conn %d (%s) from %s: %s: %s", info.id, service.name, info.client, detail,
                    "; ".join(f"{t.address}: {d}" for t, _, d in failures) or failure.value)
        self.finish(CloseReason.CONNECT_FAILED, detail)

    def dial_connected(self, sock: socket.socket, target: UpstreamState) -> None:
        """The upstream accepted: *outbound* (if any), then *open* and *relay*."""
        service = self.service
        if service.outbound:
            self.spare = self.candidates
        self.candidates = _NO_CANDIDATES
        self.upstream = sock
        target.connected()
        if service._failing and not service.outbound:  # else once the layers succeed
            service._upstream_recovered(target)
        info = self.info
        address = target.address
        info.upstream = target.text
        if address.path is None:  # not address.is_unix (a call less)
            info.upstream_addr = target.pair or _ip_pair(_peername(sock))
            if service.elements or service.outbound:
                # An element or a layer may read it, maybe after the socket is
                # closed: now.  (Observers are told only what OpenedConnection
                # names, and the admin API reads it while the socket is open.)
                info.upstream_local_addr = _ip_pair(_sockname(sock))
            else:  # only a live reader (the admin API) may ask: when it does
                info.upstream_local_from(sock)
            if service.config.tcp_nodelay:
                try:  # _nodelay, inline
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            if service.keepalive:
                _set_options(sock, service.keepalive)
        if service.outbound:
            self.work = self.loop.create_task(self._prepare(None))
            return
        self.phase = _OPEN
        try:  # (no elements, the common case: no call)
            attached = self._attach_all() if service.elements else _NO_ATTACHMENTS
        except Exception as exc:
            self._element_failed(exc)
            return
        if attached and any(a.on_open is not None for a in attached.values()):
            self.work = self.loop.create_task(self._prepare(attached))
        else:
            self._relay()

    # -- outbound, open: the phases that may await ---------------------------

    async def _prepare(self, attached: Attached | None) -> None:
        """*outbound* (when ``attached`` is None), *open*, then the relay."""
        watch = _ResetWatch(self.client)
        try:
            if attached is None:
                self.phase = Phase.OUTBOUND
                for layer in self.service.outbound:
                    self.layer = layer
                    await layer.connect(self)
                if self.service._failing:
                    self.service._upstream_recovered(self.target)
                self.phase = _OPEN
                attached = self._attach_all()
            for attachment in list(attached.values()):
                if attachment.on_open is not None:
                    await attachment.on_open(self.info)
        except asyncio.CancelledError:
            if watch.reset is None:
                raise  # stopping (cancel() reports it)
            self.finish(CloseReason.RESET, f"client: {watch.reset}", "client")
            return
        except Rejected as exc:
            log.info("conn %d (%s): rejected: %s", self.info.id, self.service.name, exc)
            self.finish(CloseReason.REJECTED, str(exc))
            return
        except TlsFailed as exc:
            if self.phase is Phase.OUTBOUND:
                self.work = None
                self._upstream_tls_failed(str(exc))
                return
            log.warning("conn %d (%s): tls: %s", self.info.id, self.service.name, exc)
            self.finish(CloseReason.TLS_FAILED, str(exc))
            return
        except OSError as exc:  # the upstream failed while an outbound layer wrote
            self.finish(CloseReason.RESET, f"upstream: {describe_oserror(exc)}", "upstream")
            return
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # one connection only
            self._element_failed(exc)
            return
        finally:
            watch.stop()
        self.work = None
        self._relay()

    def _upstream_tls_failed(self, message: str) -> None:
        """The upstream accepted but its TLS handshake failed: give it up (it
        counts as a failed attempt, towards passive health too, and is listed in
        the access log's ``failures``) and dial the next one, as a refused connect
        would; with none left, close the client (``tls_failed``).  Nothing of the
        client's was sent to it: the relay had not begun."""
        target = self.target
        detail = message.removeprefix(f"upstream {target.address}: ")  # the log names it
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self.poller.forget(upstream.fileno())
            close_socket(self.upstream_end or upstream)
        self.upstream_end = None
        info = self.info
        info.upstream = None
        info.upstream_addr = info.upstream_local_addr = None
        target.abandoned()
        self.candidates, self.spare = self.spare, _NO_CANDIDATES
        self.phase = _DIAL
        self.dial_failed(target, DialFailure.TLS_FAILED, detail)
        if self.candidates:
            self.dial_next(DialFailure.TLS_FAILED)
            return
        log.warning("conn %d (%s): tls: %s", info.id, self.service.name, message)
        self.finish(CloseReason.TLS_FAILED, message)

    def _attach_all(self) -> Attached:
        attached: Attached | None = None
        retired = self.service.retired
        for element in self.service.elements:
            if retired and element in retired:
                continue
            attachment = element.attach(self.info)
            if attachment is not None:
                if attached is None:
                    attached = {}
                attached[element] = attachment
        # No element applies (the common case): the shared empty dict, no allocation.
        self.attached = _NO_ATTACHMENTS if attached is None else attached
        return self.attached

    def _relay(self) -> None:
        """The *relay* phase: the relay owns both sockets from here."""
        service = self.service
        config = service.config
        upstream = self.upstream
        assert upstream is not None
        try:
            relay = Relay(
                self.client_end or self.client, self.upstream_end or upstream, self.info,
                idle_timeout_s=config.idle_timeout_s,
                half_close_timeout_s=config.half_close_timeout_s,
                on_close=service.relay_closed,
                splice=config.splice,
                loop=self.loop,
                client_prefix=self.pending,
                poller=self.poller,
                deadlines=self.deadlines,
            )
        except OSError as exc:
            # A relay that cannot be made (a backstop: it opens no descriptor
            # itself, the compiled relay's engine being opened with the loop's
            # poller, before the first listener): this client is closed; the slot
            # and both sockets are freed.
            log.warning("conn %d (%s) from %s: cannot relay: %s", self.info.id, service.name,
                        self.info.client, describe_oserror(exc))
            self.finish(CloseReason.ERROR, describe_oserror(exc))
            return
        service._connecting.discard(self)
        self.phase = _RELAY
        self.pending = b""
        relay.connect_time_s = time.perf_counter() - self.started
        service.live[relay] = _Relayed(self.attached, self.target, self.failures, self.lease)
        attached = self.attached
        if attached:
            for direction in DIRECTIONS:
                stages = _stages(service.elements, attached, direction)
                if stages:
                    set_stages(relay, direction, stages)
        relay.start()

    # -- endings before the relay --------------------------------------------

    def _failed_before_dial(self, layer: InboundLayer | None, exc: Exception) -> None:
        name = getattr(layer, "name", type(layer).__name__)
        if isinstance(exc, LayerRefused):
            log.log(exc.level, "conn %d (%s) from %s: %s: %s (%s)", self.info.id,
                    self.service.name, self.info.client, name, exc, exc.reason.value)
            self.finish(exc.reason, str(exc))
        elif isinstance(exc, TlsFailed):
            log.info("conn %d (%s) from %s: tls: %s", self.info.id, self.service.name,
                     self.info.client, exc)
            self.finish(CloseReason.TLS_FAILED, str(exc))
        elif isinstance(exc, Rejected):
            log.info("conn %d (%s): rejected by %s: %s", self.info.id, self.service.name, name, exc)
            self.finish(CloseReason.REJECTED, str(exc))
        elif isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
            # A reset as anywhere else, whose detail says when: not relaying yet.
            self.finish(CloseReason.RESET, f"client: {describe_oserror(exc)} (in inbound layer "
                        f"{name})", "client")
        else:
            log.warning("conn %d (%s): inbound layer %s failed (%s); closing this connection",
                        self.info.id, self.service.name, name, exc,
                        exc_info=None if isinstance(exc, TimeoutError) else exc)
            self.finish(CloseReason.ERROR, f"inbound layer {name}: "
                        f"{describe_oserror(exc) if isinstance(exc, TimeoutError) else exc}")

    def _element_failed(self, exc: BaseException) -> None:
        log.error("conn %d (%s): a chain element failed on open (%s); closing this "
                  "connection", self.info.id, self.service.name, exc,
                  exc_info=traceback_of(exc))
        self.finish(CloseReason.ERROR, f"on_open raised {type(exc).__name__}: {exc}")

    def finish(self, reason: CloseReason, detail: str, first_close: str = "proxy", *,
               reset: bool = False) -> None:
        """Close a client that never reached the relay.  With a FIN (the client
        sent nothing that was lost: midway relayed nothing from it), except after a
        reset, which the client gets as a reset too, or when ``reset`` asks for one."""
        service = self.service
        service._connecting.discard(self)
        if self.upstream is not None:
            self.poller.forget(self.upstream.fileno())
            close_socket(self.upstream_end or self.upstream)
            self.upstream = None
        reset = reset or reason is CloseReason.RESET
        self.poller.forget(self.client.fileno())
        close_socket(self.client_end or self.client, reset=reset)
        self.phase = _CLOSED
        service._closed(self.info, self.attached, self.target, self.failures or (), reason,
                        detail, first_close, reset, None, self.lease)

    def cancel(self, reason: CloseReason = CloseReason.SHUTDOWN,
               detail: str = "stopped while connecting", *, reset: bool = False) -> None:
        """Stop before the relay (shutdown, an admin kill): close what is open
        (the client with an RST if ``reset``) and report it."""
        if self.cancelled:
            return
        self.cancelled = True
        self.cancel_dial()
        if self.work is not None:
            self.work.cancel()
            self.work = None
        self.finish(reason, detail, reset=reset)

    # -- what a layer may do (midway.layers.base.LayerConnection) ----------------

    @property
    def route(self) -> dict[str, str]:
        """Route keys set by inbound layers (made on first use)."""
        if self._route is None:
            self._route = {}
        return self._route

    async def recv_client(self, max_bytes: int) -> bytes:
        pending = self.pending
        if pending:  # handed back by an earlier layer: read first, as a stream would
            self.pending = pending[max_bytes:]
            return pending[:max_bytes]
        return await self._recv(max_bytes)

    def unread(self, data: bytes) -> None:
        self.pending += data

    def take_unread(self) -> bytes:
        data, self.pending = self.pending, b""
        return data

    @property
    def client_socket(self) -> socket.socket:
        return self.client

    def replace_client(self, stream: Stream) -> None:
        self.client_end = stream

    @property
    def upstream_socket(self) -> socket.socket:
        if self.upstream is None:
            raise RuntimeError("upstream_socket before the upstream is connected")
        return self.upstream

    @property
    def upstream_address(self) -> Address:
        address: Address = self.target.address
        return address

    def replace_upstream(self, stream: Stream) -> None:
        self.upstream_end = stream

    def set_client(self, host: str, port: int) -> None:
        self.info.client_addr = (host, port)
        self.info.client = format_sockaddr((host, port))

    def set_local(self, host: str, port: int) -> None:
        self.info.local_addr = (host, port)
        self.info.listener = format_sockaddr((host, port))

    async def send_upstream(self, data: bytes) -> None:
        """Write ``data`` to the upstream, waiting on the poller while its buffer is
        full (what a layer writes is small: a header, not a stream), bounded by the
        idle timeout."""
        sock: Endpoint | None = self.upstream_end or self.upstream
        if sock is None:
            raise RuntimeError("send_upstream before the upstream is connected")
        view = memoryview(data)
        idle = self.service.config.idle_timeout_s
        async with asyncio.timeout(idle if idle > 0 else None):
            while view:
                try:
                    view = view[sock.send(view):]
                except (BlockingIOError, InterruptedError):
                    await self._ready(sock, write=True)

    async def _recv(self, max_bytes: int) -> bytes:
        end: Endpoint = self.client_end or self.client
        while True:
            try:
                return end.recv(max_bytes)
            except (BlockingIOError, InterruptedError):
                await self._ready(self.client, write=False)

    async def _ready(self, sock: Endpoint, *, write: bool) -> None:
        """Wait until ``sock`` is readable (writable), or failed: the next call on
        it then raises."""
        fut: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        fd = sock.fileno()
        (self.poller.add_writer if write else self.poller.add_reader)(fd, ready)
        try:
            await fut
        finally:
            (self.poller.remove_writer if write else self.poller.remove_reader)(fd)


_NO_ATTACHMENTS: Attached = {}
"""Shared, never written: the attachments of a connection to which no element
applies (or before *open*); :meth:`_Relayed.own_attached` replaces it before a write."""


class _ResetWatch:
    """While ``on_open`` callbacks (or outbound layers) run, watch the client for a
    reset and cancel the task running them if one comes (they would otherwise run
    to their bound for a client that is gone).  Data or a FIN from the client ends
    the watch: a reader is level-triggered, and a half-closed client may still want
    the answer, so both wait for the relay, which passes them on."""

    __slots__ = ("poller", "sock", "fd", "task", "reset")

    def __init__(self, sock: socket.socket) -> None:
        # On the relay's poller, not the loop: uvloop would miss a reset that
        # comes with data (see midway.core.poller), and the relay reuses the
        # registration.
        self.poller = poller_for(asyncio.get_running_loop())
        self.sock = sock
        self.fd = sock.fileno()
        self.task = asyncio.current_task()
        self.reset: str | None = None
        self.poller.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.reset = describe_oserror(exc)
            if self.task is not None:
                self.task.cancel()
        self.stop()

    def stop(self) -> None:
        if self.fd >= 0:
            self.poller.remove_reader(self.fd)
            self.fd = -1


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _keepalive(config: ProxyConfig) -> SocketOptions:
    """``tcp_keepalive_*`` as the options to set (``()``: keepalive is off)."""
    if not config.tcp_keepalive_s:
        return ()
    return keepalive_options(config.tcp_keepalive_s, config.tcp_keepalive_interval_s,
                             config.tcp_keepalive_probes)


def _set_options(sock: socket.socket, options: SocketOptions) -> None:
    try:
        set_options(sock, options)
    except OSError:
        pass


def _sockname(sock: socket.socket) -> object:
    try:
        return sock.getsockname()
    except OSError:
        return ""


def _peername(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return ""


def _ip_pair(addr: object) -> tuple[str, int] | None:
    """(host, port) of a socket address; an IPv4 one already is (no copy)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        if len(addr) == 2 and type(addr[0]) is str and type(addr[1]) is int:
            return addr
        return (str(addr[0]), int(addr[1]))
    return None
