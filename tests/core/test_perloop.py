"""One object per loop (midway/core/perloop.py): the same one for the same loop,
never one loop's for another (the remembered last one included), none kept once
its loop is gone, and none kept across forget_all (a forked child's fresh start)."""

from __future__ import annotations

import asyncio
import gc
import weakref

from midway.core.perloop import PerLoop


class _Thing:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)


def test_one_object_per_loop_even_when_loops_alternate() -> None:
    per_loop: PerLoop[_Thing] = PerLoop(_Thing)
    a, b = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        first_a = per_loop.get(a)
        first_b = per_loop.get(b)
        assert first_a is not first_b
        for _ in range(3):
            assert per_loop.get(a) is first_a
            assert per_loop.get(b) is first_b
        assert first_a.loop() is a and first_b.loop() is b
    finally:
        a.close()
        b.close()


def test_a_collected_loop_takes_its_object_with_it() -> None:
    per_loop: PerLoop[_Thing] = PerLoop(_Thing)
    loop = asyncio.new_event_loop()
    thing = weakref.ref(per_loop.get(loop))
    other = asyncio.new_event_loop()
    per_loop.get(other)              # no longer the last one asked for
    loop.close()
    del loop
    gc.collect()
    assert thing() is None
    other.close()


def test_forget_all_makes_new_ones() -> None:
    per_loop: PerLoop[_Thing] = PerLoop(_Thing)
    loop = asyncio.new_event_loop()
    try:
        before = per_loop.get(loop)
        per_loop.forget_all()
        assert per_loop.get(loop) is not before
    finally:
        loop.close()
