"""A connection's relay that cannot be made (out of descriptors): that one client
is closed and counted as closed, its slot and its sockets freed; the next client
is served.  The compiled relay's engine, an epoll descriptor, once opened with
the first connection relayed, is opened with the loop's poller before the first
listener, so no connection depends on opening it."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

import midway
from midway import service as service_module
from midway.core.observer import CloseRecord, Observer

from ..helpers import read_exactly, run, serve


@pytest.mark.one_mode
def test_a_relay_that_cannot_start_closes_its_client_and_frees_its_slot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = service_module.Relay
    failures = [OSError(errno.EMFILE, "Too many open files")]

    def relay(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "Relay", relay)
    records: list[CloseRecord] = []

    class Closes(Observer):
        def connection_closed(self, record: CloseRecord) -> None:
            records.append(record)

    async def main() -> tuple[bytes, int, bytes]:
        async with serve() as echo, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{echo}",
                                                 observers=[Closes()]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            first = await asyncio.wait_for(reader.read(), 5)  # closed, not left hanging
            writer.close()
            for _ in range(100):
                if proxy.connections == 0:
                    break
                await asyncio.sleep(0.01)
            active = proxy.connections
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"again")
            second = await read_exactly(reader, 5)
            writer.close()
            return first, active, second

    first, active, second = run(main())
    assert first == b""
    assert active == 0
    assert second == b"again"
    assert records and records[0].reason == "error" and "too many open files" in records[0].detail
