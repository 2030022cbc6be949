"""Active checks: one check against real loopback servers, and the check loop's
timing on a fake clock."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from midway.config.addresses import Address
from midway.core.clock import FakeClock
from midway.errors import UpstreamError
from midway.upstream import checker, dial
from midway.upstream.checker import check_once, run_checks
from midway.upstream.dial import DialFailure
from midway.upstream.health import CheckSchedule, HealthChange, HealthMachine, HealthSettings

from ..helpers import black_hole

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[Address]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield Address("127.0.0.1", srv.sockets[0].getsockname()[1])
    finally:
        srv.close()
        await srv.wait_closed()


async def redis_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    writer.write(b"+PONG\r\n" if line == b"PING\r\n" else b"-ERR unknown command\r\n")
    await writer.drain()
    writer.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # accepts, never answers
    writer.close()


PING = HealthSettings(interval_s=1.0, timeout_s=2.0, send=b"PING\r\n", expect=b"+PONG")


def run(coro: Awaitable[str | None]) -> str | None:
    async def main() -> str | None:
        return await asyncio.wait_for(coro, 10)
    return asyncio.run(main())


def test_send_expect_passes_against_a_real_server() -> None:
    async def go() -> str | None:
        async with server(redis_like) as addr:
            return await check_once(addr, PING)
    assert run(go()) is None


def test_a_wrong_reply_fails_naming_it() -> None:
    async def go() -> str | None:
        async with server(redis_like) as addr:
            return await check_once(addr, HealthSettings(send=b"HELLO\r\n", expect=b"+PONG"))
    assert run(go()) == "closed before sending b'+PONG' (reply b'-ERR unknown command\\r\\n')"


def test_a_server_that_never_answers_fails_at_the_timeout() -> None:
    async def go() -> str | None:
        async with server(silent) as addr:
            return await check_once(addr, HealthSettings(send=b"PING\r\n", expect=b"+PONG",
                                                         timeout_s=0.2))
    assert run(go()) == "no b'+PONG' in the reply within the timeout (no reply)"


def test_connect_only_check_and_a_refused_port() -> None:
    async def go() -> tuple[str | None, str | None]:
        async with server(silent) as addr:
            ok = await check_once(addr, HealthSettings())
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        return ok, await check_once(Address("127.0.0.1", port), HealthSettings())
    assert asyncio.run(go()) == (None, "connection refused")


def test_check_loop_timing_and_state_on_a_fake_clock() -> None:
    async def go() -> tuple[list[float], list[str]]:
        clock = FakeClock()
        changes: list[HealthChange] = []
        settings = HealthSettings(interval_s=2.0, rise=2, fall=3)
        health = HealthMachine(settings, "upstream 10.0.0.6:6379 of proxy redis", clock.now,
                               changes.append)
        at: list[float] = []
        results = iter([None, "connection refused", "connection refused", "connection refused",
                        None, None])

        async def fake_check(address: Address, s: HealthSettings) -> str | None:
            at.append(clock.now())
            return next(results)

        schedule = CheckSchedule(2.0, random.Random(3), spread=0.0)
        first = CheckSchedule(2.0, random.Random(3)).first_delay()
        task = asyncio.create_task(run_checks(Address("10.0.0.6", 6379), health, schedule,
                                              clock, fake_check))
        await clock.advance(first + 10.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert at == [first + 2.0 * i for i in range(6)]
        return at, [c.text for c in changes]
    _, texts = asyncio.run(go())
    assert texts == [
        "upstream 10.0.0.6:6379 of proxy redis is down: connection refused (3 checks)",
        "upstream 10.0.0.6:6379 of proxy redis is up: check passed (2 checks)",
    ]


def test_a_hung_upstream_is_down_after_fall_intervals_and_fall_timeouts() -> None:
    """An upstream that accepts but never answers (SIGSTOPped): each check lasts
    timeout_s and the next starts interval_s after it ended, so it is marked down
    fall x (interval_s + timeout_s) after its last pass, as docs/balancing.md says
    (measured with redis-server under SIGSTOP: 6 s for 1 s, 1 s and fall 3, as HAProxy)."""
    async def go() -> tuple[float, list[str]]:
        clock = FakeClock()
        changes: list[HealthChange] = []
        settings = HealthSettings(interval_s=1.0, timeout_s=1.0, rise=2, fall=3)
        calls = 0
        down_at: list[float] = []

        async def hangs_after_one_pass(address: Address, s: HealthSettings) -> str | None:
            nonlocal calls
            calls += 1
            if calls == 1:
                return None
            await clock.sleep(s.timeout_s)
            return "no reply within the timeout"

        def record(change: HealthChange) -> None:
            changes.append(change)
            down_at.append(clock.now())
        health = HealthMachine(settings, "upstream 10.0.0.6:6379 of proxy redis", clock.now,
                               record)
        schedule = CheckSchedule(1.0, random.Random(3), spread=0.0)
        task = asyncio.create_task(run_checks(Address("10.0.0.6", 6379), health, schedule,
                                              clock, hangs_after_one_pass))
        await clock.advance(20.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        first = CheckSchedule(1.0, random.Random(3)).first_delay()
        return down_at[0] - first, [c.text for c in changes]
    after_pass, texts = asyncio.run(go())
    assert after_pass == pytest.approx(3 * (1.0 + 1.0))
    assert texts == ["upstream 10.0.0.6:6379 of proxy redis is down: "
                     "no reply within the timeout (3 checks)"]


def test_a_check_midway_could_not_make_for_want_of_descriptors_says_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check's socket could not be opened (EMFILE): that is midway's
    shortage, so the upstream stays up (three such checks would otherwise take
    it down, and clients with it)."""
    async def no_descriptor(address: Address, timeout_s: float) -> socket.socket:
        error = UpstreamError(f"{address}: too many open files (process limit)")
        error.failure = DialFailure.OUT_OF_DESCRIPTORS  # type: ignore[attr-defined]
        raise error

    monkeypatch.setattr(checker, "dial", no_descriptor)

    async def go() -> tuple[bool, list[str]]:
        clock = FakeClock()
        changes: list[HealthChange] = []
        health = HealthMachine(HealthSettings(interval_s=1.0, rise=2, fall=3),
                               "upstream 10.0.0.6:6379 of proxy redis", clock.now, changes.append)
        task = asyncio.create_task(run_checks(Address("10.0.0.6", 6379), health,
                                              CheckSchedule(1.0, random.Random(3), spread=0.0),
                                              clock))
        await clock.advance(10.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return health.up, [c.text for c in changes]

    up, texts = asyncio.run(go())
    assert up and texts == []


def test_a_name_whose_first_address_never_answers_passes_through_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As for a client's connection, each address of a name gets its share of the
    check's timeout: a black-holed first address does not fail the check."""
    monkeypatch.setattr(dial, "ADDRESS_MIN_S", 0.1)  # shares of 0.25 s, not 2 s

    async def go() -> str | None:
        async with server(redis_like) as live:
            with black_hole() as holed:
                answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", holed),
                           (socket.AF_INET, socket.SOCK_STREAM, 6, "", (live.host, live.port))]
                monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
                return await check_once(Address("both.test", 6379),
                                        HealthSettings(interval_s=1.0, timeout_s=0.5,
                                                       send=b"PING\r\n", expect=b"+PONG"))
    assert run(go()) is None
