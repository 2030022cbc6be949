"""The zero-copy fast path: leaving it while live, pooled pipes, and workers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
from pathlib import Path

import midway
from midway.chain.base import Attachment, ConnectionInfo, Element, Output, Stage
from midway.core import splice

from .. import helpers
from ..helpers import fd_count, proxy_process, run, serve, wait_until


class Tap(Stage):
    """Passes data on unchanged, counting it."""

    def __init__(self, seen: list[int]) -> None:
        self.seen = seen

    async def data(self, data: bytes, out: Output) -> None:
        self.seen.append(len(data))
        await out.send(data)


class TapElement(Element):
    name = "tap"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def attach(self, info: ConnectionInfo) -> Attachment:
        return Attachment(upstream=Tap(self.seen), downstream=Tap(self.seen))


def test_leaving_the_fast_path_mid_transfer_keeps_256_mib_intact() -> None:
    size = 256 * 1024 * 1024
    block = os.urandom(1 << 20)

    async def main() -> None:
        async with serve() as port, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            sent = hashlib.sha256()

            async def send() -> None:
                for _ in range(size >> 20):
                    writer.write(block)
                    sent.update(block)
                    await writer.drain()
                writer.write_eof()

            tap = TapElement()
            sender = asyncio.create_task(send())
            received = hashlib.sha256()
            total = 0
            attached = False
            while chunk := await reader.read(1 << 20):
                received.update(chunk)
                total += len(chunk)
                if not attached and total > size // 3:
                    (relay,) = proxy.service.live
                    # Bulk data was on the zero-copy path (where enabled) ...
                    assert relay.path == ("splice" if helpers.MODE.path == "splice" else "copy")
                    proxy.add_element(tap)  # ... and leaves it with bytes in flight
                    assert relay.path == "chain"
                    attached = True
            await sender
            writer.close()
            assert total == size
            assert received.hexdigest() == sent.hexdigest()
            assert tap.seen, "the element saw the rest of the stream"
            assert sum(tap.seen) < 2 * size, "bytes were not duplicated through it"

    run(main(), timeout=300)


def test_pipes_are_returned_to_the_pool() -> None:
    async def main() -> None:
        async with serve() as port, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
            warm_r, warm_w = await asyncio.open_connection(*proxy.address)
            warm_w.close()
            await asyncio.sleep(0.1)
            before = fd_count()

            payload = os.urandom(1 << 20)
            lent = splice.pipes.lent

            async def one() -> None:
                reader, writer = await asyncio.open_connection(*proxy.address)
                writer.write(payload)
                assert await reader.readexactly(len(payload)) == payload
                writer.close()

            for _ in range(10):
                await asyncio.gather(*(one() for _ in range(200)))
            if helpers.MODE.path == "splice":
                assert splice.pipes.lent > lent, "bulk data took the splice path"
            async with asyncio.timeout(10):
                while proxy.connections:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            # Whatever is open now is at most the small cache of idle pipes.
            assert splice.pipes.idle <= splice.MAX_IDLE_PIPES
            assert fd_count() <= before + 2 * splice.pipes.idle + 2

    run(main(), timeout=120)


def test_workers_share_the_listener_and_are_supervised() -> None:
    with serve_echo_thread() as echo_port, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{echo_port}", "--workers", "2") as proxy:
        assert wait_until(lambda: len(_children(proxy.pid)) == 2, timeout=10)
        for i in range(20):
            assert _roundtrip(proxy.port, f"hello {i}".encode())
        victim = _children(proxy.pid)[0]
        os.kill(victim, signal.SIGKILL)
        # The supervisor replaces it; service never stops.
        assert wait_until(lambda: len(_children(proxy.pid)) == 2 and victim not in _children(proxy.pid),
                          timeout=10)
        for i in range(20):
            assert _roundtrip(proxy.port, f"again {i}".encode())
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(timeout=15) == 0
        assert "restarting" in proxy.stderr_text()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _roundtrip(port: int, payload: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(100)
            if not chunk:
                return False
            got += chunk
        return got == payload


class serve_echo_thread:
    """A blocking echo server on a thread (for tests with a child proxy)."""

    def __enter__(self) -> int:
        import threading
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)

        def loop() -> None:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
        return int(self.sock.getsockname()[1])

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

