"""Resets and cut streams, end to end (issue 8, items 1 and 2): a reset on either
side is seen promptly and passed on as a reset, whatever the event loop; a storm
of resets leaves no descriptor behind; and a stream midway cuts short (drain
timeout, second signal, idle timeout with bytes queued) reaches its reader as a
reset, never as a clean end.  docs/guarantees.md states the rules."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import midway

from ..helpers import fd_count, proxy_process, run, wait_until
from .test_relay import Records

_LINGER_RESET = struct.pack("ii", 1, 0)
PROMPT_S = 1.0
"""The promise: a reset on either socket is seen and passed on within a second."""


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


async def _ending(reader: asyncio.StreamReader, timeout: float) -> tuple[str, int]:
    """Read to the end: ("eof" or "reset", bytes read); fails after ``timeout``."""
    total = 0
    async with asyncio.timeout(timeout):
        try:
            while chunk := await reader.read(1 << 20):
                total += len(chunk)
        except ConnectionResetError:
            return "reset", total
    return "eof", total


# -- item 1: resets are seen and passed on ----------------------------------


@contextlib.contextmanager
def _threaded_server(serve_one: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback server running ``serve_one(conn)`` in a thread per connection
    (outside the loop under test, as a real peer would be); yields its port."""
    server = socket.create_server(("127.0.0.1", 0), backlog=512)

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    try:
        yield int(server.getsockname()[1])
    finally:
        server.close()


def _reply_then_reset(conn: socket.socket) -> None:
    """Read a request, send a short reply and reset at once (SO_LINGER 0), so the
    reset arrives together with the data."""
    with contextlib.suppress(OSError):
        conn.recv(100)
        conn.sendall(b"short reply")
    _reset(conn)


def test_reply_then_reset_reaches_every_client_as_a_reset() -> None:
    """EPOLLIN|EPOLLERR at once: uvloop's own watchers never called the reader,
    and the client waited for the idle timeout."""
    async def one(address: tuple[str, int]) -> tuple[str, int]:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"request")
        try:
            return await _ending(reader, PROMPT_S + 1)
        except TimeoutError:
            return "stuck", 0
        finally:
            writer.close()

    async def main() -> None:
        records = Records()
        with _threaded_server(_reply_then_reset) as port:
            async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}",
                                    observers=[records]) as proxy:
                # One at a time, as the trial found it (concurrent clients hid it).
                outcomes = [await one(proxy.address) for _ in range(20)]
                assert [o for o, _ in outcomes] == ["reset"] * 20, outcomes
                await records.wait(20)
                assert {r.reason for r in records.records} == {"reset"}
                assert {r.first_close for r in records.records} == {"upstream"}

    run(main(), timeout=120)


@contextlib.contextmanager
def _silent_upstream() -> Iterator[int]:
    """An upstream whose kernel completes every handshake but that never accepts,
    reads or answers; yields its port."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def test_connect_send_reset_storm_leaves_no_descriptor_behind() -> None:
    async def main() -> None:
        with _silent_upstream() as port:
            async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
                loop = asyncio.get_running_loop()
                await asyncio.sleep(0.1)
                before = fd_count()
                deadline = loop.time() + 2.0  # a bounded storm: 2 s or 600 clients
                storm = 0
                while loop.time() < deadline and storm < 600:
                    clients = []
                    for _ in range(30):
                        c = socket.socket()
                        c.setblocking(False)
                        with contextlib.suppress(BlockingIOError):
                            c.connect(proxy.address)
                        clients.append(c)
                    await asyncio.sleep(0.01)
                    for c in clients:
                        with contextlib.suppress(OSError):
                            c.send(b"GET / HTTP/1.1\r\n\r\n")
                        _reset(c)
                    storm += len(clients)
                    await asyncio.sleep(0)
                async with asyncio.timeout(PROMPT_S + 2):
                    while proxy.connections:
                        await asyncio.sleep(0.02)
                assert fd_count() <= before + 2, "descriptors left behind by the storm"

    run(main(), timeout=30)


def test_upstream_reset_right_after_accept_reaches_the_client_as_a_reset() -> None:
    async def main() -> None:
        records = Records()
        with _threaded_server(_reset) as port:  # accept, then reset at once
            # Passive health off: this upstream resets every connection, which
            # would eject it after 3 (then clients get no_upstream, a FIN).
            async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}",
                                    observers=[records], health={"eject_after": 0}) as proxy:
                for _ in range(100):
                    reader, writer = await asyncio.open_connection(*proxy.address)
                    outcome, _ = await _ending(reader, PROMPT_S + 1)
                    writer.close()
                    assert outcome == "reset"
                await records.wait(100)
                assert {r.reason for r in records.records} == {"reset"}

    run(main(), timeout=60)


# -- item 2: a cut stream must not look complete ------------------------------

DOWNLOAD = 8 << 20
"""Bytes per download: far more than the kernel's buffers and midway's hold."""


def _download(conn: socket.socket) -> None:
    """Send :data:`DOWNLOAD` bytes, then a FIN."""
    with conn, contextlib.suppress(OSError):
        conn.sendall(b"d" * DOWNLOAD)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)


_held: list[asyncio.StreamWriter] = []
"""The slow readers' writers: a writer collected closes its connection."""


