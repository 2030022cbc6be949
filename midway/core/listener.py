"""Listening sockets and the accept loop.

The accept loop is a readiness callback on the relay's poller
(:mod:`midway.core.poller`, the same epoll as the relayed sockets: no watcher of the
loop's own) that accepts up to :data:`ACCEPT_BATCH` connections per wake-up, until
the queue is empty.  It asks a gate before each accept, so a proxy at its
connection limit stops accepting and clients wait in the kernel's listen queue (as
HAProxy does at maxconn) instead of being accepted and dropped.

Accepting costs what the kernel's ``accept4`` does and one socket object: the
standard library's ``socket.accept`` also converts the listener's family and type
to enums twice per call, which the loop here does once, at start.  On Linux an
accepted socket inherits ``TCP_NODELAY`` from its listener
(:data:`NODELAY_INHERITED`), so the option is set once, on the listener, rather
than once per connection.

Running out of descriptors or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) is
survivable: the loop logs (at most once a second), stops accepting for
:data:`RESOURCE_BACKOFF_S`, and tries again; anything it does not understand is
logged and accepting goes on, so a listener never dies nor spins.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

from ..config.addresses import Address, privileged_port, resolve_listen
from ..errors import AddressError, ListenError, describe_oserror
from .deadlines import deadlines_for
from .poller import poller_for

__all__ = ["Listener", "open_listening_socket", "bind_tcp", "bind_resolved", "ACCEPT_BATCH",
           "RESOURCE_BACKOFF_S", "NODELAY_INHERITED", "SocketOptions", "keepalive_options", "set_options"]

log = logging.getLogger("midway")

ACCEPT_BATCH = 64
"""Connections accepted per wake-up: HAProxy's tune.maxaccept default."""
RESOURCE_BACKOFF_S = 0.1
"""Pause after EMFILE/ENFILE/ENOBUFS/ENOMEM: trio's serve_listeners back-off."""
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The connection died in the queue; just take the next one.
_TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})

NODELAY_INHERITED = sys.platform.startswith("linux")
"""Whether accepted TCP sockets inherit ``TCP_NODELAY`` and the keepalive options
from their listener (Linux's ``inet_csk_clone_lock`` copies the listener's options,
and a clone of a listener with ``SO_KEEPALIVE`` starts its keepalive timer; checked
by tests/core/test_listener.py).  Elsewhere they are set on each accepted socket."""

SocketOptions = tuple[tuple[int, int, int], ...]
"""``setsockopt`` calls as (level, option, value) triples, made in order."""


def keepalive_options(idle_s: float, interval_s: float = 0, probes: int = 0) -> SocketOptions:
    """The options that give a TCP socket keepalive probes after ``idle_s`` seconds
    without traffic, then every ``interval_s`` until ``probes`` go unanswered (0:
    the system's own; seconds rounded up, as the kernel counts whole ones).
    ``idle_s`` 0 turns keepalive off.  Options this platform lacks are left out."""
    if not idle_s:
        return ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0),)
    out = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s),
                        ("TCP_KEEPCNT", probes)):
        option = getattr(socket, name, None)
        if value and option is not None:
            out.append((socket.IPPROTO_TCP, option, max(1, math.ceil(value))))
    return tuple(out)


def set_options(sock: socket.socket, options: SocketOptions) -> None:
    """Make the ``setsockopt`` calls of ``options`` on ``sock``; raises OSError."""
    for level, option, value in options:
        sock.setsockopt(level, option, value)


def open_listening_socket(address: Address, backlog: int, *,
                          reuse_port: bool = False, unix_mode: int | None = None) -> socket.socket:
    """Bind and listen on ``address`` (TCP or unix); non-blocking.  Raises
    :class:`ListenError` naming it.  ``reuse_port`` sets SO_REUSEPORT so several
    workers can share the address; ``unix_mode``: the permissions of a unix
    socket's file, set before it listens (None: the umask's)."""
    if not address.is_unix:
        sock = bind_tcp(address, backlog=backlog, reuse_port=reuse_port)
        sock.setblocking(False)
        return sock
    assert address.path is not None
    try:
        _remove_stale_unix_socket(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address.path)
            if unix_mode is not None:
                os.chmod(address.path, unix_mode)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        why = describe_oserror(exc)
        if exc.errno == errno.EADDRINUSE and _not_a_socket(address.path):
            why = f"{address.path} exists and is not a socket (midway replaces only a stale socket)"
        raise ListenError(f"cannot listen on {address}: {why}") from exc
    sock.setblocking(False)
    return sock


def _not_a_socket(path: str) -> bool:
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def bind_tcp(address: Address, *, backlog: int | None, reuse_port: bool = False,
             what: str = "") -> socket.socket:
    """The one place a TCP address becomes a bound socket: the proxies' listeners,
    the admin API's and the supervisor's port reservations, at the sockaddr
    :func:`~midway.config.addresses.resolve_listen` gives (see
    :func:`bind_resolved`).  Raises :class:`ListenError` naming the address (and
    ``what`` listens there)."""
    where = f"cannot listen on {address}{what}"
    try:
        resolved = resolve_listen(address)
    except AddressError as exc:
        raise ListenError(f"{where}: {exc}") from exc
    try:
        return bind_resolved(resolved, backlog=backlog, reuse_port=reuse_port)
    except OSError as exc:
        why = (exc.errno == errno.EACCES and privileged_port(address.port)) or describe_oserror(exc)
        raise ListenError(f"{where}: {why}") from exc


