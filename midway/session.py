"""One running proxy: its listeners, its upstreams, its chain elements and its live
connections (the "session" stage of the data flow).

For each accepted client a short-lived task dials an upstream (round-robin, next on
failure), attaches the chain elements, runs their ``on_open`` callbacks and hands
both sockets to a :class:`~midway.core.relay.Relay`; from then on the connection
lives on readiness callbacks alone, with no task.

A :class:`ProxyService` can be changed while live: its elements
(:meth:`add_element`, :meth:`remove_element`, :meth:`replace_element`) apply to open
connections too, and :meth:`reconfigure` swaps settings and upstreams for new
connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from .chain.base import DIRECTIONS, Attachment, ConnectionInfo, Direction, Element, Stage
from .config.addresses import format_sockaddr
from .config.schema import ProxyConfig
from .core.listener import Listener, open_listening_socket
from .core.observer import CloseReason, CloseRecord
from .core.relay import Relay, close_socket, socket_options
from .errors import ListenError, Rejected, UpstreamError
from .upstream.dial import dial
from .upstream.pool import UpstreamPool

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["ProxyService"]

log = logging.getLogger("midway")

Attached = dict[Element, Attachment]


class ProxyService:
    """A named proxy inside a :class:`~midway.runtime.Runtime`."""

    def __init__(self, config: ProxyConfig, runtime: Runtime,
                 elements: Iterable[Element] = ()) -> None:
        self.config = config
        self.runtime = runtime
        self.pool = UpstreamPool(config.upstreams, config.balance)
        self.listeners: list[Listener] = []
        self.elements: list[Element] = list(elements)
        self.live: dict[Relay, Attached] = {}
        self._dialing: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.active = 0
        self.accepting = False
        self.enabled = True

    @property
    def name(self) -> str:
        return self.config.name

    # -- listeners -------------------------------------------------------------

    def bind(self) -> None:
        """Open every listener (not yet accepting).  All or nothing: on failure the
        ones opened are closed and :class:`ListenError` names the address."""
        socks = []
        try:
            for address in self.config.listen:
                socks.append((address, open_listening_socket(
                    address, self.config.backlog, reuse_port=self.runtime.reuse_port)))
        except ListenError:
            for _, sock in socks:
                sock.close()
            raise
        self.listeners = [
            Listener(address, sock, self._on_accept, self._can_accept) for address, sock in socks
        ]

    def start_accepting(self) -> None:
        self.accepting = True
        for listener in self.listeners:
            listener.resume()
            log.info("%s: listening on %s, forwarding to %s", self.name, listener.bound,
                     ", ".join(str(u) for u in self.pool.upstreams))

    def stop_accepting(self) -> None:
        self.accepting = False
        for listener in self.listeners:
            listener.pause()

    def close_listeners(self) -> None:
        self.accepting = False
        for listener in self.listeners:
            listener.close()
        self.listeners = []

    def room_changed(self) -> None:
        """A slot may have freed up: resume listeners paused at a limit."""
        if self.accepting and self._can_accept():
            for listener in self.listeners:
                listener.resume()

    def _can_accept(self) -> bool:
        limit = self.config.max_connections
        return (self.accepting and (limit == 0 or self.active < limit)
                and self.runtime.has_room())

    @property
    def addresses(self) -> list[str]:
        """The bound listen addresses (real ports when 0 was configured)."""
        return [listener.bound for listener in self.listeners]

    # -- connections ---------------------------------------------------------

    def _on_accept(self, client: socket.socket, addr: object) -> None:
        self.accepted += 1
        self.active += 1
        self.runtime.connection_opened()
        task = asyncio.get_running_loop().create_task(
            self._start_session(client, addr, self.accepted))
        self._dialing.add(task)
        task.add_done_callback(self._dialing.discard)

    async def _start_session(self, client: socket.socket, addr: object, sequence: int) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        info = ConnectionInfo(
            id=self.runtime.next_connection_id(),
            proxy=self.name,
            client=format_sockaddr(addr),
            listener=format_sockaddr(_sockname(client)),
            started_at=time.time(),
            sequence=sequence,
            client_addr=_ip_pair(addr),
            local_addr=_ip_pair(_sockname(client)),
        )
        started = loop.time()
        upstream: socket.socket | None = None
        try:
            socket_options(client, config.tcp_nodelay)
            upstream = await self._dial_any(info)
            if upstream is None:
                self._not_relayed(client, info, started, CloseReason.CONNECT_FAILED,
                                  "no upstream reachable")
                return
            socket_options(upstream, config.tcp_nodelay)
            connect_time = loop.time() - started
            attached = self._attach_all(info)
            for attachment in attached.values():
                if attachment.on_open is not None:
                    await attachment.on_open(info)
        except asyncio.CancelledError:
            if upstream is not None:
                close_socket(upstream)
            self._not_relayed(client, info, started, CloseReason.SHUTDOWN, "stopped while connecting")
            raise
        except Rejected as exc:
            assert upstream is not None
            close_socket(upstream)
            log.info("conn %d (%s): rejected: %s", info.id, self.name, exc)
            self._not_relayed(client, info, started, CloseReason.REJECTED, str(exc))
            return
        except Exception as exc:
            if upstream is not None:
                close_socket(upstream)
            log.error("conn %d (%s): a chain element failed on open; closing this connection",
                      info.id, self.name, exc_info=exc)
            self._not_relayed(client, info, started, CloseReason.ERROR,
                              f"on_open raised {type(exc).__name__}: {exc}")
            return
        relay = Relay(
            client, upstream, info,
            idle_timeout_s=config.idle_timeout_s,
            half_close_timeout_s=config.half_close_timeout_s,
            on_close=self._relay_closed,
            splice=config.splice,
        )
        relay.connect_time_s = connect_time
        self.live[relay] = attached
        for direction in DIRECTIONS:
            stages = _stages(self.elements, attached, direction)
            if stages:
                relay.set_stages(direction, stages)
        relay.start()

    async def _dial_any(self, info: ConnectionInfo) -> socket.socket | None:
        failures = []
        for candidate in self.pool.candidates():
            try:
                sock = await dial(candidate, self.config.connect_timeout_s)
            except UpstreamError as exc:
                failures.append(str(exc))
                continue
            info.upstream = str(candidate)
            info.upstream_addr = _ip_pair(_peername(sock))
            info.upstream_local_addr = _ip_pair(_sockname(sock))
            return sock
        log.warning("conn %d (%s) from %s: no upstream reachable: %s", info.id, self.name,
                    info.client, "; ".join(failures))
        return None

    def _attach_all(self, info: ConnectionInfo) -> Attached:
        attached: Attached = {}
        for element in self.elements:
            attachment = element.attach(info)
            if attachment is not None:
                attached[element] = attachment
        return attached

    def _not_relayed(self, client: socket.socket, info: ConnectionInfo, started: float,
                     reason: CloseReason, detail: str) -> None:
        close_socket(client)
        duration = asyncio.get_running_loop().time() - started
        self._report(CloseRecord(
            proxy=self.name, id=info.id, client=info.client, listener=info.listener,
            upstream=info.upstream, connect_time_s=None, bytes_up=0, bytes_down=0,
            duration_s=round(duration, 6), first_close="proxy", reason=reason.value,
            detail=detail, path="none", started_at=info.started_at,
        ))
        self._slot_freed()

    def _relay_closed(self, relay: Relay) -> None:
        attached = self.live.pop(relay, {})
        info = relay.info
        reason = relay.reason.value if relay.reason else CloseReason.EOF.value
        for attachment in attached.values():
            if attachment.on_close is not None:
                try:
                    attachment.on_close(info, reason)
                except Exception:
                    log.exception("conn %d (%s): an element's on_close failed", info.id, self.name)
        duration = time.time() - info.started_at
        self._report(CloseRecord(
            proxy=self.name, id=info.id, client=info.client, listener=info.listener,
            upstream=info.upstream,
            connect_time_s=round(relay.connect_time_s, 6),
            bytes_up=relay.bytes_up, bytes_down=relay.bytes_down,
            duration_s=round(duration, 6), first_close=relay.first_close or "proxy",
            reason=reason, detail=relay.detail, path=relay.path, started_at=info.started_at,
        ))
        if relay.reason in (CloseReason.RESET, CloseReason.ERROR):
            log.debug("conn %d (%s): %s %s", info.id, self.name, reason, relay.detail)
        self._slot_freed()

    def _report(self, record: CloseRecord) -> None:
        self.runtime.report(record)

    def _slot_freed(self) -> None:
        self.active -= 1
        self.runtime.connection_closed()

    # -- live changes ------------------------------------------------------

    def add_element(self, element: Element, index: int | None = None) -> None:
        """Add a chain element, to new connections and to every open one."""
        if index is None:
            self.elements.append(element)
        else:
            self.elements.insert(index, element)
        for relay, attached in list(self.live.items()):
            attachment = element.attach(relay.info)
            if attachment is not None:
                attached[element] = attachment
                self._restage(relay, attached)

    def remove_element(self, element: Element) -> None:
        """Remove a chain element everywhere; held bytes are flushed, none lost."""
        self.elements.remove(element)
        for relay, attached in list(self.live.items()):
            if attached.pop(element, None) is not None:
                self._restage(relay, attached)

    def replace_element(self, old: Element, new: Element) -> None:
        """Swap ``old`` for ``new`` in place (same position), live."""
        index = self.elements.index(old)
        self.elements[index] = new
        for relay, attached in list(self.live.items()):
            attached.pop(old, None)
            attachment = new.attach(relay.info)
            if attachment is not None:
                attached[new] = attachment
            self._restage(relay, attached)

    def _restage(self, relay: Relay, attached: Attached) -> None:
        for direction in DIRECTIONS:
            relay.set_stages(direction, _stages(self.elements, attached, direction))

    def reconfigure(self, config: ProxyConfig) -> None:
        """Use new settings and upstreams for new connections.  Listen addresses
        must be rebound by the runtime (see :meth:`Runtime.update_proxy`)."""
        self.config = replace(config, listen=config.listen)
        self.pool = UpstreamPool(config.upstreams, config.balance)

    def close_connections(self, reason: CloseReason = CloseReason.SHUTDOWN) -> None:
        """Close every open connection now, and cancel those still connecting."""
        for task in list(self._dialing):
            task.cancel()
        for relay in list(self.live):
            relay.close(reason, "proxy stopping")


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
    if isinstance(addr, tuple) and len(addr) >= 2:
        return (str(addr[0]), int(addr[1]))
    return None
