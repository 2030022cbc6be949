"""The compiled relay (midway/core/_accel.c, "C mode" in midway.core.relay), over
loopback TCP: what it relays, what it counts and how it ends must be what the
Python relay does, including when it hands a live connection back to Python
(bytes it held, a chain attached, bulk data for splice).

The e2e suite runs in C mode wherever the extension is built, and again under
MIDWAY_PURE_PYTHON=1 (CI runs both); these tests pin down what only C mode has."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from typing import Any

import pytest

from midway.chain.base import DOWNSTREAM, UPSTREAM, Output, Stage
from midway.chain.runner import set_stages
from midway.core import accel
from midway.core import splice as splice_module
from midway.core.observer import CloseReason
from midway.core.poller import engine_for
from midway.core.relay import READ_SIZE, Relay

from .. import helpers
from .endpoints import in_threads, make_relay, read_to_eof, sha, tcp_pair

pytestmark = pytest.mark.skipif(
    not accel.AVAILABLE,
    reason=helpers.needs_accel())


def _pairs() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    client_app, client_end = tcp_pair()
    upstream_app, upstream_end = tcp_pair()
    return client_app, client_end, upstream_app, upstream_end


async def _started(*, upstream_sndbuf: int = 0, **options: Any) -> tuple[
        socket.socket, socket.socket, Relay[Any], asyncio.Future[Relay[Any]]]:
    """A relay between two loopback pairs, started (``options`` as make_relay's):
    the client's and the upstream's application ends, the relay, and the future
    its close resolves."""
    c_app, c_end, u_app, u_end = _pairs()
    if upstream_sndbuf:
        u_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, upstream_sndbuf)
    closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
    relay = make_relay(c_end, u_end, closed, **options)
    relay.start()
    return c_app, u_app, relay, closed


async def _paused_client() -> tuple[socket.socket, socket.socket, Relay[Any],
                                    asyncio.Future[Relay[Any]]]:
    """A C-mode relay holding client bytes for an upstream that reads nothing (so
    reading the client is paused): the client's and upstream's application ends,
    the relay, and the future its close resolves."""
    c_app, u_app, relay, closed = await _started(upstream_sndbuf=4096, splice=False)
    loop = asyncio.get_running_loop()
    c_app.setblocking(False)
    try:
        while True:
            c_app.send(b"x" * 65536)
    except BlockingIOError:
        pass
    deadline = loop.time() + 10
    while not relay.c_up_held:
        assert loop.time() < deadline, "the relay never held bytes"
        await asyncio.sleep(0.005)
    return c_app, u_app, relay, closed


def test_a_plain_relay_runs_in_c_and_relays_both_ways_with_counts() -> None:
    async def main() -> None:
        c_app, u_app, relay, closed = await _started()
        assert relay.c_engine is not None and relay.path == "copy"

        def client() -> bytes:
            for i in range(50):
                c_app.sendall(b"request %d\n" % i)
            c_app.shutdown(socket.SHUT_WR)
            return read_to_eof(c_app)

        def upstream() -> bytes:
            got = read_to_eof(u_app)
            u_app.sendall(got.upper())
            u_app.shutdown(socket.SHUT_WR)
            return got

        answer, got = await in_threads(client, upstream)
        done = await asyncio.wait_for(closed, 10)
        sent = b"".join(b"request %d\n" % i for i in range(50))
        assert got == sent and answer == sent.upper()
        assert done.reason is CloseReason.EOF and done.first_close == "client"
        assert not done.reset
        assert (done.bytes_up, done.bytes_down) == (len(sent), len(sent))
        assert (done.bytes_up_read, done.bytes_down_read) == (len(sent), len(sent))
        assert relay.c_engine is None  # left the engine
        c_app.close()
        u_app.close()
    helpers.run(main())


def test_bytes_held_for_a_full_upstream_are_handed_to_python_in_order() -> None:
    """The upstream does not read: C holds one read and stops reading the
    client; a chain attached then takes the connection back with those bytes."""
    async def main() -> None:
        c_app, u_app, relay, closed = await _started(upstream_sndbuf=4096, splice=False)
        blob = os.urandom(3 << 20)
        sender = asyncio.get_running_loop().run_in_executor(None, c_app.sendall, blob)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not relay.c_up_held:
            assert loop.time() < deadline, "the relay never held bytes"
            await asyncio.sleep(0.005)
        seen: list[int] = []

        class Count(Stage):
            async def data(self, data: bytes, out: Output) -> None:
                seen.append(len(data))
                await out.send(data)

        set_stages(relay, UPSTREAM, [(object(), Count())])
        assert relay.c_engine is None and relay.up.chained

        def upstream() -> bytes:
            return read_to_eof(u_app)

        reader = loop.run_in_executor(None, upstream)
        await asyncio.wait_for(sender, 20)
        c_app.shutdown(socket.SHUT_WR)
        got = await asyncio.wait_for(reader, 20)
        assert sha(got) == sha(blob) and len(got) == len(blob)
        u_app.close()
        done = await asyncio.wait_for(closed, 10)
        assert done.bytes_up == len(blob) and seen  # the chain saw what followed
        c_app.close()
    helpers.run(main())


def test_a_full_read_hands_bulk_data_to_splice() -> None:
    if not splice_module.AVAILABLE:
        pytest.skip(helpers.needs("splice(2) (Linux)"))

    async def main() -> None:
        c_app, u_app, relay, closed = await _started()
        blob = os.urandom(8 * READ_SIZE + 123)

        def client() -> None:
            c_app.sendall(blob)
            c_app.shutdown(socket.SHUT_WR)

        _, got = await in_threads(client, lambda: read_to_eof(u_app))
        assert sha(got) == sha(blob)
        assert relay.path == "splice" and relay.c_engine is None
        u_app.close()
        done = await asyncio.wait_for(closed, 10)
        assert done.bytes_up == len(blob) and done.reason is CloseReason.EOF
        c_app.close()
    helpers.run(main())


def test_a_reset_on_a_paused_client_is_seen_at_once() -> None:
    """Reading the client is paused (the upstream is full) when the client
    resets: the relay resets the upstream too, long before any timeout."""
    async def main() -> None:
        c_app, u_app, relay, closed = await _paused_client()
        c_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c_app.close()
        done = await asyncio.wait_for(closed, 5)
        assert done.reason is CloseReason.RESET and done.first_close == "client"
        assert done.reset
        u_app.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while u_app.recv(1 << 20):
                pass
        u_app.close()
    helpers.run(main())


@pytest.mark.parametrize("busy", [False, True])
def test_close_by_midway_fins_a_quiet_connection_and_resets_a_busy_one(busy: bool) -> None:
    async def main() -> None:
        c_app, u_app, relay, closed = await _started()
        c_app.sendall(b"hello")
        u_app.settimeout(5)
        assert await asyncio.to_thread(u_app.recv, 100) == b"hello"
        if busy:
            # Sent, and not read by the relay when it closes (the loop does not
            # run in between): the upstream is cut short, so it is reset.
            c_app.sendall(b"more")
            time.sleep(0.05)
        else:
            await asyncio.sleep(0.05)
        relay.close(CloseReason.SHUTDOWN, quiet_s=0.0)
        done = await asyncio.wait_for(closed, 5)
        assert done.reason is CloseReason.SHUTDOWN and done.reset is busy
        if busy:
            with pytest.raises(ConnectionResetError):
                while u_app.recv(100):
                    pass
        else:
            assert u_app.recv(100) == b""  # a clean FIN
            assert done.bytes_up == 5
        c_app.close()
        u_app.close()
    helpers.run(main())


def test_idle_timeout_counts_activity_seen_in_c() -> None:
    async def main() -> None:
        c_app, u_app, relay, closed = await _started(idle_timeout_s=0.4)
        loop = asyncio.get_running_loop()
        u_app.settimeout(5)
        for _ in range(6):  # 0.9 s of activity every 0.15 s: never idle for 0.4 s
            last = loop.time()
            c_app.sendall(b"tick")
            assert await asyncio.to_thread(u_app.recv, 10) == b"tick"
            await asyncio.sleep(0.15)
            assert not closed.done()
        done = await asyncio.wait_for(closed, 5)
        assert done.reason is CloseReason.IDLE_TIMEOUT
        assert loop.time() - last >= 0.4 - 0.05  # idle for the timeout, since the last byte
        assert u_app.recv(10) == b""
        c_app.close()
        u_app.close()
    helpers.run(main())


def test_many_connections_closing_in_one_batch_each_end_cleanly() -> None:
    """Relays leave the engine while events for their (reused) descriptors are
    still in the batch: none may be run on the wrong relay or lost."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        relays = []
        apps = []
        for _ in range(200):
            c_app, u_app, relay, closed = await _started()
            relays.append(closed)
            apps.append((c_app, u_app))
        for i, (c_app, u_app) in enumerate(apps):  # all at once, then one loop turn
            c_app.sendall(b"%d" % i)
            c_app.shutdown(socket.SHUT_WR)
            u_app.shutdown(socket.SHUT_WR)
        done = await asyncio.wait_for(asyncio.gather(*relays), 20)
        for i, ((c_app, u_app), relay) in enumerate(zip(apps, done, strict=True)):
            assert relay.reason is CloseReason.EOF and relay.bytes_up == len(b"%d" % i)
            u_app.settimeout(5)
            assert read_to_eof(u_app) == b"%d" % i
            c_app.close()
            u_app.close()
        engine = engine_for(loop)
        assert engine is not None and engine.live == 0
    helpers.run(main())


def _half_close_both(c_app: socket.socket, u_app: socket.socket) -> None:
    c_app.shutdown(socket.SHUT_WR)
    u_app.shutdown(socket.SHUT_WR)


def test_an_error_in_a_callback_is_reported_and_the_engine_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A callback of the C part that raises is reported to the loop's exception
    handler; the other connections of the batch and later ones are relayed."""
    def broken(self: Relay[Any]) -> None:
        raise RuntimeError("broken half-close")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        monkeypatch.setattr(Relay, "_c_half", broken)
        c_app, u_app, relay, closed = await _started()
        _half_close_both(c_app, u_app)
        done = await asyncio.wait_for(closed, 5)  # the second FIN still ends it
        assert done.reason is CloseReason.EOF
        assert [str(c["exception"]) for c in reported] == ["broken half-close"]
        monkeypatch.undo()
        c2, u2, _, closed2 = await _started()  # the engine still relays
        c2.sendall(b"still")
        u2.settimeout(5)
        assert await asyncio.to_thread(u2.recv, 10) == b"still"
        _half_close_both(c2, u2)
        await asyncio.wait_for(closed2, 5)
        for sock in (c_app, u_app, c2, u2):
            sock.close()
    helpers.run(main())


def test_keyboard_interrupt_in_a_callback_is_raised_not_swallowed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: Relay[Any]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Relay, "_c_half", interrupted)
    c_app, c_end, u_app, u_end = _pairs()

    async def main() -> None:
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        make_relay(c_end, u_end, closed).start()
        c_app.shutdown(socket.SHUT_WR)
        await asyncio.sleep(5)  # interrupted long before

    try:
        with pytest.raises(KeyboardInterrupt):
            helpers.run(main())
    finally:
        for sock in (c_app, u_app, c_end, u_end):
            sock.close()


def test_an_empty_chain_leaves_a_relay_in_c() -> None:
    """A proxy's elements changed live, none applying to this connection (the
    service sets each direction's stages to none): it stays in C mode."""
    async def main() -> None:
        c_app, u_app, relay, closed = await _started()
        for direction in (UPSTREAM, DOWNSTREAM):
            set_stages(relay, direction, [])
        assert relay.c_engine is not None and relay.chain_of(UPSTREAM) is None
        c_app.sendall(b"ping")
        u_app.settimeout(5)
        assert await asyncio.to_thread(u_app.recv, 10) == b"ping"
        _half_close_both(c_app, u_app)
        done = await asyncio.wait_for(closed, 5)
        assert done.bytes_up == 4 and done.path == "copy"
        c_app.close()
        u_app.close()
    helpers.run(main())


@pytest.mark.parametrize("how", ["bulk", "flows"])
def test_a_reset_after_the_hand_over_of_a_half_closed_connection_is_seen_at_once(
        how: str) -> None:
    """The client sent its request and its FIN; the connection is then taken back
    into Python (bulk data from the upstream, or someone asking for the flows)
    while the upstream pauses.  The client's reset must still reach the upstream
    at once, as in pure mode: nothing reads or writes the client socket then."""
    if how == "bulk" and not splice_module.AVAILABLE:
        pytest.skip(helpers.needs("splice(2) (Linux)"))

    async def main() -> None:
        c_app, u_app, relay, closed = await _started()
        c_app.sendall(b"GET\n")
        c_app.shutdown(socket.SHUT_WR)
        assert await asyncio.to_thread(read_to_eof, u_app) == b"GET\n"
        answer = b"x" * (4 * READ_SIZE if how == "bulk" else 1000)
        u_app.sendall(answer)
        got = bytearray()
        while len(got) < len(answer):
            got += await asyncio.to_thread(c_app.recv, 1 << 20)
        if how == "flows":
            relay.flow("downstream")
        assert relay.c_engine is None
        await asyncio.sleep(0.1)
        c_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c_app.close()
        done = await asyncio.wait_for(closed, 2)
        assert done.reason is CloseReason.RESET and done.reset
        assert done.bytes_down == len(answer)
        u_app.close()
    helpers.run(main())


def test_a_reset_on_a_paused_client_after_the_hand_over_is_seen_at_once() -> None:
    """C holds bytes for a full upstream (reading the client paused) when the
    connection is taken back into Python: nothing reads or writes the client
    socket then, and its reset must still be seen at once."""
    async def main() -> None:
        c_app, u_app, relay, closed = await _paused_client()
        await asyncio.sleep(0.2)  # the upstream's buffers are full for good
        up = relay.flow("upstream")
        assert relay.c_engine is None
        await asyncio.sleep(0.1)
        assert up.sender.buf and not up.reading  # still paused
        c_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c_app.close()
        done = await asyncio.wait_for(closed, 2)
        assert done.reason is CloseReason.RESET and done.first_close == "client"
        u_app.close()
    helpers.run(main())
