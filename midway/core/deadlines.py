"""Per-connection deadlines on one loop timer: a heap of plain tuples.

Theory of operation
-------------------
Every connection has deadlines (the dial's connect timeout, the relay's idle and
half-close timeouts), nearly all of which are cancelled long before they pass: a
connection dials in a millisecond and closes long before its idle hour.  A loop
timer per deadline costs an object, a context copy and a bound method each (about
240 bytes an idle connection holds, more under uvloop, whose timers are libuv
handles), and under asyncio every timer added or cancelled pays Python-level
comparisons in the loop's heap.

Here a deadline is a tuple ``(when, token)`` in a heap that compares in C, and a
``token → owner`` entry in a dictionary; the loop holds one timer, for the
earliest entry.  Cancelling removes the owner from the dictionary (so a finished
connection is not kept alive by its cancelled deadline) and leaves the tuple,
skipped when it comes up.  Stale tuples are counted, and once they are more than
half of the heap it is rebuilt without them (asyncio's own rule for its cancelled
timers), so memory stays proportional to the live deadlines.  When the timer fires
with no deadline left, or :meth:`Deadlines.release` is called with none (a runtime
that stopped), the heap is emptied and the loop timer dropped: a timer holds its
loop, which a closed loop's cached :class:`Deadlines` would otherwise keep alive
for good.  A cancel leaves the timer (the next connection would arm it again).

An owner (:class:`Timed`) has a ``deadline_token`` attribute (0: nothing scheduled)
and a ``deadline_passed()`` method, called from the loop once ``loop.time()`` has
reached the deadline (the token is reset to 0 first, so the callback may schedule
again).  One :class:`Deadlines` per loop, made lazily by :func:`deadlines_for`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from collections.abc import Callable
from typing import Protocol

from .perloop import PerLoop

__all__ = ["Deadlines", "Timed", "deadlines_for"]

_REBUILD_MIN = 64
"""Stale entries tolerated before the heap is rebuilt, however small it is."""


class Timed(Protocol):
    """An object with at most one deadline at a time."""

    deadline_token: int
    """The token of the scheduled deadline; 0 when none."""

    def deadline_passed(self) -> None:
        """The deadline has come (``deadline_token`` is already 0)."""


class Deadlines:
    """The deadlines of one loop (see the module's theory)."""

    __slots__ = ("_loop", "_heap", "_owners", "_tokens", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self._heap: list[tuple[float, int]] = []
        self._owners: dict[int, Timed] = {}
        self._tokens = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def schedule(self, when: float, owner: Timed) -> None:
        """Call ``owner.deadline_passed()`` at loop time ``when``, replacing the
        owner's earlier deadline if it has one."""
        owners, heap = self._owners, self._heap
        token = owner.deadline_token
        if token:  # cancel, inline: the earlier tuple is left stale in the heap
            del owners[token]
            stale = len(heap) - len(owners)
            if stale > _REBUILD_MIN and stale * 2 > len(heap):
                self._rebuild()
                heap = self._heap
        token = owner.deadline_token = next(self._tokens)
        owners[token] = owner
        heapq.heappush(heap, (when, token))
        if self._timer is None or when < self._timer_at:
            self._arm(when)

    def cancel(self, owner: Timed) -> None:
        """Drop ``owner``'s deadline (nothing if it has none)."""
        token = owner.deadline_token
        if token:
            owner.deadline_token = 0
            owners = self._owners
            del owners[token]
            stale = len(self._heap) - len(owners)
            if stale > _REBUILD_MIN and stale * 2 > len(self._heap):
                self._rebuild()

    def __len__(self) -> int:
        """Deadlines scheduled and not cancelled."""
        return len(self._owners)

    def _arm(self, when: float) -> None:
        loop = self._loop()
        if loop is None or loop.is_closed():
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop()
        if loop is None:
            return
        heap, owners = self._heap, self._owners
        now = loop.time()
        while heap and heap[0][0] <= now:
            owner = owners.pop(heapq.heappop(heap)[1], None)
            if owner is None:
                continue  # cancelled
            owner.deadline_token = 0
            try:
                owner.deadline_passed()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                loop.call_exception_handler({
                    "message": f"Exception in deadline callback of {owner!r}", "exception": exc})
        if not owners:
            self._idle()
        elif heap:
            self._arm(heap[0][0])

    def release(self) -> None:
        """If no deadline is left, drop the loop timer (:meth:`_idle`): called when
        a runtime stops, so that its loop can be collected once closed."""
        if not self._owners:
            self._idle()

    def _idle(self) -> None:
        """No deadline left: the heap emptied and the loop timer cancelled and
        dropped.  A timer handle holds its loop, and this object, the loop's in a
        weakly keyed cache, would then keep the loop (and its poller's epoll)
        alive for good once it closed."""
        self._heap = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rebuild(self) -> None:
        owners = self._owners
        live = [entry for entry in self._heap if entry[1] in owners]
        heapq.heapify(live)
        self._heap = live
        if not live:
            self._idle()
        # Otherwise a timer armed for a cancelled entry stays: it finds nothing due
        # and re-arms for the earliest live one.


_deadlines: PerLoop[Deadlines] = PerLoop(Deadlines)


deadlines_for: Callable[[asyncio.AbstractEventLoop], Deadlines] = _deadlines.get
"""``deadlines_for(loop)``: the :class:`Deadlines` of ``loop`` (made on first use),
the cache's own method (one call less, several times a connection)."""
