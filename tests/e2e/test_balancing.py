"""Issue 10 end to end: balancing, weights and backups, active and passive health,
retries past a hanging upstream, access rules and per-source limits, over loopback.

Clients bind source addresses across 127.0.0.0/8 to play many clients.  Upstreams
answer with their own name, so a client sees where it landed."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import midway
from midway.metrics import Metrics

from ..helpers import free_port, needs, proxy_process, run, wait_until
from .test_failover import _closed_port, _midway_log
from .test_relay import Records

REDIS = shutil.which("redis-server")
REDIS_BENCHMARK = shutil.which("redis-benchmark")


class Health:
    """An observer of ``upstream_health`` events, with their times."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, bool]] = []

    def upstream_health(self, proxy: str, upstream: str, up: bool) -> None:
        self.events.append((time.monotonic(), upstream, up))

    def connection_closed(self, record: midway.CloseRecord) -> None:
        pass

    def went_down(self, upstream: str) -> float | None:
        return next((t for t, u, up in self.events if u == upstream and not up), None)


@contextlib.asynccontextmanager
async def named(name: bytes) -> AsyncIterator[tuple[str, asyncio.Server]]:
    """An upstream that greets each client with ``name`` and holds the connection
    until the client closes it; yields (address, server)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(name)
            await writer.drain()
            await reader.read()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=1024)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", server
    finally:
        server.close()


async def connect(proxy: midway.Proxy, source: str = "127.0.0.1"
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(proxy.host, proxy.port, local_addr=(source, 0))


async def landed(proxy: midway.Proxy, source: str = "127.0.0.1") -> bytes:
    """Which upstream one new connection from ``source`` reaches (b"" if closed)."""
    reader, writer = await connect(proxy, source)
    try:
        return await asyncio.wait_for(reader.read(1), 5)
    finally:
        writer.close()


async def until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def state(proxy: midway.Proxy, address: str) -> dict[str, Any]:
    return next(u for u in proxy.service.pool.snapshot() if u["address"] == address)


# -- balancing policies ----------------------------------------------------------


@pytest.mark.one_mode
def test_hash_source_keeps_each_source_on_one_upstream() -> None:
    # 20 sources: with 5, all landed on one of the 3 upstreams (whose ports, and
    # so whose hashes, are random) once in 81 runs.
    sources = [f"127.0.0.{i}" for i in range(10, 30)]

    async def main() -> dict[str, Counter[bytes]]:
        async with named(b"a") as (a, _), named(b"b") as (b, _), named(b"c") as (c, _):
            async with midway.Proxy("127.0.0.1:0", [a, b, c], balance="hash_source") as proxy:
                seen: dict[str, Counter[bytes]] = {s: Counter() for s in sources}
                for source in sources:
                    for _ in range(20):
                        seen[source][await landed(proxy, source)] += 1
                return seen

    seen = run(main())
    for source, where in seen.items():
        assert len(where) == 1 and sum(where.values()) == 20, (source, where)
    # And the sources do not all share one upstream (20 sources over 3 upstreams).
    assert len({next(iter(w)) for w in seen.values()}) > 1, seen


@pytest.mark.one_mode
def test_least_connections_sends_new_clients_to_the_idle_upstream() -> None:
    async def main() -> list[bytes]:
        async with named(b"a") as (a, _), named(b"b") as (b, _):
            # b drained (weight 0): the 50 long-lived connections all go to a.
            async with midway.Proxy("127.0.0.1:0", [a, f"{b},weight=0"],
                                    balance="least_connections") as proxy:
                held = [await connect(proxy) for _ in range(50)]
                assert [await r.read(1) for r, _ in held] == [b"a"] * 50
                # b back at weight 1 (a reconfigure keeps a's 50 active connections).
                proxy.runtime.update_proxy(midway.proxy_config(
                    "127.0.0.1:0", [a, b], name=proxy.config.name, balance="least_connections"))
                assert state(proxy, a)["active"] == 50
                # Twenty new clients, each held open: all go to the idle b.
                fresh = [await connect(proxy) for _ in range(20)]
                got = [await r.read(1) for r, _ in fresh]
                for _, w in held + fresh:
                    w.close()
                return got

    assert run(main()) == [b"b"] * 20


@pytest.mark.one_mode
def test_weights_share_and_backups_wait_for_the_primaries() -> None:
    async def main() -> tuple[Counter[bytes], list[bytes]]:
        async with named(b"a") as (a, sa), named(b"b") as (b, sb), named(b"c") as (c, _):
            async with midway.Proxy(
                    "127.0.0.1:0", [{"address": a, "weight": 3}, b, f"{c},backup"],
                    health={"interval_s": 0.2, "timeout_s": 0.5}) as proxy:
                shares = Counter([await landed(proxy) for _ in range(40)])
                # Both primaries stop: the checks take them down, then the backup serves.
                sa.close()
                sb.close()
                await until(lambda: state(proxy, a)["state"] == state(proxy, b)["state"]
                            == "down")
                after = [await landed(proxy) for _ in range(5)]
                return shares, after

    shares, after = run(main())
    # Smooth weighted round-robin is exact over every multiple of the weights' sum.
    assert shares == Counter({b"a": 30, b"b": 10})
    assert after == [b"c"] * 5


# -- health ------------------------------------------------------------------------


@pytest.mark.per_loop
def test_an_upstream_that_never_answers_the_check_is_marked_down() -> None:
    """It accepts TCP (the kernel does) but never replies to PING: down at the
    first check's timeout; then clients are closed at once with no_upstream,
    said once in the log; the admin list and midway_upstream_up show it."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)  # never read
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    interval, timeout = 0.3, 0.3

    async def main() -> tuple[float, float | None, list[str], list[midway.CloseRecord],
                              dict[str, Any], str]:
        health, records, metrics = Health(), Records(), Metrics()
        with _midway_log() as log:
            async with midway.Proxy("127.0.0.1:0", address, observers=[health, records, metrics],
                                    health={"interval_s": interval, "timeout_s": timeout,
                                            "send": "PING\r\n", "expect": "+PONG"}) as proxy:
                started = time.monotonic()
                await until(lambda: health.went_down(address) is not None, 5)
                for _ in range(5):
                    assert await landed(proxy) == b""
                await records.wait(5)
                return (started, health.went_down(address), log.lines, records.records,
                        state(proxy, address), metrics.render())

    try:
        started, down_at, lines, records, entry, metrics = run(main())
    finally:
        silent.close()
    assert down_at is not None and down_at - started <= interval + timeout + 1.0
    assert any(f"upstream {address} of proxy default is down: no b'+PONG' in the reply "
               "within the timeout (no reply) (1 check)" in line for line in lines), lines
    assert [r.reason for r in records] == ["no_upstream"] * 5
    assert all(r.attempts == 0 and r.upstream is None for r in records)
    assert sum("no upstream is up" in line for line in lines) == 1, lines
    assert entry["state"] == "down" and entry["last_check"]["passed"] is False
    assert abs(entry["last_check"]["at"] - time.time()) < 30  # wall-clock seconds
    assert f'midway_upstream_up{{proxy="default",upstream="{address}"}} 0' in metrics


