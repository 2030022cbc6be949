"""Seeing and changing traffic over real sockets: hooks, the dump, pcap capture
read back by tshark, the examples, and the fast path kept when none is on."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import midway
from midway.chain.hooks import HookContext
from midway.chain.runner import CHAIN_QUEUE_HIGH, DirectionRunner
from midway.core.relay import READ_SIZE
from midway.errors import Rejected

from ..helpers import (
    ROOT,
    free_port,
    needs,
    proxy_process,
    read_exactly,
    read_to_eof,
    run,
    serve,
    wait_until,
)

TSHARK = shutil.which("tshark")
REDIS = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason=needs("tshark", apt="tshark"))
needs_redis = pytest.mark.skipif(REDIS is None or REDIS_CLI is None,
                                 reason=needs("redis-server and redis-cli",
                                              apt="redis-server redis-tools"))
HOOKS = "tests.e2e.test_inspect"


# --- helpers -------------------------------------------------------------------


class Recorder:
    """An upstream that records what each connection sent, and optionally
    answers every line with ``reply``."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply
        self.received: list[bytearray] = []

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        try:
            while data := await reader.read(65536):
                got += data
                if self.reply is not None:
                    writer.write(self.reply * data.count(b"\n"))
                    await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def connect(proxy: midway.Proxy) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*proxy.address)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield reader, writer
    finally:
        writer.close()


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One byte per write, letting each go out as its own segment."""
    for i in range(len(data)):
        writer.write(data[i:i + 1])
        await writer.drain()
        await asyncio.sleep(0.0005)


class Closes:
    """An observer keeping every CloseRecord."""

    def __init__(self) -> None:
        self.records: list[midway.CloseRecord] = []

    def connection_closed(self, record: midway.CloseRecord) -> None:
        self.records.append(record)


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def midway_log() -> Iterator[LogRecords]:
    handler = LogRecords()
    logger = logging.getLogger("midway")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# --- hooks (referenced as tests.e2e.test_inspect:NAME) -----------------------------


class Upper:
    """Length-prefixed frames (2 bytes, big-endian): upper-cases each body upstream."""

    framing = "length:2:big"
    seen: list[bytes] = []

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes | None:
        if direction == "upstream":
            Upper.seen.append(data)
            return data[:2] + data[2:].upper()
        return None


def frame(body: bytes) -> bytes:
    return struct.pack("!H", len(body)) + body


@pytest.mark.per_loop
def test_hook_sees_whole_messages_however_they_are_cut_and_the_server_gets_the_change() -> None:
    bodies = [b"hello", b"x" * 1000, b"", b"mixed Case \x00\xff", b"last one"]
    stream = b"".join(frame(b) for b in bodies)
    Upper.seen = []
    recorder = Recorder()

    async def main() -> None:
        async with serve(recorder.handler) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:Upper"]) as proxy:
            async with connect(proxy) as (reader, writer):
                await trickle(writer, frame(bodies[0]))              # 1-byte segments
                writer.write(b"".join(frame(b) for b in bodies[1:4]))  # coalesced
                await writer.drain()
                last = frame(bodies[4])
                writer.write(last[:1])                               # split mid-prefix
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(last[1:])
                writer.write_eof()
                assert await read_to_eof(reader) == b""
            assert Upper.seen == [frame(b) for b in bodies]
            assert bytes(recorder.received[0]) == b"".join(frame(b.upper()) for b in bodies)
            assert len(stream) == len(recorder.received[0])

    run(main())


class Filter:
    """Lines: ``drop`` lines are dropped and answered; every line gets a ``#``
    injected before it towards the server; ``reject`` as a first line is
    refused in on_connect (see ``on_connect``)."""

    framing = "line"

    def on_connect(self, ctx: HookContext) -> None:
        if ctx.info.sequence % 3 == 0:
            raise Rejected("every third connection is refused")

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes | None:
        if direction == "downstream":
            return None
        if data.startswith(b"drop"):
            ctx.send_to_client(b"dropped: " + data)
            return b""
        ctx.send_to_server(b"#")
        return data


@pytest.mark.per_loop
def test_drop_inject_and_reject() -> None:
    recorder = Recorder(reply=b"ok\n")

    async def main() -> None:
        async with serve(recorder.handler) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:Filter"]) as proxy:
            async with connect(proxy) as (reader, writer):
                writer.write(b"one\ndrop this\ntwo\n")
                expected = b"dropped: drop this\nok\nok\n"
                got = await read_exactly(reader, len(expected))
                # The drop answer went at once; the server's answers follow.
                assert sorted(got.splitlines()) == sorted(expected.splitlines())
                writer.write_eof()
                assert await read_to_eof(reader) == b""
            assert bytes(recorder.received[0]) == b"#one\n#two\n"
            async with connect(proxy) as (reader, writer):  # the 2nd: accepted
                writer.write(b"x\n")
                assert await read_exactly(reader, 3) == b"ok\n"
            async with connect(proxy) as (reader, writer):  # the 3rd: refused
                writer.write(b"y\n")
                with contextlib.suppress(ConnectionResetError):
                    assert await read_to_eof(reader) == b""
            # on_connect runs once the upstream is connected: the refused connection
            # reached it, but carried not a byte.
            assert await asyncio.to_thread(wait_until, lambda: len(recorder.received) == 3)
            assert bytes(recorder.received[2]) == b""

    run(main())


class Bouncer:
    """Refuses the first connection in on_connect (``refuse``: by raising, or by
    ctx.close); records every on_close it gets."""

    closed: list[tuple[int, str]] = []
    refuse = "raise"

    def on_connect(self, ctx: HookContext) -> None:
        if ctx.info.sequence == 1:
            if Bouncer.refuse == "raise":
                raise Rejected("not you")
            ctx.close("not you either")
        self.id = ctx.id

    def on_close(self, ctx: HookContext, reason: str) -> None:
        Bouncer.closed.append((self.id, reason))


class Bystander:
    """A second hook, after the refusing one: its on_close is not called either."""

    closed: list[str] = []

    def on_close(self, ctx: HookContext, reason: str) -> None:
        Bystander.closed.append(reason)


@pytest.mark.one_mode
@pytest.mark.parametrize("refuse", ["raise", "close"])
def test_on_close_is_not_called_for_a_connection_on_connect_refused(refuse: str) -> None:
    """docs/inspection.md: on_close "is not called for a connection that on_connect
    (of this hook or a later one) refused" (an on_close that reads what
    on_connect set up would fail on it)."""
    Bouncer.closed, Bouncer.refuse, Bystander.closed = [], refuse, []
    closes = Closes()

    async def main() -> None:
        async with serve(Recorder(reply=b"ok\n").handler) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}",
                hooks=[f"{HOOKS}:Bystander", f"{HOOKS}:Bouncer"], observers=[closes]) as proxy:
            async with connect(proxy) as (reader, writer):  # refused
                with contextlib.suppress(ConnectionResetError):
                    assert await read_to_eof(reader) == b""
            async with connect(proxy) as (reader, writer):  # accepted
                writer.write(b"x\n")
                assert await read_exactly(reader, 3) == b"ok\n"
                writer.write_eof()
                assert await read_to_eof(reader) == b""
            assert await asyncio.to_thread(wait_until, lambda: len(closes.records) == 2)
        assert [r.reason for r in closes.records] == ["rejected", "eof"]
        assert Bouncer.closed == [(2, "eof")]
        assert Bystander.closed == ["eof"]

    run(main())


class Explode:
    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
        if b"boom" in data:
            raise ValueError("the hook cannot handle boom")
        return data


@pytest.mark.per_loop
def test_a_raising_hook_closes_its_connection_only_and_logs_once() -> None:
    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:Explode"]) as proxy:
            with midway_log() as log_records:
                async with connect(proxy) as (r1, w1), connect(proxy) as (r2, w2):
                    w2.write(b"before")
                    assert await read_exactly(r2, 6) == b"before"
                    w1.write(b"boom")
                    with contextlib.suppress(ConnectionResetError):
                        assert await read_to_eof(r1, timeout=5) == b""
                    w2.write(b"after")
                    assert await read_exactly(r2, 5) == b"after"
                    async with connect(proxy) as (r3, w3):
                        w3.write(b"new")
                        assert await read_exactly(r3, 3) == b"new"
            errors = [r for r in log_records.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1, [r.getMessage() for r in errors]
            assert errors[0].exc_info is not None
            assert f"hook {HOOKS}:Explode raised in on_data: ValueError" in errors[0].getMessage()
            text = logging.Formatter().formatException(errors[0].exc_info)
            assert "the hook cannot handle boom" in text

    run(main())


class Goodbye:
    """Answers QUIT itself, then closes: SMTP's 221, POP3's +OK."""

    framing = "line"

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes | None:
        if direction == "upstream" and data.startswith(b"QUIT"):
            ctx.send_to_client(b"221 bye\r\n")
            ctx.close("client quit")
            return b""
        return None


class GoodbyeRejected:
    framing = "line"

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes | None:
        if direction == "upstream" and data.startswith(b"QUIT"):
            ctx.send_to_client(b"221 bye\r\n")
            raise Rejected("client quit")
        return None


@pytest.mark.per_loop
@pytest.mark.parametrize("hook", ["Goodbye", "GoodbyeRejected"])
@pytest.mark.parametrize("after_quit", [b"", b"NOOP\n"])
def test_a_hook_that_answers_then_closes_delivers_its_answer(hook: str, after_quit: bytes) -> None:
    """ctx.close() (or raising Rejected) is graceful: a reply injected just before
    it reaches the client ahead of the FIN, and what the client sent after the
    QUIT (pipelined in the same segment) is not passed on."""
    recorder = Recorder()

    async def main() -> None:
        async with serve(recorder.handler) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:{hook}"]) as proxy:
            async with connect(proxy) as (reader, writer):
                writer.write(b"HELO x\nQUIT\n" + after_quit)
                assert await read_to_eof(reader, timeout=5) == b"221 bye\r\n"
            async with asyncio.timeout(5):
                while proxy.connections:
                    await asyncio.sleep(0.01)
        assert b"".join(recorder.received) == b"HELO x\n"

    run(main())


class ReturnsText:
    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> str:
        return data.decode()


class ExplodesInThread(Explode):
    blocking = True


class RefusesBadly:
    def on_connect(self, ctx: HookContext) -> None:
        raise KeyError("no such tenant")


class FailsToStart:
    def __init__(self) -> None:
        raise LookupError("no such tenant")

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
        return data


class ExitsOnStart(FailsToStart):
    def __init__(self) -> None:
        raise SystemExit(3)


@pytest.mark.per_loop
@pytest.mark.parametrize(("hook", "message", "traceback_has"), [
    ("Explode", "hook tests.e2e.test_inspect:Explode raised in on_data: ValueError: "
                "the hook cannot handle boom", 'raise ValueError("the hook cannot handle boom")'),
    ("ExplodesInThread", "hook tests.e2e.test_inspect:ExplodesInThread raised in on_data: "
                         "ValueError: the hook cannot handle boom",
     'raise ValueError("the hook cannot handle boom")'),
    ("RefusesBadly", "hook tests.e2e.test_inspect:RefusesBadly raised in on_connect: "
                     "KeyError: 'no such tenant'", 'raise KeyError("no such tenant")'),
    # Made at the first data: its traceback had midway's frame above the hook's,
    # and a SystemExit was logged as midway's own failure, the hook unnamed.
    ("FailsToStart", "hook tests.e2e.test_inspect:FailsToStart: creating its per-connection "
                     "object failed: LookupError: no such tenant",
     'raise LookupError("no such tenant")'),
    ("ExitsOnStart", "hook tests.e2e.test_inspect:ExitsOnStart: creating its per-connection "
                     "object failed: SystemExit: 3", "raise SystemExit(3)"),
    ("ReturnsText", "hook tests.e2e.test_inspect:ReturnsText: on_data returned str; "
                    "return bytes (encode it)", None),
])
def test_a_failing_hook_is_logged_as_its_own_error_not_midways(
        hook: str, message: str, traceback_has: str | None) -> None:
    """One error line that says what the hook did, and the traceback of the hook's
    own code only: none of midway's frames (the chain runner, the service), none
    at all when the hook raised nothing (a wrong return type)."""
    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:{hook}"]) as proxy:
            with midway_log() as log_records:
                async with connect(proxy) as (reader, writer):
                    writer.write(b"boom")
                    with contextlib.suppress(ConnectionResetError):
                        assert await read_to_eof(reader, timeout=5) == b""
                async with asyncio.timeout(5):
                    while proxy.connections:
                        await asyncio.sleep(0.01)
            errors = [r for r in log_records.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1, [r.getMessage() for r in errors]
            assert message in errors[0].getMessage()
            assert errors[0].getMessage().endswith("closing this connection")
            if traceback_has is None:
                assert errors[0].exc_info is None
            else:
                assert errors[0].exc_info is not None
                text = logging.Formatter().formatException(errors[0].exc_info)
                assert traceback_has in text
                assert "runner.py" not in text and "service.py" not in text, text
                assert "midway/chain/hooks.py" not in text, text   # where midway called it
                assert "concurrent/futures" not in text, text      # the pool's thread

    run(main())


class FailsAtClose:
    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> None:
        return None

    def on_close(self, ctx: HookContext, reason: str) -> None:
        raise KeyError("no such session")


class FailsAtCloseAsync(FailsAtClose):
    async def on_close(self, ctx: HookContext, reason: str) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        raise KeyError("no such session")


class FailsAtCloseInThread(FailsAtClose):
    blocking = True


@pytest.mark.per_loop
@pytest.mark.parametrize("hook", ["FailsAtClose", "FailsAtCloseAsync", "FailsAtCloseInThread"])
def test_a_hook_failing_in_on_close_is_logged_with_its_own_traceback(hook: str) -> None:
    """An error in ``on_close`` (sync, async or in the pool) is logged once, naming
    the hook, with the hook's own frames only, as for the other callbacks: the
    traceback began in midway's hooks.py (or asyncio, or the pool's thread)."""
    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:{hook}"]) as proxy:
            with midway_log() as log_records:
                async with connect(proxy) as (reader, writer):
                    writer.write(b"hello")
                    writer.write_eof()
                    assert await read_to_eof(reader, timeout=5) == b"hello"
                async with asyncio.timeout(5):      # an async on_close runs after the close
                    while not any(r.levelno >= logging.ERROR for r in log_records.records):
                        await asyncio.sleep(0.01)
            errors = [r for r in log_records.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1, [r.getMessage() for r in errors]
            assert f"hook {HOOKS}:{hook} raised in on_close" in errors[0].getMessage()
            assert errors[0].exc_info is not None
            text = logging.Formatter().formatException(errors[0].exc_info)
            assert 'raise KeyError("no such session")' in text
            assert "midway/chain/hooks.py" not in text, text
            assert "asyncio" not in text and "concurrent/futures" not in text, text

    run(main())


def test_a_hook_failing_in_on_connect_closes_as_a_refusal_does() -> None:
    """docs/inspection.md, Errors: before relaying began nothing of the client's
    was lost, so a hook raising in ``on_connect`` closes the client with a FIN,
    as a refusal does (the docs said every failing hook resets its connection)."""
    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:RefusesBadly"]) as proxy:
            with midway_log():
                reader, writer = await asyncio.open_connection(*proxy.address)
                try:
                    assert await read_to_eof(reader, timeout=5) == b""   # no ConnectionResetError
                finally:
                    writer.close()

    run(main())


class SlowLines:
    """An async hook that sleeps now and then; counts what it saw."""

    framing = "line"
    seen = 0
    digest = hashlib.sha256()

    async def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes | None:
        if direction == "upstream":
            SlowLines.seen += 1
            SlowLines.digest.update(data)
            if SlowLines.seen % 500 == 0:
                await asyncio.sleep(0.002)
        return None


def _queued(flow: Any) -> int:
    """Bytes a chained direction has read and its stages not yet taken."""
    runner = flow.chain
    return runner.queued if isinstance(runner, DirectionRunner) else 0


@pytest.mark.per_loop
def test_an_async_hook_that_sleeps_keeps_order_and_bounded_memory() -> None:
    lines = b"".join(b"%08d some payload to make the line longer\n" % i for i in range(100_000))
    SlowLines.seen, SlowLines.digest = 0, hashlib.sha256()

    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:SlowLines"]) as proxy:
            async with connect(proxy) as (reader, writer):
                highest = 0
                done = False

                async def sample() -> None:
                    nonlocal highest
                    while not done:
                        for relay in proxy.service.live:
                            highest = max(highest, _queued(relay.up), _queued(relay.down))
                        await asyncio.sleep(0.001)

                sampler = asyncio.create_task(sample())
                writer.write(lines)
                writer.write_eof()
                echoed = await read_to_eof(reader, timeout=60)
                done = True
                await sampler
            assert echoed == lines  # in order, every byte
            assert SlowLines.seen == 100_000
            assert SlowLines.digest.digest() == hashlib.sha256(lines).digest()
            # The relay stopped reading while the hook was behind: at most its
            # bounded read-ahead waited, not the 4.3 MB that were sent.
            assert 0 < highest <= CHAIN_QUEUE_HIGH + READ_SIZE

    run(main(), timeout=120)


class ConnectOnly:
    connected: list[str] = []

    def on_connect(self, ctx: HookContext) -> None:
        ConnectOnly.connected.append(ctx.client)


def test_the_fast_path_is_kept_when_nothing_inspects(tmp_path: Path) -> None:
    async def path_of(**options: Any) -> str:
        closes = Closes()
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", observers=[closes], **options) as proxy:
            async with connect(proxy) as (reader, writer):
                writer.write(b"ping")
                assert await read_exactly(reader, 4) == b"ping"
                writer.write_eof()
                assert await read_to_eof(reader) == b""
            assert await asyncio.to_thread(wait_until, lambda: bool(closes.records))
        return closes.records[0].path

    async def main() -> None:
        fast = {"splice", "copy"}
        assert await path_of() in fast
        assert await path_of(hooks=[f"{HOOKS}:ConnectOnly"]) in fast  # no on_data: no stage
        assert ConnectOnly.connected
        assert await path_of(dump="text", dump_file=str(tmp_path / "d")) == "chain"
        assert await path_of(pcap=str(tmp_path / "c.pcap")) == "chain"
        assert await path_of(hooks=[f"{HOOKS}:Explode"]) == "chain"

    run(main())


class Marker(midway.Element):
    name = "marker"

    def attach(self, info: midway.ConnectionInfo) -> None:
        return None


@pytest.mark.per_loop
def test_elements_added_while_running_go_before_the_capture_tail(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", pcap=str(tmp_path / "c.pcap"),
                hooks=[f"{HOOKS}:Explode"]) as proxy:
            proxy.add_element(Marker())
            assert [e.name for e in proxy.service.elements] == [
                "pcap", f"hook:{HOOKS}:Explode", "marker", "pcap (tail)"]

    run(main())


# --- pcap ------------------------------------------------------------------------


def tshark(path: Path, *args: str) -> list[str]:
    assert TSHARK is not None
    result = subprocess.run([TSHARK, "-n", "-r", str(path), *args], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "appears to have been cut short" not in result.stderr, result.stderr
    return result.stdout.splitlines()


def fields(path: Path, decode: list[str], display_filter: str, *names: str) -> list[str]:
    args = [a for port_proto in decode for a in ("-d", f"tcp.port=={port_proto}")]
    args += ["-Y", display_filter, "-T", "fields"]
    for name in names:
        args += ["-e", name]
    return tshark(path, *args)


def payload(path: Path, src_port: int, dst_port: int) -> bytes:
    rows = fields(path, [], f"tcp.srcport == {src_port} && tcp.dstport == {dst_port} "
                            "&& tcp.len > 0", "tcp.payload")
    return b"".join(bytes.fromhex(row.replace(":", "")) for row in rows)


REQUEST = b"GET /hello?who=midway HTTP/1.1\r\nHost: example\r\nUser-Agent: test\r\n\r\n"
BODY = b"hi there\n" * 1000
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(BODY)) + BODY


async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(RESPONSE)
    await writer.drain()
    writer.close()


@pytest.mark.per_loop
@needs_tshark
def test_pcap_of_an_http_exchange_reads_dissects_and_carries_the_exact_bytes(
        tmp_path: Path) -> None:
    path = tmp_path / "http.pcap"
    ports: dict[str, int] = {}

    async def main() -> None:
        async with serve(http_server) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", pcap=str(path)) as proxy:
            ports.update(upstream=port, listen=proxy.port)
            async with connect(proxy) as (reader, writer):
                ports["client"] = writer.get_extra_info("sockname")[1]
                await trickle(writer, REQUEST[:10])
                writer.write(REQUEST[10:])
                assert await read_to_eof(reader) == RESPONSE
            # Let the client's FIN through before stopping: a connection stopped
            # with its request direction still open (and just used) is reset.
            async with asyncio.timeout(5):
                while proxy.connections:
                    await asyncio.sleep(0.01)

    run(main())
    decode = [f"{ports['listen']},http", f"{ports['upstream']},http"]
    # Both legs are there, each dissected as HTTP, with nothing malformed.
    assert fields(path, decode, "http.request", "http.request.uri") == ["/hello?who=midway"] * 2
    assert fields(path, decode, "http.response", "http.response.code") == ["200"] * 2
    assert fields(path, decode, "_ws.malformed || tcp.analysis.flags || "
                                "_ws.expert.severity >= warning", "frame.number") == []
    # Real addresses: the client's port, the listener's, the upstream's.
    client_leg = payload(path, ports["client"], ports["listen"])
    assert client_leg == REQUEST
    assert payload(path, ports["listen"], ports["client"]) == RESPONSE
    syns = fields(path, [], "tcp.flags.syn == 1 && tcp.flags.ack == 0", "tcp.srcport",
                  "tcp.dstport")
    assert syns[0] == f"{ports['client']}\t{ports['listen']}"
    assert syns[1].endswith(f"\t{ports['upstream']}")
    midway_port = int(syns[1].split("\t")[0])
    assert payload(path, midway_port, ports["upstream"]) == REQUEST
    assert payload(path, ports["upstream"], midway_port) == RESPONSE


@pytest.mark.per_loop
@needs_tshark
def test_pcap_times_never_go_back_within_a_tcp_stream(tmp_path: Path) -> None:
    """A ping-pong of 200 lines: in each of the two TCP streams the frames' times
    follow their order, so no echo is stamped before the line it answers (uvloop's
    loop clock counts whole milliseconds: a read stamped with it could be dated up
    to 1 ms before the packets that caused it)."""
    path = tmp_path / "pingpong.pcap"

    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", pcap=str(path)) as proxy:
            async with connect(proxy) as (reader, writer):
                for i in range(200):
                    line = b"ping %d\n" % i
                    writer.write(line)
                    assert await read_exactly(reader, len(line)) == line
                    await asyncio.sleep(0.0003)  # spread the exchanges over clock ticks
                writer.write_eof()
                assert await read_to_eof(reader) == b""
            async with asyncio.timeout(5):
                while proxy.connections:
                    await asyncio.sleep(0.01)

    run(main())
    rows = fields(path, [], "tcp", "tcp.stream", "frame.number", "frame.time_epoch", "tcp.len")
    streams: dict[str, list[tuple[int, float, int]]] = {}
    for row in rows:
        stream, number, epoch, length = row.split("\t")
        streams.setdefault(stream, []).append((int(number), float(epoch), int(length)))
    assert len(streams) == 2
    for frames in streams.values():
        assert sum(length for _, _, length in frames) == 2 * sum(
            len(b"ping %d\n" % i) for i in range(200))
        back = [(a, b) for a, b in zip(frames, frames[1:], strict=False) if b[1] < a[1]]
        assert back == [], f"frames dated before the frame ahead of them: {back[:3]}"


async def reset_after_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(100)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.per_loop
@needs_tshark
def test_pcap_records_an_upstream_reset_as_rsts(tmp_path: Path) -> None:
    path = tmp_path / "rst.pcap"
    ports: dict[str, int] = {}

    async def main() -> None:
        async with serve(reset_after_reading) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", pcap=str(path)) as proxy:
            ports.update(upstream=port, listen=proxy.port)
            async with connect(proxy) as (reader, writer):
                writer.write(b"hello")
                with contextlib.suppress(ConnectionResetError):
                    await read_to_eof(reader)
            await asyncio.sleep(0.1)

    run(main())
    rst_from = sorted(int(p) for p in fields(path, [], "tcp.flags.reset == 1", "tcp.srcport"))
    # The server reset the upstream leg; midway reset the client's.
    assert rst_from == sorted([ports["upstream"], ports["listen"]])


async def answer_then_fin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(100)
    writer.write(b"the answer")
    writer.write_eof()
    await reader.read()          # until the client (through midway) goes away


@pytest.mark.per_loop
@needs_tshark
@pytest.mark.parametrize("who_resets", ["client", "upstream"])
def test_pcap_rst_comes_from_the_peer_that_reset_even_after_the_other_half_closed(
        tmp_path: Path, who_resets: str) -> None:
    """The side that half-closed first is not the one that reset: the server
    answers and sends its FIN, then the client resets (or the client sends its
    FIN, then the server resets).  The capture stamped the RSTs by who closed
    first, so both came from the wrong end of their legs."""
    path = tmp_path / "rst.pcap"
    ports: dict[str, int] = {}

    async def main() -> None:
        handler = answer_then_fin if who_resets == "client" else reset_after_reading
        async with serve(handler) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", pcap=str(path)) as proxy:
            ports["upstream"], ports["listen"] = port, proxy.port
            reader, writer = await asyncio.open_connection(*proxy.address)
            ports["client"] = writer.get_extra_info("sockname")[1]
            writer.write(b"hello")
            if who_resets == "client":
                assert await read_to_eof(reader, timeout=5) == b"the answer"
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.write_eof()
                with contextlib.suppress(ConnectionResetError):
                    await read_to_eof(reader, timeout=5)
                writer.close()
            async with asyncio.timeout(5):
                while proxy.connections:
                    await asyncio.sleep(0.01)

    run(main())
    rows = fields(path, [], "tcp.flags.reset == 1", "tcp.srcport", "tcp.dstport")
    rst = [tuple(int(p) for p in row.split("\t")) for row in rows]
    listen, upstream, client = ports["listen"], ports["upstream"], ports["client"]
    if who_resets == "client":    # the client on its leg, midway towards the server
        assert len(rst) == 2 and (client, listen) in rst, rst
        assert [dst for src, dst in rst if src != client] == [upstream], rst
    else:                         # the server on its leg, midway towards the client
        assert len(rst) == 2 and (listen, client) in rst, rst
        assert [src for src, dst in rst if src != listen] == [upstream], rst


@pytest.mark.per_loop
@needs_tshark
@needs_redis
def test_pcap_of_redis_cli_through_the_cli(tmp_path: Path, redis_port: int) -> None:
    path = tmp_path / "redis.pcap"
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{redis_port}", "--pcap", str(path)) as proxy:
        assert REDIS_CLI is not None
        cli = [REDIS_CLI, "-h", "127.0.0.1", "-p", str(proxy.port)]
        subprocess.run([*cli, "SET", "greeting", "hello, wireshark"], check=True, timeout=20,
                       capture_output=True)
        out = subprocess.run([*cli, "GET", "greeting"], check=True, timeout=20,
                             capture_output=True, text=True).stdout
        assert out.strip() == "hello, wireshark"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
        listen_port = proxy.port
    decode = [f"{listen_port},resp"]  # 6379 is RESP already; the listener's port is not
    values = fields(path, decode, "resp", "resp.bulk_string.value")
    strings = {bytes.fromhex(v.replace(":", "")).decode() for row in values
               for v in row.replace(",", "\t").split("\t") if v}
    assert {"SET", "greeting", "hello, wireshark", "GET"} <= strings
    assert fields(path, decode, "_ws.malformed || tcp.analysis.flags", "frame.number") == []


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    if REDIS is None:
        pytest.skip(needs("redis-server", apt="redis-server"))
    port = free_port()
    server = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _listening(port), timeout=10)
        yield port
    finally:
        server.terminate()
        server.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# --- dump --------------------------------------------------------------------------

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"


class EchoServer:
    """A loopback echo server on a thread, for CLI runs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