async def _slow_readers(address: tuple[str, int], n: int) -> list[asyncio.StreamReader]:
    """``n`` clients that do not read (yet): their downloads stall in the buffers."""
    readers = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(*address, limit=1 << 16)
        readers.append(reader)
        _held.append(writer)
    return readers


def _close_held() -> None:
    while _held:
        _held.pop().close()


def test_drain_timeout_resets_cut_downloads() -> None:
    async def main() -> None:
        records = Records()
        with _threaded_server(_download) as port:
            proxy = midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", observers=[records])
            await proxy.start()
            readers = await _slow_readers(proxy.address, 5)
            await asyncio.sleep(0.3)  # the downloads are under way, the readers slow
            await proxy.stop(drain_timeout_s=0.2)
            for reader in readers:
                outcome, got = await _ending(reader, 10)
                assert (outcome, got < DOWNLOAD) == ("reset", True), (outcome, got)
            assert {r.reason for r in records.records} == {"shutdown"}
            _close_held()

    run(main())


def test_idle_timeout_with_bytes_queued_resets() -> None:
    async def main() -> None:
        records = Records()
        with _threaded_server(_download) as port:
            async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", idle_timeout_s=0.3,
                                    observers=[records]) as proxy:
                (reader,) = await _slow_readers(proxy.address, 1)
                await records.wait(1, timeout=5)  # the reader stalled; midway gave up
                outcome, got = await _ending(reader, 10)
                assert (outcome, got < DOWNLOAD) == ("reset", True), (outcome, got)
                assert records.records[0].reason == "idle_timeout"
                _close_held()

    run(main())


def test_idle_timeout_resets_the_upstream_whose_download_was_cut() -> None:
    """The direction toward the upstream is quiet, but the upstream's own bytes
    were cut (a download larger than midway and the kernel hold, so some wait
    unread for a reader that stopped): it learns so by a reset, as
    docs/guarantees.md says."""
    upstream_saw: list[str] = []

    def download(conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"d" * DOWNLOAD)
                upstream_saw.append("eof" if conn.recv(1) == b"" else "data")
            except ConnectionResetError:
                upstream_saw.append("reset")
            except OSError as exc:
                upstream_saw.append(repr(exc))

    async def main() -> None:
        records = Records()
        with _threaded_server(download) as port:
            async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", idle_timeout_s=0.3,
                                    observers=[records]) as proxy:
                (reader,) = await _slow_readers(proxy.address, 1)
                await records.wait(1, timeout=5)
                assert await asyncio.to_thread(wait_until, lambda: bool(upstream_saw))
                assert upstream_saw == ["reset"]
                assert records.records[0].reason == "idle_timeout"
                _close_held()

    run(main())


def test_second_signal_resets_cut_downloads() -> None:
    with _threaded_server(_download) as port, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{port}", "--drain-timeout-s", "60") as proxy:
        clients = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                   for _ in range(5)]
        for c in clients:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        time.sleep(0.3)
        proxy.signal(signal.SIGTERM)
        assert wait_until(lambda: "stopping" in proxy.stderr_text(), timeout=5)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(timeout=10) == 0
        for c in clients:
            got, outcome = 0, "eof"
            try:
                while chunk := c.recv(1 << 20):
                    got += len(chunk)
            except ConnectionResetError:
                outcome = "reset"
            c.close()
            assert (outcome, got < DOWNLOAD) == ("reset", True), (outcome, got)


class _Health(Records):
    """Close records, and every health change told."""

    def __init__(self) -> None:
        super().__init__()
        self.health: list[tuple[str, bool]] = []

    def upstream_health(self, proxy: str, upstream: str, up: bool) -> None:
        self.health.append((upstream, up))


def _fin_first(conn: socket.socket) -> None:
    """Send nothing and half-close at once (a server with nothing to say), then
    hold the socket until the peer goes."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(5)
        while conn.recv(100):
            pass
    conn.close()


def test_a_client_reset_after_the_upstream_half_closed_does_not_eject_it() -> None:
    """Passive health counts resets *by the upstream* before its first byte; a
    client that resets after the upstream's empty FIN is not the upstream's
    fault, however often it happens (the trial ejected a healthy upstream)."""
    async def one(address: tuple[str, int]) -> None:
        reader, writer = await asyncio.open_connection(*address)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the upstream's FIN
        _reset(writer.get_extra_info("socket").dup())
        writer.transport.abort()

    async def main() -> None:
        observer = _Health()
        with _threaded_server(_fin_first) as port:
            async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", health={"eject_after": 2},
                                    observers=[observer]) as proxy:
                for _ in range(5):
                    await one(proxy.address)
                records = await observer.wait(5)
                assert {r.reason for r in records} == {"reset"}
                assert {r.first_close for r in records} == {"upstream"}
                assert all(r.detail.startswith("client:") for r in records), records
                assert (f"127.0.0.1:{port}", False) not in observer.health
                await one(proxy.address)  # still dialled: not ejected

    run(main(), timeout=60)
