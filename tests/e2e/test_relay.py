"""End-to-end behaviour of the relay over real loopback sockets, with the proxy
in-process (``midway.Proxy``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct

import pytest

import midway
from midway.core.observer import CloseRecord
from midway.core.relay import FLOWING_S

from .. import helpers
from ..helpers import (
    echo_handler,
    fd_count,
    read_exactly,
    read_to_eof,
    run,
    send_blob,
    serve,
    sha256,
    sha256_to_eof,
)


class Records:
    """An observer keeping every close record."""

    def __init__(self) -> None:
        self.records: list[CloseRecord] = []

    def connection_closed(self, record: CloseRecord) -> None:
        self.records.append(record)

    async def wait(self, n: int = 1, timeout: float = 5.0) -> list[CloseRecord]:
        async with asyncio.timeout(timeout):
            while len(self.records) < n:
                await asyncio.sleep(0.01)
        return self.records


def _blob(size: int, seed: int) -> bytes:
    # Deterministic but incompressible enough, and cheap for 64 MiB.
    block = hashlib.sha512(str(seed).encode()).digest() + os.urandom(64)
    reps = size // len(block) + 1
    return (block * reps)[:size]


@pytest.mark.parametrize("size", [1, 65537, 3 * 1024 * 1024 + 7, 64 * 1024 * 1024])
def test_bytes_both_ways_intact(size: int) -> None:
    """A blob each way, sent at once in both directions, arrives byte-exact."""
    up_blob, down_blob = os.urandom(size) if size < 1 << 20 else _blob(size, 1), _blob(size, 2)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender = asyncio.create_task(send_blob(writer, down_blob))
        digest, _ = await sha256_to_eof(reader)
        await sender
        received_up.append(digest)
        writer.close()

    received_up: list[str] = []

    async def main() -> None:
        records = Records()
        async with serve(upstream) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", observers=[records]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            sender = asyncio.create_task(send_blob(writer, up_blob))
            digest, total = await sha256_to_eof(reader)
            await sender
            writer.close()
            assert total == size
            assert digest == sha256(down_blob)
            for _ in range(200):
                if received_up:
                    break
                await asyncio.sleep(0.01)
            assert received_up == [sha256(up_blob)]
            (record,) = await records.wait()
            # A clean transfer: every byte read was delivered, on every path.
            assert (record.bytes_up, record.bytes_down) == (size, size)
            assert (record.bytes_up_read, record.bytes_down_read) == (size, size)
            if size >= 1 << 20:  # bulk: the zero-copy path took over where enabled
                assert record.path == helpers.MODE.path

    run(main(), timeout=120)


def test_server_first_banner() -> None:
    """SMTP/SSH-style: the upstream speaks first; the client gets the banner
    without sending anything."""
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mail.example ESMTP ready\r\n")
        await writer.drain()
        line = await reader.readline()
        writer.write(b"250 got " + line)
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with serve(banner) as port, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            assert await asyncio.wait_for(reader.readline(), 5) == b"220 mail.example ESMTP ready\r\n"
            writer.write(b"HELO x\r\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"250 got HELO x\r\n"
            writer.close()

    run(main())


def test_client_half_close_then_upstream_answers() -> None:
    """The client sends a request and FIN; the upstream reads to EOF, then answers
    on the still-open other direction."""
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # to EOF: the FIN was forwarded
        await asyncio.sleep(0.1)
        writer.write(b"you said: " + request)
        await writer.drain()
        writer.close()

    async def main() -> None:
        records = Records()
        async with serve(upstream) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", observers=[records]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"hello" * 1000)
            writer.write_eof()
            assert await read_to_eof(reader) == b"you said: " + b"hello" * 1000
            writer.close()
            (record,) = await records.wait()
            assert record.reason == "eof"
            assert record.first_close == "client"
            # With no element attached the fast path ran; a small exchange is
            # copied (bulk transfers switch to splice, see the blob test).
            assert record.path == "copy"
            assert (record.bytes_up, record.bytes_down) == (5000, 5010)

    run(main())


def test_upstream_half_close_then_client_continues() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting, then FIN")
        writer.write_eof()
        await writer.drain()
        got.append(await reader.read())
        writer.close()

    got: list[bytes] = []

    async def main() -> None:
        records = Records()
        async with serve(upstream) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", observers=[records]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            assert await read_to_eof(reader) == b"greeting, then FIN"
            # The client -> upstream direction still flows after the FIN came down.
            writer.write(b"still talking")
            writer.write_eof()
            (record,) = await records.wait()
            assert got == [b"still talking"]
            assert record.first_close == "upstream"
            writer.close()

    run(main())


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_client_reset_resets_upstream() -> None:
    async def main() -> None:
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                data = await reader.read()
                outcome.set_result(f"eof after {len(data)}")
            except ConnectionResetError:
                outcome.set_result("reset")

        records = Records()
        async with serve(upstream) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", observers=[records]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.1)
            _abort(writer)
            assert await asyncio.wait_for(outcome, 1.0) == "reset"
            (record,) = await records.wait()
            assert record.reason == "reset"
            assert record.first_close == "client"

    run(main())


def test_upstream_reset_resets_client() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        _abort(writer)

    async def main() -> None:
        async with serve(upstream) as port, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"x")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 1.0)
            writer.close()

    run(main())


def _refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return int(port)


def test_upstream_refused_closes_client_promptly_and_proxy_keeps_serving() -> None:
    async def main() -> None:
        records = Records()
        dead = _refused_port()
        async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{dead}", observers=[records]) as proxy:
            loop = asyncio.get_running_loop()
            for _ in range(3):
                start = loop.time()
                reader, writer = await asyncio.open_connection(*proxy.address)
                assert await read_to_eof(reader, timeout=1.0) == b""
                assert loop.time() - start < 1.0
                writer.close()
            await records.wait(3)
            assert {r.reason for r in records.records} == {"connect_failed"}
            assert proxy.connections == 0

    run(main())


def test_failover_to_next_upstream_and_round_robin() -> None:
    async def named(name: bytes) -> object:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(name)
            await writer.drain()
            writer.close()
        return handler

    async def main() -> None:
        dead = _refused_port()
        async with serve(await named(b"A")) as a, serve(await named(b"B")) as b, midway.Proxy(  # type: ignore[arg-type]
                "127.0.0.1:0", [f"127.0.0.1:{dead}", f"127.0.0.1:{a}", f"127.0.0.1:{b}"]) as proxy:
            seen = []
            for _ in range(6):
                reader, writer = await asyncio.open_connection(*proxy.address)
                seen.append(await read_to_eof(reader))
                writer.close()
            # Every connection is served (the dead one is skipped) by both live ones.
            assert set(seen) == {b"A", b"B"}
            assert b"" not in seen

    run(main())


def test_name_resolved_at_connect_time() -> None:
    async def main() -> None:
        async with serve() as port, midway.Proxy("127.0.0.1:0", f"localhost:{port}") as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"ping")
            assert await read_exactly(reader, 4) == b"ping"
            writer.close()

    run(main())


def test_ipv6_and_unix_sockets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if not socket.has_ipv6:
        pytest.skip(helpers.needs("IPv6 on this host"))

    async def main() -> None:
        upstream_path = str(tmp_path / "up.sock")
        server = await asyncio.start_unix_server(echo_handler, upstream_path)
        try:
            async with midway.Proxy("[::1]:0", f"unix:{upstream_path}") as v6:
                reader, writer = await asyncio.open_connection("::1", v6.port)
                writer.write(b"over v6 to unix")
                assert await read_exactly(reader, 15) == b"over v6 to unix"
                writer.close()
            listen_path = str(tmp_path / "front.sock")
            async with serve(host="::1") as port, midway.Proxy(f"unix:{listen_path}", f"[::1]:{port}"):
                reader, writer = await asyncio.open_unix_connection(listen_path)
                writer.write(b"over unix to v6")
                assert await read_exactly(reader, 15) == b"over unix to v6"
                writer.close()
            assert not os.path.exists(listen_path), "the unix socket file is removed on stop"
        finally:
            server.close()

    run(main())


def test_2000_concurrent_connections_each_intact() -> None:
    async def main() -> None:
        async with serve() as port, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
            async def one(i: int) -> bool:
                reader, writer = await asyncio.open_connection(*proxy.address)
                payload = f"{i}:".encode() + os.urandom(300)
                writer.write(payload)
                await writer.drain()
                got = await read_exactly(reader, len(payload), timeout=30)
                writer.close()
                return got == payload

            # Open them all before any closes: they are concurrent.
            results = await asyncio.gather(*(one(i) for i in range(2000)))
            assert all(results)

    run(main(), timeout=120)


def test_connect_then_close_leaves_no_descriptor_behind() -> None:
    async def main() -> None:
        async with serve() as port, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
            # Warm up (loop internals, resolver threads) before counting.
            r, w = await asyncio.open_connection(*proxy.address)
            w.close()
            await asyncio.sleep(0.2)
            before = fd_count()
            for _ in range(20):
                conns = [await asyncio.open_connection(*proxy.address) for _ in range(100)]
                for _, writer in conns:
                    writer.close()
                await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
            async with asyncio.timeout(10):
                while proxy.connections:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            assert fd_count() <= before + 2, "descriptors leaked"

    run(main(), timeout=120)


def test_idle_timeout_closes_quiet_connection() -> None:
    async def main() -> None:
        records = Records()
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", idle_timeout_s=0.3, observers=[records]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            # Traffic keeps it alive past the timeout ...
            for _ in range(4):
                writer.write(b"x")
                assert await read_exactly(reader, 1) == b"x"
                await asyncio.sleep(0.1)
            assert not records.records
            # ... and silence ends it.
            assert await read_to_eof(reader, timeout=3) == b""
            writer.close()
            (record,) = await records.wait()
            assert record.reason == "idle_timeout"
            assert record.first_close == "proxy"

    run(main())


def test_half_close_timeout() -> None:
    async def never_finishes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
            await asyncio.sleep(30)
        finally:
            writer.close()

    async def main() -> None:
        records = Records()
        async with serve(never_finishes) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", half_close_timeout_s=0.3,
                observers=[records]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write_eof()
            assert await read_to_eof(reader, timeout=3) == b""
            writer.close()
            (record,) = await records.wait()
            assert record.reason == "half_close_timeout"

    run(main())


def test_max_connections_per_proxy_queues_the_rest() -> None:
    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", max_connections=2) as proxy:
            held = [await asyncio.open_connection(*proxy.address) for _ in range(2)]
            for reader, writer in held:
                writer.write(b"a")
                assert await read_exactly(reader, 1) == b"a"
            # The third is queued by the kernel, not served ...
            reader3, writer3 = await asyncio.open_connection(*proxy.address)
            writer3.write(b"third")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader3.readexactly(5), 0.5)
            assert proxy.connections == 2
            # ... until a slot frees up.
            held[0][1].close()
            assert await read_exactly(reader3, 5, timeout=5) == b"third"
            writer3.close()
            held[1][1].close()

    run(main())


def test_access_log_json_lines(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from midway.config.schema import Config, ServerConfig

    async def main() -> None:
        log_path = tmp_path / "access.log"
        async with serve() as port:
            config = Config(server=ServerConfig(access_log=str(log_path)),
                            proxies=(midway.proxy_config("127.0.0.1:0", f"127.0.0.1:{port}", "web"),))
            runtime = midway.Runtime(config)
            await runtime.start()
            (address,) = runtime.services["web"].addresses
            host, _, p = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(p))
            writer.write(b"12345")
            assert await read_exactly(reader, 5) == b"12345"
            writer.write_eof()
            assert await read_to_eof(reader) == b""
            writer.close()
            async with asyncio.timeout(5):
                while runtime.active:
                    await asyncio.sleep(0.01)
            await runtime.shutdown(0)
        (line,) = log_path.read_text().splitlines()
        entry = json.loads(line)
        assert entry["proxy"] == "web"
        assert entry["upstream"] == f"127.0.0.1:{port}"
        assert entry["bytes_up"] == 5 and entry["bytes_down"] == 5
        assert entry["reason"] == "eof" and entry["first_close"] == "client"
        assert entry["client"].startswith("127.0.0.1:")
        assert entry["connect_time_s"] >= 0 and entry["duration_s"] >= 0

    run(main())


def test_live_add_and_remove_proxy() -> None:
    async def main() -> None:
        async with serve() as port, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
            runtime = proxy.runtime
            assert runtime is not None
            service = runtime.add_proxy(midway.proxy_config("127.0.0.1:0", f"127.0.0.1:{port}", "extra"))
            host, _, p = service.addresses[0].rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(p))
            writer.write(b"hi")
            assert await read_exactly(reader, 2) == b"hi"
            # Quiet for longer than a transfer in progress would be: a clean FIN
            # (docs/guarantees.md; a connection cut mid-transfer is reset instead).
            await asyncio.sleep(FLOWING_S + 0.1)
            runtime.remove_proxy("extra")
            assert await read_to_eof(reader, timeout=2) == b""
            writer.close()
            with pytest.raises(OSError):
                await asyncio.open_connection(host, int(p))

    run(main())


def test_process_wide_limit_spans_proxies() -> None:
    from midway.config.schema import Config, ServerConfig

    async def main() -> None:
        async with serve() as port:
            config = Config(server=ServerConfig(max_connections=2), proxies=(
                midway.proxy_config("127.0.0.1:0", f"127.0.0.1:{port}", "a"),
                midway.proxy_config("127.0.0.1:0", f"127.0.0.1:{port}", "b"),
            ))
            runtime = midway.Runtime(config)
            await runtime.start()
            try:
                def addr(name: str) -> tuple[str, int]:
                    host, _, p = runtime.services[name].addresses[0].rpartition(":")
                    return host, int(p)

                held = [await asyncio.open_connection(*addr("a")) for _ in range(2)]
                for reader, writer in held:
                    writer.write(b"a")
                    assert await read_exactly(reader, 1) == b"a"
                # Proxy b has no limit of its own, but the process is full.
                reader, writer = await asyncio.open_connection(*addr("b"))
                writer.write(b"b")
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(reader.readexactly(1), 0.5)
                held[0][1].close()
                assert await read_exactly(reader, 1, timeout=5) == b"b"
                writer.close()
                held[1][1].close()
            finally:
                await runtime.shutdown(0)

    run(main())


def test_an_access_log_that_cannot_be_opened_at_a_reload_keeps_the_old_one(
        tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """set_server with a new access log that fails to open (the disk filled
    between the check and the open): refused, and the old log stays the one
    written, closed and replaced by the next change as before (it was left
    written but forgotten, so a later change wrote both files)."""
    from midway import runtime as runtime_module
    from midway.config.schema import Config, ServerConfig
    from midway.errors import ConfigError

    first, second, third = (tmp_path / f"{name}.log" for name in ("first", "second", "third"))

    async def main() -> None:
        async with serve() as port:
            config = Config(server=ServerConfig(access_log=str(first)),
                            proxies=(midway.proxy_config("127.0.0.1:0", f"127.0.0.1:{port}",
                                                         "web"),))
            runtime = midway.Runtime(config)
            await runtime.start()
            (address,) = runtime.services["web"].addresses
            host, _, p = address.rpartition(":")

            async def one() -> None:
                reader, writer = await asyncio.open_connection(host, int(p))
                writer.write_eof()
                assert await read_to_eof(reader) == b""
                writer.close()
                async with asyncio.timeout(5):
                    while runtime.active:  # its close recorded
                        await asyncio.sleep(0.01)

            real = runtime_module.AccessLog

            def failing(path: str) -> object:
                if path == str(second):
                    raise OSError(28, "No space left on device")
                return real(path)

            monkeypatch.setattr(runtime_module, "AccessLog", failing)
            with pytest.raises(ConfigError, match="No space left on device"):
                runtime.set_server(ServerConfig(access_log=str(second)))
            await one()
            runtime.set_server(ServerConfig(access_log=str(third)))
            await one()
            await runtime.shutdown(0)

    run(main())
    assert len(first.read_text().splitlines()) == 1  # the one before the change only
    assert len(third.read_text().splitlines()) == 1
    assert not second.exists()
