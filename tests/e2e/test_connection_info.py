"""What a connection's ConnectionInfo says, end to end, now that parts of it are
built only when read (issue 14 item 2): the client's text, the listener's, the
upstream's and midway's own address towards it are right when read from a live
connection of a proxy with no element and no observer (the lazy path), and the
same when an element is attached (filled in at once)."""

from __future__ import annotations

import asyncio

import midway
from midway.chain.base import Attachment, ConnectionInfo, Element

from ..helpers import read_exactly, run, serve


class Seen(Element):
    """Attaches nothing; records the info it was shown."""

    name = "seen"

    def __init__(self) -> None:
        self.infos: list[ConnectionInfo] = []

    def attach(self, info: ConnectionInfo) -> Attachment | None:
        self.infos.append(info)
        return None


async def _check(with_element: bool) -> None:
    peers: list[tuple[str, int]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[:2])
        writer.write(await reader.readexactly(1))
        await writer.drain()
        await reader.read()
        writer.close()

    element = Seen()
    async with serve(handler) as port, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
        if with_element:
            proxy.add_element(element)
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"x")
        assert await read_exactly(reader, 1) == b"x"
        (relay,) = proxy.service.live
        info = relay.info
        host, cport = writer.get_extra_info("sockname")[:2]
        assert info.client == f"{host}:{cport}" and info.client_addr == (host, cport)
        assert info.listener == f"127.0.0.1:{proxy.port}"
        assert info.local_addr == ("127.0.0.1", proxy.port)
        assert info.upstream == f"127.0.0.1:{port}"
        assert info.upstream_addr == ("127.0.0.1", port)
        assert info.upstream_local_addr == peers[0]  # what the upstream sees as its peer
        assert info.extra == {}
        assert element.infos == ([info] if with_element else [])
        writer.close()


def test_connection_info_read_lazily_from_a_live_connection() -> None:
    run(_check(with_element=False))


def test_connection_info_with_an_element_attached() -> None:
    run(_check(with_element=True))
