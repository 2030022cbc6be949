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
import errno
import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .chain.base import DIRECTIONS, Attachment, ConnectionInfo, Direction, Element, Stage
from .config.addresses import Address, format_sockaddr
from .config.schema import ProxyConfig
from .core.listener import Listener, open_listening_socket
from .core.observer import CloseReason, CloseRecord
from .core.poller import poller_for
from .core.relay import Relay, close_socket
from .errors import ListenError, Rejected, UpstreamError, describe_oserror
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
        self._connecting: set[_Connecting] = set()
        self.accepted = 0
        self.active = 0
        self.accepting = False
        self.enabled = True
        self.retired: set[Element] = set()
        """Elements a reload replaced (see :meth:`retire_elements`)."""

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

    def _on_accept(self, client: socket.socket, addr: object, listener: Listener) -> None:
        self.accepted += 1
        self.active += 1
        self.runtime.connection_opened()
        config = self.config
        local = listener.local or _ip_pair(_sockname(client))
        info = ConnectionInfo(
            id=self.runtime.next_connection_id(),
            proxy=self.name,
            client=format_sockaddr(addr),
            listener=format_sockaddr(local) if local else listener.bound,
            started_at=time.time(),
            sequence=self.accepted,
            client_addr=_ip_pair(addr),
            local_addr=local,
        )
        client.setblocking(False)
        if config.tcp_nodelay and info.client_addr is not None:
            _nodelay(client)
        connecting = _Connecting(self, client, info, self.pool.candidates())
        self._connecting.add(connecting)
        connecting.next()

    def _connected(self, connecting: _Connecting, upstream: socket.socket,
                   address: Address) -> None:
        """An upstream accepted: attach the elements, run their ``on_open``, relay."""
        info = connecting.info
        info.upstream = str(address)
        if not address.is_unix:
            info.upstream_addr = (address.host, address.port) if address.is_ip_literal \
                else _ip_pair(_peername(upstream))
            info.upstream_local_addr = _ip_pair(_sockname(upstream))
            if self.config.tcp_nodelay:
                _nodelay(upstream)
        connect_time = time.perf_counter() - connecting.started
        try:
            attached = self._attach_all(info)
        except Exception as exc:
            self._element_failed(connecting, upstream, exc)
            return
        connecting.attached = attached
        opens = [a.on_open for a in attached.values() if a.on_open is not None]
        if opens:
            connecting.task = asyncio.get_running_loop().create_task(
                self._open_then_relay(connecting, upstream, attached, opens, connect_time))
        else:
            self._relay(connecting, upstream, attached, connect_time)

    async def _open_then_relay(self, connecting: _Connecting, upstream: socket.socket,
                               attached: Attached, opens: list[Any],
                               connect_time: float) -> None:
        info = connecting.info
        watch = _ResetWatch(connecting.client)
        try:
            for on_open in opens:
                await on_open(info)
        except asyncio.CancelledError:
            connecting.discard(upstream)
            if watch.reset is None:
                raise  # stopping (connecting.cancel() reports it)
            self._connecting.discard(connecting)
            self._not_relayed(connecting, CloseReason.RESET, f"client: {watch.reset}")
            return
        except Rejected as exc:
            connecting.discard(upstream)
            log.info("conn %d (%s): rejected: %s", info.id, self.name, exc)
            self._connecting.discard(connecting)
            self._not_relayed(connecting, CloseReason.REJECTED, str(exc))
            return
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # one connection only
            self._element_failed(connecting, upstream, exc)
            return
        finally:
            watch.stop()
        connecting.task = None
        self._relay(connecting, upstream, attached, connect_time)

    def _element_failed(self, connecting: _Connecting, upstream: socket.socket,
                        exc: BaseException) -> None:
        info = connecting.info
        connecting.discard(upstream)
        log.error("conn %d (%s): a chain element failed on open (%s); closing this "
                  "connection", info.id, self.name, exc, exc_info=exc)
        self._connecting.discard(connecting)
        self._not_relayed(connecting, CloseReason.ERROR,
                          f"on_open raised {type(exc).__name__}: {exc}")

    def _relay(self, connecting: _Connecting, upstream: socket.socket, attached: Attached,
               connect_time: float) -> None:
        self._connecting.discard(connecting)
        config = self.config
        relay = Relay(
            connecting.client, upstream, connecting.info,
            idle_timeout_s=config.idle_timeout_s,
            half_close_timeout_s=config.half_close_timeout_s,
            on_close=self._relay_closed,
            splice=config.splice,
            loop=connecting.loop,
        )
        relay.connect_time_s = connect_time
        self.live[relay] = attached
        if attached:
            for direction in DIRECTIONS:
                stages = _stages(self.elements, attached, direction)
                if stages:
                    relay.set_stages(direction, stages)
        relay.start()

    def _connect_failed(self, connecting: _Connecting) -> None:
        info = connecting.info
        self._connecting.discard(connecting)
        log.warning("conn %d (%s) from %s: no upstream reachable: %s", info.id, self.name,
                    info.client, "; ".join(connecting.failures))
        self._not_relayed(connecting, CloseReason.CONNECT_FAILED, "no upstream reachable")

    def _attach_all(self, info: ConnectionInfo) -> Attached:
        attached: Attached = {}
        for element in self.elements:
            if element in self.retired:
                continue
            attachment = element.attach(info)
            if attachment is not None:
                attached[element] = attachment
        return attached

    def _not_relayed(self, connecting: _Connecting, reason: CloseReason, detail: str,
                     first_close: str = "proxy") -> None:
        """Close a client that never reached the relay.  With a FIN (the client
        sent nothing that was lost: midway read nothing from it), except after an
        upstream reset, which the client gets as a reset too."""
        info = connecting.info
        reset = reason is CloseReason.RESET
        connecting.poller.forget(connecting.client.fileno())
        close_socket(connecting.client, reset=reset)
        info.first_close = first_close
        info.reset = reset
        info.close_detail = detail
        # Elements attached before the refusal get their on_close too.
        for attachment in connecting.attached.values():
            if attachment.on_close is not None:
                try:
                    attachment.on_close(info, reason.value)
                except Exception:
                    log.exception("conn %d (%s): an element's on_close failed", info.id, self.name)
        if self.runtime.observers:
            duration = time.perf_counter() - connecting.started
            self._report(CloseRecord(
                proxy=self.name, id=info.id, client=info.client, listener=info.listener,
                upstream=info.upstream, connect_time_s=None, bytes_up=0, bytes_down=0,
                duration_s=round(duration, 6), first_close=first_close, reason=reason.value,
                detail=detail, path="none", started_at=info.started_at,
            ))
        self._slot_freed()

    def _relay_closed(self, relay: Relay) -> None:
        attached = self.live.pop(relay, {})
        info = relay.info
        reason = relay.reason.value if relay.reason else CloseReason.EOF.value
        info.first_close = relay.first_close or "proxy"
        info.close_detail = relay.detail
        # The relay resets the sockets for these reasons, and for an element's
        # Output.reset, which it does not yet tell apart from Output.close.
        info.reset = relay.reset
        for attachment in attached.values():
            if attachment.on_close is not None:
                try:
                    attachment.on_close(info, reason)
                except Exception:
                    log.exception("conn %d (%s): an element's on_close failed", info.id, self.name)
        if self.runtime.observers:
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
        if self.retired:
            self._release_retired()

    # -- live changes ------------------------------------------------------

    def add_element(self, element: Element, index: int | None = None) -> None:
        """Add a chain element, to new connections and to every open one.  With no
        ``index`` it goes last, but before elements that keep the last place."""
        if index is None:
            index = len(self.elements)
            while index and self.elements[index - 1].keep_last:
                index -= 1
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

    def retire_elements(self, chain: list[Element], retired: Iterable[Element]) -> None:
        """Take a rebuilt chain (a reload): ``chain`` is the new element list, in
        which each ``retired`` element keeps its place for the open connections
        attached to it.  No new connection attaches to a retired element; each is
        closed and dropped once no connection holds it any more."""
        self.elements = chain
        self.retired.update(retired)
        self._release_retired()

    def _release_retired(self) -> None:
        held = {e for attached in self.live.values() for e in attached if e in self.retired}
        held.update(e for c in self._connecting for e in c.attached if e in self.retired)
        for element in [e for e in self.retired if e not in held]:
            self.retired.discard(element)
            self.elements.remove(element)
            try:
                element.close()
            except Exception:
                log.exception("%s: chain element %s failed to close", self.name, element.name)

    def _restage(self, relay: Relay, attached: Attached) -> None:
        for direction in DIRECTIONS:
            relay.set_stages(direction, _stages(self.elements, attached, direction))

    def reconfigure(self, config: ProxyConfig) -> None:
        """Use new settings and upstreams for new connections.  Listen addresses
        must be rebound by the runtime (see :meth:`Runtime.update_proxy`)."""
        self.config = config
        self.pool = UpstreamPool(config.upstreams, config.balance)

    def close_connections(self, reason: CloseReason = CloseReason.SHUTDOWN,
                          detail: str = "proxy stopping") -> None:
        """End every open connection now (a FIN where nothing is in flight, else a
        reset: see :meth:`Relay.close`), and cancel those still connecting."""
        for connecting in list(self._connecting):
            connecting.cancel()
        for relay in list(self.live):
            relay.close(reason, detail)


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


