"""One connection must not stall or kill the process: hooks that raise what is
not an ``Exception``, sync hooks that block, an ``on_connect`` that never returns,
a toxic that cuts a chunk into 65 536 pieces, and a hook that injects a lot.

Most run a ``python -m midway --config`` child with two proxies: ``a`` carries
the misbehaving element, ``b`` is plain, and a round trip through ``b`` shows
whether ``a`` held the process's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

import midway
from midway.chain import hooks as hooks_module
from midway.chain.hooks import HookContext

from ..helpers import (
    ProxyProcess,
    free_port,
    proxy_process,
    read_exactly,
    run,
    serve,
    wait_until,
)
from .test_inspect import Closes, midway_log

HOOKS = "tests.e2e.test_hook_isolation"


# Proxy ``a`` always takes the chain path, so splice or copy cannot matter: once
# per event loop.
pytestmark = pytest.mark.per_loop


# --- hooks (loaded by the child as tests.e2e.test_hook_isolation:NAME) ----------


class Quitter:
    """Raises what a chunk names: ``exit``, ``interrupt`` or ``cancel``."""

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
        if b"exit" in data:
            raise SystemExit(3)
        if b"interrupt" in data:
            raise KeyboardInterrupt
        if b"cancel" in data:
            raise asyncio.CancelledError
        return data


class QuitOnConnect:
    def on_connect(self, ctx: HookContext) -> None:
        raise SystemExit(4)


class QuitOnClose:
    def on_close(self, ctx: HookContext, reason: str) -> None:
        raise KeyboardInterrupt


class AsyncQuitOnClose:
    async def on_close(self, ctx: HookContext, reason: str) -> None:
        raise SystemExit(5)


class Sleepy:
    """A sync hook that blocks, declared so: it runs in midway's thread pool."""

    blocking = True

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
        if direction == "upstream":
            time.sleep(2.0)
            ctx.send_to_client(b"<")  # an action from the pool thread
        return data


class Dozy:
    """A sync hook that blocks and does not say so (0.3 s per message)."""

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
        if direction == "upstream":
            time.sleep(0.3)
        return data


class Injector:
    """On the first upstream chunk, injects 64 MiB towards the client."""

    SIZE = 64 << 20

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
        if direction == "upstream" and data == b"go":
            ctx.send_to_client(b"\xab" * Injector.SIZE)
            return b""
        return data


class Forever:
    """An ``on_connect`` that never returns."""

    async def on_connect(self, ctx: HookContext) -> None:
        await asyncio.Event().wait()


# --- helpers ------------------------------------------------------------------


@contextlib.contextmanager
def two_proxies(tmp_path: Path, upstream_port: int, a_options: str) -> Iterator[
        tuple[ProxyProcess, int, int]]:
    """A midway child with proxies ``a`` (``a_options``: TOML lines) and ``b``
    (plain), both to ``upstream_port``; yields (process, port a, port b)."""
    port_a, port_b = free_port(), free_port()
    config = tmp_path / "midway.toml"
    config.write_text(f"""
[proxy.a]
listen = "127.0.0.1:{port_a}"
upstreams = "127.0.0.1:{upstream_port}"
{a_options}

[proxy.b]
listen = "127.0.0.1:{port_b}"
upstreams = "127.0.0.1:{upstream_port}"
""")
    with proxy_process("--config", str(config)) as proc:
        assert wait_until(lambda: f"listening on 127.0.0.1:{port_b}" in proc.stderr_text(),
                          timeout=10), proc.stderr_text()
        yield proc, port_a, port_b


def with_echo(main: Callable[[int], Awaitable[None]], timeout: float = 60) -> None:
    """Run ``main(port)`` with an echo server on ``port``."""
    async def with_upstream() -> None:
        async with serve() as port:
            await main(port)

    run(with_upstream(), timeout)


async def open_nodelay(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def round_trip_s(port: int, payload: bytes = b"ping") -> float:
    """Seconds to open a connection, send ``payload`` and get it echoed back."""
    started = time.monotonic()
    reader, writer = await open_nodelay(port)
    try:
        writer.write(payload)
        assert await read_exactly(reader, len(payload)) == payload
    finally:
        writer.close()
    return time.monotonic() - started


async def ended(reader: asyncio.StreamReader, timeout: float = 5.0) -> str:
    """Wait for the proxy to end this connection: ``reset`` or ``eof``."""
    try:
        rest = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return "reset"
    assert rest == b"", rest
    return "eof"


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " midway ERROR " in line]


