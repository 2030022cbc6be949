"""The relay: moves bytes both ways between two connected sockets.

Theory of operation
-------------------
A :class:`Relay` owns two connected, non-blocking sockets (client and upstream) and
runs two independent directions over them, ``upstream`` (client → server) and
``downstream`` (server → client).  Each direction is a :class:`_Flow` that reads one
socket and writes the other through a :class:`_Sender`.

Everything is driven by readiness callbacks from the loop's relay poller
(:mod:`midway.core.poller`: one epoll per loop, which also delivers a reset on a
socket nobody is reading); there is no task per connection and no per-connection
buffer while a connection is idle.  A direction is in one of two modes:

* **fast**: no chain stage in this direction.  On readable, ``recv_into`` a shared
  buffer and ``send`` it straight on.  What the kernel does not take is copied into
  the sender's buffer, reading stops, and it resumes once the sender has drained:
  at most one read (:data:`READ_SIZE`) is held per direction, and a slow reader
  slows the sender through TCP's own flow control.  On Linux the fast path may use
  ``splice`` (see :mod:`midway.core.splice`) so bytes never enter Python at all.
* **chain**: stages are attached.  A reader callback queues chunks (bounded by
  :data:`CHAIN_QUEUE_HIGH` bytes; reading pauses above it) and a pump task feeds
  them, one at a time and in order, through the stages (see
  :mod:`midway.chain.base`); the last stage's output goes to the sender.

A direction switches between modes while live, between two chunks, without losing
or reordering a byte: the sender is a FIFO shared by both modes.

End of stream: EOF on a socket is passed on as ``shutdown(SHUT_WR)`` once everything
before it is written (half-close); the other direction goes on.  When both
directions have ended the sockets are closed.  An error on either socket (reset,
broken pipe) aborts the whole connection, resetting the other side with an RST.
When midway ends a connection itself (:meth:`Relay.close`: a timeout, a drain, an
admin command) a socket whose incoming direction is cut short gets an RST, a quiet
one a FIN (docs/guarantees.md).
Idle and half-close deadlines come from :class:`~midway.core.timers.ConnectionTimers`
with a single timer per connection.

Ownership: the relay closes both sockets exactly once, then calls ``on_close``.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
import termios
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import describe_oserror
from . import splice as _splice
from .cooperate import cooperate
from .observer import CloseReason
from .poller import poller_for
from .timers import ConnectionTimers

if TYPE_CHECKING:
    from ..chain.base import ConnectionInfo, Direction, Stage

__all__ = ["Relay", "READ_SIZE", "CHAIN_QUEUE_HIGH", "StageList", "close_socket"]

log = logging.getLogger("midway")

READ_SIZE = 65536
"""Bytes per read: 64 KiB, the largest TCP window without scaling and the size
HAProxy's and nginx's default buffers round up to for bulk transfers."""

CHAIN_QUEUE_HIGH = 1 << 20
"""Bytes a chained direction may read ahead of its stages (1 MiB): enough to keep a
latency toxic pipelined at ~40 Mbit/s per 200 ms, like Toxiproxy's buffered
channels, while bounding memory.  Reading resumes below half of it."""
CHAIN_QUEUE_LOW = CHAIN_QUEUE_HIGH // 2

WRITE_PIECE = 1 << 18
"""A chunk larger than this (256 KiB) leaves the chain for the socket in pieces of
this size, each one written (or buffered) once the previous one has gone to the
kernel: the sender's buffer then holds at most one piece, not a copy of a hook's
64 MiB injection, and other connections get the loop between pieces."""

_LINGER_RESET = struct.pack("ii", 1, 0)
_COARSE_TIMER_SLACK_S = 0.001
"""uvloop's clock (libuv's uv_now) has millisecond resolution and is read once per
loop turn, so a timer may fire up to ~1 ms early in real time; element sleeps
(latency toxics) are padded by that much so that "200 ms" is never less."""
# splice(2) refuses this pair of descriptors: copy instead.
_NO_SPLICE_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

# One read buffer for every fast-mode direction: data is sent on before the
# callback returns, and any remainder is copied, so sharing is safe and an idle
# connection holds no buffer at all.
_BUFFER = bytearray(READ_SIZE)
_VIEW = memoryview(_BUFFER)

_NO_QUEUE: deque[tuple[bytes | None, float]] = deque(maxlen=0)
"""Shared stand-in for the chain queue of a direction that never chained: an idle
connection should not carry two empty deques (≈600 bytes each)."""

StageList = Sequence[tuple[object, "Stage"]]
"""A direction's chain: (element key, stage) pairs in order."""