def bind_resolved(resolved: tuple[int, Any, bool], *, backlog: int | None,
                  reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound where ``resolved`` says (:func:`resolve_listen`'s
    family, sockaddr and dual stack), for a caller that resolved the address
    already and must bind what it checked.  SO_REUSEADDR is set (a restart does
    not wait for TIME_WAIT), SO_REUSEPORT with ``reuse_port``.  The socket
    listens with ``backlog``, or (``None``) is only bound, which holds the port
    without receiving connections.  Blocking, as made.  Raises ``OSError``."""
    family, sockaddr, dual = resolved
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        sock.bind(sockaddr)
        if backlog is not None:
            sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a unix socket file left by a process that is gone (connect refused)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


class Listener:
    """Accepts connections on one socket and hands each to ``on_accept``.

    ``can_accept()`` is asked before each accept; when it says no, the listener
    pauses itself and the owner calls :meth:`resume` once there is room."""

    def __init__(
        self,
        address: Address,
        sock: socket.socket,
        on_accept: Callable[[socket.socket, object, Listener], None],
        can_accept: Callable[[], bool],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.address = address
        self.sock = sock
        self.loop = loop or asyncio.get_running_loop()
        self.poller = poller_for(self.loop)
        self.deadlines = deadlines_for(self.loop)
        """The loop's deadlines, for the connections accepted here."""
        self._fd = sock.fileno()
        self._accept = sock._accept  # type: ignore[attr-defined]  # the C call, no wrapper
        self._kind = (int(sock.family), int(sock.type), sock.proto)
        self._on_accept = on_accept
        self._can_accept = can_accept
        self._reading = False
        self._backoff: asyncio.TimerHandle | None = None
        self._closed = False
        self._last_complaint = 0.0
        self.nodelay: bool | None = None
        """The ``TCP_NODELAY`` accepted sockets inherit (see :meth:`set_nodelay`);
        ``None``: not known to be inherited, set it on each connection."""
        self.keepalive: SocketOptions | None = None
        """The keepalive options accepted sockets inherit (see
        :meth:`set_keepalive`); ``None``: not known to be inherited."""
        name = sock.getsockname()
        wildcard = address.is_unix or address.host in ("", "0.0.0.0", "::")
        self.local: tuple[str, int] | None = None if wildcard else (str(name[0]), int(name[1]))
        """The (host, port) every connection accepted here has locally, when the
        listener is bound to one address (``None``: ask each connection)."""
        self.local_text = str(address) if address.is_unix else self.bound
        """:attr:`local` as text (the unix socket's address for one): one string
        shared by every connection accepted here (when :attr:`local` is set)."""

    @property
    def bound(self) -> str:
        """The actual bound address (with the real port when 0 was asked)."""
        name = self.sock.getsockname()
        if self.address.is_unix:
            return str(self.address)
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def port(self) -> int:
        return 0 if self.address.is_unix else int(self.sock.getsockname()[1])

    def set_nodelay(self, on: bool) -> bool:
        """Set ``TCP_NODELAY`` on the listening socket, for the connections it
        accepts from now on; whether they inherit it (else the caller sets it on
        each one).  A unix listener: nothing to set, nothing inherited."""
        self.nodelay = None
        if self.address.is_unix or not NODELAY_INHERITED:
            return False
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(on))
        except OSError:
            return False
        self.nodelay = on
        return True

    def set_keepalive(self, options: SocketOptions) -> bool:
        """Set :func:`keepalive_options` on the listening socket, for the
        connections it accepts from now on (those open keep theirs); whether
        they inherit them, as :meth:`set_nodelay`."""
        self.keepalive = None
        if self.address.is_unix or not NODELAY_INHERITED:
            return False
        try:
            set_options(self.sock, options)
        except OSError:
            return False
        self.keepalive = options
        return True

    def resume(self) -> None:
        """Start (or restart) accepting, unless closed, backing off or gated."""
        if self._closed or self._reading or self._backoff is not None:
            return
        self.poller.add_reader(self._fd, self._on_readable)
        self._reading = True

    def pause(self) -> None:
        if self._reading:
            self.poller.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        accept, kind, on_accept, can_accept = (self._accept, self._kind, self._on_accept,
                                               self._can_accept)
        family, type_, proto = kind
        for _ in range(ACCEPT_BATCH):
            if not can_accept():
                self.pause()
                return
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT_ERRNOS:
                    continue
                self._complain(exc)
                self.pause()
                self._backoff = self.loop.call_later(RESOURCE_BACKOFF_S, self._end_backoff)
                return
            # What socket.accept() makes, without its two enum conversions.  The
            # listener is non-blocking, so (as there) the socket's timeout is left.
            on_accept(socket.socket(family, type_, proto, fd), addr, self)

    def _complain(self, exc: OSError) -> None:
        now = self.loop.time()
        if now - self._last_complaint >= 1.0:
            self._last_complaint = now
            what = "out of resources" if exc.errno in _RESOURCE_ERRNOS else "accept failed"
            log.warning("listener %s: %s (%s); pausing accepts for %.0f ms", self.bound, what,
                        describe_oserror(exc), RESOURCE_BACKOFF_S * 1000)

    def _end_backoff(self) -> None:
        self._backoff = None
        self.resume()

    def close(self) -> None:
        """Stop accepting and close the socket (removing a unix socket's file)."""
        if self._closed:
            return
        self.pause()
        self._closed = True
        if self._backoff is not None:
            self._backoff.cancel()
        self.poller.forget(self._fd)
        self.sock.close()
        if self.address.is_unix and self.address.path:
            try:
                os.unlink(self.address.path)
            except OSError:
                pass
