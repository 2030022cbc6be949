"""The proxy_protocol_in layer over a fake connection: real HAProxy headers split at
every point and byte by byte, the client's bytes after the header handed on exactly
(a v2 header read without taking a byte past it), reads bounded by the cap, LOCAL
served with the peer's address, an untrusted peer closed before any read, and every
way a trusted peer's header can be missing, malformed or late."""

from __future__ import annotations

import asyncio
import logging

import pytest

from midway.core.observer import CloseReason
from midway.layers.base import LayerRefused
from midway.layers.proxy_in import ProxyProtocolIn
from midway.layers.proxy_protocol import V1_MAX_LENGTH, Mode, ProxyProtocolParser
from midway.upstream.access import AccessList
from tests.helpers import run
from tests.layers.fakeconn import FakeConn
from tests.layers.fixtures import CLIENT_PAYLOAD, byte_by_byte, every_split, load

TRUSTED = AccessList.parse(allow=["192.0.2.0/24", "2001:db8::/32"])
TINY_S = 0.05
"""A timeout short enough to wait for in a test (the layer uses the loop's clock)."""

CAPTURED = ["proxy_v1_tcp4", "proxy_v1_tcp6", "proxy_v2_tcp4", "proxy_v2_tcp6", "proxy_v2_tlvs"]


def layer(mode: Mode = "any", trusted: AccessList | None = TRUSTED,
          timeout_s: float = 5.0) -> ProxyProtocolIn:
    return ProxyProtocolIn(mode, trusted, timeout_s)


def accept(conn: FakeConn, proxy_in: ProxyProtocolIn | None = None) -> None:
    run((proxy_in or layer()).accept(conn), timeout=10)


def refused(conn: FakeConn, proxy_in: ProxyProtocolIn | None = None) -> LayerRefused:
    with pytest.raises(LayerRefused) as caught:
        accept(conn, proxy_in)
    return caught.value


def header_of(data: bytes) -> tuple[object, object, bytes]:
    parser = ProxyProtocolParser("any")
    header = parser.feed(data)
    assert header is not None
    return header.source, header.destination, parser.rest


@pytest.mark.parametrize("name", CAPTURED)
def test_every_split_point_gives_the_header_s_client_and_hands_on_the_rest_exactly(
        name: str) -> None:
    data = load(name)
    source, destination, after = header_of(data)
    for pieces in [[data], byte_by_byte(data), *every_split(data)]:
        conn = FakeConn(pieces)
        accept(conn)
        assert (conn.info.client_addr, conn.info.local_addr) == (source, destination)
        # What reaches the upstream: the bytes handed back, then the unread rest.
        assert conn.pending + conn.unsent == after
        if name.startswith("proxy_v2"):
            # v2: read exactly, nothing of the client's stream was taken.
            assert conn.pending == b""
            assert conn.taken == data[: len(data) - len(after)]


def test_the_client_address_is_written_as_the_access_log_writes_it() -> None:
    conn = FakeConn([load("proxy_v1_tcp6")])
    accept(conn)
    assert conn.info.client.startswith("[::1]:")
    assert conn.info.proxy_header is not None and conn.info.proxy_header.version == 1


def test_v1_reads_stay_within_the_107_byte_cap() -> None:
    data = load("proxy_v1_tcp4") + b"x" * 10_000
    conn = FakeConn([data])
    accept(conn, layer("v1"))
    assert sum(conn.asked) <= V1_MAX_LENGTH
    assert conn.pending + conn.unsent == data[data.index(b"\r\n") + 2:]


def test_a_v2_header_and_the_client_s_first_bytes_in_one_segment_are_not_overread() -> None:
    data = load("proxy_v2_tcp4")
    conn = FakeConn([data])
    accept(conn, layer("v2"))
    assert conn.asked == [16, len(data) - 16 - len(CLIENT_PAYLOAD)]
    assert conn.unsent == CLIENT_PAYLOAD and conn.pending == b""


def test_v2_tlvs_are_kept_and_the_authority_becomes_the_route_key() -> None:
    conn = FakeConn([load("proxy_v2_tlvs")])
    accept(conn)
    header = conn.info.proxy_header
    assert header is not None
    assert header.alpn == b"http/1.1"
    assert header.authority == "tls.example.test"
    assert header.ssl is not None and header.ssl.version is not None
    assert conn.route == {"sni": "tls.example.test"}
    assert conn.info.alpn == "http/1.1"  # hooks see the balancer's protocol


