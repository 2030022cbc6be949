"""The relay's stream seam (midway.core.streams): an endpoint that is not a plain
socket can only copy, and arrives possibly with bytes already read.

Real loopback TCP connections; one or both relay ends are wrapped in
:class:`~tests.core.endpoints.HoldingStream`, which, like a TLS stream, keeps
decoded bytes that no readiness event announces.  ``splice`` is replaced by a
recorder: a connection with a stream endpoint must never try it."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from typing import Any

import pytest

from midway.chain.base import DOWNSTREAM, UPSTREAM, Stage
from midway.chain.runner import set_stages
from midway.core import splice as splice_module
from midway.core.observer import CloseReason
from midway.core.relay import Relay
from midway.core.streams import Stream, can_splice

from .endpoints import (
    HoldingStream,
    in_threads,
    make_relay,
    read_to_eof,
    send_all_then_fin,
    sha,
    tcp_pair,
)

BLOB_SIZE = 16 << 20


@pytest.fixture
def splice_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every splice(2) the relay attempts (each refused, so it would copy on)."""
    calls: list[tuple[int, int]] = []

    def recording_splice(src: int, dst: int, count: int, **_: Any) -> int:
        calls.append((src, dst))
        raise OSError(errno.EINVAL, "splice attempted on a stream endpoint")

    monkeypatch.setattr(splice_module, "AVAILABLE", True)
    monkeypatch.setattr(splice_module, "splice", recording_splice)
    return calls


def test_a_stream_is_copy_only_and_a_plain_socket_can_splice() -> None:
    app, end = tcp_pair()
    with app, end:
        stream = HoldingStream(end)
        assert isinstance(stream, Stream)
        assert can_splice(end)
        assert not can_splice(stream)


class Passing(Stage):
    """A chain stage that changes nothing (the chained path, no element logic)."""


