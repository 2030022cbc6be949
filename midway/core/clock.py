"""Clocks: the one source of "now" and "sleep" for timing logic.

Timing code takes a clock as a parameter instead of calling ``time`` or
``asyncio.sleep`` directly, so tests drive it with :class:`FakeClock` and assert exact
timings without sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Protocol

__all__ = ["Clock", "LoopClock", "FakeClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""


class LoopClock:
    """The running event loop's monotonic clock (the default everywhere)."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that only moves when a test calls :meth:`advance`.

    ``sleep`` parks the caller until ``advance`` moves time to (or past) its deadline;
    sleepers wake in deadline order, and ``advance`` lets every woken task run before
    it returns, so a test sees the effects of exactly the time it advanced.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting on this clock."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def settle(self) -> None:
        """Let every runnable task run until all are waiting again."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking sleepers at their deadlines in order."""
        target = self._now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
            await self.settle()
        self._now = target
        await self.settle()
