"""The relay's poller (midway/core/poller.py), on both event loops, with real
socket pairs: the loop's level-triggered semantics, descriptor reuse, error and
hang-up delivery, and a callback that raises."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest

from midway.core import accel
from midway.core import poller as poller_module
from midway.core.poller import Poller, engine_for, poller_for

from .. import helpers

pytestmark = pytest.mark.skipif(not poller_module.AVAILABLE, reason="needs epoll (Linux)")

LOOPS = ["asyncio", "uvloop"]


@pytest.fixture(params=LOOPS)
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    if request.param == "uvloop":
        if importlib.util.find_spec("uvloop") is None:
            pytest.skip(helpers.needs("uvloop", pip="midway[fast]"))
        import uvloop
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def run(factory: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, 10))


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair over loopback (non-blocking), so that resets exist."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0.01)


def test_one_poller_per_loop(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> Poller:
        loop = asyncio.get_running_loop()
        first = poller_for(loop)
        assert poller_for(loop) is first
        assert isinstance(first, Poller)
        return first

    assert run(loop_factory, main()) is not run(loop_factory, main())


def test_reader_level_triggered_until_removed(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        p = poller_for(asyncio.get_running_loop())
        a, b = pair()
        calls: list[bytes] = []
        p.add_reader(a.fileno(), lambda: calls.append(b"r"))
        b.send(b"x")
        await turns()
        assert len(calls) > 1, "level-triggered: called again while data is unread"
        assert p.remove_reader(a.fileno()) is True
        assert p.remove_reader(a.fileno()) is False
        n = len(calls)
        await turns()
        assert len(calls) == n
        # Added again: called again (the data is still there).
        p.add_reader(a.fileno(), lambda: calls.append(a.recv(10)))
        await turns()
        assert calls[-1] == b"x" or b"x" in calls
        p.forget(a.fileno())
        a.close()
        b.close()

    run(loop_factory, main())


def test_writer_and_replacing_a_callback(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        p = poller_for(asyncio.get_running_loop())
        a, b = pair()
        first: list[int] = []
        second: list[int] = []
        p.add_writer(a.fileno(), lambda: first.append(1))
        p.add_writer(a.fileno(), lambda: (second.append(1), p.remove_writer(a.fileno())))
        await turns()
        assert first == [] and second == [1]
        p.forget(a.fileno())
        a.close()
        b.close()

    run(loop_factory, main())


def test_a_reused_descriptor_never_gets_the_old_callback(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        p = poller_for(asyncio.get_running_loop())
        a, b = pair()
        old: list[int] = []
        fd = a.fileno()
        p.add_reader(fd, lambda: old.append(1))
        p.add_writer(fd, lambda: old.append(2))
        p.forget(fd)
        a.close()
        c, d = pair()  # likely the same descriptor number
        new: list[bytes] = []
        p.add_reader(c.fileno(), lambda: new.append(c.recv(10)))
        d.send(b"hi")
        await turns()
        assert old == []
        assert new[:1] == [b"hi"]
        p.forget(c.fileno())
        for s in (b, c, d):
            s.close()

    run(loop_factory, main())


def test_forget_during_a_batch_skips_the_stale_event(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """Two ready descriptors in one batch; the first callback closes the second
    and a new socket takes its number: the batch's event for it is stale."""
    async def main() -> None:
        p = poller_for(asyncio.get_running_loop())
        a, a_peer = pair()
        b, b_peer = pair()
        called: list[str] = []
        reused: list[socket.socket] = []

        def on_a() -> None:
            called.append("a")
            p.forget(a.fileno())
            fd = b.fileno()
            p.forget(fd)
            b.close()
            c, c_peer = socket.socketpair()  # the lowest free number: b's
            reused.extend((c, c_peer))
            assert fd in (c.fileno(), c_peer.fileno())
            # Nothing is sent to it: any call would come from b's stale event.
            p.add_reader(fd, lambda: called.append("new"))

        p.add_reader(a.fileno(), on_a)
        p.add_reader(b.fileno(), lambda: called.append("b"))
        a_peer.send(b"1")
        b_peer.send(b"2")
        await turns()
        assert called[0] == "a"
        assert called == ["a"], "an event of a forgotten descriptor was dispatched"
        for s in (a, a_peer, b_peer, *reused):
            p.forget(s.fileno())
            s.close()

    run(loop_factory, main())


