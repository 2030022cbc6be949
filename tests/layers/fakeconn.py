"""A fake :class:`~midway.layers.base.LayerConnection` for driving layers with no
socket: the client's bytes come as given segments (cut further by each read's
``max_bytes``, as a socket's recv would), and everything a layer does is recorded."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from midway.chain.base import ConnectionInfo
from midway.config.addresses import format_sockaddr


class FakeConn:
    """``segments`` are what the client sends, in order; after them the client
    half-closes (``eof=True``) or goes quiet for ever (``eof=False``: a layer's
    own timeout must end the wait).  ``client=None`` is a unix-socket peer."""

    def __init__(self, segments: Iterable[bytes] = (), *, eof: bool = True,
                 client: tuple[str, int] | None = ("192.0.2.50", 40000),
                 local: tuple[str, int] | None = ("192.0.2.1", 443)) -> None:
        self.info = ConnectionInfo(
            id=7, proxy="p", client=format_sockaddr(client) if client else "unix:/run/p.sock",
            listener=format_sockaddr(local) if local else "unix:/run/p.sock",
            client_addr=client, local_addr=local)
        self.route: dict[str, str] = {}
        self.segments = deque(s for s in segments if s)
        self.eof = eof
        self.pending = b""
        """Bytes handed back by unread(), read first by the next recv_client."""
        self.asked: list[int] = []
        """``max_bytes`` of every read that reached the (fake) socket."""
        self.taken = b""
        """Every byte the layers took from the socket."""
        self.sent = b""

    @property
    def unsent(self) -> bytes:
        """What the client sent that no layer has read from the socket yet."""
        return b"".join(self.segments)

    async def recv_client(self, max_bytes: int) -> bytes:
        assert max_bytes > 0, "a layer asked for 0 bytes"
        if self.pending:
            out, self.pending = self.pending[:max_bytes], self.pending[max_bytes:]
            return out
        self.asked.append(max_bytes)
        if not self.segments:
            if self.eof:
                return b""
            await asyncio.Event().wait()  # quiet for ever
        segment = self.segments.popleft()
        out, rest = segment[:max_bytes], segment[max_bytes:]
        if rest:
            self.segments.appendleft(rest)
        self.taken += out
        return out

    def unread(self, data: bytes) -> None:
        self.pending += data

    def set_client(self, host: str, port: int) -> None:
        self.info.client_addr = (host, port)
        self.info.client = format_sockaddr((host, port))

    def set_local(self, host: str, port: int) -> None:
        self.info.local_addr = (host, port)
        self.info.listener = format_sockaddr((host, port))

    async def send_upstream(self, data: bytes) -> None:
        self.sent += data
