"""The listener (midway/core/listener.py) over real loopback sockets: accepted
sockets inherit TCP_NODELAY from it on Linux (what lets the service skip a
setsockopt per connection), and the gate is asked before each accept."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from midway.config.addresses import parse_address
from midway.core.listener import (
    NODELAY_INHERITED,
    Listener,
    keepalive_options,
    open_listening_socket,
)


async def _accepted(nodelay: bool | None, clients: int = 1,
                    room: int = 100) -> tuple[list[socket.socket], Listener]:
    address = parse_address("127.0.0.1:0", listen=True)
    got: list[socket.socket] = []
    listener = Listener(address, open_listening_socket(address, 16),
                        lambda sock, addr, lst: got.append(sock), lambda: len(got) < room)
    if nodelay is not None:
        listener.set_nodelay(nodelay)
    listener.resume()
    peers = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(clients)]
    try:
        async with asyncio.timeout(5):
            while len(got) < min(clients, room):
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
    finally:
        for peer in peers:
            peer.close()
    return got, listener


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux behaviour")
@pytest.mark.parametrize("on", [True, False])
def test_accepted_sockets_inherit_tcp_nodelay_from_the_listener(on: bool) -> None:
    assert NODELAY_INHERITED

    async def main() -> None:
        got, listener = await _accepted(on)
        try:
            assert listener.nodelay is on
            assert got[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == int(on)
        finally:
            for sock in got:
                sock.close()
            listener.close()

    asyncio.run(main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux behaviour")
def test_accepted_sockets_inherit_the_keepalive_options_from_the_listener() -> None:
    """What lets the service set ``tcp_keepalive_*`` once, on the listener."""
    async def main() -> None:
        address = parse_address("127.0.0.1:0", listen=True)
        got: list[socket.socket] = []
        listener = Listener(address, open_listening_socket(address, 16),
                            lambda sock, addr, lst: got.append(sock), lambda: True)
        assert listener.set_keepalive(keepalive_options(7.2, 2, 3))
        listener.resume()
        peer = socket.create_connection(("127.0.0.1", listener.port))
        try:
            async with asyncio.timeout(5):
                while not got:
                    await asyncio.sleep(0.01)
            sock = got[0]
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert [sock.getsockopt(socket.IPPROTO_TCP, option) for option in
                    (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)] == [8, 2, 3]
        finally:
            peer.close()
            for sock in got:
                sock.close()
            listener.close()

    asyncio.run(main())


def test_keepalive_options_round_up_to_whole_seconds_and_leave_zeros_to_the_system() -> None:
    on = keepalive_options(0.5, 0, 0)
    assert on == ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                  (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1))
    assert keepalive_options(0) == ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0),)


def test_the_gate_is_asked_before_each_accept() -> None:
    async def main() -> None:
        got, listener = await _accepted(None, clients=5, room=3)
        try:
            assert len(got) == 3  # the other two wait in the kernel's queue
        finally:
            for sock in got:
                sock.close()
            listener.close()

    asyncio.run(main())