def test_reset_with_data_reaches_the_reader(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """Data and a reset at once (EPOLLIN|EPOLLERR): the reader gets both."""
    async def main() -> None:
        p = poller_for(asyncio.get_running_loop())
        a, b = pair()
        got: list[object] = []

        def on_readable() -> None:
            try:
                got.append(a.recv(100))
            except OSError as exc:
                got.append(type(exc))
                p.forget(a.fileno())

        p.add_reader(a.fileno(), on_readable)
        b.send(b"reply")
        reset(b)
        await turns()
        assert got == [b"reply", ConnectionResetError]
        a.close()

    run(loop_factory, main())


def test_reset_on_a_socket_nobody_reads_goes_to_on_error(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        p = poller_for(asyncio.get_running_loop())
        a, b = pair()
        errors: list[OSError] = []
        p.watch(a.fileno(), errors.append)
        p.add_reader(a.fileno(), lambda: None)
        p.remove_reader(a.fileno())  # paused, as for back-pressure
        reset(b)
        await turns()
        assert [e.errno for e in errors] == [104]  # ECONNRESET, seen once
        p.forget(a.fileno())
        a.close()

    run(loop_factory, main())


def test_hang_up_nobody_reads_does_not_spin(
        loop_factory: Callable[[], asyncio.AbstractEventLoop],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both directions shut, the EOF not read: a level-triggered EPOLLHUP.  It is
    not an error; the poller stops polling the descriptor instead of spinning."""
    async def main() -> None:
        p = poller_for(asyncio.get_running_loop())
        assert isinstance(p, Poller)
        wakeups = [0]
        dispatch = p._dispatch

        def counting() -> None:
            wakeups[0] += 1
            dispatch()

        loop = asyncio.get_running_loop()
        loop.remove_reader(p._epoll.fileno())
        loop.add_reader(p._epoll.fileno(), counting)
        a, b = pair()
        errors: list[OSError] = []
        p.watch(a.fileno(), errors.append)
        p.add_reader(a.fileno(), lambda: None)
        p.remove_reader(a.fileno())
        b.shutdown(socket.SHUT_WR)
        a.shutdown(socket.SHUT_WR)
        await turns(10)
        assert errors == []
        assert wakeups[0] <= 3, f"{wakeups[0]} wake-ups: the hang-up spins"
        # Wanted again: registered again, and the EOF is read.
        got: list[bytes] = []
        p.add_reader(a.fileno(), lambda: got.append(a.recv(10)))
        await turns()
        assert got[:1] == [b""]
        p.forget(a.fileno())
        a.close()
        b.close()

    run(loop_factory, main())


def test_a_raising_callback_is_reported_and_others_still_run(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        p = poller_for(loop)
        a, a_peer = pair()
        b, b_peer = pair()
        ran: list[str] = []

        def boom() -> None:
            p.remove_reader(a.fileno())
            raise ValueError("user code failed")

        p.add_reader(a.fileno(), boom)
        p.add_reader(b.fileno(), lambda: (ran.append("b"), p.remove_reader(b.fileno())))
        a_peer.send(b"1")
        b_peer.send(b"2")
        await turns()
        assert ran == ["b"]
        assert [type(c["exception"]) for c in reported] == [ValueError]
        # The dispatcher still works afterwards.
        p.add_reader(a.fileno(), lambda: (ran.append("a"), p.remove_reader(a.fileno())))
        await turns()
        assert ran == ["b", "a"]
        for s in (a, a_peer, b, b_peer):
            p.forget(s.fileno())
            s.close()

    run(loop_factory, main())


def test_hand_over_leaves_the_descriptor_registered_with_its_mask(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """What the compiled relay's start relies on: a descriptor handed over keeps its
    kernel registration (the engine changes it with one ``epoll_ctl``) and its
    callbacks are gone; one nobody registered is reported as such."""
    async def main() -> None:
        p = poller_for(asyncio.get_running_loop())
        assert isinstance(p, Poller)
        a, a_peer = pair()
        called: list[str] = []
        p.add_writer(a.fileno(), lambda: called.append("writer"))
        assert p.hand_over(a.fileno()) == select.EPOLLOUT
        a_peer.send(b"x")
        await turns()
        assert called == []  # the writer left with the hand-over (it was writable)
        with pytest.raises(FileExistsError):  # still in the epoll set
            p._epoll.register(a.fileno(), select.EPOLLIN)
        p._epoll.unregister(a.fileno())
        assert p.hand_over(a_peer.fileno()) == -1
        a.close()
        a_peer.close()

    run(loop_factory, main())


@pytest.mark.skipif(not accel.AVAILABLE, reason=helpers.needs_accel())
def test_with_the_compiled_relay_the_poller_and_engine_share_one_epoll(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """One epoll per loop: what the poller registers is in the engine's set, and its
    callbacks run from the engine's dispatch (the loop's one reader)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        p = poller_for(loop)
        engine = engine_for(loop)
        assert engine is not None and p.engine is engine
        a, a_peer = pair()
        got = loop.create_future()
        p.add_reader(a.fileno(), lambda: got.done() or got.set_result(a.recv(10)))
        same = select.epoll.fromfd(os.dup(engine.epfd))
        try:
            with pytest.raises(FileExistsError):
                same.register(a.fileno(), select.EPOLLIN)
        finally:
            same.close()
        a_peer.send(b"through")
        assert await asyncio.wait_for(got, 5) == b"through"
        p.forget(a.fileno())
        a.close()
        a_peer.close()

    run(loop_factory, main())