def stopped_stdout(proxy: Any) -> str:
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0
    assert proxy.proc.stdout is not None
    return str(proxy.proc.stdout.read().decode())


@pytest.mark.per_loop
def test_dump_to_a_pipe_shows_both_directions_without_colour(echo: EchoServer) -> None:
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{echo.port}", "--dump", "text") as proxy:
        assert exchange(proxy.port, b"PING\r\n") == b"PING\r\n"
        out = stopped_stdout(proxy)
    assert "\x1b" not in out
    lines = out.splitlines()
    assert re.fullmatch(rf"{STAMP} #1 open: client 127\.0\.0\.1:\d+ → proxy default → "
                        rf"upstream 127\.0\.0\.1:{echo.port}", lines[0]), lines
    # The client's FIN may come before or after the echo: look for each chunk's
    # header and the line that follows it.
    for arrow in ("client → server", "client ← server"):
        at = [i for i, line in enumerate(lines) if re.fullmatch(rf"{STAMP} #1 {arrow} 6 bytes",
                                                                 line)]
        assert len(at) == 1, lines
        assert lines[at[0] + 1] == "PING\\r"
    assert re.fullmatch(rf"{STAMP} #1 closed \(eof\) after \d+\.\d{{3}} s: client → server "
                        r"6 bytes, client ← server 6 bytes", lines[-1]), lines
    assert sum("end of stream (FIN)" in line for line in lines) == 2


