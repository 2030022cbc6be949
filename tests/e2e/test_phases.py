"""The phases of one connection, end to end (issue 9 item 1), with test layers:
with no inbound layer the upstream is dialled at accept (a server-first protocol
works); with one, nothing is dialled before it has finished, the client address it
sets is what hooks and the access log see, and the bytes it read and handed back
reach the upstream first, after an outbound layer's prefix."""

from __future__ import annotations

import asyncio
from typing import Any

import midway
from midway.chain.base import Attachment, ConnectionInfo, Element
from midway.core.observer import Observer as BaseObserver
from midway.layers.base import LayerConnection
from midway.service import Connection, Phase

from ..helpers import read_exactly, run, serve

HELLO_MAX = 64
"""The test layer's cap on its header line."""


class Events:
    """One ordered list for everything the test watches."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, ...]] = []

    def add(self, *item: Any) -> None:
        self.items.append(item)

    def names(self) -> list[str]:
        return [item[0] for item in self.items]


class HelloLayer:
    """A test inbound layer: reads ``HELLO host:port\\n`` from the client, makes that
    the client's address, and hands back whatever it read after the line."""

    name = "hello"

    def __init__(self, events: Events, accepted: list[int]) -> None:
        self.events = events
        self.accepted = accepted

    async def accept(self, conn: LayerConnection) -> None:
        assert isinstance(conn, Connection)
        self.events.add("inbound", conn.phase, len(self.accepted))
        data = b""
        while b"\n" not in data:
            chunk = await asyncio.wait_for(conn.recv_client(HELLO_MAX), 5)
            if not chunk:
                raise midway.Rejected("no HELLO line")
            data += chunk
        line, rest = data.split(b"\n", 1)
        host, port = line.removeprefix(b"HELLO ").decode().rsplit(":", 1)
        conn.set_client(host, int(port))
        conn.route["sni"] = "example.test"
        conn.unread(rest)
        self.events.add("inbound done", conn.phase, len(self.accepted))


class PrefixLayer:
    """A test outbound layer: writes a prefix to the upstream first."""

    name = "prefix"

    def __init__(self, events: Events, prefix: bytes) -> None:
        self.events = events
        self.prefix = prefix

    async def connect(self, conn: LayerConnection) -> None:
        assert isinstance(conn, Connection)
        self.events.add("outbound", conn.phase, conn.info.upstream)
        await conn.send_upstream(self.prefix)


class Watch(Element):
    """Records on_open (with the client address a hook sees) and on_close."""

    name = "watch"

    def __init__(self, events: Events) -> None:
        self.events = events

    def attach(self, info: ConnectionInfo) -> Attachment:
        async def on_open(info: ConnectionInfo) -> None:
            self.events.add("open", info.client_addr)

        def on_close(info: ConnectionInfo, reason: str) -> None:
            self.events.add("element closed", reason)

        return Attachment(on_open=on_open, on_close=on_close)


class Observer(BaseObserver):
    def __init__(self, events: Events) -> None:
        self.events = events
        self.records: list[midway.CloseRecord] = []

    def connection_opened(self, info: ConnectionInfo) -> None:
        self.events.add("opened", info.client)

    def connection_closed(self, record: midway.CloseRecord) -> None:
        self.records.append(record)
        self.events.add("closed", record.client)


def _upstream(events: Events, accepted: list[int], greeting: bytes = b"",
              until: bytes = b"") -> Any:
    """A server that records its accept, reads (until ``until`` ends what it got,
    else one read), answers ``echo:`` and what it got, and closes."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)  # when the server's loop gets to it: not ordered with the proxy
        if greeting:
            writer.write(greeting)
        data = await reader.read(1 << 16)
        async with asyncio.timeout(5):
            while until and not data.endswith(until):
                data += await reader.read(1 << 16)
        events.add("upstream got", data)
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()
    return handler


async def _wait(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def test_without_an_inbound_layer_the_dial_starts_at_accept() -> None:
    """A server-first protocol: the upstream greets a client that sends nothing."""
    async def main() -> None:
        events, accepted = Events(), []
        observer = Observer(events)
        async with serve(_upstream(events, accepted, greeting=b"220 ready\r\n")) as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", elements=[Watch(events)],
                             observers=[observer]) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            assert await read_exactly(reader, 11) == b"220 ready\r\n"
            writer.write(b"QUIT")
            assert await reader.read() == b"echo:QUIT"
            writer.close()
            await _wait(lambda: observer.records)
        client = observer.records[0].client
        assert events.names() == ["opened", "open", "upstream got", "element closed", "closed"]
        assert observer.records[0].attempts == 1 and observer.records[0].failures == ()
        assert client.startswith("127.0.0.1:")
    run(main())


def test_with_an_inbound_layer_nothing_is_dialled_before_it_finishes() -> None:
    async def main() -> None:
        events, accepted = Events(), []
        observer = Observer(events)
        async with serve(_upstream(events, accepted, until=b"late")) as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", elements=[Watch(events)],
                             observers=[observer]) as proxy:
            service = proxy.service
            service.inbound = (HelloLayer(events, accepted),)
            service.outbound = (PrefixLayer(events, b"PREFIX|"),)
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            await _wait(lambda: "inbound" in events.names())
            await asyncio.sleep(0.2)  # the layer waits for its line: no dial meanwhile
            assert accepted == []
            # The line and the first payload bytes in one write: the layer reads
            # them together and must hand back "early|".
            writer.write(b"HELLO 10.1.2.3:5555\nearly|")
            await writer.drain()
            await _wait(lambda: "open" in events.names())
            writer.write(b"late")
            got = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await _wait(lambda: observer.records)
        # The prefix first, then the handed-back bytes, then what the relay read.
        assert got == b"echo:PREFIX|early|late"
        names = events.names()
        assert names == ["opened", "inbound", "inbound done", "outbound", "open",
                         "upstream got", "element closed", "closed"]
        inbound = events.items[1]
        assert inbound[1] is Phase.INBOUND and inbound[2] == 0
        assert events.items[2][2] == 0  # still nothing dialled when the layer returned
        assert events.items[3][1] is Phase.OUTBOUND
        assert events.items[4] == ("open", ("10.1.2.3", 5555))  # what a hook sees
        assert observer.records[0].client == "10.1.2.3:5555"  # what the access log sees
        assert events.items[-1] == ("closed", "10.1.2.3:5555")
    run(main())


def test_an_inbound_layer_that_refuses_closes_only_that_client() -> None:
    async def main() -> None:
        events, accepted = Events(), []
        observer = Observer(events)
        async with serve(_upstream(events, accepted)) as port, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}", observers=[observer]) as proxy:
            proxy.service.inbound = (HelloLayer(events, accepted),)
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write_eof()  # EOF before any HELLO line: the layer refuses
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await _wait(lambda: observer.records)
            assert proxy.connections == 0
        record = observer.records[0]
        assert (record.reason, record.detail, record.attempts) == ("rejected", "no HELLO line", 0)
        assert accepted == []
    run(main())
