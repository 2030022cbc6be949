"""The chain engine: runs one direction's stages between the relay's reader and sender.

Theory of operation
-------------------
The relay (:mod:`midway.core.relay`) moves bytes; this module runs elements.  A
direction with at least one stage gets a :class:`DirectionRunner`, attached to the
relay's :class:`~midway.core.relay.Flow` by :func:`set_stages`.  The flow's reader
hands it every chunk it reads (:meth:`DirectionRunner.received`); the runner queues
them, bounded by :data:`CHAIN_QUEUE_HIGH` bytes (it pauses the reader above that and
resumes it below :data:`CHAIN_QUEUE_LOW`), and one pump task feeds them, one at a
time and in order, through the stages (see :mod:`midway.chain.base`).  Each stage
gets an :class:`_Out` for its position; what the last stage sends goes to the
direction's sender, a chunk larger than :data:`WRITE_PIECE` a piece at a time.

The stage list changes live (:func:`set_stages`): the new list is taken between two
chunks.  A stage that goes has its pending sleeps cut short at once, then is flushed
(it passes on what it holds) and closed; a stage that stays keeps its ``Output`` (a
background task of its own may hold it); a new one is started.  When no stage is
left and nothing is queued the runner detaches and the direction is fast again.

A stage's exception (even ``SystemExit``/``KeyboardInterrupt``: user code) resets
this connection only, with one log line.

The runner's contract with the relay
------------------------------------
(The same text opens :mod:`midway.core.relay`, the other side.)  ``core`` knows no
chain type: what it needs of a chain is the :class:`~midway.core.relay.Chain`
protocol, which :class:`DirectionRunner` implements.

* The engine attaches itself to one direction with ``Flow.attach_chain`` (before
  ``Relay.start``, or live).  From the start, or at once if live, the direction is
  chained: the relay calls ``Chain.begin``, then, for every read,
  ``Chain.received`` (the chunk and the loop time it was read) and at the source's
  FIN ``Chain.ended``.  The relay has already counted the bytes read, stamped
  the activity and left the zero-copy path in this direction; the senders count
  what is delivered.
* The engine writes what its elements pass on through the direction's ``sender``
  (``write``, ``drain``, ``send_eof``; the FIN is its to send) and what they reply
  through ``reverse_sender``, both FIFOs shared with the fast path.  It applies its
  own back-pressure with ``Flow.pause_reading`` / ``Flow.resume_reading``.
* It ends the connection only through the relay (``Relay.close_after_flush``,
  ``Relay.abort``); ``Relay.copy_only`` takes both directions off the zero-copy
  path for good (an element may reply into the other direction).
* When it has nothing left to run and nothing queued it calls
  ``Flow.detach_chain`` and the direction is fast again.
* The relay asks ``Chain.holding`` whether ending now would cut bytes short, calls
  ``Chain.halt`` when it closes after a flush (stop feeding elements), and
  ``Chain.stop`` exactly once when it ends (cancel, interrupt, close elements).
  After that the engine must not touch the relay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence

from ..core.cooperate import cooperate
from ..core.observer import CloseReason
from ..core.relay import PROXY, Flow, Relay
from ..errors import traceback_of
from .base import ConnectionInfo, Direction, Stage

__all__ = [
    "set_stages",
    "DirectionRunner",
    "StageList",
    "timer_slack",
    "CHAIN_QUEUE_HIGH",
    "CHAIN_QUEUE_LOW",
    "WRITE_PIECE",
    "COARSE_TIMER_SLACK_S",
]

log = logging.getLogger("midway")

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

COARSE_TIMER_SLACK_S = 0.001
"""uvloop's clock (libuv's uv_now) has millisecond resolution and is read once per
loop turn, so a timer may fire up to ~1 ms early in real time; element sleeps
(latency toxics) are padded by that much so that "200 ms" is never less."""

StageList = Sequence[tuple[object, Stage]]
"""A direction's chain: (element key, stage) pairs in order."""


def timer_slack(loop: asyncio.AbstractEventLoop) -> float:
    """Seconds added to every element sleep on ``loop``: none on asyncio's own loops
    (a precise monotonic clock), :data:`COARSE_TIMER_SLACK_S` on any other (uvloop)."""
    return 0.0 if isinstance(loop, asyncio.BaseEventLoop) else COARSE_TIMER_SLACK_S


def set_stages(relay: Relay[ConnectionInfo], direction: Direction, stages: StageList) -> None:
    """Make ``stages`` the chain of ``relay``'s ``direction``, before it starts or
    live (applied between two chunks: removed stages are flushed first).

    A connection with any stage leaves the zero-copy path in both directions (a
    stage may ``reply`` into the other direction's socket, which must then be
    written in order through its sender).  An empty list on a direction that never
    had a stage costs nothing."""
    if relay.closed or (not stages and relay.chain_of(direction) is None):
        return  # (a relay in C mode stays there)
    if stages:
        relay.copy_only()
    flow = relay.flow(direction)
    runner = flow.chain
    if isinstance(runner, DirectionRunner):
        runner.set_stages(stages)
    elif stages:
        runner = DirectionRunner(flow, relay, direction)
        runner.set_stages(stages)
        flow.attach_chain(runner)


