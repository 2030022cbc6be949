"""Drive chain stages directly with bytes under a fake clock.

:class:`FakeOutput` implements :class:`midway.chain.base.Output` over a
:class:`~midway.core.clock.FakeClock` and records everything a stage does (send,
eof, reply, close, reset) with the clock time it happened.  :class:`Feeder` plays the
relay's part for one direction: it reads each chunk at its scripted arrival time
(stamping ``out.received_at``), feeds the stage one call at a time in order, and can
remove the stage live the way the relay does (cut the pending sleep short, wait for
the call in progress, ``flush``, then pass later chunks straight on).
:func:`run_stage` does all of that for a script and returns the recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from midway.chain.base import ConnectionInfo, Direction, Stage
from midway.core.clock import FakeClock

__all__ = ["Event", "FakeOutput", "Feeder", "run_stage", "run", "make_info", "EOF", "loop_gaps"]

T = TypeVar("T")

WALL_AT_ZERO = 1714566896.0
"""The wall-clock time a :class:`FakeOutput` maps its fake clock's 0 to."""

EOF = None
"""In a script, the end of the stream."""

Script = Iterable[tuple[float, bytes | None]]


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
    """Run a test coroutine with a bound on its (real) running time."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@contextlib.asynccontextmanager
async def loop_gaps() -> AsyncIterator[list[float]]:
    """While the block runs, a task that does nothing but yield records the real
    time (seconds) between its turns: how long other work held the loop."""
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0)
    try:
        yield gaps
    finally:
        ticker.cancel()


def make_info(
    sequence: int = 1, client_addr: tuple[str, int] | None = ("127.0.0.1", 40000)
) -> ConnectionInfo:
    client = "unix:/tmp/s" if client_addr is None else f"{client_addr[0]}:{client_addr[1]}"
    return ConnectionInfo(
        id=sequence,
        proxy="test",
        client=client,
        listener="127.0.0.1:8080",
        client_addr=client_addr,
        sequence=sequence,
    )


@dataclass(frozen=True)
class Event:
    time: float
    kind: str
    """``send``, ``eof``, ``reply``, ``close`` or ``reset``."""
    data: bytes = b""
    reason: str = ""


class FakeOutput:
    """An :class:`~midway.chain.base.Output` that records instead of sending.

    There is always room: ``send`` records at once without yielding, so a burst
    of sends happens at one instant of the fake clock however many there are.
    Sleeps are cut short by :meth:`cut` (removal) and by ``close``/``reset`` (the
    connection closing), as the protocol says."""

    def __init__(
        self,
        clock: FakeClock | None = None,
        direction: Direction = "downstream",
        info: ConnectionInfo | None = None,
    ) -> None:
        self.clock = clock if clock is not None else FakeClock()
        self.direction: Direction = direction
        self.info = info if info is not None else make_info()
        self.received_at = self.clock.now()
        self.received_wall = WALL_AT_ZERO + self.received_at
        """The wall-clock reading of ``received_at``: the fake clock's 0 is
        :data:`WALL_AT_ZERO`; a test may set it apart (uvloop's clock is coarse)."""
        self.events: list[Event] = []
        self.sleeps: list[tuple[float, float]] = []
        """Every ``sleep`` call as (time called, seconds asked)."""
        self._cut = asyncio.Event()
        self._eof = False

    # -- the Output protocol --------------------------------------------------

    def now(self) -> float:
        return self.clock.now()

    async def sleep(self, seconds: float) -> bool:
        self.sleeps.append((self.now(), seconds))
        if self._cut.is_set():
            await asyncio.sleep(0)
            return False
        if seconds <= 0:
            await asyncio.sleep(0)
            return True
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            done, _ = await asyncio.wait({sleeper, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            if not sleeper.done():
                sleeper.cancel()
        return sleeper in done and not sleeper.cancelled()

    async def send(self, data: bytes) -> None:
        assert isinstance(data, bytes), f"send() takes bytes, got {type(data).__name__}"
        assert data, "a stage must not send empty chunks"
        assert not self.eof_sent, "send() after send_eof()"
        self._record("send", data)

    async def send_eof(self) -> None:
        assert not self.eof_sent, "send_eof() twice"
        self._record("eof")

    async def reply(self, data: bytes) -> None:
        self._record("reply", data)

    def close(self, reason: str = "closed by element") -> None:
        self._record("close", reason=reason)
        self._cut.set()

    def reset(self, reason: str = "reset by element") -> None:
        self._record("reset", reason=reason)
        self._cut.set()

    # -- test helpers ------------------------------------------------------------

    def cut(self) -> None:
        """Cut pending and future sleeps short, as the relay does on removal."""
        self._cut.set()

    def _record(self, kind: str, data: bytes = b"", reason: str = "") -> None:
        self.events.append(Event(self.now(), kind, data, reason))
        self._eof = self._eof or kind == "eof"

    @property
    def sends(self) -> list[tuple[float, bytes]]:
        return [(e.time, e.data) for e in self.events if e.kind == "send"]

    @property
    def sent(self) -> bytes:
        """Every byte passed on, concatenated."""
        return b"".join(e.data for e in self.events if e.kind == "send")

    @property
    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    @property
    def eof_sent(self) -> bool:
        return self._eof  # O(1): a stage may send 65 536 pieces

    def first(self, kind: str) -> Event | None:
        return next((e for e in self.events if e.kind == kind), None)


class Feeder:
    """The relay's part for one direction of one stage."""

    def __init__(self, stage: Stage, out: FakeOutput) -> None:
        self.stage = stage
        self.out = out
        self.removed = False
        self.given = 0
        """Bytes handed to the stage (not counting those passed straight on after
        removal)."""
        self.calls = 0
        """Calls made into the stage (``data`` and ``eof``)."""
        self._lock = asyncio.Lock()

    async def feed(self, script: Script) -> None:
        """Deliver each chunk (``None``: EOF) no earlier than its arrival time."""
        clock = self.out.clock
        for at, chunk in script:
            if at > clock.now():
                await clock.sleep(at - clock.now())
            await self._deliver(at, chunk)

    async def _deliver(self, at: float, chunk: bytes | None) -> None:
        async with self._lock:
            self.out.received_at = at
            self.out.received_wall = WALL_AT_ZERO + at
            if self.removed:
                if chunk is None:
                    await self.out.send_eof()
                else:
                    await self.out.send(chunk)
            elif chunk is None:
                self.calls += 1
                await self.stage.eof(self.out)
            else:
                self.calls += 1
                self.given += len(chunk)
                await self.stage.data(chunk, self.out)

    async def remove(self) -> None:
        """Remove the stage live: cut its sleep, let the call in progress end,
        flush, and from then on pass chunks straight on."""
        self.out.cut()
        async with self._lock:
            await self.stage.flush(self.out)
            self.removed = True


async def run_stage(
    stage: Stage,
    script: Script,
    *,
    out: FakeOutput | None = None,
    until: float = 1000.0,
    remove_at: float | None = None,
) -> FakeOutput:
    """Feed ``script`` through ``stage`` while the fake clock runs to ``until``
    (optionally removing the stage at ``remove_at``), close it, and return the
    recording.  The feeder must have finished by ``until``."""
    out = out if out is not None else FakeOutput()
    clock = out.clock
    feeder = Feeder(stage, out)
    task = asyncio.ensure_future(feeder.feed(list(script)))
    if remove_at is not None:
        await clock.advance(remove_at - clock.now())
        await feeder.remove()
    await clock.advance(until - clock.now())
    assert task.done(), f"the stage was still busy at t={until}"
    task.result()
    stage.close()
    return out
