"""One object per event loop, made on first use.

Theory of operation
-------------------
The poller (:func:`~midway.core.poller.poller_for`) and the deadline heap
(:func:`~midway.core.deadlines.deadlines_for`) are one per loop, and looked up
for every connection.  A :class:`PerLoop` keeps them in a dictionary keyed
weakly by loop, so a loop that is collected takes its object with it, and
remembers the one it gave last: a process runs one loop per thread, so nearly
every look-up is one identity test instead of a dictionary look-up.  It holds
that loop weakly too; the object it made should do the same, or the loop is
never collected.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PerLoop"]

T = TypeVar("T")


class PerLoop(Generic[T]):
    """``get(loop)``: the object ``make(loop)`` made for ``loop``, made on the
    first call for that loop."""

    __slots__ = ("_make", "_all", "_last")

    def __init__(self, make: Callable[[asyncio.AbstractEventLoop], T]) -> None:
        self._make = make
        self._all: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = \
            weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], T] | None = None
        """The loop asked for last, and its object."""

    def get(self, loop: asyncio.AbstractEventLoop) -> T:
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        found = self._all.get(loop)
        if found is None:
            found = self._all[loop] = self._make(loop)
        self._last = (weakref.ref(loop), found)
        return found

    def forget_all(self) -> None:
        """Drop every object made so far (a forked child must not use its
        parent's); the next :meth:`get` makes a new one."""
        self._last = None
        self._all = weakref.WeakKeyDictionary()
