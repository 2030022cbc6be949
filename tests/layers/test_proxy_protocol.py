"""PROXY protocol v1/v2: real HAProxy headers whole, byte by byte, at every split
point and with trailing data; every rejection; the caps; the builders."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from midway.layers.proxy_protocol import (
    V1_MAX_LENGTH,
    V2_DEFAULT_MAX_LENGTH,
    V2_SIGNATURE,
    Mode,
    ProxyHeader,
    ProxyProtocolError,
    ProxyProtocolParser,
    build_v1,
    build_v2,
    build_v2_local,
)
from tests.layers.fixtures import CLIENT_PAYLOAD, byte_by_byte, every_split, load

# name -> (what the header must say, the bytes that follow it on the wire)
CAPTURED = {
    "proxy_v1_tcp4": ("AF_INET", CLIENT_PAYLOAD),
    "proxy_v1_tcp6": ("AF_INET6", CLIENT_PAYLOAD),
    "proxy_v2_tcp4": ("AF_INET", CLIENT_PAYLOAD),
    "proxy_v2_tcp6": ("AF_INET6", CLIENT_PAYLOAD),
    "proxy_v2_local": ("AF_UNSPEC", b""),
    "proxy_v2_tlvs": ("AF_INET", b"GET / HTTP/1.1\r\nHost: tls.example.test:"),
}


def parse(pieces: Iterable[bytes], mode: Mode = "any") -> tuple[ProxyHeader, bytes]:
    """Feed the pieces; the header and every byte after it (rest + later pieces)."""
    parser = ProxyProtocolParser(mode)
    header = None
    after = b""
    for piece in pieces:
        if header is None:
            header = parser.feed(piece)
            if header is not None:
                after = parser.rest
        else:
            after += piece
    assert header is not None, "the header never completed"
    return header, after


def parse_error(data: bytes, mode: Mode = "any") -> str:
    with pytest.raises(ProxyProtocolError) as info:
        parse([data], mode)
    return str(info.value)


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_captured_header_whole_bytewise_every_split_and_with_trailing_data(name: str) -> None:
    data = load(name)
    family, payload_start = CAPTURED[name]
    reference, after = parse([data])
    assert reference.family == family
    assert after.startswith(payload_start)
    assert data[reference.length :] == after  # the rest is untouched, byte for byte
    assert parse(byte_by_byte(data)) == (reference, after)
    for pieces in every_split(data):
        assert parse(pieces) == (reference, after)
    trailing = b"\r\n\r\n\x00PROXY garbage \xff" * 3
    assert parse([data + trailing]) == (reference, after + trailing)
    mode: Mode = "v1" if reference.version == 1 else "v2"
    assert parse([data], mode) == (reference, after)


def test_haproxy_v1_tcp4_header_fields() -> None:
    header, _ = parse([load("proxy_v1_tcp4")])
    assert (header.version, header.command, header.transport) == (1, "PROXY", "STREAM")
    assert header.source is not None and header.source[0] == "127.0.0.1"
    assert header.destination is not None and header.destination[0] == "127.0.0.1"
    line = load("proxy_v1_tcp4")[: header.length]
    sport, dport = line.split()[4:6]
    assert (header.source[1], header.destination[1]) == (int(sport), int(dport))


def test_haproxy_v2_tcp6_and_local() -> None:
    header, _ = parse([load("proxy_v2_tcp6")])
    assert header.source is not None and header.source[0] == "::1"
    assert header.length == 16 + 36
    local, _ = parse([load("proxy_v2_local")])
    assert local.command == "LOCAL" and local.uses_connection_addresses
    assert local.length == 16


def test_haproxy_v2_tlvs_ssl_authority_alpn_unique_id_crc() -> None:
    header, _ = parse([load("proxy_v2_tlvs")])
    assert header.alpn == b"http/1.1"
    assert header.authority == "tls.example.test"
    assert header.unique_id is not None and header.unique_id.startswith(b"7F000001:")
    assert header.crc32c is not None  # present and it matched
    assert header.ssl is not None
    assert header.ssl.client & 0x01 and header.ssl.verify == 0
    assert header.ssl.version == "TLSv1.3"
    assert header.ssl.cipher == "TLS_AES_256_GCM_SHA384"
    assert (header.ssl.sig_alg, header.ssl.key_alg) == ("ecdsa-with-SHA256", "EC256")
    assert [kind for kind, _ in header.tlvs] == [0x03, 0x01, 0x02, 0x05, 0x20]


def test_crc_mismatch_is_rejected() -> None:
    data = bytearray(load("proxy_v2_tlvs"))
    crc_at = data.index(b"\x03\x00\x04") + 3
    data[crc_at] ^= 0x01
    assert "CRC32C mismatch" in parse_error(bytes(data))
    # ... and so is a changed byte that the checksum covers.
    data = bytearray(load("proxy_v2_tlvs"))
    data[data.index(b"tls.example.test")] = ord("T")
    assert "CRC32C mismatch" in parse_error(bytes(data))


def test_v2_header_split_after_the_signature_is_accepted_nginx_1400() -> None:
    data = load("proxy_v2_tcp4")
    parser = ProxyProtocolParser("v2")
    assert parser.feed(data[:12]) is None
    assert parser.feed(data[12:16]) is None
    header = parser.feed(data[16:])
    assert header is not None and header.source is not None
    assert parser.rest == CLIENT_PAYLOAD


@pytest.mark.parametrize(
    ("data", "mode", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "any", "first byte 0x47"),
        (b"\x16\x03\x01", "any", "first byte 0x16"),
        (load("proxy_v2_tcp4"), "v1", "expected a v1 header"),
        (load("proxy_v1_tcp4"), "v2", "expected a v2 header"),
        # What the operator has to change, said in the log line:
        (load("proxy_v2_tcp4"), "v1", "(a v2 header? the sender uses send-proxy-v2: set "
                                      "proxy_protocol_in to v2 or any)"),
        (load("proxy_v1_tcp4"), "v2", "(a v1 header? the sender uses send-proxy: set "
                                      "proxy_protocol_in to v1 or any)"),
        (b"\x16\x03\x01", "v2", "(a TLS handshake: the sender sent no PROXY header)"),
        (b"GET / HTTP/1.1\r\n", "v1", "(plain data: the sender sent no PROXY header)"),
        (b"PROXX TCP4", "any", "must start with 'PROXY '"),
        (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "any", "must be TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "any", "bare LF"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX\n", "any", "CR not followed by LF"),
        (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "any", "4 fields"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", "any", "4 fields"),
        (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", "any", "not a canonical IPv4"),
        (b"PROXY TCP4 256.2.3.4 1.2.3.4 1 2\r\n", "any", "not a canonical IPv4"),
        (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "any", "not a canonical IPv4"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "any", "not a canonical IPv6"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "any", "not a canonical IPv6"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "any", "leading zeros"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", "any", "0..65535"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 -2\r\n", "any", "0..65535"),
        (b"PROXY \xff\xfe\r\n", "any", "must be TCP4, TCP6 or UNKNOWN"),
        (V2_SIGNATURE[:5] + b"X", "any", "signature mismatch"),
        (V2_SIGNATURE + b"\x11", "any", "version 1, only 2"),
        (V2_SIGNATURE + b"\x22", "any", "unknown command 0x2"),
        (V2_SIGNATURE + b"\x21\x41", "any", "unknown address family 0x4"),
        (V2_SIGNATURE + b"\x21\x13", "any", "unknown transport 0x3"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11), "any", "needs 12 address bytes"),
        (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "any", "needs 36 address bytes"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(14), "any", "truncated: 2 bytes left"),
        (V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x05x", "any",
         "runs past the end"),
        (V2_SIGNATURE + b"\x21\x00\x00\x06\x03\x00\x03abc", "any", "CRC32C TLV must hold 4"),
        (V2_SIGNATURE + b"\x21\x00\x00\x07\x20\x00\x04abcd", "any", "SSL TLV must hold at least 5"),
        (V2_SIGNATURE + b"\x21\x00\x00\x0b\x20\x00\x08\x01\x00\x00\x00\x00\x21\x00\x05", "any",
         "SSL sub-TLV 0x21 of 5 bytes runs past"),
        (V2_SIGNATURE + b"\x21\x00\x00\x05\x02\x00\x02\xc3\x28", "any", "AUTHORITY TLV is not UTF-8"),
        (V2_SIGNATURE + b"\x21\x00\x00\x05\x30\x00\x02\xc3\xa9", "any", "NETNS TLV is not ASCII"),
        (V2_SIGNATURE + b"\x21\x00\x00\x84\x05\x00\x81" + bytes(129), "any",
         "UNIQUE_ID TLV of 129 bytes exceeds 128"),
    ],
)
def test_malformed_headers_are_rejected_with_a_reason(data: bytes, mode: Mode, message: str) -> None:
    assert message in parse_error(data, mode)


def test_rejection_comes_as_early_as_the_bytes_allow() -> None:
    for data in (b"G", b"PROXX", V2_SIGNATURE + b"\x31", V2_SIGNATURE + b"\x21\x51"):
        parser = ProxyProtocolParser("any")
        with pytest.raises(ProxyProtocolError):
            for i in range(len(data)):
                parser.feed(data[i : i + 1])
        assert i == len(data) - 1  # the last byte, not later
    # a spent parser keeps refusing
    with pytest.raises(ProxyProtocolError):
        parser.feed(b"\r")


def test_v1_without_crlf_is_rejected_at_107_bytes_and_not_read_further() -> None:
    parser = ProxyProtocolParser("v1")
    line = b"PROXY UNKNOWN " + b"f" * 200
    with pytest.raises(ProxyProtocolError, match="no CRLF within 107 bytes"):
        for i in range(len(line)):
            parser.feed(line[i : i + 1])
    assert i == V1_MAX_LENGTH - 1
    # the worst case of §2.1 (exactly 107 bytes with the CRLF) is accepted
    ffff = ":".join(["ffff"] * 8)
    worst = f"PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n".encode()
    assert len(worst) == V1_MAX_LENGTH
    header, after = parse([worst + b"rest"])
    assert header.uses_connection_addresses and after == b"rest"
    longest_tcp6 = f"PROXY TCP6 {ffff} {ffff} 65535 65535\r\n".encode()
    assert parse([longest_tcp6])[0].source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


def test_v1_unknown_short_form() -> None:
    header, after = parse([b"PROXY UNKNOWN\r\nSSH-2.0"])
    assert (header.version, header.family, header.source, after) == (1, "AF_UNSPEC", None, b"SSH-2.0")


def test_v2_length_over_the_cap_is_rejected_before_reading_the_body() -> None:
    parser = ProxyProtocolParser("v2", max_length=512)
    fixed = V2_SIGNATURE + b"\x21\x11" + (600).to_bytes(2, "big")
    with pytest.raises(ProxyProtocolError, match="exceeds the cap of 512"):
        parser.feed(fixed + bytes(600))
    # the default cap: 16384 accepted, one more refused
    ok = V2_SIGNATURE + b"\x21\x00" + (V2_DEFAULT_MAX_LENGTH - 16).to_bytes(2, "big")
    body = b"\x04" + (V2_DEFAULT_MAX_LENGTH - 19).to_bytes(2, "big") + bytes(V2_DEFAULT_MAX_LENGTH - 19)
    header, after = parse([ok + body + b"x"])
    assert header.length == V2_DEFAULT_MAX_LENGTH and after == b"x"
    big = V2_SIGNATURE + b"\x21\x00" + (V2_DEFAULT_MAX_LENGTH - 15).to_bytes(2, "big")
    assert "exceeds the cap of 16384" in parse_error(big)


def test_parser_never_holds_more_than_the_cap_even_fed_a_flood() -> None:
    flood = V2_SIGNATURE + b"\x21\x00\x40\x00" + bytes(100_000)  # len 16384 > cap - 16
    parser = ProxyProtocolParser("any", max_length=4096)
    with pytest.raises(ProxyProtocolError):
        parser.feed(flood)
    assert parser.buffered == 0
    parser = ProxyProtocolParser("any")
    for _ in range(50):
        parser.feed(b"PROXY " if parser.buffered == 0 else b"f")  # no CRLF yet
        assert parser.buffered <= V1_MAX_LENGTH


def test_unspecified_family_or_transport_keeps_the_connection_addresses() -> None:
    # AF_UNSPEC with a PROXY command: no addresses, TLVs right after the 16 bytes.
    header, _ = parse([V2_SIGNATURE + b"\x21\x00\x00\x05\x01\x00\x02h2"])
    assert header.uses_connection_addresses and header.alpn == b"h2"
    # AF_INET with UNSPEC transport: no layout, the block is skipped.
    header, after = parse([V2_SIGNATURE + b"\x21\x10\x00\x03abcREST"])
    assert header.uses_connection_addresses and header.tlvs == () and after == b"REST"


# --- builders ------------------------------------------------------------------------


def test_build_v1_matches_haproxy_byte_for_byte() -> None:
    captured = load("proxy_v1_tcp4")
    header, _ = parse([captured])
    assert header.source is not None and header.destination is not None
    assert isinstance(header.source, tuple) and isinstance(header.destination, tuple)
    assert build_v1(header.source, header.destination) == captured[: header.length]
    captured6 = load("proxy_v1_tcp6")
    header6, _ = parse([captured6])
    assert isinstance(header6.source, tuple) and isinstance(header6.destination, tuple)
    assert build_v1(header6.source, header6.destination) == captured6[: header6.length]


@pytest.mark.parametrize("name", ["proxy_v2_tcp4", "proxy_v2_tcp6"])
def test_build_v2_matches_haproxy_byte_for_byte(name: str) -> None:
    captured = load(name)
    header, _ = parse([captured])
    assert isinstance(header.source, tuple) and isinstance(header.destination, tuple)
    assert build_v2(header.source, header.destination) == captured[: header.length]


def test_build_v2_local_matches_haproxy_health_check() -> None:
    assert build_v2_local() == load("proxy_v2_local")


def test_build_v2_with_alpn_authority_and_crc_round_trips() -> None:
    wire = build_v2(("192.0.2.1", 40000), ("198.51.100.7", 443), alpn="h2",
                    authority="shop.example.com", unique_id=b"id-1", crc=True)
    header, after = parse([wire + b"body"])
    assert header.source == ("192.0.2.1", 40000)
    assert header.destination == ("198.51.100.7", 443)
    assert (header.alpn, header.authority, header.unique_id) == (b"h2", "shop.example.com", b"id-1")
    assert header.crc32c is not None and after == b"body"


def test_builders_map_mixed_families_and_say_unknown_without_addresses() -> None:
    assert build_v1(("192.0.2.1", 1), ("2001:db8::1", 2)) == \
        b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1 2\r\n"
    header, _ = parse([build_v2(("192.0.2.1", 1), ("2001:db8::1", 2))])
    assert header.family == "AF_INET6" and header.source == ("::ffff:192.0.2.1", 1)
    assert build_v1(None, ("192.0.2.1", 1)) == b"PROXY UNKNOWN\r\n"


def test_build_v2_unix_paths() -> None:
    header, _ = parse([build_v2("/run/app.sock", "\0abstract")])
    assert (header.family, header.source, header.destination) == \
        ("AF_UNIX", "/run/app.sock", "\0abstract")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: build_v1(("example.com", 1), ("192.0.2.1", 2)), "not names"),
        (lambda: build_v1(("192.0.2.1", 70000), ("192.0.2.1", 2)), "0..65535"),
        (lambda: build_v2("/a", ("192.0.2.1", 2)), "AF_UNIX path"),
        (lambda: build_v2("/" + "a" * 108, "/b"), "exceeds 108"),
        (lambda: build_v2(("::1", 1), ("::1", 2), unique_id=bytes(129)), "at most 128"),
        (lambda: build_v2(("::1", 1), ("::1", 2), tlvs=[(0xE0, bytes(70000))]), "65535"),
        (lambda: build_v2(("::1", 1), ("::1", 2), tlvs=[(0xE0, bytes(40000))] * 2),
         "at most 65535 bytes after its 16"),
    ],
)
def test_builders_refuse_what_the_format_cannot_carry(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()


def test_parser_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="mode"):
        ProxyProtocolParser("v3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        ProxyProtocolParser(max_length=100)
    parser = ProxyProtocolParser()
    assert parser.feed(load("proxy_v2_local")) is not None
    with pytest.raises(RuntimeError, match="already parsed"):
        parser.feed(b"more")