@pytest.mark.parametrize("chained", [False, True], ids=["fast", "chain"])
@pytest.mark.parametrize("streams", ["client", "both"])
def test_16_mib_each_way_through_stream_endpoints_arrive_intact_without_splice(
        chained: bool, streams: str, splice_calls: list[tuple[int, int]]) -> None:
    up_blob, down_blob = os.urandom(BLOB_SIZE), os.urandom(BLOB_SIZE)

    async def main() -> None:
        client_app, client_end = tcp_pair()
        server_app, upstream_end = tcp_pair()
        client = HoldingStream(client_end)
        upstream = HoldingStream(upstream_end) if streams == "both" else upstream_end
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(client, upstream, closed, splice=True)
        assert not relay.splice  # one stream endpoint: the connection copies
        if chained:
            set_stages(relay, UPSTREAM, [("pass", Passing())])
            set_stages(relay, DOWNSTREAM, [("pass", Passing())])
        relay.start()
        with client_app, server_app:
            _, _, at_server, at_client = await in_threads(
                lambda: send_all_then_fin(client_app, up_blob),
                lambda: send_all_then_fin(server_app, down_blob),
                lambda: read_to_eof(server_app),
                lambda: read_to_eof(client_app))
            done = await asyncio.wait_for(closed, 10)
        assert sha(at_server) == sha(up_blob)
        assert sha(at_client) == sha(down_blob)
        assert done.reason is CloseReason.EOF and not done.reset
        assert (done.bytes_up, done.bytes_down) == (BLOB_SIZE, BLOB_SIZE)
        assert done.path == ("chain" if chained else "copy")
        # The stream really held bytes no readiness event announced.
        assert client.most_held > HoldingStream.PIECE

    asyncio.run(asyncio.wait_for(main(), 120))
    assert splice_calls == []


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("chained", [False, True], ids=["fast", "chain"])
def test_bytes_a_stream_holds_decoded_are_relayed_with_no_readiness_event_left(
        chained: bool) -> None:
    # A request that fits one "record": the stream returns a piece and holds the
    # rest, the socket has nothing more to announce, and the client waits for the
    # answer.  Only draining pending() moves the rest.
    request = os.urandom(HoldingStream.RECORD - 1000)
    answer = os.urandom(HoldingStream.RECORD - 2000)

    async def main() -> None:
        client_app, client_end = tcp_pair()
        server_app, upstream_end = tcp_pair()
        server_app.settimeout(5.0)
        client_app.settimeout(5.0)
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(HoldingStream(client_end), HoldingStream(upstream_end), closed)
        if chained:
            set_stages(relay, UPSTREAM, [("pass", Passing())])
            set_stages(relay, DOWNSTREAM, [("pass", Passing())])
        relay.start()
        with client_app, server_app:
            client_app.sendall(request)
            assert await asyncio.to_thread(recv_exactly, server_app, len(request)) == request
            server_app.sendall(answer)
            assert await asyncio.to_thread(recv_exactly, client_app, len(answer)) == answer
            relay.close(CloseReason.SHUTDOWN)

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("chained", [False, True], ids=["fast", "chain"])
def test_prefixes_are_relayed_first_and_in_order(chained: bool) -> None:
    # Larger than the socket buffers: the prefix itself has to wait for the reader.
    client_prefix, client_rest = os.urandom(4 << 20), os.urandom(1 << 20)
    upstream_prefix = b"bytes read from the upstream before the relay\n"
    seen: list[bytes] = []

    class Recording(Stage):
        async def data(self, data: bytes, out: Any) -> None:
            seen.append(data)
            await out.send(data)

    async def main() -> None:
        client_app, client_end = tcp_pair()
        server_app, upstream_end = tcp_pair()
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(HoldingStream(client_end), upstream_end, closed,
                           client_prefix=client_prefix, upstream_prefix=upstream_prefix)
        if chained:
            set_stages(relay, UPSTREAM, [("rec", Recording())])
        relay.start()
        with client_app, server_app:
            _, _, at_server, at_client = await in_threads(
                lambda: send_all_then_fin(client_app, client_rest),
                lambda: server_app.shutdown(socket.SHUT_WR),
                lambda: read_to_eof(server_app),
                lambda: read_to_eof(client_app))
            done = await asyncio.wait_for(closed, 10)
        assert sha(at_server) == sha(client_prefix + client_rest)
        assert at_client == upstream_prefix
        assert done.bytes_up == len(client_prefix) + len(client_rest)
        assert done.bytes_down == len(upstream_prefix)
        if chained:
            assert seen[0] == client_prefix  # the chain sees it first, whole

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_half_close_passes_through_stream_endpoints_and_the_other_way_goes_on() -> None:
    reply = os.urandom(1 << 20)

    async def main() -> None:
        client_app, client_end = tcp_pair()
        server_app, upstream_end = tcp_pair()
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(HoldingStream(client_end), HoldingStream(upstream_end), closed)
        relay.start()
        with client_app, server_app:
            send_all_then_fin(client_app, b"request")
            request = await asyncio.to_thread(read_to_eof, server_app)  # the FIN arrived
            assert not closed.done()  # the other direction is still open
            _, at_client = await in_threads(lambda: send_all_then_fin(server_app, reply),
                                            lambda: read_to_eof(client_app))
            done = await asyncio.wait_for(closed, 10)
        assert request == b"request"
        assert sha(at_client) == sha(reply)
        assert done.reason is CloseReason.EOF and done.first_close == "client"

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_reset_passes_through_stream_endpoints() -> None:
    async def main() -> None:
        client_app, client_end = tcp_pair()
        server_app, upstream_end = tcp_pair()
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(HoldingStream(client_end), HoldingStream(upstream_end), closed)
        relay.start()
        with client_app:
            client_app.sendall(b"hello")
            assert await asyncio.to_thread(server_app.recv, 5) == b"hello"
            server_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            server_app.close()  # RST to the relay's upstream end
            done = await asyncio.wait_for(closed, 10)
            with pytest.raises(ConnectionResetError):
                await asyncio.to_thread(client_app.recv, 1)  # and an RST to the client
        assert done.reason is CloseReason.RESET and done.reset
        assert done.first_close == "upstream"

    asyncio.run(asyncio.wait_for(main(), 30))
