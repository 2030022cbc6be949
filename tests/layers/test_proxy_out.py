"""The proxy_protocol_out layer over a fake connection: the header it writes, read
back by midway's own parser, carries the client's address (the one a received
header gave, when chained), the SNI as AUTHORITY and a known ALPN (v2), and
AF_UNSPEC/UNKNOWN for a client without an IP address."""

from __future__ import annotations

import pytest

from midway.layers.proxy_in import ProxyProtocolIn
from midway.layers.proxy_out import ProxyProtocolOut
from midway.layers.proxy_protocol import ProxyHeader, ProxyProtocolParser, build_v1
from midway.upstream.access import AccessList
from tests.helpers import run
from tests.layers.fakeconn import FakeConn
from tests.layers.fixtures import load


def sent_header(conn: FakeConn, version: int) -> ProxyHeader:
    run(ProxyProtocolOut(version).connect(conn), timeout=10)  # type: ignore[arg-type]
    parser = ProxyProtocolParser("any")
    header = parser.feed(conn.sent)
    assert header is not None and parser.rest == b"", "one whole header, nothing else"
    return header


@pytest.mark.parametrize("version", [1, 2])
def test_the_header_carries_the_client_and_the_address_it_connected_to(version: int) -> None:
    conn = FakeConn(client=("203.0.113.5", 1234), local=("192.0.2.1", 443))
    header = sent_header(conn, version)
    assert (header.version, header.command) == (version, "PROXY")
    assert (header.source, header.destination) == (("203.0.113.5", 1234), ("192.0.2.1", 443))


def test_v1_is_haproxy_s_line() -> None:
    conn = FakeConn(client=("203.0.113.5", 1234), local=("192.0.2.1", 443))
    run(ProxyProtocolOut(1).connect(conn), timeout=10)
    assert conn.sent == b"PROXY TCP4 203.0.113.5 192.0.2.1 1234 443\r\n"


@pytest.mark.parametrize("version", [1, 2])
def test_chained_the_received_client_is_passed_on(version: int) -> None:
    conn = FakeConn([load("proxy_v2_tlvs")], client=("192.0.2.9", 6000))
    run(ProxyProtocolIn("any", AccessList.parse(allow=["192.0.2.0/24"]), 5).accept(conn))
    received = conn.info.proxy_header
    assert received is not None
    header = sent_header(conn, version)
    assert (header.source, header.destination) == (received.source, received.destination)
    if version == 2:  # the TLVs midway knows are passed on too
        assert header.authority == "tls.example.test" and header.alpn == b"http/1.1"


def test_v2_carries_the_sni_and_an_alpn_a_tls_layer_negotiated() -> None:
    conn = FakeConn()
    conn.info.sni = "shop.example.com"
    conn.route["alpn"] = "h2"
    header = sent_header(conn, 2)
    assert header.authority == "shop.example.com" and header.alpn == b"h2"


def test_v2_without_a_known_name_or_protocol_has_no_tlvs() -> None:
    assert sent_header(FakeConn(), 2).tlvs == ()


def test_a_client_without_an_ip_address_is_sent_as_unknown() -> None:
    conn = FakeConn(client=None, local=None)
    run(ProxyProtocolOut(1).connect(conn), timeout=10)
    assert conn.sent == build_v1(None, None) == b"PROXY UNKNOWN\r\n"
    header = sent_header(FakeConn(client=None, local=None), 2)
    assert (header.command, header.family, header.source) == ("PROXY", "AF_UNSPEC", None)
