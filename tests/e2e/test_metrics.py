"""Metrics as an observer of a real proxy: after a known load over loopback the
totals are exact and agree with the access log's records."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator

import pytest

import midway
from midway.core.observer import CloseRecord, Observer
from midway.metrics import Metrics
from midway.metrics.registry import Sample

from ..helpers import free_port, read_to_eof, run, send_blob, serve
from ..metrics.support import value

UP_SIZES = [1, 100, 1000, 65537, 3 * 1024 * 1024 + 7]
"""What each of five clients sends; the upstream answers 2n + 7 bytes."""


def reply_size(n: int) -> int:
    return 2 * n + 7


class Records:
    """An observer keeping every close record (what the access log writes)."""

    def __init__(self) -> None:
        self.records: list[CloseRecord] = []

    def connection_closed(self, record: CloseRecord) -> None:
        self.records.append(record)


class Counted(Observer):
    """An observer that needs no close records (as the metrics): it is told
    ``connection_counted``, and no record is made while every observer is one."""

    counts_only = True

    def __init__(self) -> None:
        self.records: list[tuple[object, ...]] = []

    def connection_counted(self, *fields: object) -> None:
        self.records.append(fields)

    def connection_closed(self, record: CloseRecord) -> None:
        raise AssertionError("a close record was made for observers that need none")


async def answer_by_size(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to EOF, then send 2n + 7 bytes and close."""
    received = len(await read_to_eof(reader))
    writer.write(b"d" * reply_size(received))
    await writer.drain()
    writer.close()


async def client(host: str, port: int, size: int) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    await send_blob(writer, b"u" * size)
    got = len(await read_to_eof(reader))
    writer.close()
    return got


async def settled(records: Records | Counted, n: int, *proxies: midway.Proxy) -> None:
    async with asyncio.timeout(10):
        while len(records.records) < n or any(p.connections for p in proxies):
            await asyncio.sleep(0.01)


async def known_load(metrics: Metrics, records: Records | Counted) -> str:
    """Five clients through ``web``, one through ``dead``, whose upstream refuses
    (returned)."""
    refusing = f"127.0.0.1:{free_port()}"
    async with serve(answer_by_size) as port, \
            midway.Proxy(upstreams=f"127.0.0.1:{port}", name="web",
                         observers=[metrics, records]) as web, \
            midway.Proxy(upstreams=refusing, name="dead",
                         observers=[metrics, records]) as dead:
        got = await asyncio.gather(*(client(*web.address, n) for n in UP_SIZES))
        assert got == [reply_size(n) for n in UP_SIZES]
        # The proxy closes this client when its upstream refuses; it sends nothing.
        reader, writer = await asyncio.open_connection(*dead.address)
        assert await read_to_eof(reader) == b""
        writer.close()
        await settled(records, len(UP_SIZES) + 1, web, dead)
    return refusing


def test_totals_after_a_known_load_are_exact_and_match_the_access_log() -> None:
    metrics, records = Metrics(), Records()
    run(known_load(metrics, records))
    text = metrics.render()
    up, down = sum(UP_SIZES), sum(reply_size(n) for n in UP_SIZES)
    assert value(text, "midway_bytes_total", proxy="web", direction="upstream") == up
    assert value(text, "midway_bytes_total", proxy="web", direction="downstream") == down
    assert value(text, "midway_closes_total", proxy="web", reason="eof") == len(UP_SIZES)
    assert value(text, "midway_closes_total", proxy="dead", reason="connect_failed") == 1
    assert value(text, "midway_connect_seconds_count", proxy="web") == len(UP_SIZES)
    assert 'midway_connect_seconds_count{proxy="dead"}' not in text
    for proxy in ("web", "dead"):
        mine = [r for r in records.records if r.proxy == proxy]
        # The access log's view, record by record, and the metrics' agree exactly.
        for reason, count in collections.Counter(r.reason for r in mine).items():
            assert value(text, "midway_closes_total", proxy=proxy, reason=reason) == count
        assert value(text, "midway_connection_seconds_count", proxy=proxy) == len(mine)
        assert value(text, "midway_connection_seconds_sum", proxy=proxy) == \
            pytest.approx(sum(r.duration_s for r in mine))
        if proxy == "web":
            assert sum(r.bytes_up for r in mine) == up
            assert sum(r.bytes_down for r in mine) == down