# --- 1. SystemExit, KeyboardInterrupt, CancelledError ---------------------------


@pytest.mark.parametrize("trigger, what, source", [
    (b"exit", "SystemExit", "raise SystemExit(3)"),
    (b"interrupt", "KeyboardInterrupt", "raise KeyboardInterrupt"),
    (b"cancel", "CancelledError", "raise asyncio.CancelledError"),
])
def test_a_hook_raising_a_base_exception_resets_its_connection_only(
        tmp_path: Path, trigger: bytes, what: str, source: str) -> None:
    async def main(port: int) -> None:
        with two_proxies(tmp_path, port, f'hooks = ["{HOOKS}:Quitter"]') as (proc, a, b):
            r2, w2 = await open_nodelay(a)
            w2.write(b"before")
            assert await read_exactly(r2, 6) == b"before"
            r1, w1 = await open_nodelay(a)
            w1.write(trigger)
            assert await ended(r1) == "reset"
            w1.close()
            w2.write(b"after")  # the other connection through the same hook goes on
            assert await read_exactly(r2, 5) == b"after"
            w2.close()
            assert await round_trip_s(a) < 5 and await round_trip_s(b) < 5
            assert proc.proc.poll() is None, proc.stderr_text()
            # The log line may reach the pipe's reader a moment after the reset.
            deadline = time.monotonic() + 5
            while not error_lines(proc.stderr_text()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            text = proc.stderr_text()
            errors = error_lines(text)
            assert len(errors) == 1, text
            assert f"hook {HOOKS}:Quitter raised in on_data: {what}" in text, text
            # One log entry, whose traceback shows the hook's own line.
            assert source in text, text

    with_echo(main)


@pytest.mark.parametrize("hook, callback, what", [
    ("QuitOnConnect", "on_connect", "SystemExit"),
    ("QuitOnClose", "on_close", "KeyboardInterrupt"),
    ("AsyncQuitOnClose", "on_close", "SystemExit"),
])
def test_on_connect_and_on_close_raising_a_base_exception_do_not_end_the_process(
        tmp_path: Path, hook: str, callback: str, what: str) -> None:
    async def main(port: int) -> None:
        with two_proxies(tmp_path, port, f'hooks = ["{HOOKS}:{hook}"]') as (proc, a, b):
            for _ in range(2):
                reader, writer = await open_nodelay(a)
                if callback == "on_close":
                    writer.write(b"x")
                    assert await read_exactly(reader, 1) == b"x"
                    writer.write_eof()
                await ended(reader)
                writer.close()
            assert await round_trip_s(b) < 5
            assert wait_until(lambda: len(error_lines(proc.stderr_text())) >= 2, timeout=5)
            time.sleep(0.2)
            assert proc.proc.poll() is None, proc.stderr_text()
            text = proc.stderr_text()
            assert len(error_lines(text)) == 2, text
            assert f"{HOOKS}:{hook}" in error_lines(text)[0], text
            assert what in text, text

    with_echo(main)


# --- 2. a sync hook that blocks costs only its own connection ---------------------


def test_a_blocking_hook_costs_only_its_own_connection(tmp_path: Path) -> None:
    async def main(port: int) -> None:
        with two_proxies(tmp_path, port, f'hooks = ["{HOOKS}:Sleepy"]') as (proc, a, b):
            assert await round_trip_s(b) < 5  # warm
            slow_reader, slow_writer = await open_nodelay(a)
            slow_writer.write(b"slow")
            await asyncio.sleep(0.1)  # the hook is now sleeping in its 2 s
            started = time.monotonic()
            fast = [await round_trip_s(b) for _ in range(3)]
            assert max(fast) < 0.5, fast
            # The slow connection still gets its bytes, in order, with what the
            # hook injected from its thread first.
            assert await read_exactly(slow_reader, 5, timeout=10) == b"<slow"
            assert time.monotonic() - started > 1.5
            slow_writer.close()
            assert "ERROR" not in proc.stderr_text()

    with_echo(main)


def test_a_sync_hook_that_holds_the_loop_is_named_in_one_warning(tmp_path: Path) -> None:
    async def main(port: int) -> None:
        with two_proxies(tmp_path, port, f'hooks = ["{HOOKS}:Dozy"]') as (proc, a, b):
            for _ in range(3):
                assert await round_trip_s(a) < 5
            text = proc.stderr_text()
            warnings = [line for line in text.splitlines()
                        if " WARNING " in line and f"{HOOKS}:Dozy" in line]
            assert len(warnings) == 1, text  # rate-limited: three slow calls, one line
            assert "blocking = True" in warnings[0]
            assert re.search(r"held the event loop for 0\.\d+ s", warnings[0]), warnings[0]

    with_echo(main)


# --- 3. an on_connect that never returns ---------------------------------------


def test_an_on_connect_that_never_returns_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks_module, "HOOK_CALLBACK_TIMEOUT_S", 0.5)
    closes = Closes()

    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:Forever"],
                observers=[closes]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            started = time.monotonic()
            await ended(reader, timeout=5)
            assert 0.4 < time.monotonic() - started < 3
            writer.close()
            assert await asyncio.to_thread(wait_until, lambda: len(closes.records) == 1)
            assert proxy.connections == 0

    with midway_log() as handler:
        run(main())
    record = closes.records[0]
    assert record.reason == "error"
    assert "on_connect" in record.detail and "0.5 s" in record.detail, record.detail
    messages = [r.getMessage() for r in handler.records if r.levelno >= logging.ERROR]
    assert len(messages) == 1 and f"{HOOKS}:Forever" in messages[0], messages
    # Said once: "...after 0.5 s; closing the connection); closing this connection" was twice.
    assert messages[0].endswith(f"a chain element failed on open (hook {HOOKS}:Forever: "
                                "on_connect still running after 0.5 s); closing this "
                                "connection"), messages[0]