CLIENT, UPSTREAM_SIDE, PROXY = "client", "upstream", "proxy"

FLOWING_S = 1.0
"""A connection that read a byte this recently is a transfer in progress: cut by
midway (drain, signal, admin), it is reset, not closed with a FIN.  One second is
the promptness midway promises for resets; a keep-alive connection between
requests is quiet for far longer."""


class _Sender:
    """Writes to one socket in order, keeping what the kernel does not take yet."""

    __slots__ = ("relay", "loop", "poller", "sock", "fd", "side", "buf", "waiters", "on_drained",
                 "fin_pending", "fin_sent")

    def __init__(self, relay: Relay, sock: socket.socket, side: str) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.poller = relay.poller
        self.sock = sock
        self.fd = sock.fileno()
        self.side = side
        self.buf = bytearray()
        self.waiters: list[asyncio.Future[None]] = []
        self.on_drained: Callable[[], None] | None = None
        self.fin_pending = False
        self.fin_sent = False

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
        if sent == len(data):
            return True
        self.buf += data[sent:]
        self.poller.add_writer(self.fd, self._on_writable)
        return False

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.relay._failed(self.side, exc)
            return
        del self.buf[:sent]
        if self.buf:
            return
        self.poller.remove_writer(self.fd)
        if self.fin_pending:
            self._shutdown()
        callback, self.on_drained = self.on_drained, None
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        if callback is not None and not self.relay.closed:
            callback()

    async def drain(self) -> None:
        """Wait until everything written so far has gone to the kernel."""
        if self.buf:
            fut = self.loop.create_future()
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
        self.buf = bytearray()
        for fut in self.waiters:
            if not fut.done():
                fut.cancel()
        self.waiters = []
        self.on_drained = None


class _Out:
    """The :class:`~midway.chain.base.Output` handed to the stage at ``index``."""

    __slots__ = ("flow", "index", "direction", "info", "interrupted", "_sleepers")

    def __init__(self, flow: _Flow, index: int) -> None:
        self.flow = flow
        self.index = index
        self.direction: Direction = flow.name
        self.info: ConnectionInfo = flow.relay.info
        self.interrupted = False
        self._sleepers: set[asyncio.Future[bool]] = set()

    @property
    def received_at(self) -> float:
        return self.flow.received_at

    @received_at.setter
    def received_at(self, value: float) -> None:
        self.flow.received_at = value

    def now(self) -> float:
        return self.flow.loop.time()

    async def sleep(self, seconds: float) -> bool:
        if self.interrupted or self.flow.relay.closed:
            return False
        loop = self.flow.loop
        fut: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_later(max(seconds, 0.0) + self.flow.relay.timer_slack,
                                 _resolve, fut, True)
        self._sleepers.add(fut)
        try:
            return await fut
        finally:
            handle.cancel()
            self._sleepers.discard(fut)

    def interrupt(self) -> None:
        self.interrupted = True
        for fut in self._sleepers:
            _resolve(fut, False)

    async def send(self, data: bytes) -> None:
        if data:
            await cooperate()  # an element sending many pieces lets the others run
            await self.flow._data_from(self.index + 1, data)

    async def send_eof(self) -> None:
        await self.flow._eof_from(self.index + 1)

    async def reply(self, data: bytes) -> None:
        sender = self.flow.reverse_sender
        if data and not sender.fin_sent and not self.flow.relay.closed:
            if not sender.write(data):
                await sender.drain()

    def close(self, reason: str = "closed by element") -> None:
        self.flow.relay.close_after_flush(CloseReason.ELEMENT, reason)

    def reset(self, reason: str = "reset by element") -> None:
        self.flow.relay.abort(CloseReason.ELEMENT, reason, PROXY)


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