def test_a_header_without_alpn_names_no_protocol() -> None:
    conn = FakeConn([load("proxy_v2_tcp4")])
    accept(conn)
    assert conn.info.proxy_header is not None and conn.info.proxy_header.alpn is None
    assert conn.info.alpn is None


def test_local_is_served_with_the_peer_s_own_addresses() -> None:
    conn = FakeConn([load("proxy_v2_local"), b"health?"])
    accept(conn)
    assert conn.info.client_addr == ("192.0.2.50", 40000)
    assert conn.info.local_addr == ("192.0.2.1", 443)
    assert conn.info.proxy_header is not None and conn.info.proxy_header.command == "LOCAL"
    assert conn.pending + conn.unsent == b"health?"


def test_v1_unknown_keeps_the_peer_s_addresses() -> None:
    conn = FakeConn([b"PROXY UNKNOWN\r\nGET /"])
    accept(conn)
    assert conn.info.client_addr == ("192.0.2.50", 40000)
    assert conn.pending + conn.unsent == b"GET /"


def test_an_untrusted_peer_is_closed_before_anything_is_read() -> None:
    conn = FakeConn([load("proxy_v2_tcp4")], client=("198.51.100.9", 5000))
    exc = refused(conn)
    assert exc.reason is CloseReason.UNTRUSTED_PEER
    assert "198.51.100.9" in str(exc)
    assert conn.asked == [] and conn.info.client_addr == ("198.51.100.9", 5000)


def test_an_ipv4_mapped_peer_is_matched_as_its_ipv4_address() -> None:
    conn = FakeConn([load("proxy_v2_tcp4")], client=("::ffff:192.0.2.7", 5000))
    accept(conn)
    assert conn.info.client_addr == ("127.0.0.1", conn.info.client_addr[1])  # type: ignore[index]


def test_with_no_trusted_network_no_ip_peer_may_send_a_header() -> None:
    exc = refused(FakeConn([load("proxy_v2_tcp4")]), layer(trusted=None))
    assert exc.reason is CloseReason.UNTRUSTED_PEER


def test_a_unix_socket_peer_is_trusted() -> None:
    conn = FakeConn([load("proxy_v1_tcp4")], client=None, local=None)
    accept(conn, layer(trusted=None))
    assert conn.info.client_addr is not None and conn.info.client_addr[0] == "127.0.0.1"


@pytest.mark.parametrize(("mode", "data", "words"), [
    ("any", b"GET / HTTP/1.1\r\n\r\n", "first byte 0x47"),
    ("v1", load("proxy_v2_tcp4"), "expected a v1 header"),
    ("v2", load("proxy_v1_tcp4"), "expected a v2 header"),
    ("any", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    ("any", b"PROXY TCP4 " + b"1" * 200, "no CRLF within 107"),
])
def test_a_missing_or_malformed_header_closes_with_bad_proxy_header(
        mode: Mode, data: bytes, words: str) -> None:
    exc = refused(FakeConn([data]), layer(mode))
    assert exc.reason is CloseReason.BAD_PROXY_HEADER
    assert words in str(exc)


def test_a_peer_that_closes_mid_header_is_bad_proxy_header() -> None:
    data = load("proxy_v2_tcp4")[:20]
    exc = refused(FakeConn([data]))
    assert exc.reason is CloseReason.BAD_PROXY_HEADER
    assert "after 20 bytes" in str(exc) and exc.level == logging.WARNING
    # Connect and close without a byte: a TCP health check (an AWS NLB's, a
    # plain HAProxy check), nothing for the operator to fix, so not a warning.
    exc = refused(FakeConn([]))
    assert "before sending a PROXY header" in str(exc)
    assert exc.reason is CloseReason.BAD_PROXY_HEADER and exc.level == logging.INFO


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 1.2", load("proxy_v2_tcp4")[:15]])
def test_a_header_that_does_not_come_in_time_is_bad_proxy_header(sent: bytes) -> None:
    conn = FakeConn([sent], eof=False)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(LayerRefused) as caught:
            await layer(timeout_s=TINY_S).accept(conn)
        assert caught.value.reason is CloseReason.BAD_PROXY_HEADER
        assert f"within {TINY_S:g} s ({len(sent)} bytes came)" in str(caught.value)
        return loop.time() - started

    took = run(main(), timeout=10)
    assert TINY_S <= took < TINY_S + 2.0