class DirectionRunner:
    """Runs one direction's stages; the :class:`~midway.core.relay.Chain` of a flow."""

    __slots__ = ("flow", "relay", "loop", "direction", "info", "slack", "stages", "wanted",
                 "outs", "queue", "queued", "pump", "wake", "received_at",
                 "received_wall")

    def __init__(self, flow: Flow, relay: Relay[ConnectionInfo], direction: Direction) -> None:
        self.flow = flow
        self.relay = relay
        self.loop = relay.loop
        self.direction = direction
        self.info = relay.info
        self.slack = timer_slack(self.loop)
        self.stages: list[tuple[object, Stage]] = []
        self.wanted: list[tuple[object, Stage]] = self.stages
        self.outs: list[_Out] = []
        self.queue: deque[tuple[bytes | None, float, float]] = deque()
        self.queued = 0
        """Bytes read and not yet taken by the first stage."""
        self.pump: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        """Set while the pump has work (a chunk, an EOF or a new stage list)."""
        self.received_at = 0.0
        self.received_wall = 0.0

    def set_stages(self, stages: StageList) -> None:
        wanted = list(stages)
        keep = {id(stage) for _, stage in wanted}
        for out, (_, stage) in zip(self.outs, self.stages, strict=True):
            if id(stage) not in keep:
                out.interrupt()
        self.wanted = wanted
        if self.pump is not None:
            self.wake.set()
        elif not wanted and not self.flow.chained:
            self.flow.detach_chain()  # never began: nothing to run or flush

    # -- the Chain protocol (called by the relay) --------------------------------

    def begin(self) -> None:
        self.pump = self.loop.create_task(self._pump())

    def received(self, data: bytes, now: float) -> None:
        # The wall clock too, read here to its full precision: ``now`` is the loop's
        # clock, which uvloop keeps in whole milliseconds (see Output.received_wall).
        self.queue.append((data, now, time.time()))
        self.queued += len(data)
        if self.queued >= CHAIN_QUEUE_HIGH:
            self.flow.pause_reading()
        self.wake.set()

    def ended(self, now: float) -> None:
        self.queue.append((None, now, time.time()))
        self.wake.set()

    def holding(self) -> bool:
        # The pump clears ``wake`` only to wait: set, it is busy with a chunk.
        return self.queued > 0 or self.wake.is_set()

    def halt(self) -> None:
        if self.pump is not None and self.pump is not asyncio.current_task():
            self.pump.cancel()

    def stop(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
            self.pump = None
        for out in self.outs:
            out.interrupt()
        for _, stage in self.stages:
            try:
                stage.close()
            except Exception:
                log.exception("conn %d: a %s stage failed to close", self.info.id, self.direction)
        self.stages = []

    # -- the pump -----------------------------------------------------------------

    async def _pump(self) -> None:
        flow, wake = self.flow, self.wake
        try:
            while True:
                if self.wanted is not self.stages:
                    await self._apply_changes()
                if not self.queue:
                    if not self.stages:
                        self._detach()
                        return
                    wake.clear()
                    await wake.wait()
                    continue
                data, self.received_at, self.received_wall = self.queue.popleft()
                if data is None:
                    await self._eof_from(0)
                    continue
                self.queued -= len(data)
                if not flow.reading and self.queued <= CHAIN_QUEUE_LOW:
                    flow.resume_reading()
                await self._data_from(0, data)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the relay stopping this pump
            self._failed(exc)  # raised by a stage's own code
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # A stage (user code) failed, even with an exception meant to end the
            # process: this connection only.
            self._failed(exc)

    def _detach(self) -> None:
        self.pump = None
        self.outs = []
        self.flow.detach_chain()

    def _failed(self, exc: BaseException) -> None:
        relay = self.relay
        if relay.closed:
            return
        log.error("conn %d (%s): %s chain element failed (%s); closing this connection",
                  self.info.id, self.info.proxy, self.direction, exc,
                  exc_info=traceback_of(exc))
        relay.abort(CloseReason.ERROR,
                    f"{self.direction} element raised {type(exc).__name__}: {exc}", PROXY)

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
            return
        sender = self.flow.sender
        if not sender.fin_sent and not sender.fin_pending:
            if len(data) > WRITE_PIECE:
                await self._write_pieces(data)
            elif not sender.write(data):
                await sender.drain()

    async def _write_pieces(self, data: bytes) -> None:
        """Write a large chunk a piece at a time (see :data:`WRITE_PIECE`)."""
        sender = self.flow.sender
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
            self.flow.sender.send_eof()


class _Out:
    """The :class:`~midway.chain.base.Output` handed to the stage at ``index``."""

    __slots__ = ("runner", "index", "direction", "info", "interrupted", "_sleepers")

    def __init__(self, runner: DirectionRunner, index: int) -> None:
        self.runner = runner
        self.index = index
        self.direction: Direction = runner.direction
        self.info: ConnectionInfo = runner.info
        self.interrupted = False
        self._sleepers: set[asyncio.Future[bool]] = set()

    @property
    def received_at(self) -> float:
        return self.runner.received_at

    @received_at.setter
    def received_at(self, value: float) -> None:
        self.runner.received_at = value

    @property
    def received_wall(self) -> float:
        return self.runner.received_wall

    def now(self) -> float:
        return self.runner.loop.time()

    async def sleep(self, seconds: float) -> bool:
        runner = self.runner
        if self.interrupted or runner.relay.closed:
            return False
        loop = runner.loop
        fut: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_later(max(seconds, 0.0) + runner.slack, _resolve, fut, True)
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
            await self.runner._data_from(self.index + 1, data)

    async def send_eof(self) -> None:
        await self.runner._eof_from(self.index + 1)

    async def reply(self, data: bytes) -> None:
        sender = self.runner.flow.reverse_sender
        if data and not sender.fin_sent and not self.runner.relay.closed:
            if not sender.write(data):
                await sender.drain()

    def close(self, reason: str = "closed by element") -> None:
        self.runner.relay.close_after_flush(CloseReason.ELEMENT, reason)

    def reset(self, reason: str = "reset by element") -> None:
        self.runner.relay.abort(CloseReason.ELEMENT, reason, PROXY)


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)