class _Flow:
    """One direction of a relay: reads ``src``, writes through ``sender``."""

    __slots__ = ("relay", "loop", "poller", "name", "src", "src_fd", "src_side", "sender",
                 "reverse_sender", "bytes", "reading", "eof", "chained", "stages", "wanted",
                 "outs", "queue", "queued", "pump", "wake", "received_at", "fast_reader",
                 "pipe", "in_pipe", "writing", "dst_fd", "can_splice", "read_at")

    def __init__(self, relay: Relay, name: Direction, src: socket.socket, src_side: str,
                 sender: _Sender, reverse_sender: _Sender) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.poller = relay.poller
        self.name = name
        self.src = src
        self.src_fd = src.fileno()
        self.src_side = src_side
        self.sender = sender
        self.reverse_sender = reverse_sender
        self.bytes = 0
        self.reading = False
        self.eof = False
        self.chained = False
        self.stages: list[tuple[object, Stage]] = []
        self.wanted: list[tuple[object, Stage]] = self.stages
        self.outs: list[_Out] = []
        self.queue: deque[tuple[bytes | None, float]] = _NO_QUEUE  # made on entering chain mode
        self.queued = 0
        self.pump: asyncio.Task[None] | None = None
        self.wake: asyncio.Event | None = None
        self.received_at = 0.0
        self.fast_reader: Callable[[], None] = self._on_readable
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0
        self.writing = False
        self.dst_fd = sender.fd
        self.can_splice = False
        self.read_at = 0.0
        """When this direction last read a byte (loop time)."""

    # -- fast mode -------------------------------------------------------------

    def start(self, splice: bool) -> None:
        self.can_splice = splice
        if self.wanted:
            self._enter_chain()
        else:
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
        self.bytes += n
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
        self.bytes += n
        self.relay.timers.last_activity = self.read_at = self.loop.time()
        self.in_pipe = n
        self._splice_out()

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

    # -- chain mode ------------------------------------------------------------

    def set_stages(self, stages: StageList) -> None:
        """Make ``stages`` this direction's chain (applied between two chunks)."""
        wanted = list(stages)
        keep = {id(stage) for _, stage in wanted}
        for out, (_, stage) in zip(self.outs, self.stages, strict=True):
            if id(stage) not in keep:
                out.interrupt()
        self.wanted = wanted
        if self.relay.started and not self.chained and wanted:
            self._enter_chain()
        elif self.wake is not None:
            self.wake.set()

    def _enter_chain(self) -> None:
        self.use_copy()
        self.chained = True
        self.relay.path = "chain"
        self._stop_reading()
        self.sender.on_drained = None
        self.wake = asyncio.Event()
        if self.queue is _NO_QUEUE:
            self.queue = deque()
        self._read(self._on_readable_chain)
        self.pump = self.loop.create_task(self._pump())

    def _leave_chain(self) -> None:
        self.chained = False
        self.pump = None
        self.wake = None
        self.outs = []
        self._stop_reading()
        if self.sender.buf:
            self.sender.on_drained = self._resume
        else:
            self._read(self.fast_reader)

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
        if not data:
            self._src_ended()
            self.queue.append((None, now))
        else:
            self.bytes += len(data)
            self.read_at = now
            self.queue.append((data, now))
            self.queued += len(data)
            if self.queued >= CHAIN_QUEUE_HIGH:
                self._stop_reading()
        assert self.wake is not None
        self.wake.set()

    async def _pump(self) -> None:
        assert self.wake is not None
        try:
            while True:
                if self.wanted is not self.stages:
                    await self._apply_changes()
                if not self.queue:
                    if not self.stages:
                        self._leave_chain()
                        return
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                data, self.received_at = self.queue.popleft()
                if data is None:
                    await self._eof_from(0)
                    continue
                self.queued -= len(data)
                if not self.reading and not self.eof and self.queued <= CHAIN_QUEUE_LOW:
                    self._read(self._on_readable_chain)
                await self._data_from(0, data)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the relay stopping this pump
            self.relay._stage_failed(self.name, exc)  # raised by a stage's own code
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # A stage (user code) failed, even with an exception meant to end the
            # process: this connection only.
            self.relay._stage_failed(self.name, exc)

    async def _apply_changes(self) -> None:
        wanted = self.wanted
        keep = {id(stage) for _, stage in wanted}
        old = {id(stage) for _, stage in self.stages}
        for out, (_, stage) in zip(list(self.outs), list(self.stages), strict=True):
            if id(stage) not in keep:
                out.interrupt()
                await stage.flush(out)
                stage.close()
        # Stages that stay keep their Output (a background task of theirs may hold
        # it); only its position changes.
        kept = {id(stage): out for out, (_, stage) in zip(self.outs, self.stages, strict=True)}
        self.stages = wanted
        outs = []
        for index, (_, stage) in enumerate(wanted):
            previous = kept.get(id(stage))
            out = previous if previous is not None and not previous.interrupted else _Out(self, index)
            out.index = index
            outs.append(out)
        self.outs = outs
        for out, (_, stage) in zip(outs, wanted, strict=True):
            if id(stage) not in old:
                stage.start(out)

    async def _data_from(self, index: int, data: bytes) -> None:
        if index < len(self.stages):
            await self.stages[index][1].data(data, self.outs[index])
        elif not self.sender.fin_sent and not self.sender.fin_pending:
            if len(data) > WRITE_PIECE:
                await self._write_pieces(data)
            elif not self.sender.write(data):
                await self.sender.drain()

    async def _write_pieces(self, data: bytes) -> None:
        """Write a large chunk a piece at a time (see :data:`WRITE_PIECE`)."""
        sender = self.sender
        with memoryview(data) as view:
            for start in range(0, len(view), WRITE_PIECE):
                if self.relay.closed:
                    return
                if not sender.write(view[start:start + WRITE_PIECE]):
                    await sender.drain()
                else:
                    await cooperate()

    async def _eof_from(self, index: int) -> None:
        if index < len(self.stages):
            await self.stages[index][1].eof(self.outs[index])
        else:
            self.sender.send_eof()

    def cut_short(self, now: float, quiet_s: float) -> bool:
        """Whether ending the connection now would cut this direction short: bytes
        read and not yet given to the kernel for the peer (a sender's buffer, a
        pipe, the chain's queue or stages), bytes the source sent that midway has
        not read, or a transfer in progress (a byte read in the last ``quiet_s``
        and no end of stream yet).  Its destination must then get a reset."""
        if self.sender.fin_sent:
            return False  # ended: every byte delivered and the FIN passed on
        if self.sender.buf or self.in_pipe or self.queued:
            return True
        if self.wake is not None and self.wake.is_set():
            return True  # the pump is busy with a chunk (it clears it to wait)
        if self.eof:
            return False
        return (self.bytes > 0 and now - self.read_at < quiet_s) or _unread(self.src_fd) > 0

    def stop(self) -> None:
        self._stop_reading()
        if self.writing:
            self.poller.remove_writer(self.dst_fd)
            self.writing = False
        self._release_pipe()
        if self.pump is not None:
            self.pump.cancel()
            self.pump = None
        for out in self.outs:
            out.interrupt()
        for _, stage in self.stages:
            try:
                stage.close()
            except Exception:
                log.exception("conn %d: a %s stage failed to close", self.relay.info.id, self.name)
        self.stages = []


