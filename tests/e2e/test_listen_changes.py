"""A reload (or an API update) that changes a proxy's listen list: the addresses
that stay keep their listening sockets, so a client connecting to one of them
during the change is served, never refused or reset; addresses added start
listening, addresses removed stop."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess

import pytest

import midway
from midway.config.addresses import Address
from midway.config.target import keep_ports
from midway.errors import ListenError

from ..helpers import free_port, needs, read_exactly, run, serve


def _queued_client(port: int) -> socket.socket:
    """A client whose handshake the kernel has completed: it sits in the
    listener's accept queue (the event loop has not run since)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    return sock


async def _echoes(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(payload)
        await writer.drain()
        return await read_exactly(reader, len(payload), timeout=5)
    finally:
        writer.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.one_mode
@pytest.mark.parametrize("change", ["add", "remove"])
def test_an_address_kept_by_a_listen_change_keeps_its_queued_clients(change: str) -> None:
    """A client queued on the kept address while the list changes (another
    address added, or one removed) is served: the kept socket was not closed
    and bound again (which resets every queued handshake and refuses
    connections until the new socket listens)."""
    kept, other = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    before, after = ([kept], [kept, other]) if change == "add" else ([kept, other], [kept])

    async def main() -> tuple[bytes, bool]:
        async with serve() as echo, midway.Proxy(before, f"127.0.0.1:{echo}") as proxy:
            assert proxy.runtime is not None
            queued = _queued_client(int(kept.rsplit(":", 1)[1]))
            # In the same turn of the loop: the client is still in the kernel's queue.
            proxy.runtime.update_proxy(midway.proxy_config(after, f"127.0.0.1:{echo}",
                                                           name=proxy.config.name))
            got = await _echoes(queued)
            other_refused = await asyncio.to_thread(_refused, int(other.rsplit(":", 1)[1]))
            return got, other_refused

    got, other_refused = run(main())
    assert got == b"ping"
    assert other_refused == (change == "remove")


@pytest.mark.one_mode
def test_a_listen_change_that_cannot_bind_leaves_the_kept_address_serving() -> None:
    """The added address is taken by another process: the update fails, naming
    it, and the kept address never stopped listening (its queued client is
    served); the proxy listens where it did."""
    taken = socket.create_server(("127.0.0.1", 0))
    kept = f"127.0.0.1:{free_port()}"
    busy = f"127.0.0.1:{taken.getsockname()[1]}"

    async def main() -> tuple[str, bytes, list[str]]:
        async with serve() as echo, midway.Proxy(kept, f"127.0.0.1:{echo}") as proxy:
            assert proxy.runtime is not None
            queued = _queued_client(int(kept.rsplit(":", 1)[1]))
            with pytest.raises(ListenError) as failure:
                proxy.runtime.update_proxy(midway.proxy_config(
                    [kept, busy], f"127.0.0.1:{echo}", name=proxy.config.name))
            got = await _echoes(queued)
            return str(failure.value), got, proxy.service.addresses

    try:
        error, got, addresses = run(main())
    finally:
        taken.close()
    assert busy in error and "in use" in error
    assert got == b"ping"
    assert addresses == [kept]


@pytest.mark.one_mode
def test_a_port_0_address_keeps_its_port_and_socket_when_another_is_added() -> None:
    """``127.0.0.1:0`` stays where it was bound (as a same-length change keeps
    it), and its queued client is served, when an address is added beside it."""
    other = f"127.0.0.1:{free_port()}"

    async def main() -> tuple[int, bytes, list[str]]:
        async with serve() as echo, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{echo}") as proxy:
            assert proxy.runtime is not None
            port = proxy.port
            queued = _queued_client(port)
            proxy.runtime.update_proxy(midway.proxy_config(["127.0.0.1:0", other],
                                                           f"127.0.0.1:{echo}",
                                                           name=proxy.config.name))
            return port, await _echoes(queued), proxy.service.addresses

    port, got, addresses = run(main())
    assert got == b"ping"
    assert addresses == [f"127.0.0.1:{port}", other]


def test_keep_ports_gives_each_port_0_address_a_port_the_new_list_does_not_name() -> None:
    current = (Address("127.0.0.1", 5000), Address("127.0.0.1", 6000))
    assert keep_ports((Address("127.0.0.1", 6000), Address("127.0.0.1", 0)), current) == (
        Address("127.0.0.1", 6000), Address("127.0.0.1", 5000))
    assert keep_ports((Address("127.0.0.1", 0),), current) == (Address("127.0.0.1", 5000),)
    assert keep_ports((Address("::1", 0),), current) == (Address("::1", 0),)


def _listen_backlog(port: int) -> int:
    """The backlog the kernel applies to the listener on ``port`` (``ss``'s
    Send-Q of a listening socket)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=10, check=True).stdout.split()
    return int(out[2])


@pytest.mark.one_mode
@pytest.mark.skipif(not shutil.which("ss"), reason=needs("ss", apt="iproute2"))
def test_a_changed_backlog_applies_to_the_listener_it_keeps() -> None:
    """A reload that says ``changed web (backlog)`` applies it: the listening
    socket is kept, its accept queue resized."""
    async def main() -> tuple[int, int]:
        async with serve() as echo, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{echo}",
                                                 backlog=16) as proxy:
            assert proxy.runtime is not None
            before = await asyncio.to_thread(_listen_backlog, proxy.port)
            proxy.runtime.update_proxy(midway.proxy_config(
                f"127.0.0.1:{proxy.port}", f"127.0.0.1:{echo}", name=proxy.config.name,
                backlog=64))
            return before, await asyncio.to_thread(_listen_backlog, proxy.port)

    assert run(main()) == (16, 64)


@pytest.mark.one_mode
def test_a_listener_moves_onto_the_wildcard_of_its_port() -> None:
    """``127.0.0.1:P`` replaced by ``:P``, which cannot be bound beside it: the
    old socket is closed first, then the wildcard serves (IPv4 too)."""
    port = free_port()

    async def main() -> tuple[list[str], bytes]:
        async with serve() as echo, midway.Proxy(f"127.0.0.1:{port}",
                                                 f"127.0.0.1:{echo}") as proxy:
            assert proxy.runtime is not None
            proxy.runtime.update_proxy(midway.proxy_config(f":{port}", f"127.0.0.1:{echo}",
                                                           name=proxy.config.name))
            client = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 5)
            client.setblocking(False)
            return proxy.service.addresses, await _echoes(client)

    addresses, got = run(main())
    assert len(addresses) == 1 and addresses[0].endswith(f":{port}")
    assert got == b"ping"


@pytest.mark.one_mode
def test_a_failed_change_leaves_a_removed_address_listening() -> None:
    """``[kept, gone]`` to ``[kept, taken]``: the taken address fails the change,
    and ``gone``, which it would have removed, never stopped listening."""
    taken = socket.create_server(("127.0.0.1", 0))
    kept, gone = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    busy = f"127.0.0.1:{taken.getsockname()[1]}"

    async def main() -> tuple[bytes, list[str]]:
        async with serve() as echo, midway.Proxy([kept, gone], f"127.0.0.1:{echo}") as proxy:
            assert proxy.runtime is not None
            queued = _queued_client(int(gone.rsplit(":", 1)[1]))
            with pytest.raises(ListenError):
                proxy.runtime.update_proxy(midway.proxy_config(
                    [kept, busy], f"127.0.0.1:{echo}", name=proxy.config.name))
            return await _echoes(queued), proxy.service.addresses

    try:
        got, addresses = run(main())
    finally:
        taken.close()
    assert got == b"ping"
    assert addresses == [kept, gone]


@pytest.mark.one_mode
@pytest.mark.parametrize("how", ["relisten", "enable"])
def test_an_address_added_with_new_upstreams_is_announced_with_them(
        how: str, caplog: pytest.LogCaptureFixture) -> None:
    """A reload that adds an address and changes the upstreams in one step (or
    an API update that enables a stopped proxy with new upstreams) logs the
    new listener as forwarding to the new upstreams, where its connections go,
    not to the ones it replaced."""
    kept, added = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    async def main() -> tuple[bytes, int]:
        async with serve() as old, serve() as new, \
                midway.Proxy(kept, f"127.0.0.1:{old}") as proxy:
            assert proxy.runtime is not None
            name = proxy.config.name
            if how == "enable":
                proxy.runtime.enable_proxy(name, False)
            caplog.clear()
            proxy.runtime.update_proxy(midway.proxy_config([kept, added], f"127.0.0.1:{new}",
                                                           name=name), enabled=True)
            sock = await asyncio.to_thread(
                socket.create_connection, ("127.0.0.1", int(added.rsplit(":", 1)[1])), 5)
            return await _echoes(sock), new

    with caplog.at_level(logging.INFO, logger="midway"):
        got, new = run(main())
    assert got == b"ping"
    announced = [r.getMessage() for r in caplog.records if f"listening on {added}" in r.getMessage()]
    assert len(announced) == 1, announced
    assert announced[0].endswith(f"forwarding to 127.0.0.1:{new}"), announced