class Hangable:
    """An upstream like a redis-server that can be SIGSTOPped: it greets each
    client with ``name``, answers ``PING`` lines with ``+PONG`` (the health
    check) and echoes every other line, until :attr:`hung`: then it answers
    nothing, though its sockets stay open."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.hung = False
        self.address = ""
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self.hung:
                writer.write(self.name)
            while line := await reader.readline():
                if not self.hung:
                    writer.write(b"+PONG\r\n" if line == b"PING\r\n" else line)
        except OSError:
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Hangable:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()


@pytest.mark.parametrize("on_marked_down", ["keep", "reset"])
def test_the_open_connections_of_a_hung_upstream_are_reset_once_it_is_marked_down(
        on_marked_down: str) -> None:
    """A client holds a connection to upstream a, which then hangs (as a
    SIGSTOPped redis-server does).  The checks mark it down.  With
    ``on_marked_down = "reset"`` the client's connection is reset at once
    (reason upstream_down) and its reconnect reaches b; with the default
    ``keep`` it stays open, and a answers on it again once it wakes up."""
    interval, timeout = 0.2, 0.2

    async def main() -> tuple[bytes, bool, bytes, list[midway.CloseRecord], list[str], int]:
        health, records = Health(), Records()
        async with Hangable(b"a") as a, Hangable(b"b") as b:
            with _midway_log() as log:
                async with midway.Proxy(
                        "127.0.0.1:0", [a.address, b.address], observers=[health, records],
                        health={"interval_s": interval, "timeout_s": timeout, "fall": 1,
                                "send": "PING\r\n", "expect": "+PONG",
                                "on_marked_down": on_marked_down}) as proxy:
                    before = 0  # connections that reached b, closed
                    while True:  # round robin: find a connection on a
                        reader, writer = await connect(proxy)
                        if await asyncio.wait_for(reader.read(1), 5) == b"a":
                            break
                        writer.close()
                        before += 1
                        assert before < 4, "round robin never chose a"
                    await records.wait(before, 5)
                    a.hung = True
                    await until(lambda: health.went_down(a.address) is not None, 5)
                    reset = False
                    try:
                        got = await asyncio.wait_for(reader.read(100), 2 * interval + 1)
                    except ConnectionResetError:
                        reset, got = True, b""
                    except TimeoutError:  # kept open: a answers once awake
                        a.hung = False
                        writer.write(b"still there?\n")
                        got = await asyncio.wait_for(reader.readline(), 5)
                    writer.close()
                    fresh = await landed(proxy)
                    await records.wait(before + 2, 5)
                    return (got, reset, fresh, records.records[before:], log.lines,
                            proxy.service.pool.upstreams[0].active)

    got, reset, fresh, records, lines, a_active = run(main())
    assert fresh == b"b"  # new clients go to the upstream that is up
    if on_marked_down == "reset":
        assert reset and got == b""
        assert records[0].reason == "upstream_down" and records[0].upstream is not None
        assert records[0].detail == "the upstream was marked down"
        assert any("is down: resetting its 1 open connection" in line for line in lines), lines
    else:
        assert not reset and got == b"still there?\n"
        assert records[0].reason != "upstream_down"
        assert not any("resetting its" in line for line in lines), lines
    assert a_active == 0  # counted out either way


SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
"""PostgreSQL's SSLRequest: length 8, code 80877103 (protocol docs, 55.2.10)."""


