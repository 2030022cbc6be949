"""midway/core/tlsstream.py directly: two TlsStreams over a socket pair, no relay.
The half-close cases the relay relies on: a ``close_notify`` sent while the peer's
records wait undecrypted (OpenSSL's ``unwrap`` would fail on them), reading on
after it, and the peer's ``close_notify`` read as the end of the stream."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from midway.core.tlsstream import TlsStream

from ..tlspki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def pair(pki: Pki) -> tuple[TlsStream, TlsStream]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca))
    a, b = socket.socketpair()
    for sock in (a, b):
        sock.setblocking(False)
    server = TlsStream(a, server_ctx, server_side=True)
    client = TlsStream(b, client_ctx, server_side=False, server_hostname="localhost")
    await asyncio.wait_for(asyncio.gather(server.handshake(), client.handshake()), 10)
    return server, client


async def read_all(stream: TlsStream, size: int = 65536) -> bytes:
    """Read to the end of the stream (busy-waits on the loop, bounded by the caller)."""
    out = bytearray()
    buffer = bytearray(size)
    while True:
        try:
            n = stream.recv_into(buffer)
        except BlockingIOError:
            await asyncio.sleep(0.001)
            continue
        if n == 0:
            return bytes(out)
        out += buffer[:n]


def send_all(stream: TlsStream, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[stream.send(view):]


def test_close_notify_with_records_waiting_loses_nothing(pki: Pki) -> None:
    request = bytes(range(256)) * 192  # 48 KiB: three records, one socket read

    async def main() -> None:
        server, client = await pair(pki)
        send_all(client, request)
        await asyncio.sleep(0.05)  # all three records in the server's socket
        first = bytearray(100)
        assert server.recv_into(first) == 100  # one socket read: the rest waits in the BIO
        server.shutdown(socket.SHUT_WR)  # the upstream ended: close_notify now
        assert server.pending() == len(request) - 100  # decrypted ahead, announced
        assert await asyncio.wait_for(read_all(client), 10) == b""  # close_notify, clean
        client.shutdown(socket.SHUT_WR)
        rest = await asyncio.wait_for(read_all(server), 10)
        assert bytes(first) + rest == request
        assert not server.truncated
        server.close()
        client.close()

    asyncio.run(main())


def test_a_fin_without_close_notify_ends_the_stream_and_is_recorded(pki: Pki) -> None:
    async def main() -> None:
        server, client = await pair(pki)
        send_all(client, b"last words")
        client.sock.shutdown(socket.SHUT_WR)  # TCP FIN, no close_notify
        assert await asyncio.wait_for(read_all(server), 10) == b"last words"
        assert server.truncated
        server.close()
        client.close()

    asyncio.run(main())


def test_after_a_would_block_the_same_bytes_are_taken_once(pki: Pki, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 4096 * 8  # 8 MiB: far more than the socket buffers hold

    async def main() -> None:
        server, client = await pair(pki)
        reader = asyncio.ensure_future(read_all(client))
        view = memoryview(blob)
        blocked = 0
        while view:
            try:
                view = view[server.send(view):]
            except BlockingIOError:
                blocked += 1
                await asyncio.sleep(0.001)
        server.shutdown(socket.SHUT_WR)
        got = await asyncio.wait_for(reader, 30)
        assert blocked > 0  # the case under test happened
        assert got == blob
        server.close()
        client.close()

    asyncio.run(main())


def test_an_end_read_with_the_last_bytes_is_announced_by_pending(pki: Pki) -> None:
    # The peer's last record and its close_notify in one read, then silence (it
    # waits for midway's answer): the relay must learn of the end without an event.
    async def main() -> None:
        server, client = await pair(pki)
        send_all(client, b"last words")
        client.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.05)  # both in the server's socket
        buffer = bytearray(65536)
        assert server.recv_into(buffer) == len(b"last words")
        assert server.pending() > 0  # so the relay reads again at once
        assert server.recv_into(buffer) == 0
        assert server.pending() == 0
        server.close()
        client.close()

    asyncio.run(main())
