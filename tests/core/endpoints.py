"""Relay endpoints for core tests: loopback TCP pairs, a copy-only stream that
holds decoded bytes like TLS does, and a relay run between them."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from midway.core.relay import Relay
from midway.core.streams import Endpoint

TIMEOUT_S = 30.0
"""Bound on every blocking socket call of the application ends."""


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """``(app end, relay end)`` of one loopback TCP connection; the relay end is
    non-blocking, the app end blocking with :data:`TIMEOUT_S`."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        app = socket.create_connection(server.getsockname()[:2], timeout=TIMEOUT_S)
        relay_end, _ = server.accept()
    relay_end.setblocking(False)
    return app, relay_end


class HoldingStream:
    """A copy-only endpoint over a socket, shaped like a TLS stream: a read takes a
    whole "record" (up to :attr:`RECORD` bytes) from the socket but returns at most
    :attr:`PIECE`, keeping the rest decoded and announced by nothing but
    :meth:`pending`; a write takes at most :attr:`WRITE_MAX` bytes."""

    RECORD = 65536
    PIECE = 5000
    WRITE_MAX = 20000

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.held = bytearray()
        self.most_held = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, bufsize: int, /) -> bytes:
        if not self.held:
            record = self.sock.recv(self.RECORD)  # BlockingIOError: nothing yet
            if not record:
                return b""
            self.held += record
            self.most_held = max(self.most_held, len(self.held))
        size = min(bufsize, self.PIECE, len(self.held))
        out = bytes(self.held[:size])
        del self.held[:size]
        return out

    def recv_into(self, buffer: bytearray, nbytes: int = 0, /) -> int:
        data = self.recv(nbytes or len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def send(self, data: bytes | bytearray | memoryview, /) -> int:
        return self.sock.send(data[:self.WRITE_MAX])

    def shutdown(self, how: int, /) -> None:
        self.sock.shutdown(how)

    def setsockopt(self, level: int, option: int, value: bytes, /) -> None:
        self.sock.setsockopt(level, option, value)

    def close(self) -> None:
        self.sock.close()

    def pending(self) -> int:
        return len(self.held)


@dataclass
class Info:
    """What the relay carries for its owner (anything will do: it only carries it)."""

    id: int = 1
    proxy: str = "test"
    extra: dict[str, Any] = field(default_factory=dict)


def make_relay(client: Endpoint, upstream: Endpoint, closed: asyncio.Future[Relay[Any]],
               info: Any = None, **kwargs: Any) -> Relay[Any]:
    """A relay between two relay ends that resolves ``closed`` when it ends."""
    def on_close(relay: Relay[Any]) -> None:
        if not closed.done():
            closed.set_result(relay)
    options: dict[str, Any] = {"idle_timeout_s": 60.0, "half_close_timeout_s": 60.0}
    options.update(kwargs)
    return Relay(client, upstream, Info() if info is None else info, on_close=on_close,
                 **options)


def send_all_then_fin(sock: socket.socket, blob: bytes) -> None:
    sock.sendall(blob)
    sock.shutdown(socket.SHUT_WR)


def read_to_eof(sock: socket.socket, limit: int = 1 << 26) -> bytes:
    """Everything until EOF (bounded by ``limit`` bytes)."""
    chunks = bytearray()
    while len(chunks) <= limit:
        data = sock.recv(1 << 20)
        if not data:
            return bytes(chunks)
        chunks += data
    raise AssertionError(f"more than {limit} bytes before EOF")


async def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run blocking application ends concurrently with the relay's loop."""
    return list(await asyncio.wait_for(
        asyncio.gather(*(asyncio.to_thread(call) for call in calls)), TIMEOUT_S * 2))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