@contextlib.asynccontextmanager
async def postgres_like(answer: bytes) -> AsyncIterator[str]:
    """A server that answers an SSLRequest as PostgreSQL does, with one byte
    (``S``: TLS on, ``N``: off), then waits (a real one would start TLS or read
    the startup message); anything else is refused as PostgreSQL refuses it."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readexactly(len(SSL_REQUEST))
            writer.write(answer if request == SSL_REQUEST else b"E invalid length")
            await writer.drain()
            if request == SSL_REQUEST:
                await reader.read()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@pytest.mark.per_loop
def test_a_binary_check_sends_the_sslrequest_and_downs_the_upstream_with_the_wrong_byte() -> None:
    """``send_hex``/``expect_hex``: the check writes PostgreSQL's 8-byte
    SSLRequest and expects ``N``; the upstream that answers ``S`` is marked
    down, its log line quoting the byte, and clients all reach the other."""
    async def main() -> tuple[list[str], list[bytes], str, str, str, str]:
        health = Health()
        async with postgres_like(b"N") as plain, postgres_like(b"S") as tls:
            with _midway_log() as log:
                async with midway.Proxy(
                        "127.0.0.1:0", [plain, tls], observers=[health],
                        health={"interval_s": 0.2, "timeout_s": 0.3,
                                "send_hex": "00 00 00 08 04 D2 16 2f", "expect_hex": "4e"},
                ) as proxy:
                    await until(lambda: health.went_down(tls) is not None, 5)
                    await asyncio.sleep(0.5)  # a few more checks of both
                    replies = []
                    for _ in range(4):
                        reader, writer = await connect(proxy)
                        writer.write(SSL_REQUEST)
                        replies.append(await asyncio.wait_for(reader.read(1), 5))
                        writer.close()
                    return (log.lines, replies, state(proxy, plain)["state"],
                            state(proxy, tls)["state"], plain, tls)

    lines, replies, plain_state, tls_state, plain, tls = run(main())
    assert (plain_state, tls_state) == ("up", "down")
    assert any(f"upstream {tls} of proxy default is down: no b'N' in the reply within the "
               "timeout (reply b'S') (1 check)" in line for line in lines), lines
    assert not any(plain in line and "is down" in line for line in lines), lines
    assert replies == [b"N"] * 4


# Debian keeps the server's programs off PATH, in /usr/lib/postgresql/VERSION/bin.
_PG_PATH = os.pathsep.join([os.environ.get("PATH", ""),
                            *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)])
POSTGRES, INITDB, PG_CTL = (shutil.which(n, path=_PG_PATH) for n in ("postgres", "initdb", "pg_ctl"))


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str, Path]]:
    """A throwaway PostgreSQL on loopback (ssl off), run as the ``postgres`` user
    when the tests run as root (it refuses root), in a directory of its own under
    /tmp (pytest's are root's alone); yields (address, its log)."""
    assert INITDB is not None and PG_CTL is not None
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    with tempfile.TemporaryDirectory(prefix="midway-pg-") as name:
        home = Path(name)
        if as_user:
            shutil.chown(home, "postgres")
        port = free_port()  # PostgreSQL cannot listen on port 0
        data, log = home / "data", home / "log"
        subprocess.run([*as_user, INITDB, "-D", str(data), "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True, timeout=120, cwd=home)
        subprocess.run([*as_user, PG_CTL, "-D", str(data), "-l", str(log), "-w", "-t", "60",
                        "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c ssl=off",
                        "start"], check=True, capture_output=True, timeout=90, cwd=home)
        try:
            yield f"127.0.0.1:{port}", log
        finally:
            subprocess.run([*as_user, PG_CTL, "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60, cwd=home)


@pytest.mark.one_mode
@pytest.mark.timeout(180)
@pytest.mark.skipif(not (POSTGRES and INITDB and PG_CTL) or (
                        os.geteuid() == 0 and not shutil.which("runuser")),
                    reason=needs("PostgreSQL's postgres, initdb and pg_ctl", apt="postgresql"))
def test_a_real_postgresql_answers_the_sslrequest_check() -> None:
    """The SSLRequest check against PostgreSQL itself: ``N`` (ssl off) passes,
    so expecting ``S`` fails quoting the ``N``; the server logs no complaint
    about the checks' connections."""
    async def main(address: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        health = Health()
        request = {"interval_s": 0.2, "timeout_s": 1, "send_hex": "00 00 00 08 04 d2 16 2f"}
        with _midway_log() as log:
            async with midway.Proxy("127.0.0.1:0", address, name="plain", observers=[health],
                                    health={**request, "expect_hex": "4e"}) as plain, \
                    midway.Proxy("127.0.0.1:0", address, name="tls", observers=[health],
                                 health={**request, "expect_hex": "53"}) as tls:
                await until(lambda: health.went_down(address) is not None, 10)
                await until(lambda: (state(plain, address)["last_check"] or {}).get("passed")
                            is True, 10)
                await asyncio.sleep(1)  # a few more checks
                return state(plain, address), state(tls, address), log.lines

    with postgres_server() as (address, pg_log):
        plain, tls, lines = run(main(address), timeout=120)
        server_log = pg_log.read_text()
    assert plain["state"] == "up" and tls["state"] == "down"
    assert any(f"upstream {address} of proxy tls is down: " in line and "(reply b'N')" in line
               for line in lines), lines
    assert not any("proxy plain is down" in line for line in lines), lines
    assert "startup packet" not in server_log and "FATAL" not in server_log, server_log


@contextlib.contextmanager
def full_listen_queue() -> Iterator[str]:
    """A listener with backlog 0 that never accepts, its queue filled: a connect
    to it hangs (the kernel drops the SYN).  Yields its address."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            s = socket.socket()
            s.setblocking(False)
            fillers.append(s)
            s.connect_ex(listener.getsockname())
            time.sleep(0.05)
            try:
                s.getpeername()
            except OSError:  # not connected: the queue is full
                break
        else:
            pytest.fail("could not fill the listen queue")
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        for s in fillers:
            s.close()
        listener.close()


@pytest.mark.per_loop
def test_a_hanging_upstream_costs_a_client_at_most_the_connect_timeout() -> None:
    connect_timeout = 0.5

    async def main(hanging: str) -> tuple[list[tuple[bytes, float]], list[midway.CloseRecord]]:
        records = Records()
        async with named(b"b") as (b, _):
            async with midway.Proxy("127.0.0.1:0", [hanging, b], observers=[records],
                                    connect_timeout_s=connect_timeout) as proxy:
                timed = []
                for _ in range(4):
                    t0 = time.monotonic()
                    got = await landed(proxy)
                    timed.append((got, time.monotonic() - t0))
                await records.wait(4)
                return timed, records.records

    with full_listen_queue() as hanging:
        timed, records = run(main(hanging))
    assert [got for got, _ in timed] == [b"b"] * 4  # the client never saw the failure
    assert all(took <= connect_timeout + 0.5 for _, took in timed), timed
    failed = [r for r in records if r.failures]
    assert failed, "the hanging upstream was never tried"
    for r in failed:
        assert [f["failure"] for f in r.failures] == ["timed_out"] and r.attempts == 2
        assert r.upstream is not None and r.upstream != hanging


# -- access control ------------------------------------------------------------------


@pytest.mark.one_mode
def test_allow_deny_and_the_per_source_limit_from_different_sources() -> None:
    async def main() -> tuple[dict[str, bytes], list[bytes], bytes, list[midway.CloseRecord],
                              int]:
        records = Records()
        reached = [0]

        async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            reached[0] += 1
            writer.write(b"u")
            with contextlib.suppress(OSError):
                await writer.drain()
                await reader.read()
            writer.close()

        server = await asyncio.start_server(counting, "127.0.0.1", 0)
        upstream = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            async with midway.Proxy("127.0.0.1:0", upstream, observers=[records],
                                    allow=["127.0.0.0/24"], deny=["127.0.0.66"],
                                    max_connections_per_source=2) as proxy:
                one = {src: await landed(proxy, src)
                       for src in ("127.0.0.5", "127.0.0.66", "127.0.1.5")}
                held = [await connect(proxy, "127.0.0.7") for _ in range(2)]
                assert [await r.read(1) for r, _ in held] == [b"u", b"u"]
                third = [await landed(proxy, "127.0.0.7"), await landed(proxy, "127.0.0.8")]
                held[0][1].close()
                await until(lambda: proxy.service.sources.live("127.0.0.7") == 1)
                again = await landed(proxy, "127.0.0.7")
                held[1][1].close()
                await records.wait(8)
                return one, third, again, records.records, reached[0]
        finally:
            server.close()

    one, third, again, records, reached = run(main())
    assert one == {"127.0.0.5": b"u", "127.0.0.66": b"", "127.0.1.5": b""}
    assert third == [b"", b"u"] and again == b"u"
    by_reason = Counter(r.reason for r in records)
    assert by_reason["denied"] == 2 and by_reason["source_limit"] == 1
    for r in records:
        if r.reason in ("denied", "source_limit"):
            assert r.upstream is None and r.attempts == 0  # nothing was dialled
    assert reached == 5  # the upstream saw only the admitted clients


# -- three redis servers, one killed under redis-benchmark -----------------------------


@contextlib.contextmanager
def redis_servers(n: int) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    servers = []
    try:
        for _ in range(n):
            port = _closed_port()
            proc = subprocess.Popen(
                [str(REDIS), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append((f"127.0.0.1:{port}", proc))
        for address, _ in servers:
            host, port = address.rsplit(":", 1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        yield servers
    finally:
        for _, proc in servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.mark.per_loop
@pytest.mark.skipif(not REDIS or not REDIS_BENCHMARK,
                    reason=needs("redis-server and redis-benchmark",
                                 apt="redis-server redis-tools"))
def test_a_redis_killed_under_benchmark_fails_no_request() -> None:
    """redis-benchmark with a new connection per request (-k 0) through midway to
    three redis servers checked with PING/+PONG; one is killed (SIGKILL) in the
    middle.  redis-benchmark stops at the first failed request ("Error:
    Connection reset by peer", exit 1), so its clean finish shows that none
    failed.

    What midway promises, and so what the test makes exact: a *new* connection
    never fails because an upstream died (its dial fails over, the client sees
    nothing).  A connection already relayed to the server that dies is lost with
    it (midway does not replay requests), so the kill is made when no connection
    is open or being dialled to that server: from the proxy's own loop, where
    nothing else runs between the look and the kill, and waiting for the process
    to be gone, so that no connect reaches its dying listener."""
    interval, fall, requests = 0.3, 2, 6000

    async def main(servers: list[tuple[str, subprocess.Popen[bytes]]]
                   ) -> tuple[int, bytes, float, float | None, list[midway.CloseRecord]]:
        health, records = Health(), Records()
        victim, victim_proc = servers[1]
        async with midway.Proxy("127.0.0.1:0", [a for a, _ in servers],
                                observers=[health, records],
                                health={"interval_s": interval, "fall": fall,
                                        "send": "PING\r\n", "expect": "+PONG"}) as proxy:
            bench = await asyncio.create_subprocess_exec(
                str(REDIS_BENCHMARK), "-h", proxy.host, "-p", str(proxy.port), "-k", "0",
                "-c", "2", "-n", str(requests), "-t", "ping_inline", "-q",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            target = next(u for u in proxy.service.pool.upstreams if str(u.address) == victim)
            await until(lambda: len(records.records) >= requests // 10, 30)

            def idle() -> bool:
                return target.active == 0 and not any(
                    c.target is target for c in proxy.service._connecting)

            async with asyncio.timeout(10):
                while not idle():  # looked at on every loop turn: idle moments are short
                    await asyncio.sleep(0)
            victim_proc.kill()  # the loop does nothing else until it is gone
            victim_proc.wait(5)
            killed_at = time.monotonic()
            done_at_kill = len(records.records)
            out, _ = await asyncio.wait_for(bench.communicate(), 60)
            assert bench.returncode is not None
            await until(lambda: proxy.service.active == 0)  # its last closes, not shutdown
            assert done_at_kill < requests * 3 // 4, "killed too late to be in the middle"
            return bench.returncode, out, killed_at, health.went_down(victim), records.records

    with redis_servers(3) as servers:
        rc, out, killed_at, down_at, records = run(main(servers), timeout=90)
    assert rc == 0, out.decode(errors="replace")
    assert re.search(rb"PING_INLINE: [\d.]+ requests per second", out), out
    assert down_at is not None and down_at - killed_at <= fall * interval + 1.0
    assert all(r.reason == "eof" for r in records), Counter(r.reason for r in records)
    # Failover happened, invisibly: some connections tried the dead server first.
    assert any(r.failures for r in records)
    assert len(records) >= requests


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(REDIS), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _api_upstreams(admin: int) -> dict[str, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    try:
        conn.request("GET", "/proxies/default", headers={"User-Agent": "midway-tests"})
        shown = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return {u["address"]: u for u in shown["upstreams"]}


def _benchmark(port: int, requests: int, clients: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REDIS_BENCHMARK), "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
         "-n", str(requests), "-c", str(clients), "-q"],
        capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.one_mode
@pytest.mark.timeout(120)
@pytest.mark.skipif(not REDIS or not REDIS_BENCHMARK,
                    reason=needs("redis-server and redis-benchmark",
                                 apt="redis-server redis-tools"))
def test_a_killed_redis_is_marked_down_skipped_and_back_once_restarted() -> None:
    """A user's run: ``midway`` (the quick form, PING/+PONG checks, the admin
    API) before three redis servers, ``redis-benchmark -t set,get -c 50`` with
    keep-alive connections, one server SIGKILLed in the middle.  The benchmark's
    connections on that server are lost with it (redis-benchmark stops: "Server
    closed the connection"; midway does not replay requests); the server is
    marked down within fall x interval + 1 s; the next benchmark, started at
    once, fails no request and sends that server no connection; restarted on its
    port, it is marked up within rise x interval + 1 s and gets clients again."""
    interval, fall, rise = 0.3, 2, 2
    with redis_servers(3) as servers, proxy_process(
            "127.0.0.1:0", *[a for a, _ in servers], "--admin", "127.0.0.1:0",
            "--health-interval-s", str(interval), "--health-fall", str(fall),
            "--health-rise", str(rise), "--health-send", r"PING\r\n",
            "--health-expect", "+PONG") as proxy:
        assert wait_until(lambda: any("admin API" in line for line in proxy.stderr_lines), 10)
        admin = int(next(line for line in proxy.stderr_lines
                         if "admin API" in line).rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
        conn.request("GET", "/proxies/default", headers={"User-Agent": "midway-tests"})
        port = int(json.loads(conn.getresponse().read())["listen"].rsplit(":", 1)[1])
        conn.close()
        victim, victim_proc = servers[1]
        victim_port = int(victim.rsplit(":", 1)[1])
        during = subprocess.Popen(
            [str(REDIS_BENCHMARK), "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
             "-n", "400000", "-c", "50", "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert wait_until(lambda: _api_upstreams(admin)[victim]["active"] > 0, 10)
            time.sleep(0.5)
            victim_proc.kill()
            victim_proc.wait(5)
            killed_at = time.monotonic()
            assert wait_until(lambda: _api_upstreams(admin)[victim]["state"] == "down",
                              fall * interval + 1.0), _api_upstreams(admin)[victim]
            assert time.monotonic() - killed_at <= fall * interval + 1.0
            out, _ = during.communicate(timeout=60)
        finally:
            if during.poll() is None:
                during.kill()
                during.wait(10)
        # Only what the dead server held was lost, and said so.
        assert during.returncode == 0 or re.search(
            r"Server closed the connection|Connection reset by peer", out), out
        before = _api_upstreams(admin)[victim]["connects"]
        after_kill = _benchmark(port, 20000, 50)
        assert after_kill.returncode == 0, after_kill.stdout + after_kill.stderr
        assert re.search(r"GET: [\d.]+ requests per second", after_kill.stdout)
        assert _api_upstreams(admin)[victim]["connects"] == before
        assert _api_upstreams(admin)[victim]["active"] == 0
        # Back on its port: checks bring it up, and it is used again.
        servers[1] = (victim, _start_redis(victim_port))
        back_from = time.monotonic()
        assert wait_until(lambda: _api_upstreams(admin)[victim]["state"] == "up",
                          rise * interval + 3.0), _api_upstreams(admin)[victim]
        assert time.monotonic() - back_from <= rise * interval + 3.0  # its start-up too
        again = _benchmark(port, 3000, 10)
        assert again.returncode == 0, again.stdout + again.stderr
        assert _api_upstreams(admin)[victim]["connects"] > before
        assert "Traceback" not in proxy.stderr_text()


# -- the command line's quick form ---------------------------------------------------


@pytest.mark.one_mode
def test_the_quick_form_takes_weights_backups_and_health_flags() -> None:
    from midway.cli import build_parser, config_from_args

    args = build_parser().parse_args([
        ":6380", "10.0.0.5:6379", "10.0.0.6:6379,weight=3", "10.0.0.7:6379,backup",
        "--balance", "hash_source", "--health-interval-s", "2", "--health-send", r"PING\r\n",
        "--health-expect", "+PONG", "--deny", "192.0.2.0/24", "--retries", "all"])
    proxy = config_from_args(args).proxies[0]
    assert [(str(u.address), u.weight, u.backup) for u in proxy.upstreams] == [
        ("10.0.0.5:6379", 1, False), ("10.0.0.6:6379", 3, False), ("10.0.0.7:6379", 1, True)]
    assert proxy.health.send == "PING\r\n" and proxy.health.interval_s == 2
    assert proxy.balance == "hash_source" and proxy.deny == ("192.0.2.0/24",)


@pytest.mark.one_mode
def test_the_start_up_line_shows_weights_and_backups() -> None:
    with proxy_process("127.0.0.1:0", "127.0.0.1:6379", "127.0.0.1:6380,weight=3",
                       "127.0.0.1:6381,backup", "--log-level", "info") as proc:
        assert wait_until(lambda: "forwarding to" in proc.stderr_text(), 10)
        line = next(line for line in proc.stderr_text().splitlines() if "forwarding to" in line)
    assert line.endswith("forwarding to 127.0.0.1:6379, 127.0.0.1:6380,weight=3, "
                         "127.0.0.1:6381,backup"), line


@pytest.mark.one_mode
def test_checkers_follow_the_upstreams_and_stop_with_the_proxy() -> None:
    """One checker per upstream, started with the proxy; a reconfigure keeps the
    checker (and the state) of a kept address, starts one for a new address and
    cancels a removed one's; closing the listeners cancels them all."""
    async def main() -> None:
        async with named(b"a") as (a, _), named(b"b") as (b, _), named(b"c") as (c, _):
            health = {"interval_s": 0.1}
            async with midway.Proxy("127.0.0.1:0", [a, b], health=health) as proxy:
                service = proxy.service
                assert service.checkers == 2
                await until(lambda: all(u["last_check"] for u in service.pool.snapshot()))
                own = service.pool.proxy  # checkers are keyed by set (proxy or route) and address
                kept = service._checks[own, service.pool.upstreams[0].address][0]
                machine = service.pool.upstreams[0].health
                proxy.runtime.update_proxy(midway.proxy_config(
                    "127.0.0.1:0", [a, c], name=proxy.config.name, health=health))
                assert service.checkers == 2
                assert service._checks[own, service.pool.upstreams[0].address][0] is kept
                assert service.pool.upstreams[0].health is machine
                assert {str(addr) for _, addr in service._checks} == {a, c}
                await until(lambda: all(u["last_check"] for u in service.pool.snapshot()))
                tasks = [task for task, _, _ in service._checks.values()]
                service.close_listeners()
                assert service.checkers == 0
                await asyncio.sleep(0)
                assert all(t.cancelled() or t.done() for t in tasks)

    run(main())
