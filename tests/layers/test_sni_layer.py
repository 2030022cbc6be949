"""The ClientHello peek layer over a fake connection: real ClientHellos split at every
point, byte by byte and across TLS records; every byte read handed back unchanged;
reads within the 16 KiB cap; no name, not TLS, malformed and half-closed clients
left to the default route; a late ClientHello closed with peek_timeout; and the
peek after a PROXY header that was read past."""

from __future__ import annotations

import asyncio

import pytest

from midway.core.observer import CloseReason
from midway.layers.base import LayerRefused
from midway.layers.clienthello import CLIENTHELLO_MAX_BYTES
from midway.layers.proxy_in import ProxyProtocolIn
from midway.layers.proxy_protocol import build_v1
from midway.layers.sni import SniPeek
from midway.upstream.access import AccessList
from tests.helpers import run
from tests.layers.fakeconn import FakeConn
from tests.layers.fixtures import byte_by_byte, every_split, load

APP_DATA = b"\x17\x03\x03\x00\x05early"
"""What a client may send after its ClientHello (it must reach the upstream too)."""
TINY_S = 0.05


def peek(conn: FakeConn, timeout_s: float = 5.0) -> None:
    run(SniPeek(timeout_s).accept(conn), timeout=10)


@pytest.mark.parametrize(("name", "sni"), [
    ("clienthello_curl", "api.example.test"),
    ("clienthello_openssl", "www.example.com"),
    ("clienthello_openssl_split", "split.example.net"),  # three TLS records
    ("clienthello_curl_tls12", "legacy.example.test"),
])
def test_every_split_point_sets_the_name_and_hands_back_every_byte(
        name: str, sni: str) -> None:
    hello = load(name)
    data = hello + APP_DATA
    pieces_list = [[data], byte_by_byte(data)]
    if len(hello) < 600:
        pieces_list += list(every_split(data))
    for pieces in pieces_list:
        conn = FakeConn(pieces)
        peek(conn)
        assert conn.route.get("sni") == sni
        # Everything read is handed back, and with what was not read it is the
        # client's stream, unchanged.
        assert conn.pending == conn.taken
        assert conn.pending + conn.unsent == data
        assert len(conn.taken) >= len(hello)


def test_without_a_server_name_no_route_key_is_set() -> None:
    hello = load("clienthello_openssl_nosni")
    conn = FakeConn([hello])
    peek(conn)
    assert conn.route == {} and conn.pending == hello


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n"])
def test_a_client_that_is_not_tls_is_left_to_the_default_route(data: bytes) -> None:
    conn = FakeConn([data], eof=False)
    peek(conn)
    assert conn.route == {} and conn.pending + conn.unsent == data


def test_a_malformed_clienthello_is_left_to_the_default_route_unchanged() -> None:
    hello = bytearray(load("clienthello_curl"))
    hello[5] = 2  # a ServerHello where the ClientHello should be
    conn = FakeConn([bytes(hello)])
    peek(conn)
    assert conn.route == {} and conn.pending + conn.unsent == bytes(hello)


def test_a_client_that_half_closes_mid_hello_is_routed_without_a_name() -> None:
    hello = load("clienthello_curl")[:100]
    conn = FakeConn([hello])
    peek(conn)
    assert conn.route == {} and conn.pending == hello


def test_the_peek_never_reads_more_than_16_kib() -> None:
    # Handshake records of 4 KiB that start a ClientHello claiming 15 KiB: a
    # client that keeps sending records would be read up to the cap, no further.
    body = b"\x01" + (15 * 1024).to_bytes(3, "big") + bytes(4096 - 4)
    record = b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body
    more = b"\x16\x03\x01\x10\x00" + bytes(4096)
    conn = FakeConn([record] + [more] * 10)
    peek(conn)
    assert len(conn.taken) <= CLIENTHELLO_MAX_BYTES
    assert conn.pending == conn.taken and conn.route == {}


@pytest.mark.parametrize("sent", [b"", load("clienthello_curl")[:50]])
def test_a_clienthello_that_does_not_come_in_time_is_peek_timeout(sent: bytes) -> None:
    conn = FakeConn([sent], eof=False)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(LayerRefused) as caught:
            await SniPeek(TINY_S).accept(conn)
        assert caught.value.reason is CloseReason.PEEK_TIMEOUT
        assert f"({len(sent)} bytes came)" in str(caught.value)
        return loop.time() - started

    took = run(main(), timeout=10)
    assert TINY_S <= took < TINY_S + 2.0


def test_after_a_v1_header_read_past_the_peek_reads_the_handed_back_bytes_first() -> None:
    """The v1 layer reads up to its cap, so it may take the ClientHello's first
    bytes; the peek must see them (and hand the whole stream back in order)."""
    hello = load("clienthello_curl")
    header = build_v1(("203.0.113.5", 1234), ("192.0.2.1", 443))
    conn = FakeConn([header + hello + APP_DATA])

    async def main() -> None:
        await ProxyProtocolIn("v1", AccessList.parse(allow=["192.0.2.0/24"]), 5).accept(conn)
        assert conn.pending, "the v1 layer read past its line (the case under test)"
        await SniPeek(5).accept(conn)

    run(main(), timeout=10)
    assert conn.route == {"sni": "api.example.test"}
    assert conn.info.client_addr == ("203.0.113.5", 1234)
    assert conn.pending + conn.unsent == hello + APP_DATA