@pytest.mark.per_loop
def test_dump_hex_to_a_file(echo: EchoServer, tmp_path: Path) -> None:
    path = tmp_path / "dump.txt"
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{echo.port}", "--dump", "hex",
                       "--dump-file", str(path)) as proxy:
        assert exchange(proxy.port, b"\x00\x01hello") == b"\x00\x01hello"
        assert stopped_stdout(proxy) == ""
    text = path.read_text()
    assert text.count("00000000  00 01 68 65 6c 6c 6f                              |..hello|\n"
                      "00000007\n") == 2


@pytest.mark.per_loop
def test_a_flood_through_a_dump_nobody_reads_is_relayed_in_full(echo: EchoServer) -> None:
    """The dump's pipe is never read while 64 MiB flow: the proxy keeps relaying
    at full speed and only says, afterwards, how much it did not show."""
    blob = os.urandom(1 << 20) * 64
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{echo.port}", "--dump", "hex") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
            def send() -> None:
                sock.sendall(blob)
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            digest, total = hashlib.sha256(), 0
            while chunk := sock.recv(1 << 20):
                digest.update(chunk)
                total += len(chunk)
            sender.join(30)
        assert total == len(blob) and digest.digest() == hashlib.sha256(blob).digest()
        assert proxy.rss_kib() < 200_000
        # Now read the dump: what fit, then the count of what was skipped.
        assert proxy.proc.stdout is not None
        dump = bytearray()
        reader = threading.Thread(target=lambda: dump.extend(proxy.proc.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
        reader.join(10)
    text = dump.decode(errors="replace")
    match = re.search(r"dump output fell behind: (\d+) chunks \((\d+) bytes of traffic\) "
                      r"not shown", text)
    assert match, text[-2000:]
    assert int(match.group(2)) > len(blob)  # most of both directions went unshown


# --- configuration -------------------------------------------------------------------


@pytest.mark.per_loop
def test_a_hook_that_cannot_be_imported_stops_the_cli_with_one_clear_line(
        echo: EchoServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "midway", "127.0.0.1:0", f"127.0.0.1:{echo.port}",
         "--hook", "examples.nope:Hook"], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"midway: --hook: hook 'examples.nope:Hook': no module named 'examples.nope' "
        f"(searched from {ROOT})"]


@pytest.mark.per_loop
def test_hooks_from_a_toml_file_chain_in_order(tmp_path: Path) -> None:
    recorder = Recorder()
    config = tmp_path / "midway.toml"

    async def main() -> None:
        async with serve(recorder.handler) as port:
            config.write_text(f"""
                [proxy.chained]
                listen = "127.0.0.1:0"
                upstreams = "127.0.0.1:{port}"
                hooks = ["{HOOKS}:Filter", "examples.rewrite:rewrite"]
            """.replace("\n                ", "\n"))
            loaded = midway.load_config(config)
            assert loaded.proxies[0].hooks == (f"{HOOKS}:Filter", "examples.rewrite:rewrite")
            runtime = midway.Runtime(loaded)
            await runtime.start()
            try:
                service = runtime.services["chained"]
                assert [e.name for e in service.elements] == [
                    f"hook:{HOOKS}:Filter", "hook:examples.rewrite:rewrite"]
                host, port_ = service.listeners[0].sock.getsockname()[:2]
                reader, writer = await asyncio.open_connection(host, port_)
                writer.write(b"hello\n")
                writer.write_eof()
                await read_to_eof(reader)
                writer.close()
            finally:
                await runtime.shutdown(0)
            # Filter injected "#", then rewrite changed what Filter passed on.
            assert bytes(recorder.received[0]) == b"#goodbye\n"

    run(main())


# --- the examples ----------------------------------------------------------------------


@pytest.mark.per_loop
@needs_redis
def test_example_redis_logger(redis_port: int) -> None:
    value = "two\r\nlines"
    with proxy_process("127.0.0.1:0", f"127.0.0.1:{redis_port}",
                       "--hook", "examples.redis_logger:RedisLogger") as proxy:
        assert REDIS_CLI is not None
        cli = [REDIS_CLI, "-h", "127.0.0.1", "-p", str(proxy.port)]
        subprocess.run([*cli, "-x", "SET", "greeting"], input=value, check=True, timeout=20,
                       capture_output=True, text=True)
        out = subprocess.run([*cli, "GET", "greeting"], check=True, timeout=20,
                             capture_output=True).stdout
        assert out == value.encode() + b"\n"
        subprocess.run([*cli, "INCR", "greeting"], timeout=20, capture_output=True)
        assert wait_until(lambda: "INCR" in proxy.stderr_text(), timeout=10)
        log_text = proxy.stderr_text()
    assert re.search(r"redis #\d+ 127\.0\.0\.1:\d+: SET greeting two\\r\\nlines -> \+OK",
                     log_text), log_text
    assert re.search(r'GET greeting -> "two\\r\\nlines"', log_text), log_text
    assert re.search(r"INCR greeting -> -ERR value is not an integer", log_text), log_text


@pytest.mark.per_loop
def test_example_rewrite() -> None:
    recorder = Recorder(reply=b"hello back\n")

    async def main() -> None:
        async with serve(recorder.handler) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=["examples.rewrite:rewrite"]) as proxy:
            async with connect(proxy) as (reader, writer):
                await trickle(writer, b"hel")        # "hello" cut across segments
                writer.write(b"lo, world\n")
                assert await read_exactly(reader, 13) == b"goodbye back\n"  # both ways
                writer.write_eof()
                assert await read_to_eof(reader) == b""
            assert bytes(recorder.received[0]) == b"goodbye, world\n"

    run(main())


