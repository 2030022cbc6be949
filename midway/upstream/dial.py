"""Connecting to an upstream: the one dialer, and why a dial failed.

Theory of operation
-------------------
A :class:`Dialer` tries, for one connection, a list of upstreams in order (the
balancer's order) until one accepts.  Each upstream gets its own connect timeout,
which covers its name lookup and every address the lookup returned.

* **IP literals** (the common case, kept cheap: the hot path of connection rate) are
  dialled by readiness callbacks alone: a non-blocking ``connect``, a writer on the
  relay's poller (:func:`midway.core.poller.poller_for`) and one deadline
  (:mod:`midway.core.deadlines`: no loop timer of its own).  No task, no future.
  An upstream on the same host (loopback) has usually completed the handshake
  inside ``connect`` already, though a non-blocking ``connect`` still says
  "in progress": one ``getsockopt(TCP_INFO)`` tells, and such a dial ends there,
  with no writer, no wake-up and no deadline.  Addresses whose handshakes take a
  round trip stop being asked after a few misses (then once in a while).
* **Host names** are resolved for each connection (DNS changes are followed) by an
  injectable :data:`Resolver`, by default the loop's ``getaddrinfo`` (which runs off
  the loop); the task that awaits it ends there, and every address returned is then
  tried in turn, in the resolver's order, by the same callback connect.  Each address
  gets a share of the time left, as Go's dialer gives it: the time left divided by
  the addresses left, but at least :data:`ADDRESS_MIN_S` (or all that is left), so
  that an address that never answers (an AAAA record where IPv6 is black-holed)
  leaves time for the next one instead of timing the whole name out.
* **Unix sockets** take the callback connect too.

Each failed attempt is reported once with a :class:`DialFailure` and a detail string
(``connection refused``, ``connect timed out after 5 s``; for a name, each address
tried and how it failed, ``[::1]:80: connection refused; 127.0.0.2:80: no answer``,
so a log line says what the name resolved to): the service logs it, the
access log records it, the upstream's passive health and a metrics observer count
it, all from the same value.  An upstream that accepts and then resets before the
relay begins (``SO_ERROR`` is ``ECONNRESET``) is :attr:`DialFailure.RESET`, and the
dialer stops there: the client is reset in turn, and trying the next upstream would
replay a connection this one already took.

The connected socket is handed over still registered on the poller: removing the
writer only updates the poller's table, and the relay's first ``add_reader`` turns
the kernel's interest from writable to readable in one ``epoll_ctl`` (see
:mod:`midway.core.poller`).  A dial that ended inside ``connect`` hands over a
socket never registered: the relay's one ``epoll_ctl`` adds it.

A :class:`Dialer` is subclassed by the object that owns the connection (the
service's per-connection object), so that a connection is one allocation; it is
told of progress through three methods it overrides.  :func:`dial` wraps it in a
coroutine for callers that want one (health checks).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..config.addresses import Address, format_sockaddr
from ..core.deadlines import Deadlines, deadlines_for
from ..core.perloop import PerLoop
from ..core.poller import LoopPoller, Poller, poller_for
from ..core.relay import close_socket
from ..errors import UpstreamError, describe_oserror

__all__ = ["dial", "Resolver", "Dialer", "DialFailure", "Target", "failure_of",
           "loop_resolver", "ADDRESS_MIN_S"]

Resolver = Callable[[str, int], Awaitable[list[tuple[int, Any]]]]
"""``resolve(host, port)`` → [(family, sockaddr), ...]; raises :class:`socket.gaierror`
when the name does not resolve.  Injectable for tests."""


class DialFailure(enum.StrEnum):
    """Why one attempt to reach an upstream failed (logs, access log, metrics and
    passive health all read this value)."""

    REFUSED = "refused"
    """Nothing listens there (ECONNREFUSED)."""
    TIMED_OUT = "timed_out"
    """No answer within ``connect_timeout_s`` (name lookup included)."""
    UNREACHABLE = "unreachable"
    """No route to the host or network, or no such unix socket."""
    RESOLVE_FAILED = "resolve_failed"
    """The host name did not resolve."""
    RESET = "reset"
    """The upstream accepted, then reset before the relay began."""
    NO_UPSTREAM = "no_upstream"
    """No upstream was eligible (all down or drained); nothing was dialled."""
    OUT_OF_DESCRIPTORS = "out_of_descriptors"
    """midway could not open a socket (EMFILE, ENFILE)."""
    TLS_FAILED = "tls_failed"
    """The upstream accepted, then the TLS handshake with it failed
    (``upstream_tls``: told by the service, after the dial)."""
    OTHER = "other"


_FAILURES: dict[int, DialFailure] = {
    errno.ECONNREFUSED: DialFailure.REFUSED,
    errno.ETIMEDOUT: DialFailure.TIMED_OUT,
    errno.ENETUNREACH: DialFailure.UNREACHABLE,
    errno.EHOSTUNREACH: DialFailure.UNREACHABLE,
    errno.ENETDOWN: DialFailure.UNREACHABLE,
    errno.EHOSTDOWN: DialFailure.UNREACHABLE,
    errno.ENOENT: DialFailure.UNREACHABLE,  # a unix socket path that does not exist
    errno.ECONNRESET: DialFailure.RESET,
    errno.EPIPE: DialFailure.RESET,
    errno.EMFILE: DialFailure.OUT_OF_DESCRIPTORS,
    errno.ENFILE: DialFailure.OUT_OF_DESCRIPTORS,
}


def failure_of(err: int | None) -> DialFailure:
    """The :class:`DialFailure` of an ``errno`` value from ``connect``/``socket``."""
    return _FAILURES.get(err or 0, DialFailure.OTHER)


_RESET_AFTER_CONNECT = frozenset({errno.ECONNRESET, errno.EPIPE})
"""``SO_ERROR`` values of a connection that was established and then reset (a
refused connect is ECONNREFUSED)."""

_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN})
"""``connect`` is under way: EINPROGRESS for TCP; EAGAIN for a unix socket whose
listener's backlog is full (asyncio's ``sock_connect`` waits for writable on both)."""

ADDRESS_MIN_S = 2.0
"""The least time one address of a name is given before the next one is tried
(unless less is left of the connect timeout): Go's ``net`` dialer's minimum."""

_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
_ESTABLISHED = b"\x01"
"""``tcpi_state``, the first byte of ``struct tcp_info``, of an established
connection (TCP_ESTABLISHED in linux/tcp_states.h)."""
_MISSES: dict[Any, int] = {}
"""Socket addresses whose connects were still under way when ``connect``
returned, by how many times in a row: a remote upstream, whose handshake takes a
round trip.  After :data:`_MISS_LIMIT` of them it is asked once in
:data:`_REPROBE_EVERY` connects only (a system call each time saved), in case
it is local after all."""
_MISS_LIMIT = 8
_REPROBE_EVERY = 256
_MISSES_MAX = 4096
"""Addresses remembered at most (names may resolve to ever new ones)."""

# One syscall for a non-blocking socket where the platform allows it.
_NONBLOCKING_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


_lookups: PerLoop[dict[tuple[str, int], asyncio.Future[list[tuple[int, Any]]]]] = \
    PerLoop(lambda loop: {})
"""The lookups under way on each loop, by (host, port)."""


async def loop_resolver(host: str, port: int) -> list[tuple[int, Any]]:
    """The default :data:`Resolver`: the running loop's ``getaddrinfo``, which runs
    in the loop's default executor (a few threads).  Connections that ask for the
    same (host, port) while a lookup of it is under way share that lookup's answer
    (as fresh as asking again): a slow or unanswered name holds one thread, not one
    per connection, and so cannot starve the lookups of other names.  A waiter that
    is cancelled (its connect timeout) leaves the lookup to the others."""
    loop = asyncio.get_running_loop()
    under_way = _lookups.get(loop)
    key = (host, port)
    lookup = under_way.get(key)
    if lookup is None:
        lookup = under_way[key] = asyncio.ensure_future(_getaddrinfo(loop, host, port))
        lookup.add_done_callback(lambda done: _lookup_done(under_way, key, done))
    return await asyncio.shield(lookup)


async def _getaddrinfo(loop: asyncio.AbstractEventLoop, host: str,
                       port: int) -> list[tuple[int, Any]]:
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def _lookup_done(under_way: dict[tuple[str, int], Any], key: tuple[str, int],
                 done: asyncio.Future[Any]) -> None:
    """A lookup ended: the next connection asks again (DNS changes are followed).
    Its error is marked retrieved: every waiter may have been cancelled."""
    if under_way.get(key) is done:
        del under_way[key]
    if not done.cancelled():
        done.exception()


class Target(Protocol):
    """What the dialer needs of an upstream (an :class:`~.state.UpstreamState`)."""

    @property
    def address(self) -> Address: ...


class Dialer:
    """Dials ``candidates`` in order for one connection.

    A subclass sets the fields of :meth:`init_dial` and overrides
    :meth:`dial_connected`, :meth:`dial_failed` and :meth:`dial_given_up`; then
    :meth:`dial_next` starts.  Exactly one of ``dial_connected`` (with the socket,
    now the subclass's) or ``dial_given_up`` ends a dial, unless
    :meth:`cancel_dial` came first."""

    __slots__ = ("loop", "poller", "connect_timeout_s", "resolve", "candidates", "target",
                 "sock", "addrs", "sockaddr", "until", "detail", "deadlines", "deadline_token",
                 "task")

    def init_dial(self, loop: asyncio.AbstractEventLoop, candidates: list[Any],
                  connect_timeout_s: float, resolve: Resolver, *,
                  poller: Poller | LoopPoller | None = None,
                  deadlines: Deadlines | None = None) -> None:
        """``poller`` and ``deadlines``: the loop's (:func:`poller_for`,
        :func:`deadlines_for`), when the caller has them at hand (the listener
        does: two look-ups a connection saved)."""
        self.loop = loop
        self.poller: Poller | LoopPoller = poller if poller is not None else poller_for(loop)
        self.connect_timeout_s = connect_timeout_s
        self.resolve = resolve
        self.candidates = candidates
        """Upstreams (:class:`Target`) not tried yet, in order."""
        self.target: Any = None
        """The upstream being dialled (or, after ``dial_connected``, the one connected)."""
        self.sock: socket.socket | None = None
        """The socket whose connect is under way."""
        self.addrs: list[tuple[int, Any]] | None = None
        """The current name's resolved addresses not tried yet."""
        self.sockaddr: Any = None
        """The current name's address being connected to."""
        self.until = 0.0
        """When the current name's connect timeout passes (0: no timeout)."""
        self.detail = ""
        """Each of the current name's addresses tried so far, and how it failed."""
        self.deadlines: Deadlines = deadlines if deadlines is not None else deadlines_for(loop)
        self.deadline_token = 0
        """The connect timeout scheduled (0: none)."""
        self.task: asyncio.Task[None] | None = None
        """The name lookup under way, if any."""

    # -- told to the subclass ------------------------------------------------

    def dial_connected(self, sock: socket.socket, target: Any) -> None:
        """``target`` accepted; ``sock`` (connected, non-blocking, registered on the
        poller) is the subclass's now."""
        raise NotImplementedError

    def dial_failed(self, target: Any, failure: DialFailure, detail: str) -> None:
        """One attempt failed (the dialer moves on to the next upstream unless
        ``failure`` is :attr:`DialFailure.RESET`)."""
        raise NotImplementedError

    def dial_given_up(self, failure: DialFailure) -> None:
        """No upstream left to try (``failure``: the last one's), or the upstream
        reset right after accepting (:attr:`DialFailure.RESET`)."""
        raise NotImplementedError

    # -- the dial --------------------------------------------------------------

    def dial_next(self, failure: DialFailure = DialFailure.NO_UPSTREAM) -> None:
        """Try the next upstream, or give up when none is left (``failure``: how
        the last one failed)."""
        while self.candidates:
            target = self.target = self.candidates.pop(0)
            address: Address = target.address
            if address.is_ip_literal:
                self.addrs = None
                err = self._connect(socket.AF_INET6 if ":" in address.host else socket.AF_INET,
                                    (address.host, address.port))
            elif address.is_unix:
                self.addrs = None
                err = self._connect(socket.AF_UNIX, address.path)
            else:
                self.detail = ""
                self.addrs = []
                if self.connect_timeout_s > 0:
                    self.until = self.loop.time() + self.connect_timeout_s
                    self.deadlines.schedule(self.until, self)
                self.task = self.loop.create_task(self._lookup(address))
                return
            if err is None:
                return
            failure = failure_of(err[0])
            self.dial_failed(target, failure, err[1])
        self.dial_given_up(failure)

    def cancel_dial(self) -> None:
        """Stop dialling (shutdown): close what is open; nothing more is told."""
        self.candidates = []
        if self.sock is not None:
            _discard(self.poller, self._take())
        self._stop_timer()
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def _connect(self, family: int, sockaddr: Any) -> tuple[int, str] | None:
        """Start connecting; ``None`` when it succeeded or is under way, else
        (errno, detail) of the failure."""
        try:
            sock = socket.socket(family, _NONBLOCKING_STREAM)
        except OSError as exc:  # out of descriptors
            return exc.errno or 0, describe_oserror(exc)
        err = sock.connect_ex(sockaddr)
        if err == 0:
            self._connected(sock)
            return None
        if err in _IN_PROGRESS:
            if family != socket.AF_UNIX and _TCP_INFO is not None:
                # An upstream on this host has, nearly always, completed the
                # handshake inside connect() itself: then it is connected now,
                # with no writer, no wake-up and no connect timer.  An address
                # that keeps missing is asked only now and then (see _MISSES).
                misses = _MISSES.get(sockaddr, 0)
                if misses < _MISS_LIMIT or not misses % _REPROBE_EVERY:
                    if sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1) == _ESTABLISHED:
                        if misses:
                            del _MISSES[sockaddr]
                        self._connected(sock)
                        return None
                if len(_MISSES) >= _MISSES_MAX and sockaddr not in _MISSES:
                    _MISSES.clear()
                _MISSES[sockaddr] = misses + 1
            self.sock = sock
            self.poller.add_writer(sock.fileno(), self._on_writable)
            if not self.deadline_token:
                self._arm_timer()
            return None
        sock.close()
        return err, describe_oserror(OSError(err, os.strerror(err)))

    def _arm_timer(self) -> None:
        if self.connect_timeout_s > 0:
            self.deadlines.schedule(self.loop.time() + self.connect_timeout_s, self)

    def _connected(self, sock: socket.socket) -> None:
        self._stop_timer()
        self.dial_connected(sock, self.target)

    def _take(self) -> socket.socket:
        sock = self.sock
        assert sock is not None
        self.poller.remove_writer(sock.fileno())
        self.sock = None
        return sock

    def _on_writable(self) -> None:
        failed = self.poller.failed  # writable with no error reported: connected
        sock = self._take()
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if failed else 0
        if err == 0:
            if self.deadline_token:
                self.deadlines.cancel(self)
            self.dial_connected(sock, self.target)
            return
        _discard(self.poller, sock)
        detail = describe_oserror(OSError(err, os.strerror(err)))
        if err in _RESET_AFTER_CONNECT:
            # The upstream accepted, then reset before the relay began: reading
            # SO_ERROR consumed the error (a later recv would return 0, a clean
            # end), so it is passed on here, and the dial stops.
            self._stop_timer()
            self.dial_failed(self.target, DialFailure.RESET, f"upstream: {detail}")
            self.dial_given_up(DialFailure.RESET)
            return
        self._address_failed(err, detail)

    def _address_failed(self, err: int, detail: str) -> None:
        """One address of the current upstream failed: try its next address, or
        report the upstream and try the next one."""
        if self.addrs is not None:
            self._note(detail)
            err = self._next_address(err)
            if err:
                self._name_failed(err)
            return
        self._stop_timer()
        failure = failure_of(err)
        self.dial_failed(self.target, failure, detail)
        self.dial_next(failure)

    def _name_failed(self, err: int) -> None:
        """Every address of the current name failed (``err``: the last one's)."""
        self._stop_timer()
        failure = failure_of(err)
        self.dial_failed(self.target, failure, self.detail)
        self.dial_next(failure)

    def _next_address(self, err: int) -> int:
        """Connect to the current name's next address that does not fail at once,
        each given its share of the time left (see the module's theory); 0 when one
        is under way, else the ``errno`` of the last failure (``err`` when no
        address was left)."""
        addrs = self.addrs
        assert addrs is not None
        while addrs:
            family, self.sockaddr = addrs.pop(0)
            if self.until:
                now = self.loop.time()
                left = self.until - now
                share = max(left / (len(addrs) + 1), min(left, ADDRESS_MIN_S))
                self.deadlines.schedule(now + share, self)
            failed = self._connect(family, self.sockaddr)
            if failed is None:
                return 0
            err = failed[0] or errno.EIO
            self._note(failed[1])
        return err

    def _note(self, detail: str) -> None:
        """Add how the current address of a name failed to :attr:`detail`."""
        note = f"{format_sockaddr(self.sockaddr)}: {detail}"
        self.detail = f"{self.detail}; {note}" if self.detail else note

    def _stop_timer(self) -> None:
        if self.deadline_token:
            self.deadlines.cancel(self)

    def deadline_passed(self) -> None:
        """The connect timeout, or one address's share of it (see
        :mod:`midway.core.deadlines`)."""
        if self.sock is not None:
            _discard(self.poller, self._take())
        detail = f"connect timed out after {self.connect_timeout_s:g} s"
        if self.task is not None:
            self.task.cancel()
            self.task = None
            detail = f"{detail} (looking up {self.target.address.host!r})"
        elif self.addrs is not None:
            self._note("no answer")
            if self.addrs and self.loop.time() < self.until:  # this address's share is over
                err = self._next_address(errno.ETIMEDOUT)
                if err:
                    self._name_failed(err)
                return
            detail = f"{detail} ({self.detail})"
        self.dial_failed(self.target, DialFailure.TIMED_OUT, detail)
        self.dial_next(DialFailure.TIMED_OUT)

    async def _lookup(self, address: Address) -> None:
        try:
            found = await self.resolve(address.host, address.port)
        except OSError as exc:  # socket.gaierror, or what an injected resolver raises
            self.task = None
            self._stop_timer()
            self.dial_failed(self.target, DialFailure.RESOLVE_FAILED,
                             f"cannot resolve {address.host!r} ({exc.strerror or exc})")
            self.dial_next(DialFailure.RESOLVE_FAILED)
            return
        self.task = None
        self.addrs = list(found)
        if not self.addrs:
            self._stop_timer()
            self.dial_failed(self.target, DialFailure.RESOLVE_FAILED,
                             f"{address.host!r} resolved to no address")
            self.dial_next(DialFailure.RESOLVE_FAILED)
            return
        err = self._next_address(0)
        if err:
            self._name_failed(err)