class Relay:
    """Relays bytes between ``client`` and ``upstream`` (connected, non-blocking).

    ``on_close(relay)`` is called exactly once, after both sockets are closed; by
    then ``reason``, ``detail``, ``first_close`` and the byte counts are final."""

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        info: ConnectionInfo,
        *,
        idle_timeout_s: float,
        half_close_timeout_s: float,
        on_close: Callable[[Relay], None],
        splice: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.poller = poller_for(self.loop)
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
        self.splice = splice and _splice.AVAILABLE
        self.path = "copy"
        """``copy`` (fast path, bytes through a buffer), ``splice`` (fast path that
        moved bulk data zero-copy) or ``chain`` (elements attached)."""
        self.connect_time_s = 0.0
        self.reset = False
        """Whether the connection ended with an RST (set when it closes)."""
        self.timer_slack = 0.0 if isinstance(self.loop, asyncio.BaseEventLoop) else _COARSE_TIMER_SLACK_S
        self._closing: tuple[CloseReason, str] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ended = 0
        to_upstream = _Sender(self, upstream, UPSTREAM_SIDE)
        to_client = _Sender(self, client, CLIENT)
        self.up = _Flow(self, "upstream", client, CLIENT, to_upstream, to_client)
        self.down = _Flow(self, "downstream", upstream, UPSTREAM_SIDE, to_client, to_upstream)

    # -- public ------------------------------------------------------------

    @property
    def bytes_up(self) -> int:
        return self.up.bytes

    @property
    def bytes_down(self) -> int:
        return self.down.bytes

    def flow(self, direction: str) -> _Flow:
        return self.up if direction == "upstream" else self.down

    def set_stages(self, direction: str, stages: StageList) -> None:
        """Replace a direction's chain, live: removed stages are flushed first.

        A connection with any stage leaves the zero-copy path in both directions
        (a stage may ``reply`` into the other direction's socket, which must then
        be written in order through its sender)."""
        if self.closed:
            return
        if stages and self.splice:
            self.splice = False
            for flow in (self.up, self.down):
                flow.can_splice = False
                if self.started:
                    flow.use_copy()
        self.flow(direction).set_stages(stages)

    def start(self) -> None:
        """Begin relaying.  Call once."""
        self.started = True
        # A reset on a socket nobody reads or writes (reading paused for
        # back-pressure, or a side already half-closed) is seen at once too.
        self.poller.watch(self.up.src_fd, self._client_failed)
        self.poller.watch(self.down.src_fd, self._upstream_failed)
        self.up.start(self.splice)
        self.down.start(self.splice)
        self._arm()

    def close(self, reason: CloseReason, detail: str = "", *,
              quiet_s: float | None = None) -> None:
        """End the connection now, on midway's own initiative (a drain cut short, a
        second signal, a timeout, an admin command).

        Each socket gets a FIN, as at a clean stop, unless the direction into it
        is cut short (:meth:`_Flow.cut_short`: bytes held or unread, or a byte
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
        self._finish(reason, detail, PROXY,
                     reset_upstream=self.up.cut_short(now, quiet_s),
                     reset_client=self.down.cut_short(now, quiet_s))

    def abort(self, reason: CloseReason, detail: str = "", side: str = PROXY) -> None:
        """Reset both sockets (RST) now."""
        self._finish(reason, detail, side, reset_client=True, reset_upstream=True)

    def close_after_flush(self, reason: CloseReason, detail: str = "") -> None:
        """Stop reading both ways, deliver what was already passed to the senders,
        then FIN both ways and close (bounded by the half-close timeout)."""
        if self.closed or self._closing is not None:
            return
        self._closing = (reason, detail)
        if self.first_close is None:
            self.first_close = PROXY
        self.timers.half_closed(self.loop.time())
        self._arm()
        current = asyncio.current_task()
        for flow in (self.up, self.down):
            flow._stop_reading()
            flow.eof = True
            if flow.pump is not None and flow.pump is not current:
                flow.pump.cancel()
            flow.sender.send_eof()

    # -- events from flows and senders ---------------------------------------

    def _saw_end(self, side: str) -> None:
        if self.first_close is None:
            self.first_close = side

    def _direction_ended(self, sender: _Sender) -> None:
        self._ended += 1
        if self._ended == 2:  # every byte delivered and both FINs passed on
            reason, detail = self._closing or (CloseReason.EOF, "")
            self._finish(reason, detail, self.first_close or PROXY)
        else:
            self.timers.half_closed(self.loop.time())
            self._arm()

    def _failed(self, side: str, exc: OSError) -> None:
        if not self.closed:
            self.abort(CloseReason.RESET, f"{side}: {describe_oserror(exc)}", side)

    def _client_failed(self, exc: OSError) -> None:
        self._failed(CLIENT, exc)

    def _upstream_failed(self, exc: OSError) -> None:
        self._failed(UPSTREAM_SIDE, exc)

    def _stage_failed(self, direction: str, exc: BaseException) -> None:
        if self.closed:
            return
        log.error("conn %d (%s): %s chain element failed; closing this connection",
                  self.info.id, self.info.proxy, direction, exc_info=exc)
        self.abort(CloseReason.ERROR, f"{direction} element raised {type(exc).__name__}: {exc}",
                   PROXY)

    # -- timers -----------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.timers.next_deadline()
        if deadline is not None and not self.closed:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
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
        if self.first_close is None:
            self.first_close = side
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Before the descriptors are closed (and their numbers reused): the flows'
        # remove_reader/remove_writer below then cost nothing.
        self.poller.forget(self.up.src_fd)
        self.poller.forget(self.down.src_fd)
        for flow in (self.up, self.down):
            flow.stop()
            flow.sender.stop()
        close_socket(self.client, reset=reset_client)
        close_socket(self.upstream, reset=reset_upstream)
        self.on_close(self)


def _unread(fd: int) -> int:
    """Bytes waiting in socket ``fd``'s receive queue (FIONREAD, i.e. SIOCINQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, _INT_ZERO))[0]
    except OSError:
        return 0


_INT_ZERO = struct.pack("i", 0)


def close_socket(sock: socket.socket, *, reset: bool = False) -> None:
    """Close ``sock``, with an RST when ``reset`` (SO_LINGER 0)."""
    if reset:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    try:
        sock.close()
    except OSError:
        pass