@pytest.mark.per_loop
@needs_redis
def test_example_drop_command(redis_port: int) -> None:
    async def main() -> None:
        async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{redis_port}",
                                hooks=["examples.drop_command:DropCommand"]) as proxy:
            async with connect(proxy) as (reader, writer):
                for command, answer in [(b"SET a 1\r\n", b"+OK\r\n"),
                                        (b"flushall\r\n",
                                         b"-ERR FLUSHALL is disabled by midway\r\n"),
                                        (b"GET a\n", b"$1\r\n1\r\n"),
                                        (b"FLUSHDB async\r\n",
                                         b"-ERR FLUSHDB is disabled by midway\r\n"),
                                        (b"DBSIZE\r\n", b":1\r\n")]:
                    writer.write(command)
                    assert await read_exactly(reader, len(answer)) == answer

    run(main())


def test_example_drop_command_reply_from_its_docstring_ends_the_line() -> None:
    """The docstring's ``MIDWAY_DROP_REPLY=... python -m midway ...`` line, run by
    bash as a user types it, gives a reply that ends in CR LF (in plain quotes it
    ended in the four characters ``\\r\\n``, and a client waiting for the line end hung)."""
    import examples.drop_command
    line = next(line.strip() for line in (examples.drop_command.__doc__ or "").splitlines()
                if "MIDWAY_DROP_REPLY=" in line and "python -m midway" in line)
    show = "python -c 'import sys; from examples.drop_command import DropCommand as D; " \
           "sys.stdout.write(D.reply.format(command=\"QUIT\"))'"
    result = subprocess.run(["bash", "-c", line.replace("python -m midway ...", show)],
                            cwd=ROOT, capture_output=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"502 QUIT not allowed\r\n"


@pytest.mark.per_loop
def test_the_examples_are_referenced_from_the_readme_and_run_from_the_root() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, attr in [("redis_logger", "RedisLogger"), ("rewrite", "rewrite"),
                       ("drop_command", "DropCommand")]:
        doc = (ROOT / "examples" / f"{name}.py").read_text()
        assert f"--hook examples.{name}:{attr}" in doc
        assert f"examples/{name}.py" in readme