def test_a_client_reset_during_on_connect_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    closes = Closes()
    upstream_ends: list[float] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        upstream_ends.append(time.monotonic())
        writer.close()

    async def main() -> None:
        async with serve(upstream) as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", hooks=[f"{HOOKS}:Forever"],
                observers=[closes]) as proxy:
            sock = socket.create_connection(proxy.address)
            await asyncio.sleep(0.2)  # on_connect is waiting
            assert proxy.connections == 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            started = time.monotonic()
            sock.close()  # RST
            assert await asyncio.to_thread(wait_until, lambda: len(closes.records) == 1, 3)
            assert time.monotonic() - started < 2
            assert await asyncio.to_thread(wait_until, lambda: bool(upstream_ends), 3)
            assert proxy.connections == 0

    run(main())
    assert closes.records[0].reason == "reset", closes.records[0]


# --- 4. an element that cuts a chunk into many pieces yields between them -----------


def test_slicing_a_chunk_into_bytes_does_not_hold_other_proxies(tmp_path: Path) -> None:
    slicer = """
[[proxy.a.toxics]]
type = "slicer"
stream = "upstream"
attributes = { average_size = 1 }
"""
    blob = bytes(range(256)) * 1024  # 256 KiB: four 64 KiB reads

    async def main(port: int) -> None:
        with two_proxies(tmp_path, port, slicer) as (proc, a, b):
            assert await round_trip_s(b) < 5  # warm
            reader, writer = await open_nodelay(a)
            got = bytearray()

            async def receive() -> None:
                while len(got) < len(blob):
                    data = await reader.read(65536)
                    assert data
                    got.extend(data)

            receiving = asyncio.create_task(receive())
            writer.write(blob)
            times = []
            while not receiving.done() and len(times) < 200:
                times.append(await round_trip_s(b))
            await asyncio.wait_for(receiving, 60)
            writer.close()
            assert bytes(got) == blob
            assert len(times) >= 2, "the slicer finished before it could be measured"
            assert max(times) < 0.25, sorted(times)[-5:]

    with_echo(main, timeout=120)


# --- 5. a hook's injection is not copied on its way to the socket -------------------


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_injecting_64_mib_costs_about_64_mib(tmp_path: Path) -> None:
    async def main(port: int) -> None:
        with two_proxies(tmp_path, port, f'hooks = ["{HOOKS}:Injector"]') as (proc, a, b):
            assert await round_trip_s(a) < 5  # warm: the chain path has run once
            before = vm_hwm_kib(proc.pid)
            reader, writer = await open_nodelay(a)
            writer.write(b"go")
            total = 0
            while total < Injector.SIZE:
                data = await asyncio.wait_for(reader.read(1 << 20), 30)
                assert data
                total += len(data)
            writer.close()
            growth_mib = (vm_hwm_kib(proc.pid) - before) / 1024
            assert growth_mib < 1.5 * (Injector.SIZE >> 20), growth_mib

    with_echo(main, timeout=120)
