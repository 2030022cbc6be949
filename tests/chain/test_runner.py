"""The chain runner (midway.chain.runner) driving a real relay over loopback TCP:
stages before the start and live, flush on removal, back to the fast path,
bounded read-ahead, a failing stage, and the timer-slack policy."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest

from midway.chain.base import UPSTREAM, Output, Stage
from midway.chain.runner import (
    CHAIN_QUEUE_HIGH,
    COARSE_TIMER_SLACK_S,
    DirectionRunner,
    set_stages,
    timer_slack,
)
from midway.core import splice as splice_module
from midway.core.observer import CloseReason
from midway.core.relay import READ_SIZE, Relay

from .. import helpers
from ..core.endpoints import make_relay, read_to_eof, sha, tcp_pair
from .harness import make_info


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (bounded) until ``predicate()`` holds, letting the relay run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def test_sleeps_are_padded_on_a_coarse_clock_only() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert timer_slack(loop) == 0.0  # asyncio's clock is precise
    finally:
        loop.close()
    if importlib.util.find_spec("uvloop") is None:
        pytest.skip(helpers.needs("uvloop", pip="midway[fast]"))
    import uvloop
    coarse = uvloop.new_event_loop()
    try:
        assert timer_slack(coarse) == COARSE_TIMER_SLACK_S == 0.001  # libuv's 1 ms clock
    finally:
        coarse.close()


def test_an_empty_chain_leaves_a_connection_alone() -> None:
    async def main() -> None:
        client_app, client_end = tcp_pair()
        server_app, upstream_end = tcp_pair()
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(client_end, upstream_end, closed, make_info())
        splice_before = relay.splice
        set_stages(relay, UPSTREAM, [])
        assert relay.up.chain is None and relay.splice == splice_before
        set_stages(relay, UPSTREAM, [("x", Stage())])
        set_stages(relay, UPSTREAM, [])  # gone again before the start: nothing to run
        relay.start()
        assert relay.up.chain is None and not relay.up.chained
        assert not relay.splice  # a stage was set once: copy from then on
        relay.close(CloseReason.SHUTDOWN)
        client_app.close()
        server_app.close()

    asyncio.run(asyncio.wait_for(main(), 10))


class HoldUntilFlush(Stage):
    """Keeps every byte; passes them on, upper-cased, only when removed."""

    def __init__(self) -> None:
        self.held = b""
        self.closed = False

    async def data(self, data: bytes, out: Output) -> None:
        self.held += data

    async def flush(self, out: Output) -> None:
        await out.send(self.held.upper())
        self.held = b""

    def close(self) -> None:
        self.closed = True


def test_a_stage_removed_live_flushes_first_and_the_direction_is_fast_again() -> None:
    async def main() -> None:
        client_app, client_end = tcp_pair()
        server_app, upstream_end = tcp_pair()
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(client_end, upstream_end, closed, make_info())
        stage = HoldUntilFlush()
        set_stages(relay, UPSTREAM, [("hold", stage)])
        relay.start()
        assert relay.path == "chain" and isinstance(relay.up.chain, DirectionRunner)
        with client_app, server_app:
            client_app.sendall(b"hello")
            await until(lambda: stage.held == b"hello")
            set_stages(relay, UPSTREAM, [])
            await until(lambda: relay.up.chain is None)
            assert stage.closed
            client_app.sendall(b" world")
            client_app.shutdown(socket.SHUT_WR)
            server_app.shutdown(socket.SHUT_WR)
            got = await asyncio.to_thread(read_to_eof, server_app)
            await asyncio.wait_for(closed, 10)
        assert got == b"HELLO world"  # what the stage held first, then the rest, unchanged
        assert not relay.up.chained

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_stalled_stage_bounds_what_the_relay_reads_ahead() -> None:
    blob = os.urandom(8 << 20)
    gate = asyncio.Event()

    class Stalled(Stage):
        async def data(self, data: bytes, out: Output) -> None:
            await gate.wait()
            await out.send(data)

    async def main() -> None:
        client_app, client_end = tcp_pair()
        server_app, upstream_end = tcp_pair()
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(client_end, upstream_end, closed, make_info())
        set_stages(relay, UPSTREAM, [("stall", Stalled())])
        relay.start()
        runner = relay.up.chain
        assert isinstance(runner, DirectionRunner)
        with client_app, server_app:
            def send() -> None:
                client_app.sendall(blob)
                client_app.shutdown(socket.SHUT_WR)
            sending = asyncio.ensure_future(asyncio.to_thread(send))
            await until(lambda: runner.queued >= CHAIN_QUEUE_HIGH)
            await asyncio.sleep(0.05)  # time to read more, were reading not paused
            assert not relay.up.reading
            assert runner.queued <= CHAIN_QUEUE_HIGH + READ_SIZE
            gate.set()
            server_app.shutdown(socket.SHUT_WR)
            got = await asyncio.to_thread(read_to_eof, server_app)
            await sending
            await asyncio.wait_for(closed, 10)
        assert sha(got) == sha(blob)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_stage_that_raises_resets_its_connection_with_the_reason() -> None:
    class Raising(Stage):
        async def data(self, data: bytes, out: Output) -> None:
            raise ValueError("bad byte")

    async def main() -> None:
        client_app, client_end = tcp_pair()
        server_app, upstream_end = tcp_pair()
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(client_end, upstream_end, closed, make_info())
        set_stages(relay, UPSTREAM, [("raise", Raising())])
        relay.start()
        with client_app, server_app:
            client_app.sendall(b"x")
            done = await asyncio.wait_for(closed, 10)
            with pytest.raises(ConnectionResetError):
                await asyncio.to_thread(client_app.recv, 1)
        assert done.reason is CloseReason.ERROR and done.reset
        assert done.detail == "upstream element raised ValueError: bad byte"

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_stage_leaves_the_zero_copy_path_in_both_directions() -> None:
    if not splice_module.AVAILABLE:
        pytest.skip("needs splice(2) (Linux)")

    async def main() -> None:
        client_app, client_end = tcp_pair()
        server_app, upstream_end = tcp_pair()
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(client_end, upstream_end, closed, make_info(), splice=True)
        relay.start()
        assert relay.splice and relay.down.can_splice
        set_stages(relay, UPSTREAM, [("x", Stage())])
        assert not relay.splice and not relay.down.can_splice  # a reply goes through the sender
        relay.close(CloseReason.SHUTDOWN)
        client_app.close()
        server_app.close()

    asyncio.run(asyncio.wait_for(main(), 10))