class _Connecting:
    """Dials the upstreams in order for one accepted client.

    IP-literal upstreams are dialled by readiness callbacks alone (a non-blocking
    ``connect``, a writer on the relay's poller and a timer: no task, no future),
    the common case kept cheap; host names and unix sockets go through
    :func:`~midway.upstream.dial.dial` in a task.  The connect timeout applies to
    each upstream in turn.

    The connected socket is handed over still registered on the poller: removing
    the writer only updates its table, and the relay's first ``add_reader`` turns
    the kernel's interest from writable to readable in one ``epoll_ctl`` (see
    :mod:`midway.core.poller`)."""

    __slots__ = ("service", "loop", "poller", "client", "info", "started", "candidates",
                 "failures", "sock", "address", "timer", "task", "cancelled", "attached")

    def __init__(self, service: ProxyService, client: socket.socket, info: ConnectionInfo,
                 candidates: list[Address]) -> None:
        self.service = service
        self.loop = asyncio.get_running_loop()
        self.poller = poller_for(self.loop)
        self.client = client
        self.info = info
        self.started = time.perf_counter()  # not the loop's: uvloop's counts whole ms
        self.candidates = candidates
        self.failures: list[str] = []
        self.sock: socket.socket | None = None
        self.address: Address | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self.attached: Attached = {}

    def next(self) -> None:
        """Try the next upstream, or report that none could be reached."""
        timeout = self.service.config.connect_timeout_s
        while self.candidates:
            address = self.candidates.pop(0)
            if not address.is_ip_literal:
                self.task = self.loop.create_task(self._dial_task(address))
                return
            try:
                sock = socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET,
                                     _NONBLOCKING_STREAM)
            except OSError as exc:  # out of descriptors
                self.failures.append(f"{address}: {describe_oserror(exc)}")
                continue
            err = sock.connect_ex((address.host, address.port))
            if err == 0:
                self.service._connected(self, sock, address)
                return
            if err == errno.EINPROGRESS:
                self.sock, self.address = sock, address
                self.poller.add_writer(sock.fileno(), self._on_writable)
                if timeout > 0:
                    self.timer = self.loop.call_later(timeout, self._on_timeout)
                return
            sock.close()
            self.failures.append(f"{address}: {describe_oserror(OSError(err, os.strerror(err)))}")
        self.service._connect_failed(self)

    def _take(self) -> tuple[socket.socket, Address]:
        sock, address = self.sock, self.address
        assert sock is not None and address is not None
        self.poller.remove_writer(sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.sock = self.address = None
        return sock, address

    def _on_writable(self) -> None:
        sock, address = self._take()
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err in _RESET_AFTER_CONNECT:
            # The upstream accepted, then reset before the relay began: reading
            # SO_ERROR consumed the error (a later recv would return 0, a clean
            # end), so pass the reset on here.  Not a connect failure: trying the
            # next upstream would replay a connection this one already took.
            self.discard(sock)
            self.service._connecting.discard(self)
            self.service._not_relayed(self, CloseReason.RESET,
                                      f"upstream: {describe_oserror(OSError(err, os.strerror(err)))}",
                                      "upstream")
            return
        if err:
            self.discard(sock)
            self.failures.append(f"{address}: {describe_oserror(OSError(err, os.strerror(err)))}")
            self.next()
            return
        self.service._connected(self, sock, address)

    def discard(self, sock: socket.socket) -> None:
        """Close an upstream socket that will not be relayed."""
        self.poller.forget(sock.fileno())
        close_socket(sock)

    def _on_timeout(self) -> None:
        self.timer = None
        sock, address = self._take()
        self.discard(sock)
        self.failures.append(
            f"{address}: connect timed out after {self.service.config.connect_timeout_s:g} s")
        self.next()

    async def _dial_task(self, address: Address) -> None:
        try:
            sock = await dial(address, self.service.config.connect_timeout_s)
        except UpstreamError as exc:
            self.task = None
            self.failures.append(str(exc))
            self.next()
            return
        self.task = None
        self.service._connected(self, sock, address)

    def cancel(self) -> None:
        """Stop connecting (shutdown): close what is open and report it."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.sock is not None:
            sock, _ = self._take()
            self.discard(sock)
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.service._connecting.discard(self)
        self.service._not_relayed(self, CloseReason.SHUTDOWN, "stopped while connecting")


class _ResetWatch:
    """While ``on_open`` callbacks run, watch the client for a reset and cancel
    the task running them if one comes (they would otherwise run to their bound
    for a client that is gone).  Data or a FIN from the client ends the watch: a
    reader is level-triggered, and a half-closed client may still want the
    answer, so both wait for the relay, which passes them on."""

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


_RESET_AFTER_CONNECT = frozenset({errno.ECONNRESET, errno.EPIPE})
"""``SO_ERROR`` values of a connection that was established and then reset (a
refused connect is ECONNREFUSED)."""

# One syscall for a non-blocking socket where the platform allows it.
_NONBLOCKING_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
    if isinstance(addr, tuple) and len(addr) >= 2:
        return (str(addr[0]), int(addr[1]))
    return None
