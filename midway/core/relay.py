"""The relay: moves bytes both ways between two connected endpoints.

Theory of operation
-------------------
A :class:`Relay` owns two connected, non-blocking endpoints (client and upstream:
plain sockets or copy-only streams, see :mod:`midway.core.streams`) and runs two
independent directions over them, ``upstream`` (client → server) and
``downstream`` (server → client).  Each direction is a :class:`Flow` that reads one
endpoint and writes the other through a :class:`Sender`.

Everything is driven by readiness callbacks from the loop's relay poller
(:mod:`midway.core.poller`: one epoll per loop, which also delivers a reset on a
socket nobody is reading); there is no task per connection and no per-connection
buffer while a connection is idle.  A direction is in one of two modes:

* **fast**: no chain in this direction.  On readable, ``recv_into`` a shared
  buffer and ``send`` it straight on.  What the kernel does not take is copied into
  the sender's buffer, reading stops, and it resumes once the sender has drained:
  at most one read (:data:`READ_SIZE`) is held per direction, and a slow reader
  slows the sender through TCP's own flow control.  On Linux, when both endpoints
  are plain sockets, the fast path may use ``splice`` (see :mod:`midway.core.splice`)
  so bytes never enter Python at all.
* **chained**: a :class:`Chain` is attached (the chain engine,
  :mod:`midway.chain.runner`, runs the elements; the relay never sees one).  The
  reader hands each chunk to the chain, which passes what its elements make of it
  to the direction's sender.

A direction switches between modes while live, between two chunks, without losing
or reordering a byte: the sender is a FIFO shared by both modes.

End of stream: EOF on an endpoint is passed on as ``shutdown(SHUT_WR)`` once
everything before it is written (half-close); the other direction goes on.  When
both directions have ended the endpoints are closed.  An error on either (reset,
broken pipe) aborts the whole connection, resetting the other side with an RST.
When midway ends a connection itself (:meth:`Relay.close`: a timeout, a drain, an
admin command) an endpoint whose incoming direction is cut short gets an RST, a
quiet one a FIN (docs/guarantees.md).
Idle and half-close deadlines come from :class:`~midway.core.timers.ConnectionTimers`
with a single timer per connection.

Ownership: the relay closes both endpoints exactly once, then calls ``on_close``.

Counting: each direction counts the bytes it *read* from its source
(:attr:`Flow.bytes_read`, prefixes included) and each sender the bytes it
*delivered* to its socket (:attr:`Sender.delivered`: what ``send`` returned, or
what ``splice`` moved out of the pipe into that socket).  One integer add per
read, send or splice, never per byte.  The two differ when a chain element drops
or injects bytes, an element replies into the other direction (counted by that
socket's sender), or the connection ends with bytes still held.  A socket closed
with a FIN keeps what its kernel accepted and sends it on after the close; a
socket reset (by midway, or after its peer reset) discards what its kernel had not
sent yet, which is subtracted at the close (:func:`_unsent`), so a peer cut short
received exactly the count.  Read live, :attr:`Relay.bytes_up` /
:attr:`Relay.bytes_down` subtract what is unsent now: a count that only grows.
A stream endpoint (TLS) counts the plaintext it accepted, and nothing is
subtracted at a reset: its kernel queue holds records, not the relay's bytes.

The chain's contract with the relay
-----------------------------------
(The same text opens :mod:`midway.chain.runner`, the other side.)  ``core`` knows
no chain type: what it needs of a chain is the :class:`Chain` protocol below.

* The engine attaches itself to one direction with :meth:`Flow.attach_chain`
  (before :meth:`Relay.start`, or live).  From the start, or at once if live, the
  direction is chained: the relay calls :meth:`Chain.begin`, then, for every read,
  :meth:`Chain.received` (the chunk and the loop time it was read) and at the
  source's FIN :meth:`Chain.ended`.  The relay has already counted the bytes read,
  stamped the activity and left the zero-copy path in this direction; the senders
  count what is delivered.
* The engine writes what its elements pass on through the direction's ``sender``
  (``write``, ``drain``, ``send_eof``; the FIN is its to send) and what they reply
  through ``reverse_sender``, both FIFOs shared with the fast path.  It applies its
  own back-pressure with :meth:`Flow.pause_reading` / :meth:`Flow.resume_reading`.
* It ends the connection only through the relay (:meth:`Relay.close_after_flush`,
  :meth:`Relay.abort`); :meth:`Relay.copy_only` takes both directions off the
  zero-copy path for good (an element may reply into the other direction).
* When it has nothing left to run and nothing queued it calls
  :meth:`Flow.detach_chain` and the direction is fast again.
* The relay asks :meth:`Chain.holding` whether ending now would cut bytes short,
  calls :meth:`Chain.halt` when it closes after a flush (stop feeding elements), and
  :meth:`Chain.stop` exactly once when it ends (cancel, interrupt, close elements).
  After that the engine must not touch the relay.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import fcntl
import os
import socket
import struct
import sys
import termios
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from ..errors import describe_oserror
from . import splice as _splice
from .accel import Core
from .deadlines import Deadlines, deadlines_for
from .observer import CloseReason
from .poller import LoopPoller, Poller, poller_for
from .streams import Endpoint, can_splice, pending
from .timers import ConnectionTimers

__all__ = ["Relay", "Chain", "Flow", "Sender", "READ_SIZE", "FLOWING_S", "PROXY", "close_socket"]

READ_SIZE = 65536
"""Bytes per read: 64 KiB, the largest TCP window without scaling and the size
HAProxy's and nginx's default buffers round up to for bulk transfers."""

_LINGER_RESET = struct.pack("ii", 1, 0)
# Linux ioctl (linux/sockios.h, since 2.6.39): bytes in a TCP socket's send queue
# not sent yet, which a reset discards.  Neither socket nor termios names it.
_SIOCOUTQNSD = 0x894B
# splice(2) refuses this pair of descriptors: copy instead.
_NO_SPLICE_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

# One read buffer for every fast-mode direction: data is sent on before the
# callback returns, and any remainder is copied, so sharing is safe and an idle
# connection holds no buffer at all.
_BUFFER = bytearray(READ_SIZE)
_VIEW = memoryview(_BUFFER)

CLIENT, UPSTREAM_SIDE, PROXY = "client", "upstream", "proxy"

FLOWING_S = 1.0
"""A connection that read a byte this recently is a transfer in progress: cut by
midway (drain, signal, admin), it is reset, not closed with a FIN.  One second is
the promptness midway promises for resets; a keep-alive connection between
requests is quiet for far longer."""

InfoT = TypeVar("InfoT")
"""What the owner knows about the connection (the relay only carries it)."""


class Chain(Protocol):
    """What a chained direction needs of the chain engine (see the contract above)."""

    def begin(self) -> None:
        """The direction is chained from now on; chunks follow."""

    def received(self, data: bytes, now: float) -> None:
        """A chunk was read from the source at loop time ``now``."""

    def ended(self, now: float) -> None:
        """The source sent its FIN at loop time ``now``; nothing follows."""

    def holding(self) -> bool:
        """Whether bytes were read and not yet given to the sender."""

    def halt(self) -> None:
        """The relay closes after a flush: stop feeding elements (unless called
        from the engine's own task, which then ends by itself)."""

    def stop(self) -> None:
        """The relay has ended: cancel, interrupt and close everything.  Last call."""


class Sender:
    """Writes to one socket in order, keeping what the kernel does not take yet."""

    __slots__ = ("relay", "loop", "poller", "sock", "fd", "side", "buf", "waiters", "on_drained",
                 "fin_pending", "fin_sent", "delivered")

    def __init__(self, relay: Relay[Any], sock: Endpoint, side: str) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.poller = relay.poller
        self.sock = sock
        self.fd = sock.fileno()
        self.side = side
        # What the kernel has not taken yet, and who waits for it to drain: made
        # when needed and dropped once drained, so an idle sender holds neither.
        self.buf: bytearray | None = None
        self.waiters: list[asyncio.Future[None]] | None = None
        self.on_drained: Callable[[], None] | None = None
        self.fin_pending = False
        self.fin_sent = False
        self.delivered = 0
        """Bytes this socket's kernel accepted (``send``, or ``splice`` out of a
        flow's pipe), less what a reset discarded unsent (set at the close)."""

    def write(self, data: bytes | bytearray | memoryview) -> bool:
        """Send or buffer ``data``; ``True`` when it all went to the kernel."""
        if self.buf:
            self.buf += data
            return False
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.relay._failed(self.side, exc)
            return False
        self.delivered += sent
        if sent == len(data):
            return True
        self.buf = bytearray(data[sent:])
        self.poller.add_writer(self.fd, self._on_writable)
        return False

    def _on_writable(self) -> None:
        buf = self.buf
        if buf is None:
            return
        try:
            sent = self.sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.relay._failed(self.side, exc)
            return
        self.delivered += sent
        del buf[:sent]
        if buf:
            return
        self.buf = None
        self.poller.remove_writer(self.fd)
        if self.fin_pending:
            self._shutdown()
        callback, self.on_drained = self.on_drained, None
        waiters, self.waiters = self.waiters, None
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        if callback is not None and not self.relay.closed:
            callback()

    async def drain(self) -> None:
        """Wait until everything written so far has gone to the kernel."""
        if self.buf:
            fut = self.loop.create_future()
            if self.waiters is None:
                self.waiters = []
            self.waiters.append(fut)
            await fut

    def send_eof(self) -> None:
        """Half-close this socket once everything before it is written."""
        if self.fin_sent or self.fin_pending:
            return
        if self.buf:
            self.fin_pending = True
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        self.fin_pending = False
        self.fin_sent = True
        if not self.relay._ended:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is already gone; its reader will see it
        # else the other direction has ended too: both sockets were read to EOF and
        # are closed right away, and close() sends this FIN without a shutdown call.
        self.relay._direction_ended(self)

    def stop(self) -> None:
        if self.buf:
            self.poller.remove_writer(self.fd)
        self.buf = None
        waiters, self.waiters = self.waiters, None
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.cancel()
        self.on_drained = None


class Flow:
    """One direction of a relay: reads ``src``, writes through ``sender``."""

    __slots__ = ("relay", "loop", "poller", "name", "src", "src_fd", "src_side", "sender",
                 "reverse_sender", "bytes_read", "reading", "eof", "chained", "chain", "fast_reader",
                 "pipe", "in_pipe", "writing", "dst_fd", "can_splice", "read_at")

    def __init__(self, relay: Relay[Any], name: str, src: Endpoint, src_side: str,
                 sender: Sender, reverse_sender: Sender) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.poller = relay.poller
        self.name = name
        self.src = src
        self.src_fd = reverse_sender.fd  # the same socket (and one int object, not two)
        self.src_side = src_side
        self.sender = sender
        self.reverse_sender = reverse_sender
        self.bytes_read = 0
        """Bytes read from the source (prefix included); what reaches the other
        socket is its sender's :attr:`Sender.delivered`."""
        self.reading = False
        self.eof = False
        self.chained = False
        """Whether chunks go to :attr:`chain` (set from the start or on attaching)."""
        self.chain: Chain | None = None
        self.fast_reader: Callable[[], None] = self._on_readable
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0
        self.writing = False
        self.dst_fd = sender.fd
        self.can_splice = False
        self.read_at = 0.0
        """When this direction last read a byte (loop time)."""

    # -- fast mode -------------------------------------------------------------

    def start(self, splice: bool, prefix: bytes) -> None:
        """Begin reading; ``prefix`` (bytes read from the source before the relay
        got it) goes first, as if it were the first read."""
        self.can_splice = splice
        if self.chain is not None:
            self._enter_chain()
            if prefix and self.chain is not None:
                self.bytes_read += len(prefix)
                self.chain.received(prefix, self.loop.time())
            return
        if prefix:
            self.bytes_read += len(prefix)
            if not self.sender.write(prefix):
                self.sender.on_drained = self._resume
                return
        self._read(self.fast_reader)

    def _read(self, callback: Callable[[], None]) -> None:
        if not self.eof and not self.relay.closed:
            self.poller.add_reader(self.src_fd, callback)
            self.reading = True

    def _stop_reading(self) -> None:
        if self.reading:
            self.poller.remove_reader(self.src_fd)
            self.reading = False

    def _on_readable(self) -> None:
        try:
            n = self.src.recv_into(_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.relay._failed(self.src_side, exc)
            return
        if n == 0:
            self._src_ended()
            self.sender.send_eof()
            return
        self.bytes_read += n
        relay = self.relay
        relay.timers.last_activity = self.read_at = self.loop.time()
        if not self.sender.write(_VIEW[:n]):
            if not relay.closed:
                self._stop_reading()
                self.sender.on_drained = self._resume
        elif n == READ_SIZE and self.can_splice and not self.chained:
            # A full read: bulk data.  From now on let the kernel move it (as
            # HAProxy's splice-auto does); small exchanges stay on plain copies,
            # which cost fewer system calls per message.
            self.fast_reader = self._on_readable_splice
            self.poller.add_reader(self.src_fd, self.fast_reader)
            if relay.path == "copy":
                relay.path = "splice"

    def _src_ended(self) -> None:
        """The source sent FIN: stop reading it for good."""
        self._stop_reading()
        self.eof = True
        self.relay._saw_end(self.src_side)

    def _resume(self) -> None:
        if not self.chained:
            self._read(self.fast_reader)

    # -- fast mode, zero-copy (see midway.core.splice) ---------------------------

    def _on_readable_splice(self) -> None:
        for _ in range(_splice.SPLICE_ROUNDS):
            pipe = self.pipe
            if pipe is None:
                pipe = self.pipe = _splice.pipes.acquire()
                if pipe is None:  # no descriptor for a pipe right now: copy this read
                    self._on_readable()
                    return
            try:
                n = _splice.splice(self.src_fd, pipe[1], _splice.PIPE_SIZE, flags=_splice.FLAGS)  # type: ignore[misc]
            except (BlockingIOError, InterruptedError):
                self._release_pipe()
                return
            except OSError as exc:
                self._release_pipe()
                if exc.errno in _NO_SPLICE_ERRNOS:
                    self.can_splice = False
                    self.use_copy()
                    return
                self.relay._failed(self.src_side, exc)
                return
            if n == 0:
                self._release_pipe()
                self._src_ended()
                self.sender.send_eof()
                return
            self.bytes_read += n
            self.relay.timers.last_activity = self.read_at = self.loop.time()
            self.in_pipe = n
            self._splice_out()
            # Another round only if the pipe was filled (more is surely waiting) and
            # went out whole (else the destination is full: wait for it).
            if n < _splice.PIPE_SIZE or self.pipe is not None or not self.reading:
                return

    def _splice_out(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        while self.in_pipe:
            try:
                sent = _splice.splice(pipe[0], self.dst_fd, self.in_pipe, flags=_splice.FLAGS)  # type: ignore[misc]
            except (BlockingIOError, InterruptedError):
                self._stop_reading()
                if not self.writing:
                    self.poller.add_writer(self.dst_fd, self._splice_out)
                    self.writing = True
                return
            except OSError as exc:
                if exc.errno in _NO_SPLICE_ERRNOS:
                    self.can_splice = False
                    self.use_copy()
                    return
                self.relay._failed(self.sender.side, exc)
                return
            self.in_pipe -= sent
            self.sender.delivered += sent
        if self.writing:
            self.poller.remove_writer(self.dst_fd)
            self.writing = False
        self._release_pipe()
        if not self.reading and not self.relay.closed:
            self._read(self.fast_reader)

    def _release_pipe(self) -> None:
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            if self.in_pipe:
                _splice.pipes.discard(pipe)
                self.in_pipe = 0
            else:
                _splice.pipes.release(pipe)

    def use_copy(self) -> None:
        """Leave the zero-copy path for good: bytes already in the pipe go to the
        sender first, so order is kept."""
        if self.fast_reader == self._on_readable:
            return
        was_reading = self.reading
        self._stop_reading()
        self.fast_reader = self._on_readable
        if self.relay.path == "splice":
            self.relay.path = "copy"
        if self.writing:
            self.poller.remove_writer(self.dst_fd)
            self.writing = False
        if self.pipe is not None and self.in_pipe:
            held = bytearray()
            while len(held) < self.in_pipe:
                try:
                    chunk = os.read(self.pipe[0], self.in_pipe - len(held))
                except BlockingIOError:
                    break
                if not chunk:
                    break
                held += chunk
            self.in_pipe = 0
            self.sender.write(held)
        self._release_pipe()
        if self.relay.closed or self.chained or self.eof:
            return
        if self.sender.buf:
            self.sender.on_drained = self._resume
        elif was_reading or self.relay.started:
            self._read(self.fast_reader)

    # -- chained (the engine's side: see "The chain's contract" above) ----------

    def attach_chain(self, chain: Chain) -> None:
        """Give this direction's chunks to ``chain`` from now on (from the start,
        or between two chunks when live)."""
        self.chain = chain
        if self.relay.started and not self.chained:
            self._enter_chain()

    def detach_chain(self) -> None:
        """The chain is done (nothing to run, nothing held): fast mode again."""
        self.chain = None
        if not self.chained:
            return
        self.chained = False
        self._stop_reading()
        if self.sender.buf:
            self.sender.on_drained = self._resume
        else:
            self._read(self.fast_reader)

    def pause_reading(self) -> None:
        """The chain holds enough: stop reading the source (back-pressure)."""
        self._stop_reading()

    def resume_reading(self) -> None:
        """The chain has room again (a no-op after the source's FIN)."""
        if not self.reading:
            self._read(self._on_readable_chain)

    def _enter_chain(self) -> None:
        self.use_copy()
        if self.relay.closed:
            return
        self.chained = True
        self.relay.path = "chain"
        self._stop_reading()
        self.sender.on_drained = None
        self._read(self._on_readable_chain)
        assert self.chain is not None
        self.chain.begin()

    def _on_readable_chain(self) -> None:
        try:
            data = self.src.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.relay._failed(self.src_side, exc)
            return
        now = self.loop.time()
        self.relay.timers.last_activity = now
        chain = self.chain
        assert chain is not None
        if not data:
            self._src_ended()
            chain.ended(now)
        else:
            self.bytes_read += len(data)
            self.read_at = now
            chain.received(data, now)

    def cut_short(self, now: float, quiet_s: float) -> bool:
        """Whether ending the connection now would cut this direction short: bytes
        read and not yet given to the kernel for the peer (a sender's buffer, a
        pipe, the chain), bytes the source sent that midway has not read, or a
        transfer in progress (a byte read in the last ``quiet_s`` and no end of
        stream yet).  Its destination must then get a reset."""
        if self.sender.fin_sent:
            return False  # ended: every byte delivered and the FIN passed on
        if self.sender.buf or self.in_pipe:
            return True
        if self.chain is not None and self.chain.holding():
            return True
        if self.eof:
            return False
        return ((self.bytes_read > 0 and now - self.read_at < quiet_s)
                or _unread(self.src_fd) > 0 or pending(self.src) > 0)

    def stop(self) -> None:
        if self.reading:  # (tested here: once per direction per connection, a frame each)
            self._stop_reading()
        if self.writing:
            self.poller.remove_writer(self.dst_fd)
            self.writing = False
        if self.pipe is not None:
            self._release_pipe()
        if self.chain is not None:
            self.chain.stop()


class _StreamFlow(Flow):
    """A direction whose source is a :class:`~midway.core.streams.Stream`: the same,
    but bytes a read left decoded inside the stream (``pending()``), which no
    readiness event will announce, are read on the next loop turn.  Plain sockets
    use :class:`Flow` and pay nothing for this."""

    __slots__ = ("reader", "kicked")

    def __init__(self, relay: Relay[Any], name: str, src: Endpoint, src_side: str,
                 sender: Sender, reverse_sender: Sender) -> None:
        super().__init__(relay, name, src, src_side, sender, reverse_sender)
        self.reader: Callable[[], None] = self._on_readable
        self.kicked = False

    def _read(self, callback: Callable[[], None]) -> None:
        self.reader = callback
        super()._read(self._on_stream_readable)
        self._kick_if_pending()

    def _on_stream_readable(self) -> None:
        self.reader()
        self._kick_if_pending()

    def _kick_if_pending(self) -> None:
        if self.reading and not self.kicked and pending(self.src) > 0:
            self.kicked = True
            self.loop.call_soon(self._kick)

    def _kick(self) -> None:
        self.kicked = False
        if self.reading:  # not paused, ended or closed meanwhile
            self._on_stream_readable()


class Relay(Core, Generic[InfoT]):
    """Relays bytes between ``client`` and ``upstream`` (connected, non-blocking
    endpoints: plain sockets, or streams that can only copy).

    ``client_prefix`` / ``upstream_prefix``: bytes already read from that endpoint
    before the relay got it (a peeked ClientHello, what followed a PROXY header),
    relayed first, in order, before anything read later.  ``info`` is the owner's
    description of the connection; the relay only carries it.

    ``on_close(relay)`` is called exactly once, after both endpoints are closed; by
    then ``reason``, ``detail``, ``first_close`` and the byte counts are final.

    **C mode.**  Where the compiled relay is available (:mod:`midway.core.accel`)
    and both endpoints are plain sockets with no prefix, the relay starts in C
    mode: the loop's :class:`~midway.core.accel.Engine` moves the bytes (the fast
    path's copy, in C), and its :class:`Flow` and :class:`Sender` objects are not
    even made.  The C part calls back only when a direction ends, on a failure, and
    on 64 KiB read in one wake-up while splice is allowed (bulk data: the flows
    splice it).  Anything that needs the flows (a chain attached,
    :meth:`close_after_flush`, :meth:`flow`, :attr:`up`/:attr:`down`) first takes
    the connection back into Python (:meth:`_python`) with everything the C part
    held, counted and saw, so the rules of this module hold in both modes."""

    # An idle connection is mostly this object: slots, not a dict (~1 KiB less each).
    __slots__ = ("loop", "poller", "client", "upstream", "info", "on_close", "timers", "closed",
                 "started", "reason", "detail", "first_close", "splice", "path",
                 "connect_time_s", "reset", "_prefixes", "_closing", "_deadlines", "deadline_token",
                 "_ended", "_up", "_down", "_engine", "failed_side")

    def __init__(
        self,
        client: Endpoint,
        upstream: Endpoint,
        info: InfoT,
        *,
        idle_timeout_s: float,
        half_close_timeout_s: float,
        on_close: Callable[[Relay[InfoT]], None],
        splice: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
        client_prefix: bytes = b"",
        upstream_prefix: bytes = b"",
        poller: Poller | LoopPoller | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.poller = poller if poller is not None else poller_for(self.loop)
        self.client = client
        self.upstream = upstream
        self.info = info
        self.on_close = on_close
        self.timers = ConnectionTimers(idle_timeout_s, half_close_timeout_s, self.loop.time())
        self.closed = False
        self.started = False
        self.reason: CloseReason | None = None
        self.detail = ""
        self.first_close: str | None = None
        plain_client = type(client) is socket.socket  # can_splice(), inline
        plain_upstream = type(upstream) is socket.socket
        self.splice = splice and _splice.AVAILABLE and plain_client and plain_upstream
        """Whether the zero-copy path may be taken (both endpoints plain sockets)."""
        self.path = "copy"
        """``copy`` (fast path, bytes through a buffer), ``splice`` (fast path that
        moved bulk data zero-copy) or ``chain`` (elements attached)."""
        self.connect_time_s = 0.0
        self.reset = False
        """Whether the connection ended with an RST (set when it closes)."""
        self._prefixes = (client_prefix, upstream_prefix)
        self._closing: tuple[CloseReason, str] | None = None
        self._deadlines = deadlines if deadlines is not None else deadlines_for(self.loop)
        self.deadline_token = 0
        """The idle or half-close deadline scheduled (see :mod:`midway.core.deadlines`)."""
        self._ended = 0
        self.failed_side: str | None = None
        """The side whose socket failed (reset, broken pipe), when one did."""
        self._up: Flow | None = None
        self._down: Flow | None = None
        self._engine = self.poller.engine if (
            plain_client and plain_upstream and not client_prefix and not upstream_prefix) \
            else None
        """The compiled relay's engine while the relay is (or will start) in C mode
        (the poller has none without the compiled relay)."""
        if self._engine is None:
            self._make_flows()

    def _make_flows(self) -> tuple[Flow, Flow]:
        client, upstream = self.client, self.upstream
        to_upstream = Sender(self, upstream, UPSTREAM_SIDE)
        to_client = Sender(self, client, CLIENT)
        up = Flow if can_splice(client) else _StreamFlow
        down = Flow if can_splice(upstream) else _StreamFlow
        self._up = up(self, "upstream", client, CLIENT, to_upstream, to_client)
        self._down = down(self, "downstream", upstream, UPSTREAM_SIDE, to_client, to_upstream)
        return self._up, self._down

    # -- public ------------------------------------------------------------

    @property
    def up(self) -> Flow:
        """The client → upstream direction (takes a C-mode relay back into Python)."""
        return self._python()[0]

    @property
    def down(self) -> Flow:
        """The upstream → client direction (takes a C-mode relay back into Python)."""
        return self._python()[1]

    @property
    def bytes_up(self) -> int:
        """Bytes delivered to the upstream (see "Counting" above): final once
        closed; while open, what its kernel has sent so far (one ioctl per call:
        for scrapes and tests, not per chunk), so the count never goes back."""
        if self._up is None:
            return self._c_delivered(self.c_up_delivered, self.upstream)
        return self._delivered(self._up.sender)

    @property
    def bytes_down(self) -> int:
        """Bytes delivered to the client, as :attr:`bytes_up`; replies of
        upstream-direction elements included."""
        if self._down is None:
            return self._c_delivered(self.c_down_delivered, self.client)
        return self._delivered(self._down.sender)

    @property
    def bytes_up_read(self) -> int:
        """Bytes read from the client so far."""
        return self.c_up_read if self._up is None else self._up.bytes_read

    @property
    def bytes_down_read(self) -> int:
        """Bytes read from the upstream so far."""
        return self.c_down_read if self._down is None else self._down.bytes_read

    def counts(self) -> tuple[int, int, int, int]:
        """:attr:`bytes_up`, :attr:`bytes_down`, :attr:`bytes_up_read` and
        :attr:`bytes_down_read` in one call (the close record's)."""
        up, down = self._up, self._down
        if up is None or down is None:
            if self.closed:
                return self.c_up_delivered, self.c_down_delivered, self.c_up_read, self.c_down_read
            return (self._c_delivered(self.c_up_delivered, self.upstream),
                    self._c_delivered(self.c_down_delivered, self.client),
                    self.c_up_read, self.c_down_read)
        return (self._delivered(up.sender), self._delivered(down.sender), up.bytes_read,
                down.bytes_read)

    def ends(self) -> tuple[bool, bool, str | None]:
        """Whether the client and the upstream have sent their FIN, and which
        side ended first (None while neither has), in either mode."""
        if self._up is None or self._down is None:
            first = self.first_close or _FIRST[self.c_first]
            return self.c_up_eof, self.c_down_eof, first
        return self._up.eof, self._down.eof, self.first_close

    def _delivered(self, sender: Sender) -> int:
        if self.closed:
            return sender.delivered
        return sender.delivered - _unsent(sender.sock, sender.delivered)

    def _c_delivered(self, delivered: int, sock: Endpoint) -> int:
        if self.closed or not self.started:
            return delivered
        return delivered - _unsent(sock, delivered)

    def chain_of(self, direction: str) -> Chain | None:
        """The chain attached to ``direction``, if any (a relay in C mode has none,
        and stays in C mode)."""
        flow = self._up if direction == "upstream" else self._down
        return None if flow is None else flow.chain

    def flow(self, direction: str) -> Flow:
        up, down = self._python()
        return up if direction == "upstream" else down

    def copy_only(self) -> None:
        """Leave the zero-copy path in both directions, for good (bytes already in
        a pipe are delivered first)."""
        if self.splice:
            self.splice = False
            if self._up is None or self._down is None:
                self.c_splice_ok = 0  # C mode copies anyway; no bulk hand-over now
                return
            for flow in (self._up, self._down):
                flow.can_splice = False
                if self.started:
                    flow.use_copy()

    def start(self) -> None:
        """Begin relaying.  Call once."""
        self.started = True
        engine = self._engine
        if engine is not None and self._up is None:
            cfd, ufd = self.client.fileno(), self.upstream.fileno()
            # The dial left the upstream socket registered on the poller's epoll,
            # which is the engine's too: it takes the registration over.
            poller = self.poller
            try:
                self._c_start(engine, cfd, ufd, self.splice, self.loop.time(),
                              poller.hand_over(cfd), poller.hand_over(ufd))
            except OSError:
                self._engine = None
                self._make_flows()  # relay in Python then
            else:
                # _arm, inline (once a connection): only the idle deadline can be set yet.
                timers = self.timers
                if timers.idle_timeout_s > 0:
                    self._deadlines.schedule(self.c_last_activity + timers.idle_timeout_s, self)
                return
        up, down = self._up, self._down
        assert up is not None and down is not None
        # A reset on a socket nobody reads or writes (reading paused for
        # back-pressure, or a side already half-closed) is seen at once too.
        self.poller.watch(up.src_fd, self._client_failed)
        self.poller.watch(down.src_fd, self._upstream_failed)
        client_prefix, upstream_prefix = self._prefixes
        self._prefixes = (b"", b"")
        up.start(self.splice, client_prefix)
        down.start(self.splice, upstream_prefix)
        self._arm()

    def close(self, reason: CloseReason, detail: str = "", *,
              quiet_s: float | None = None) -> None:
        """End the connection now, on midway's own initiative (a drain cut short, a
        second signal, a timeout, an admin command).

        Each socket gets a FIN, as at a clean stop, unless the direction into it
        is cut short (:meth:`Flow.cut_short`: bytes held or unread, or a byte
        read in the last ``quiet_s``, default :data:`FLOWING_S`, with no end of
        stream yet); then it is reset, so that no peer mistakes a cut stream for a
        complete one (docs/guarantees.md)."""
        if self.closed:
            return
        if quiet_s is None:
            quiet_s = FLOWING_S
        now = self.loop.time()
        # Each socket is reset if the direction into it is cut short (the other
        # may still end cleanly: a finished response keeps its FIN).
        if self._up is None or self._down is None:
            self._finish(reason, detail, PROXY,
                         reset_upstream=self._c_cut_short(0, now, quiet_s),
                         reset_client=self._c_cut_short(1, now, quiet_s))
            return
        self._finish(reason, detail, PROXY,
                     reset_upstream=self._up.cut_short(now, quiet_s),
                     reset_client=self._down.cut_short(now, quiet_s))

    def _c_cut_short(self, direction: int, now: float, quiet_s: float) -> bool:
        """:meth:`Flow.cut_short` in C mode (0: client → upstream, 1: back)."""
        if direction == 0:
            fin, held, eof = self.c_up_fin, self.c_up_held, self.c_up_eof
            read, read_at, src = self.c_up_read, self.c_up_read_at, self.client
        else:
            fin, held, eof = self.c_down_fin, self.c_down_held, self.c_down_eof
            read, read_at, src = self.c_down_read, self.c_down_read_at, self.upstream
        if fin:
            return False
        if held:
            return True
        if eof:
            return False
        return (read > 0 and now - read_at < quiet_s) or _unread(src.fileno()) > 0

    def abort(self, reason: CloseReason, detail: str = "", side: str = PROXY) -> None:
        """Reset both sockets (RST) now."""
        self._finish(reason, detail, side, reset_client=True, reset_upstream=True)

    def close_after_flush(self, reason: CloseReason, detail: str = "") -> None:
        """Stop reading both ways, deliver what was already passed to the senders,
        then FIN both ways and close (bounded by the half-close timeout)."""
        if self.closed or self._closing is not None:
            return
        flows = self._python()
        self._closing = (reason, detail)
        if self.first_close is None:
            self.first_close = PROXY
        self.timers.half_closed(self.loop.time())
        self._arm()
        for flow in flows:
            flow._stop_reading()
            flow.eof = True
            if flow.chain is not None:
                flow.chain.halt()
            flow.sender.send_eof()

    # -- C mode: taking the connection back, and the C part's calls --------------

    def _python(self) -> tuple[Flow, Flow]:
        """The two flows, made now if the relay is in C mode: it then leaves the
        engine, and the flows go on from the state the C part left (counts, ends,
        bytes it held), registered on the poller as :meth:`start` would."""
        if self._up is not None and self._down is not None:
            return self._up, self._down
        up, down = self._make_flows()
        if not self.started:
            return up, down
        held_up, held_down = self._c_export()
        self._engine = None
        self._ended = self.c_ended
        if self.first_close is None:
            self.first_close = _FIRST[self.c_first]
        up.bytes_read, up.read_at, up.eof = self.c_up_read, self.c_up_read_at, self.c_up_eof
        down.bytes_read, down.read_at, down.eof = (self.c_down_read, self.c_down_read_at,
                                                   self.c_down_eof)
        up.sender.delivered, up.sender.fin_sent = self.c_up_delivered, self.c_up_fin
        down.sender.delivered, down.sender.fin_sent = self.c_down_delivered, self.c_down_fin
        if self.closed:
            return up, down
        self.timers.last_activity = max(self.timers.last_activity, self.c_last_activity)
        self.poller.watch(up.src_fd, self._client_failed)
        self.poller.watch(down.src_fd, self._upstream_failed)
        for flow, held in ((up, held_up), (down, held_down)):
            flow.can_splice = self.splice
            if held:
                sender = flow.sender
                sender.buf = bytearray(held)
                self.poller.add_writer(sender.fd, sender._on_writable)
                sender.on_drained = flow._resume
            elif not flow.eof:
                flow._read(flow.fast_reader)
        # A socket neither read (its source sent its FIN, or reading it is paused
        # for bytes held) nor written must still be polled, for its reset: the
        # pure relay's sockets stay registered from their first read on.
        for flow, on_error, reverse_held in ((up, self._client_failed, held_down),
                                             (down, self._upstream_failed, held_up)):
            if not flow.reading and not reverse_held:
                self.poller.watch(flow.src_fd, on_error, register=True)
        return up, down

    def _c_half(self) -> None:
        """C mode: the first direction ended (its FIN passed on)."""
        timers = self.timers
        if timers.half_closed_at is None:  # timers.half_closed, inline (once a connection)
            timers.half_closed_at = self.loop.time()
        timers.last_activity = self.c_last_activity  # _arm, inline: C mode, started, open
        deadline = timers.next_deadline()
        if deadline is not None:
            self._deadlines.schedule(deadline, self)
        else:
            self._deadlines.cancel(self)

    def _c_end(self) -> None:
        """C mode: both directions ended, every byte delivered."""
        reason, detail = self._closing or (CloseReason.EOF, "")
        self._finish(reason, detail, _FIRST[self.c_first] or PROXY)

    def _c_fail(self, side: int, err: int) -> None:
        """C mode: ``err`` on the client (0) or the upstream (1) socket."""
        self._failed(UPSTREAM_SIDE if side else CLIENT, OSError(err, os.strerror(err)))

    def _c_bulk(self, direction: int) -> None:
        """C mode: 64 KiB in one wake-up while splice is allowed: bulk, which the flows
        move zero-copy (as :meth:`Flow._on_readable` switches)."""
        flow = self._python()[direction]
        if self.closed or not flow.can_splice or flow.chained:
            return
        flow.fast_reader = flow._on_readable_splice
        if flow.reading:
            self.poller.add_reader(flow.src_fd, flow.fast_reader)
        if self.path == "copy":
            self.path = "splice"

    # -- events from flows and senders ---------------------------------------

    def _saw_end(self, side: str) -> None:
        if self.first_close is None:
            self.first_close = side

    def _direction_ended(self, sender: Sender) -> None:
        self._ended += 1
        if self._ended == 2:  # every byte delivered and both FINs passed on
            reason, detail = self._closing or (CloseReason.EOF, "")
            self._finish(reason, detail, self.first_close or PROXY)
        else:
            self.timers.half_closed(self.loop.time())
            self._arm()

    def _failed(self, side: str, exc: OSError) -> None:
        if not self.closed:
            self.failed_side = side
            self.abort(CloseReason.RESET, f"{side}: {describe_oserror(exc)}", side)

    def _client_failed(self, exc: OSError) -> None:
        self._failed(CLIENT, exc)

    def _upstream_failed(self, exc: OSError) -> None:
        self._failed(UPSTREAM_SIDE, exc)

    # -- timers -----------------------------------------------------------

    def _arm(self) -> None:
        if self._up is None and self.started:
            self.timers.last_activity = self.c_last_activity
        deadline = self.timers.next_deadline()
        if deadline is not None and not self.closed:
            self._deadlines.schedule(deadline, self)
        else:
            self._deadlines.cancel(self)

    def deadline_passed(self) -> None:
        if self._up is None and self.started:
            self.timers.last_activity = self.c_last_activity
        reason = self.timers.expired(self.loop.time())
        if reason is None:
            self._arm()
        elif reason is CloseReason.IDLE_TIMEOUT:
            self.close(reason, quiet_s=0.0)  # quiet by definition: reset only if data is held
        else:
            self.close(reason)

    # -- the end ----------------------------------------------------------

    def _finish(self, reason: CloseReason, detail: str, side: str, *,
                reset_client: bool = False, reset_upstream: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        self.detail = detail
        self.reset = reset_client or reset_upstream
        self._deadlines.cancel(self)
        up, down = self._up, self._down
        if up is None or down is None:  # C mode
            if self.first_close is None:
                self.first_close = _FIRST[self.c_first] or side
            if self.started:
                self._c_leave(type(self.client) is socket.socket
                              and type(self.upstream) is socket.socket)
            if reset_client:
                self.c_down_delivered -= _unsent(self.client, self.c_down_delivered)
            if reset_upstream:
                self.c_up_delivered -= _unsent(self.upstream, self.c_up_delivered)
            close_socket(self.client, reset=reset_client)
            close_socket(self.upstream, reset=reset_upstream)
            self.on_close(self)
            return
        if self.first_close is None:
            self.first_close = side
        # Before the descriptors are closed (and their numbers reused): the flows'
        # remove_reader/remove_writer below then cost nothing.
        # A plain socket (a Flow, not a _StreamFlow) is closed right below.
        self.poller.forget(up.src_fd, closing=type(up) is Flow)
        self.poller.forget(down.src_fd, closing=type(down) is Flow)
        for flow in (up, down):
            flow.stop()
            flow.sender.stop()
        # A reset discards what the kernel has not sent yet: not delivered.
        if reset_client:
            down.sender.delivered -= _unsent(self.client, down.sender.delivered)
        if reset_upstream:
            up.sender.delivered -= _unsent(self.upstream, up.sender.delivered)
        close_socket(self.client, reset=reset_client)
        close_socket(self.upstream, reset=reset_upstream)
        self.on_close(self)


_FIRST: tuple[str | None, str, str] = (None, CLIENT, UPSTREAM_SIDE)
"""The C part's ``c_first`` (0: nobody yet, 1: the client, 2: the upstream) in words."""


def _unread(fd: int) -> int:
    """Bytes waiting in socket ``fd``'s receive queue (FIONREAD, i.e. SIOCINQ)."""
    try:
        count: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, _INT_ZERO))[0]
    except OSError:
        return 0
    return count


_INT_ZERO = struct.pack("i", 0)


def _unsent(sock: Endpoint, delivered: int) -> int:
    """Bytes of the ``delivered`` that plain TCP socket ``sock``'s kernel has not
    sent yet (SIOCOUTQNSD), which a reset now would discard; 0 where that cannot
    be asked (not Linux, not TCP) and for a stream, whose descriptor carries
    bytes of its own (TLS records), not the relay's."""
    if not _ASK_UNSENT or not can_splice(sock):
        return 0
    try:
        unsent: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, _INT_ZERO))[0]
    except OSError:
        return 0
    return min(max(unsent, 0), delivered)


_ASK_UNSENT = sys.platform == "linux"


def close_socket(sock: Endpoint, *, reset: bool = False) -> None:
    """Close ``sock``, with an RST when ``reset`` (SO_LINGER 0)."""
    if reset:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    try:
        if type(sock) is socket.socket and sock._io_refs <= 0:  # type: ignore[attr-defined]
            # What socket.socket.close does (no makefile() is open on a relayed
            # socket), without its two Python-level frames: twice per connection.
            sock._closed = True  # type: ignore[attr-defined]
            _close(sock)
        else:
            sock.close()
    except OSError:
        pass


_close = _socket.socket.close
"""The C-level close of a socket object (what ``socket.socket._real_close`` calls)."""