def _discard(poller: Poller | LoopPoller, sock: socket.socket) -> None:
    """Close an upstream socket that will not be relayed."""
    poller.forget(sock.fileno(), closing=True)
    close_socket(sock)


class _Awaited(Dialer):
    """:func:`dial` as a :class:`Dialer`: one upstream, a future for the result."""

    __slots__ = ("future", "failures")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[socket.socket] = loop.create_future()
        self.failures: list[tuple[DialFailure, str]] = []

    def dial_connected(self, sock: socket.socket, target: Any) -> None:
        # The socket leaves the poller: its new owner uses the loop's own calls.
        self.poller.forget(sock.fileno())
        if self.future.done():
            sock.close()
        else:
            self.future.set_result(sock)

    def dial_failed(self, target: Any, failure: DialFailure, detail: str) -> None:
        self.failures.append((failure, detail))

    def dial_given_up(self, failure: DialFailure) -> None:
        if not self.future.done():
            failure, detail = self.failures[-1] if self.failures else (failure, "no address")
            error = UpstreamError(f"{self.target.address}: {detail}")
            error.failure = failure  # type: ignore[attr-defined]
            self.future.set_exception(error)


class _One:
    __slots__ = ("address",)

    def __init__(self, address: Address) -> None:
        self.address = address


async def dial(address: Address, timeout_s: float, *,
               resolve: Resolver = loop_resolver) -> socket.socket:
    """Connect to ``address`` (every resolved address tried in order) within
    ``timeout_s`` (0 = no timeout).  Returns a connected non-blocking socket owned by
    the caller (not on the relay's poller); raises :class:`UpstreamError` naming the
    address and why, with the :class:`DialFailure` as its ``failure`` attribute."""
    loop = asyncio.get_running_loop()
    dialer = _Awaited(loop)
    dialer.init_dial(loop, [_One(address)], timeout_s, resolve)
    dialer.dial_next()
    try:
        return await dialer.future
    finally:
        if not dialer.future.done() or dialer.future.cancelled():
            dialer.cancel_dial()
