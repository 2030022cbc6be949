"""The access log's byte fields over real sockets (issue 15, item 4).

``bytes_up`` / ``bytes_down`` are the bytes delivered to the peer: what the peer
can read, however the connection ended.  ``bytes_up_read`` / ``bytes_down_read``
are what midway read from the other side.  They agree on a clean transfer, on the
fast path (copy and splice) as on the chain; they differ when a transfer is cut
short, a toxic or hook drops bytes, or an element injects some."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import midway
from midway.chain.hooks import HookContext
from midway.core.observer import CloseRecord

from ..helpers import proxy_process, read_exactly, read_to_eof, run, serve, wait_until
from .test_inspect import Recorder, connect
from .test_relay import Records
from .test_resets import DOWNLOAD, _download, _threaded_server

HOOKS = "tests.e2e.test_byte_counts"


def _read_until_the_end(sock: socket.socket) -> tuple[str, int]:
    """Read ``sock`` to its end: ("eof" or "reset", bytes received)."""
    total = 0
    try:
        while chunk := sock.recv(1 << 20):
            total += len(chunk)
    except ConnectionResetError:
        return "reset", total
    return "eof", total


@pytest.mark.per_loop
def test_a_drain_cut_through_a_bandwidth_toxic_logs_what_the_client_received(
        tmp_path: Path) -> None:
    """The issue's scenario: a download through a bandwidth toxic, SIGTERM, a drain
    too short to finish it.  The toxic's queue held bytes read from the upstream
    and never sent (curl got 983 040 bytes, the log said 1 638 605): ``bytes_down``
    is what the client received, ``bytes_down_read`` the larger amount read."""
    log = tmp_path / "access.log"
    with _threaded_server(_download) as port, proxy_process(
            "127.0.0.1:0", f"127.0.0.1:{port}", "--toxic",
            "bandwidth:rate=2000,stream=downstream", "--drain-timeout-s", "0.3",
            "--access-log", str(log)) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
        result: list[tuple[str, int]] = []
        reader = threading.Thread(target=lambda: result.append(_read_until_the_end(client)))
        reader.start()
        time.sleep(0.8)  # about 1.6 MB through the toxic, its queue full
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(timeout=15) == 0
        reader.join(15)
        client.close()
    (outcome, received), = result
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert (entry["reason"], entry["detail"], entry["path"]) == ("shutdown", "drain timeout",
                                                                 "chain")
    assert outcome == "reset" and 0 < received < DOWNLOAD
    assert entry["bytes_down"] == received
    assert entry["bytes_down_read"] > received  # the toxic's queue, never sent
    assert entry["bytes_up"] == entry["bytes_up_read"] == 0


def test_a_slow_reader_cut_by_the_drain_is_counted_as_received_on_every_path() -> None:
    """A client that stops reading, then a drain cut: what midway's buffers and the
    kernel's send queue held is reset away, on the fast path (copy or splice) as
    well.  ``bytes_down`` is exactly what the client can still read; read live it
    never exceeds the final count (a counter for metrics must not go back)."""
    records = Records()

    async def main() -> tuple[int, int]:
        with _threaded_server(_download) as port:
            proxy = midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", observers=[records])
            await proxy.start()
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            client.connect(proxy.address)
            client.settimeout(20)
            try:
                await asyncio.sleep(0.5)  # the download stalls in the buffers
                (relay,) = proxy.service.live
                live = relay.bytes_down
                await proxy.stop(drain_timeout_s=0.2)
                outcome, received = await asyncio.to_thread(_read_until_the_end, client)
            finally:
                client.close()
        assert outcome == "reset"
        return live, received

    live, received = run(main())
    (record,) = records.records
    assert record.reason == "shutdown"
    assert 0 < live <= record.bytes_down == received
    # Read from the upstream: what reached the client and what the cut threw away
    # (a send buffer, a pipe, the kernel's queue).
    assert record.bytes_down_read > received


class DropLines:
    """Drops every ``drop`` line the client sends, and answers nothing for it."""

    framing = "line"

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes | None:
        if direction == "upstream" and data.startswith(b"drop"):
            return b""
        return None


Conversation = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _through_hook(hook: str, talk: Conversation) -> tuple[CloseRecord, bytes]:
    """One connection through ``hook`` to a server answering ``ok`` per line,
    ``talk`` driving the client: its access record and what the server got."""
    recorder = Recorder(reply=b"ok\n")
    records = Records()

    async def main() -> None:
        async with serve(recorder.handler) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:{hook}"],
                observers=[records]) as proxy:
            async with connect(proxy) as (reader, writer):
                await talk(reader, writer)
            assert await asyncio.to_thread(wait_until, lambda: len(records.records) == 1)

    run(main())
    (record,) = records.records
    return record, bytes(recorder.received[0])


@pytest.mark.per_loop
def test_bytes_a_hook_drops_are_read_and_not_delivered() -> None:
    sent = b"one\ndrop 1\ntwo\ndrop 2\nthree\n"
    kept = b"one\ntwo\nthree\n"

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(sent)
        writer.write_eof()
        assert await read_to_eof(reader) == b"ok\n" * 3

    record, received = _through_hook("DropLines", talk)
    assert received == kept
    assert (record.bytes_up_read, record.bytes_up) == (len(sent), len(kept))
    assert record.bytes_down_read == record.bytes_down == 9


class Inject:
    """Before each line to the server, injects ``> ``; answers ``ping`` itself with
    a reply to the client (``pong``) instead of passing it on."""

    framing = "line"

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes | None:
        if direction == "downstream":
            return None
        if data == b"ping\n":
            ctx.send_to_client(b"pong\n")
            return b""
        ctx.send_to_server(b"> ")
        return data


@pytest.mark.per_loop
def test_bytes_an_element_injects_are_delivered_beyond_what_was_read() -> None:
    """Injected bytes count where they are delivered: ``send_to_server`` in the
    upstream count, ``send_to_client`` (a reply) in the downstream one, which then
    exceeds what the upstream sent."""
    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ping\n")
        assert await read_exactly(reader, 5) == b"pong\n"
        writer.write(b"a\nb\n")
        writer.write_eof()
        assert await read_to_eof(reader) == b"ok\nok\n"

    record, received = _through_hook("Inject", talk)
    assert received == b"> a\n> b\n"
    assert (record.bytes_up_read, record.bytes_up) == (9, 8)  # 5 dropped, 4 injected
    assert (record.bytes_down_read, record.bytes_down) == (6, 11)  # a 5-byte reply