def test_metrics_alone_count_the_same_without_close_records() -> None:
    """With only observers that count (the metrics), no close record is made:
    the totals are the same as beside the access log's records."""
    metrics, counted = Metrics(), Counted()
    run(known_load(metrics, counted))
    text = metrics.render()
    assert value(text, "midway_bytes_total", proxy="web", direction="upstream") == sum(UP_SIZES)
    assert value(text, "midway_bytes_total", proxy="web", direction="downstream") == \
        sum(reply_size(n) for n in UP_SIZES)
    assert value(text, "midway_closes_total", proxy="web", reason="eof") == len(UP_SIZES)
    assert value(text, "midway_closes_total", proxy="dead", reason="connect_failed") == 1
    assert value(text, "midway_connect_seconds_count", proxy="web") == len(UP_SIZES)
    assert 'midway_connect_seconds_count{proxy="dead"}' not in text
    for proxy in ("web", "dead"):
        assert value(text, "midway_connections_active", proxy=proxy) == 0
    web = [fields for fields in counted.records if fields[0] == "web"]
    assert sorted(fields[2] for fields in web) == sorted(UP_SIZES)  # bytes_up, each
    assert all(fields[1] == "eof" and isinstance(fields[4], float) for fields in web)
    assert [fields[1:5] for fields in counted.records if fields[0] == "dead"] == \
        [("connect_failed", 0, 0, None)]


def test_opened_and_failed_connections_are_counted() -> None:
    metrics, records = Metrics(), Records()
    refusing = run(known_load(metrics, records))
    text = metrics.render()
    assert value(text, "midway_connections_total", proxy="web") == len(UP_SIZES)
    assert value(text, "midway_connections_total", proxy="dead") == 1
    for proxy in ("web", "dead"):
        assert value(text, "midway_connections_active", proxy=proxy) == 0
    assert value(text, "midway_connect_failures_total", proxy="dead",
                 upstream=refusing) == 1


def test_a_live_bytes_collector_counts_open_connections_without_going_back() -> None:
    """The collector hook over real relays: bytes of an open connection show at
    a scrape, and when it closes the counter neither drops nor double counts."""
    metrics, records = Metrics(), Records()
    got_first = asyncio.Event()
    finish = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1000)
        got_first.set()
        await finish.wait()
        await read_to_eof(reader)
        writer.write(b"d" * 300)
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[float, float, float]:
        async with serve(upstream) as port, \
                midway.Proxy(upstreams=f"127.0.0.1:{port}", name="web",
                             observers=[metrics, records]) as proxy:
            def live_bytes() -> Iterator[Sample]:
                up = sum(relay.bytes_up for relay in proxy.service.live)
                down = sum(relay.bytes_down for relay in proxy.service.live)
                yield ("midway_bytes_total", ("web", "upstream"), up)
                yield ("midway_bytes_total", ("web", "downstream"), down)

            metrics.add_collector(live_bytes)
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"u" * 1000)
            async with asyncio.timeout(10):
                await got_first.wait()
            during = value(metrics.render(), "midway_bytes_total", proxy="web",
                           direction="upstream")
            writer.write(b"u" * 500)
            writer.write_eof()
            finish.set()
            assert len(await read_to_eof(reader)) == 300
            writer.close()
            await settled(records, 1, proxy)
            text = metrics.render()
            return (during,
                    value(text, "midway_bytes_total", proxy="web", direction="upstream"),
                    value(text, "midway_bytes_total", proxy="web", direction="downstream"))

    during, after_up, after_down = run(scenario())
    assert during == 1000
    assert (after_up, after_down) == (1500, 300)
