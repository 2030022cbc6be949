"""Cooperative time slices: a long loop on the event loop lets the others run.

Every connection of a process shares one event loop.  An element that does a lot
of work for one chunk (a slicer cutting 64 KiB into single bytes, a framer that
finds thousands of messages, a hook's 64 MiB injection written piece by piece)
holds that loop, and every other connection waits, unless it yields.

``await cooperate()`` between two pieces of such work yields to the loop once the
current loop turn has run for more than :data:`SLICE_S`, and otherwise costs a
clock read.  A turn starts at the first ``cooperate()`` after the loop last got
control: that call arms a ``call_soon`` marker, which runs (and so ends the turn)
as soon as the loop gets control back, whoever gave it.  Yielding is
``asyncio.sleep(0)``: the caller runs again on the next loop turn, after the
callbacks that were ready, so order within a task is unchanged.

The clock is :func:`time.perf_counter`, not ``loop.time()``: uvloop reads its clock
once per loop turn, so its time does not advance while one callback runs.  State
is per thread (one running loop per thread).
"""

from __future__ import annotations

import asyncio
import threading
from time import perf_counter

__all__ = ["SLICE_S", "cooperate"]

SLICE_S = 0.001
"""Longest stretch (1 ms) that chain work runs before letting other connections
have the loop: about one loopback round trip through midway (0.7 ms measured in
issue 8), so a busy neighbour adds about a round trip to another connection's
latency, while a yield (one loop turn, ~10 µs) costs about 1% of the time it
bounds.  For scale: asyncio's debug mode calls a callback slow at 100 ms."""


class _Turn(threading.local):
    armed = False
    deadline = 0.0


_turn = _Turn()


def _end_turn() -> None:
    _turn.armed = False


async def cooperate() -> None:
    """Yield to the event loop if this loop turn has run for :data:`SLICE_S`."""
    turn = _turn
    if not turn.armed:
        turn.armed = True
        turn.deadline = perf_counter() + SLICE_S
        asyncio.get_running_loop().call_soon(_end_turn)
    elif perf_counter() >= turn.deadline:
        await asyncio.sleep(0)
