"""The ClientHello peek: real hellos from openssl and curl whole, byte by byte, at
every split point and with trailing data; hellos split across records; every
rejection; the 16 KiB cap."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pytest

from midway.layers.clienthello import (
    CLIENTHELLO_MAX_BYTES,
    ClientHello,
    ClientHelloError,
    ClientHelloParser,
    NotTLS,
)
from tests.layers.fixtures import byte_by_byte, every_split, load

CAPTURED = {
    "clienthello_openssl": ("www.example.com", (b"h2", b"http/1.1"), 1),
    "clienthello_openssl_nosni": (None, (), 1),
    "clienthello_openssl_split": ("split.example.net", None, 3),
    "clienthello_curl": ("api.example.test", (b"h2", b"http/1.1"), 1),
    "clienthello_curl_tls12": ("legacy.example.test", (b"http/1.1",), 1),
}


def peek(pieces: Iterable[bytes]) -> ClientHello | NotTLS | None:
    parser = ClientHelloParser()
    for piece in pieces:
        verdict = parser.feed(piece)
        if verdict is not None:
            return verdict
    return None


def hello_of(data: bytes) -> ClientHello:
    verdict = peek([data])
    assert isinstance(verdict, ClientHello), verdict
    return verdict


def error_of(data: bytes) -> str:
    with pytest.raises(ClientHelloError) as info:
        peek([data])
    return str(info.value)


# --- a synthetic ClientHello, field by field (RFC 8446 §4.1.2) ---------------------


def vec(size_bytes: int, body: bytes) -> bytes:
    return len(body).to_bytes(size_bytes, "big") + body


def ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!H", kind) + vec(2, body)


def sni(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, vec(2, b"".join(bytes((name_type,)) + vec(2, n) for n in names)))


def alpn(*protocols: bytes) -> bytes:
    return ext(16, vec(2, b"".join(vec(1, p) for p in protocols)))


def client_hello(extensions: bytes | None, *, session_id: bytes = bytes(32),
                 suites: bytes = b"\x13\x01\x13\x02", compression: bytes = b"\x00",
                 tail: bytes = b"") -> bytes:
    body = b"\x03\x03" + bytes(32) + vec(1, session_id) + vec(2, suites) + vec(1, compression)
    if extensions is not None:
        body += vec(2, extensions)
    body += tail
    return b"\x01" + vec(3, body)


def records(handshake: bytes, fragment: int = 1 << 14, version: bytes = b"\x03\x01") -> bytes:
    out = b""
    for i in range(0, len(handshake), fragment):
        out += b"\x16" + version + vec(2, handshake[i : i + fragment])
    return out


# --- captured ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_captured_hello_whole_bytewise_every_split_and_with_trailing_data(name: str) -> None:
    data = load(name)
    server_name, protocols, record_count = CAPTURED[name]
    reference = hello_of(data)
    assert reference.server_name == server_name
    if protocols is not None:
        assert reference.alpn == protocols
    assert reference.records == record_count
    assert reference.length == len(data)  # the capture is exactly the client's first flight
    assert peek(byte_by_byte(data)) == reference
    for pieces in every_split(data):
        assert peek(pieces) == reference
    # Trailing data (early data, a second flight) changes nothing, and the
    # parser never takes it as part of the hello.
    assert peek([data + b"\x17\x03\x03\x00\x05hello"]) == reference
    parser = ClientHelloParser()
    assert parser.feed(data[:-1]) is None
    assert parser.feed(data[-1:] + b"\x00" * 100) == reference


def test_sni_is_lower_cased() -> None:
    # openssl was told -servername WWW.Example.COM
    assert b"WWW.Example.COM" in load("clienthello_openssl")
    assert hello_of(load("clienthello_openssl")).server_name == "www.example.com"


def test_split_capture_really_spans_three_records() -> None:
    data = load("clienthello_openssl_split")
    assert data[0] == 0x16 and int.from_bytes(data[3:5], "big") == 512
    hello = hello_of(data)
    assert len(hello.alpn) == 22 and hello.alpn[:2] == (b"h2", b"http/1.1")


def test_curl_offers_tls13_and_openssl_split_hello_at_every_fragment_size() -> None:
    assert 0x0304 in hello_of(load("clienthello_curl")).supported_versions
    message = client_hello(sni(b"frag.example.com") + alpn(b"h2"))
    for fragment in (1, 2, 3, 4, 5, 17, 100):
        hello = hello_of(records(message, fragment))
        assert (hello.server_name, hello.alpn) == ("frag.example.com", (b"h2",))


def test_hello_without_extensions_is_accepted() -> None:
    hello = hello_of(records(client_hello(None)))
    assert (hello.server_name, hello.alpn) == (None, ())


# --- not TLS -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (b"G", "first byte 0x47"),  # GET / HTTP/1.1
        (b"SSH-2.0-OpenSSH_9.2\r\n", "first byte 0x53"),
        (b"PROXY TCP4 ", "first byte 0x50"),
        (b"\x17\x03\x03\x00\x10", "first byte 0x17"),  # application data first
        (b"\x80\x2e\x01\x03\x01", "SSLv2-style"),  # an SSLv2-compatible ClientHello
        (b"\x16\x02\x00", "major 2"),
    ],
)
def test_not_tls_is_told_from_the_first_bytes(first: bytes, reason: str) -> None:
    parser = ClientHelloParser()
    verdict = None
    for i in range(len(first)):
        verdict = parser.feed(first[i : i + 1])
        if verdict is not None:
            break
    assert isinstance(verdict, NotTLS) and reason in verdict.reason
    assert i <= 1  # one byte decides, two for the record version


# --- rejected ------------------------------------------------------------------------


def with_byte(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes((value,)) + data[at + 1 :]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (records(client_hello(sni(b"a.example", b"b.example"))), "two host names"),
        (records(client_hello(sni(b"a.example") + sni(b"b.example"))), "extension 0 appears twice"),
        (records(client_hello(sni(b""))), "server name length 0 outside 1..65535"),
        (records(client_hello(ext(0, b""))), "server_name_list length needs 2 bytes"),
        (records(client_hello(ext(0, vec(2, b"\x00" + vec(2, b"a.b")) + b"x"))), "1 stray bytes"),
        (records(client_hello(sni(b"bad name.example"))), "is not a host name"),
        (records(client_hello(sni(b"caf\xc3\xa9.example"))), "is not a host name"),
        (records(client_hello(sni(b"a..example"))), "is not a host name"),
        (records(client_hello(sni(b"a" * 64 + b".example"))), "is not a host name"),
        (records(client_hello(sni(b"a." * 127 + b"aa"))), "is not a host name"),
        (records(client_hello(alpn(b"h2", b""))), "protocol name length 0 outside 1..255"),
        (records(client_hello(ext(16, vec(2, b"")))), "protocol_name_list length 0 outside 2..65535"),
        (records(client_hello(ext(16, vec(2, b"\x05h2")))), "protocol name needs 5 bytes"),
        (records(client_hello(b"", session_id=bytes(33))), "legacy_session_id length 33 outside"),
        (records(client_hello(b"", suites=b"")), "cipher_suites length 0 outside"),
        (records(client_hello(b"", suites=b"\x13\x01\x13")), "odd length"),
        (records(client_hello(b"", compression=b"")), "legacy_compression_methods length 0"),
        (records(client_hello(sni(b"a.example"))[:-3] + b"\x00\x00\x00"), None),
        (records(client_hello(ext(0x1234, b"x"), tail=b"\x00")), "1 bytes after the extensions"),
        (records(b"\x02" + vec(3, bytes(40))), "type 2, not client_hello"),
        (b"\x16\x03\x01\x00\x00", "empty handshake record"),
        (b"\x16\x03\x01\x40\x01", "exceeds 2^14"),
        (records(client_hello(b""))[:5] + b"\x17\x03\x03\x00\x01x", None),
    ],
)
def test_malformed_hellos_are_errors(data: bytes, message: str | None) -> None:
    text = error_of(data)
    if message is not None:
        assert message in text


def test_length_fields_that_overrun_their_container_are_errors_not_over_reads() -> None:
    good = client_hello(sni(b"a.example") + alpn(b"h2"))
    # grow the handshake length so the body's last vector runs past the message
    bad = good[:1] + (len(good) - 4 - 1).to_bytes(3, "big") + good[4:-1]
    assert "needs" in error_of(records(bad))
    # the extensions length says more than is there
    at = good.index(sni(b"a.example")) - 2
    bad = good[:at] + b"\xff\xff" + good[at + 2 :]
    assert "extensions needs 65535 bytes" in error_of(records(bad))


def test_a_second_record_that_is_not_handshake_is_an_error() -> None:
    data = bytearray(load("clienthello_openssl_split"))
    data[5 + 512] = 0x17  # the second record becomes application data
    assert "content type 23 before the ClientHello ended" in error_of(bytes(data))


def test_the_16k_cap() -> None:
    # A hello that would need more than 16 KiB is refused once its length is read.
    huge = b"\x01" + (20000).to_bytes(3, "big")
    parser = ClientHelloParser()
    fed = 0
    with pytest.raises(ClientHelloError, match="does not fit in 16384"):
        for byte in records(huge + bytes(20000), 512):
            fed += 1
            parser.feed(bytes((byte,)))
    assert fed == 9  # 5 bytes of record header + 4 of handshake header: no more
    # Records that keep coming without completing the hello stop at the cap.
    endless = records(b"\x01\x00\x3f\xf0" + bytes(20000), 100)
    parser = ClientHelloParser()
    with pytest.raises(ClientHelloError, match="does not fit"):
        parser.feed(endless)
    assert parser.buffered == 0
    # The largest hello that fits is accepted.
    padding = CLIENTHELLO_MAX_BYTES - len(records(client_hello(ext(21, b"")))) - 5  # 2nd record
    biggest = records(client_hello(ext(21, bytes(padding))), 16000)
    assert len(biggest) == CLIENTHELLO_MAX_BYTES
    assert hello_of(biggest).length == CLIENTHELLO_MAX_BYTES


def test_parser_never_holds_more_than_the_cap() -> None:
    # Small records of a hello that claims to fit, but whose record headers push
    # it past the cap: the parser fills up to the cap, then refuses.
    stream = records(b"\x01" + (16300).to_bytes(3, "big") + bytes(16300), 100)
    parser = ClientHelloParser()
    most = 0
    with pytest.raises(ClientHelloError, match="does not fit in 16384"):
        for i in range(0, len(stream), 1000):
            parser.feed(stream[i : i + 1000])
            most = max(most, parser.buffered)
    assert 15000 < most <= CLIENTHELLO_MAX_BYTES


def test_spent_parser_refuses_more() -> None:
    parser = ClientHelloParser()
    assert isinstance(parser.feed(b"G"), NotTLS)
    with pytest.raises(RuntimeError):
        parser.feed(b"ET")
    parser = ClientHelloParser()
    with pytest.raises(ClientHelloError):
        parser.feed(b"\x16\x03\x01\x00\x00")
    with pytest.raises(ClientHelloError):
        parser.feed(b"\x00")
