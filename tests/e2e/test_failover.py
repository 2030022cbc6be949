"""Failover is not silent (issue 15 item 3), and an upstream's state survives a live
reconfigure (issue 9 item 2).

With upstreams ``127.0.0.1:<closed>`` (refused), a live one and ``nosuch.invalid:80``
(a resolver that fails, injected so that the test needs no DNS), every request
succeeds; each failing upstream is logged once (not once per connection) and the
access log records the attempts and their failures."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import midway
from midway.config.addresses import parse_address
from midway.config.schema import UpstreamConfig
from midway.service import FAILURE_LOG_INTERVAL_S

from ..helpers import run, serve
from .test_relay import Records

REQUESTS = 9
"""Three rounds of the three upstreams' rotation."""


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


async def _no_dns(host: str, port: int) -> list[tuple[int, Any]]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def _midway_log() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("midway")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


async def _request(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def test_failover_logs_each_failing_upstream_once_and_records_the_attempts() -> None:
    async def main() -> tuple[list[midway.CloseRecord], list[str], str]:
        records = Records()
        refused = f"127.0.0.1:{_closed_port()}"
        with _midway_log() as log:
            async with serve() as port, midway.Proxy(
                    "127.0.0.1:0", [refused, f"127.0.0.1:{port}", "nosuch.invalid:80"],
                    observers=[records],
                    # Passive health off: every request starts where the rotation
                    # says (with it, the refused upstream is ejected after 3).
                    health={"eject_after": 0}) as proxy:
                proxy.service.resolve = _no_dns
                for _ in range(REQUESTS):
                    assert await _request(proxy.port) == b"ping"
                await records.wait(REQUESTS)
        return records.records, log.lines, refused

    records, lines, refused = run(main())
    failed = [line for line in lines if " failed: " in line and "upstream" in line]
    # Once per upstream, though each failed three times (well within the interval).
    assert REQUESTS / 3 < FAILURE_LOG_INTERVAL_S
    assert len(failed) == 2, failed
    assert any(f"upstream {refused} failed: connection refused (refused)" in line for line in failed)
    assert any("upstream nosuch.invalid:80 failed: cannot resolve 'nosuch.invalid'" in line
               and "(resolve_failed)" in line for line in failed)
    by_attempts = sorted((r.attempts, [f["failure"] for f in r.failures]) for r in records)
    # Smooth weighted round-robin with nginx's slow start after a failure: one
    # request in three starts at each upstream.  From the refused one: refused,
    # then live.  From the live one: 1 attempt.  From the unresolvable one: the
    # retry goes by current weight, and the refused one's dropped at its failure,
    # so the live one is next (resolve_failed, live), except once.
    assert by_attempts == sorted(
        [(1, [])] * 4 + [(2, ["refused"])] * 3 + [(2, ["resolve_failed"])] * 2)
    assert all(r.reason == "eof" for r in records)
    line = json.loads(records[-1].to_json())
    assert {"attempts", "failures"} <= line.keys()
    for r in records:
        for f in r.failures:
            assert set(f) == {"upstream", "failure", "detail"} and f["detail"]


def test_every_upstream_failing_is_still_logged_per_connection() -> None:
    async def main() -> tuple[list[midway.CloseRecord], list[str]]:
        records = Records()
        with _midway_log() as log:
            async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{_closed_port()}",
                                    observers=[records]) as proxy:
                reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed with a FIN
                writer.close()
                await records.wait(1)
        return records.records, log.lines

    records, lines = run(main())
    assert records[0].reason == "connect_failed" and records[0].attempts == 1
    assert records[0].failures[0]["failure"] == "refused"
    assert any("no upstream reachable" in line for line in lines)


def test_upstream_state_survives_a_reconfigure_that_keeps_its_address() -> None:
    async def main() -> None:
        dead = f"127.0.0.1:{_closed_port()}"
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", [f"127.0.0.1:{port}", dead]) as proxy:
            live = f"127.0.0.1:{port}"
            assert proxy.runtime is not None
            # An open connection to the live upstream, and a failed connect to the
            # dead one (the second connection starts there, then fails over).
            r1, w1 = await asyncio.open_connection(proxy.host, proxy.port)
            w1.write(b"a")
            assert await r1.readexactly(1) == b"a"
            assert await _request(proxy.port) == b"ping"
            before = {s["address"]: s for s in proxy.service.pool.snapshot()}
            assert before[live]["active"] == 1 and before[live]["connects"] == 2
            assert before[dead]["connect_failures"] == 1
            # Reconfigure live: keep both addresses, add a third.
            config = proxy.service.config
            third = parse_address(f"127.0.0.1:{_closed_port()}", listen=False)
            proxy.runtime.update_proxy(dataclasses.replace(
                config, upstreams=(*config.upstreams, UpstreamConfig(third))))
            after = {s["address"]: s for s in proxy.service.pool.snapshot()}
            assert after[live] == before[live]
            assert after[dead] == before[dead]
            assert after[str(third)]["connects"] == 0
            # The open connection reports its close to the kept state.
            w1.close()
            async with asyncio.timeout(5):
                while proxy.service.pool.snapshot()[0]["active"]:
                    await asyncio.sleep(0.01)
    run(main())


def test_a_connection_refused_after_the_dial_gives_its_upstream_slot_back() -> None:
    """An element that refuses in on_open: the upstream was connected (one more
    active connection) and must be told of the close, or least-connections and
    the admin API would count it for ever."""
    from midway.chain.base import Attachment, ConnectionInfo, Element

    class Refuse(Element):
        name = "refuse"

        def attach(self, info: ConnectionInfo) -> Attachment:
            async def on_open(info: ConnectionInfo) -> None:
                raise midway.Rejected("not today")
            return Attachment(on_open=on_open)

    async def main() -> None:
        records = Records()
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", elements=[Refuse()],
                observers=[records]) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await records.wait(1)
            state = proxy.service.pool.snapshot()[0]
            assert (state["connects"], state["active"]) == (1, 0)
        assert records.records[0].reason == "rejected" and records.records[0].attempts == 1
    run(main())


def test_a_lone_upstream_that_restarts_serves_the_next_client_at_once() -> None:
    """Its process died: three clients fail (connect_failed) and passive health
    ejects it for eject_s (10 s); it is back within a second, and the very next
    client is served, not closed with no_upstream for the rest of the 10 s (the
    panic rule, docs/balancing.md; nginx and HAProxy without checks behave so)."""
    async def main() -> tuple[list[midway.CloseRecord], list[str]]:
        records = Records()
        with _midway_log() as log:
            async with serve() as port:
                pass  # the upstream's address, now with nothing listening
            async with midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}",
                                    observers=[records]) as proxy:
                for _ in range(3):  # a client that waits for a greeting (nothing sent)
                    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
                    assert await asyncio.wait_for(reader.read(), 5) == b""  # a FIN
                    writer.close()
                await records.wait(3)
                assert any(" is down: connection refused" in line for line in log.lines)
                server = await asyncio.start_server(_echo, "127.0.0.1", port)
                try:
                    assert await _request(proxy.port) == b"ping"
                finally:
                    server.close()
                await records.wait(4)
        return records.records, log.lines

    records, lines = run(main())
    assert [r.reason for r in records] == ["connect_failed"] * 3 + ["eof"]
    assert sum(" is down: " in line for line in lines) == 1, lines
    assert any("dialling those ejected by passive health anyway" in line for line in lines)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read())
    await writer.drain()
    writer.close()
