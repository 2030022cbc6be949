"""Property-based tests (hypothesis) of the wire parsers, and a CI slice of the
standalone fuzzer.  Bounded: the whole file runs in seconds.

- No input makes a parser raise anything but its own error type, in any split.
- A parser never holds more than its cap, and what it reports consumed is
  exact: header length + rest = bytes fed; the rest is the input's tail.
- build -> parse round-trips for v1 and v2 with random addresses, ports, TLVs.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from midway.layers import fuzz
from midway.layers.clienthello import ClientHello, ClientHelloError, ClientHelloParser, NotTLS
from midway.layers.proxy_protocol import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyProtocolError,
    ProxyProtocolParser,
    build_v1,
    build_v2,
)
from midway.layers.routes import RoutePatternError, SniRoutes, normalize_pattern
from tests.layers.fixtures import load

BOUNDED = settings(max_examples=300, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])

SEEDS = [load(n) for n in ("proxy_v1_tcp4", "proxy_v2_tlvs", "proxy_v2_tcp6", "clienthello_curl",
                           "clienthello_openssl_split")]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A captured header or hello with a few bytes overwritten, or cut, or random."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if kind == 2:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)] or [b""]


@BOUNDED
@given(data=mutated() | st.binary(max_size=64).map(lambda b: V2_SIGNATURE + b"\x21" + b),
       cuts=st.lists(st.integers(0, 2000), max_size=4),
       mode=st.sampled_from(["v1", "v2", "any"]))
def test_proxy_parser_only_raises_its_own_error_and_accounts_for_every_byte(
        data: bytes, cuts: list[int], mode: str) -> None:
    parser = ProxyProtocolParser(mode)  # type: ignore[arg-type]
    fed = 0
    try:
        for piece in pieces(data, cuts):
            fed += len(piece)
            header = parser.feed(piece)
            assert parser.buffered <= parser.cap
            if header is not None:
                assert header.length <= (V1_MAX_LENGTH if header.version == 1 else parser.cap)
                assert header.length + len(parser.rest) == fed
                assert parser.rest == data[header.length : fed]
                break
    except ProxyProtocolError:
        pass


@BOUNDED
@given(data=mutated(), cuts=st.lists(st.integers(0, 2000), max_size=4))
def test_clienthello_parser_only_raises_its_own_error_and_stays_in_the_cap(
        data: bytes, cuts: list[int]) -> None:
    parser = ClientHelloParser()
    fed = 0
    try:
        for piece in pieces(data, cuts):
            fed += len(piece)
            verdict = parser.feed(piece)
            assert parser.buffered <= parser.cap
            if isinstance(verdict, ClientHello):
                assert verdict.length <= fed
                assert verdict.server_name is None or verdict.server_name == \
                    verdict.server_name.lower()
                break
            if isinstance(verdict, NotTLS):
                break
    except ClientHelloError:
        pass


@BOUNDED
@given(data=mutated(), cuts=st.lists(st.integers(0, 2000), max_size=3))
def test_split_points_never_change_a_verdict(data: bytes, cuts: list[int]) -> None:
    def verdicts(chunks: list[bytes]) -> tuple[object, object]:
        results: list[object] = []
        for make, error in ((ProxyProtocolParser, ProxyProtocolError),
                            (ClientHelloParser, ClientHelloError)):
            parser = make()
            got: object = None
            try:
                for chunk in chunks:
                    got = parser.feed(chunk)
                    if got is not None:
                        break
            except error:
                got = "error"
            results.append(got)
        return results[0], results[1]

    assert verdicts([data]) == verdicts(pieces(data, cuts))


ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))).filter(
    lambda a: ipaddress.IPv6Address(a).ipv4_mapped is None)
port = st.integers(0, 65535)


@BOUNDED
@given(v6=st.booleans(), data=st.data(), sport=port, dport=port, tail=st.binary(max_size=20))
def test_v1_round_trip(v6: bool, data: st.DataObject, sport: int, dport: int, tail: bytes) -> None:
    addr = ipv6 if v6 else ipv4
    src, dst = (data.draw(addr), sport), (data.draw(addr), dport)
    wire = build_v1(src, dst)
    parser = ProxyProtocolParser("v1")
    header = parser.feed(wire + tail)
    assert header is not None
    assert (header.source, header.destination, header.length) == (src, dst, len(wire))
    assert parser.rest == tail


tlv_list = st.lists(st.tuples(st.sampled_from([0x04, 0xE0, 0xEF, 0xF0, 0x10]),
                              st.binary(max_size=64)), max_size=5)


@BOUNDED
@given(v6=st.booleans(), data=st.data(), sport=port, dport=port, tlvs=tlv_list,
       alpn=st.none() | st.binary(min_size=1, max_size=20),
       authority=st.none() | st.text(max_size=40),
       unique_id=st.none() | st.binary(max_size=128), crc=st.booleans(),
       cuts=st.lists(st.integers(0, 400), max_size=3))
def test_v2_round_trip(v6: bool, data: st.DataObject, sport: int, dport: int,
                       tlvs: list[tuple[int, bytes]], alpn: bytes | None, authority: str | None,
                       unique_id: bytes | None, crc: bool, cuts: list[int]) -> None:
    addr = ipv6 if v6 else ipv4
    src, dst = (data.draw(addr), sport), (data.draw(addr), dport)
    wire = build_v2(src, dst, alpn=alpn, authority=authority, unique_id=unique_id, tlvs=tlvs,
                    crc=crc)
    parser = ProxyProtocolParser("v2")
    header = None
    for piece in pieces(wire + b"tail", cuts):
        header = parser.feed(piece)
        if header is not None:
            break
    assert header is not None
    assert (header.source, header.destination) == (src, dst)
    assert (header.alpn, header.authority, header.unique_id) == (alpn, authority, unique_id)
    assert (header.crc32c is not None) == crc
    extra = [t for t in header.tlvs if t[0] not in (0x01, 0x02, 0x03, 0x05)]
    assert extra == tlvs
    assert header.length == len(wire)


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@BOUNDED
@given(labels=st.lists(label, min_size=2, max_size=5), junk=st.text(max_size=30))
def test_routes_match_a_name_and_its_wildcard_and_refuse_only_with_their_error(
        labels: list[str], junk: str) -> None:
    name = ".".join(labels)
    parent = ".".join(labels[1:])
    r = SniRoutes([(name.upper(), "exact"), ("*." + parent, "wild")])
    assert r.match(name) == "exact"
    assert r.match("other-" + labels[0] + "." + parent) == "wild"
    assert r.match(junk) in (None, "exact", "wild")
    try:
        normalize_pattern(junk)
    except RoutePatternError:
        pass


def test_fuzz_slice_runs_clean() -> None:
    tally = fuzz.run(count=3000, seed=20240501)
    assert sum(n for k, n in tally.items() if k.startswith("proxy ")) == 3000
    # the mutations reach every verdict of both parsers
    for outcome in ("proxy header v1", "proxy header v2", "proxy error", "proxy need more",
                    "tls hello", "tls not TLS", "tls error", "tls need more"):
        assert tally[outcome] > 0, outcome


def test_fuzz_command_reports_count_and_time(capsys) -> None:  # type: ignore[no-untyped-def]
    assert fuzz.main(["--count", "200", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("200 inputs in ") and "no contract violated" in out


def test_fuzz_reports_a_contract_violation(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    def broken(data: bytes, splits: list[int]) -> tuple[str, None]:
        raise IndexError("boom")

    monkeypatch.setattr(fuzz, "check_clienthello", broken)
    assert fuzz.main(["--count", "5", "--seed", "1"]) == 1
    err = capsys.readouterr().err
    assert "unexpected IndexError: boom" in err and "input (" in err
