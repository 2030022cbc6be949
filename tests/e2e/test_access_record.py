"""What the access record says about a connection's phases, on either loop."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

import midway
from midway.core.observer import CloseRecord

from ..helpers import free_port, run, serve

pytestmark = pytest.mark.per_loop


class Records:
    def __init__(self) -> None:
        self.got: list[CloseRecord] = []

    def connection_closed(self, record: CloseRecord) -> None:
        self.got.append(record)


def test_connect_time_has_sub_millisecond_resolution_on_either_loop() -> None:
    """uvloop's loop clock counts whole milliseconds: a loopback connect timed on
    it reads 0.0 or 0.001.  Timed on a high-resolution clock it reads what it
    took (a few tens of microseconds to well under a millisecond)."""
    records = Records()

    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}", observers=[records]) as proxy:
            for _ in range(20):
                reader, writer = await asyncio.open_connection(*proxy.address)
                writer.write(b"x")
                assert await reader.readexactly(1) == b"x"
                writer.close()
                await writer.wait_closed()
            for _ in range(200):  # each record comes as the proxy sees the close
                if len(records.got) == 20:
                    break
                await asyncio.sleep(0.01)

    run(main())
    times = [r.connect_time_s for r in records.got]
    assert len(times) == 20 and all(t is not None and t > 0 for t in times), times
    # At most a handful fall on a whole millisecond by chance.
    on_a_millisecond = [t for t in times if t is not None and round(t * 1e6) % 1000 == 0]
    assert len(on_a_millisecond) < 5, times


def test_a_name_records_the_address_it_resolved_to_that_accepted() -> None:
    """An upstream given by name: ``upstream`` is the name as configured,
    ``upstream_addr`` the resolved address that took the connection (the first
    one refused: not a failed attempt of the name)."""
    records = Records()
    refused = free_port()

    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"two.test:{port}", observers=[records]) as proxy:
            async def resolve(host: str, p: int) -> list[tuple[int, Any]]:
                return [(socket.AF_INET, ("127.0.0.1", refused)),
                        (socket.AF_INET, ("127.0.0.1", p))]
            proxy.service.resolve = resolve
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            writer.close()
            await writer.wait_closed()
            for _ in range(200):
                if records.got:
                    break
                await asyncio.sleep(0.01)
            (record,) = records.got
            assert (record.upstream, record.upstream_addr) == (
                f"two.test:{port}", f"127.0.0.1:{port}")
            assert (record.attempts, record.failures) == (1, ())

    run(main())
