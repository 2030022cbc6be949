"""Deadlines on one loop timer (midway/core/deadlines.py), driven on a fake loop:
order, replacement, cancellation (no owner kept alive), the heap rebuilt once
mostly stale, the one loop timer re-armed only for an earlier deadline, and a
callback that raises."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from midway.core.deadlines import Deadlines


class _Handle:
    def __init__(self, loop: FakeLoop, when: float, callback: Any) -> None:
        self.loop, self.when, self.callback, self.cancelled = loop, when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The three loop calls Deadlines makes, on a clock moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[_Handle] = []
        self.errors: list[dict[str, Any]] = []

    def time(self) -> float:
        return self.now

    def is_closed(self) -> bool:
        return False

    def call_at(self, when: float, callback: Any) -> _Handle:
        handle = _Handle(self, when, callback)
        self.handles.append(handle)
        return handle

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def armed(self) -> list[float]:
        return [h.when for h in self.handles if not h.cancelled]

    def advance(self, to: float) -> None:
        self.now = to
        for handle in list(self.handles):
            if not handle.cancelled and handle.when <= to:
                self.handles.remove(handle)
                handle.callback()


class Owner:
    def __init__(self, name: str, fired: list[str]) -> None:
        self.name, self.fired, self.deadline_token = name, fired, 0

    def deadline_passed(self) -> None:
        self.fired.append(self.name)


def make() -> tuple[FakeLoop, Deadlines, list[str]]:
    loop = FakeLoop()
    return loop, Deadlines(loop), []  # type: ignore[arg-type]


def test_deadlines_fire_in_order_of_time_not_of_scheduling() -> None:
    loop, deadlines, fired = make()
    for name, when in [("c", 3.0), ("a", 1.0), ("b", 2.0)]:
        deadlines.schedule(when, Owner(name, fired))
    loop.advance(1.5)
    assert fired == ["a"]
    loop.advance(10.0)
    assert fired == ["a", "b", "c"]
    assert len(deadlines) == 0 and loop.armed() == []


def test_rescheduling_replaces_and_cancel_drops_without_keeping_the_owner() -> None:
    loop, deadlines, fired = make()
    moved, dropped = Owner("moved", fired), Owner("dropped", fired)
    deadlines.schedule(1.0, moved)
    deadlines.schedule(5.0, moved)  # replaces the 1.0 one
    deadlines.schedule(2.0, dropped)
    deadlines.cancel(dropped)
    assert dropped.deadline_token == 0 and len(deadlines) == 1
    ref = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is None  # a cancelled deadline does not pin a finished connection
    loop.advance(4.0)
    assert fired == []
    loop.advance(5.0)
    assert fired == ["moved"] and moved.deadline_token == 0


def test_no_deadline_left_drops_the_loop_timer_which_holds_the_loop() -> None:
    """Once every deadline has fired, or is cancelled and the runtime released
    them, no loop timer is kept (a timer holds its loop: a closed loop would stay
    alive, its epoll open)."""
    loop, deadlines, fired = make()
    a, b = Owner("a", fired), Owner("b", fired)
    deadlines.schedule(5.0, a)
    deadlines.schedule(9.0, b)
    deadlines.cancel(b)
    deadlines.cancel(a)
    assert len(loop.armed()) == 1  # kept: the next connection would arm one again
    deadlines.release()  # a runtime that stopped
    assert loop.armed() == [] and deadlines._timer is None and deadlines._heap == []
    deadlines.schedule(5.0, a)
    deadlines.schedule(9.0, b)
    deadlines.cancel(b)            # a stale tuple after a's, which then fires
    loop.advance(5.0)
    assert fired == ["a"]
    assert loop.armed() == [] and deadlines._timer is None and deadlines._heap == []


def test_one_loop_timer_rearmed_only_for_an_earlier_deadline() -> None:
    loop, deadlines, fired = make()
    for i in range(100):
        deadlines.schedule(10.0 + i, Owner(str(i), fired))
    assert loop.armed() == [10.0]
    deadlines.schedule(5.0, Owner("early", fired))
    assert loop.armed() == [5.0]
    loop.advance(5.0)
    assert fired == ["early"] and loop.armed() == [10.0]


def test_a_mostly_stale_heap_is_rebuilt() -> None:
    loop, deadlines, fired = make()
    owners = [Owner(str(i), fired) for i in range(1000)]
    for i, owner in enumerate(owners):
        deadlines.schedule(100.0 + i, owner)
    for owner in owners[:900]:
        deadlines.cancel(owner)
    assert len(deadlines._heap) < 2 * 100 + 70  # rebuilt: about twice the live ones at most
    loop.advance(10_000.0)
    assert fired == [str(i) for i in range(900, 1000)]


def test_rescheduling_alone_keeps_the_heap_bounded() -> None:
    """A connection that keeps moving its deadline (each re-arm leaves the
    earlier tuple stale) does not grow the heap without bound, and only its
    last deadline fires."""
    loop, deadlines, fired = make()
    others = [Owner(f"other{i}", fired) for i in range(10)]
    for i, other in enumerate(others):
        deadlines.schedule(1_000_000.0 + i, other)
    busy = Owner("busy", fired)
    for i in range(10_000):
        deadlines.schedule(100.0 + i, busy)
    assert len(deadlines) == 11
    assert len(deadlines._heap) < 2 * 11 + 70
    loop.advance(10_099.0)
    assert fired == ["busy"]


def test_the_callback_may_schedule_again_and_an_error_goes_to_the_loop() -> None:
    loop, deadlines, fired = make()

    class Again(Owner):
        def deadline_passed(self) -> None:
            super().deadline_passed()
            if len(self.fired) < 3:
                deadlines.schedule(loop.time() + 1.0, self)

    class Broken(Owner):
        def deadline_passed(self) -> None:
            raise RuntimeError("boom")

    deadlines.schedule(1.0, Again("again", fired))
    deadlines.schedule(1.0, Broken("broken", fired))
    for t in (1.0, 2.0, 3.0, 4.0):
        loop.advance(t)
    assert fired == ["again"] * 3
    assert [str(e["exception"]) for e in loop.errors] == ["boom"]
