"""Reading conversations back out of pcap files (midway.chain.pcapread): what
midway's writer wrote comes back event for event, whatever the payloads, the
address family and the byte order; retransmissions and lost bytes; other link
types; the upstream legs of a midway capture; malformed files (fuzzed)."""

from __future__ import annotations

import io
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from midway.chain.pcapfile import PcapWriter, TcpConversation
from midway.chain.pcapread import (
    Event,
    PcapReadError,
    read_connections,
    read_packets,
    upstream_legs,
)

T0 = 1714566896.25
CLIENT, SERVER = ("10.0.0.1", 50000), ("10.0.0.2", 80)


def capture(write: object) -> io.BytesIO:
    buf = io.BytesIO()
    write(PcapWriter(buf))  # type: ignore[operator]
    buf.seek(0)
    return buf


def http(pcap: PcapWriter, client: tuple[str, int] = CLIENT,
         server: tuple[str, int] = SERVER) -> None:
    conv = TcpConversation(pcap, client, server, rng=random.Random(1))
    conv.open(T0)
    conv.data(True, b"GET / HTTP/1.1\r\n\r\n", T0 + 0.1)
    conv.data(False, b"HTTP/1.1 200 OK\r\n", T0 + 0.2)
    conv.data(False, b"\r\nbody", T0 + 0.3)
    conv.fin(False, T0 + 0.4)
    conv.fin(True, T0 + 0.5)


def test_a_written_conversation_reads_back_event_for_event() -> None:
    [conn] = read_connections(capture(http))
    assert (conn.client, conn.server, conn.opened_at) == (CLIENT, SERVER, T0)
    assert [(e.from_client, e.kind, e.data) for e in conn.events] == [
        (True, "data", b"GET / HTTP/1.1\r\n\r\n"),
        (False, "data", b"HTTP/1.1 200 OK\r\n"),
        (False, "data", b"\r\nbody"),
        (False, "fin", b""), (True, "fin", b"")]
    assert conn.events[1].t == pytest.approx(T0 + 0.2, abs=1e-6)
    assert conn.gaps == 0 and conn.finished


@settings(max_examples=50, deadline=None)
@given(chunks=st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=300)),
                       max_size=10),
       v6=st.booleans(), isn=st.integers(0, 2**32 - 1), reset=st.booleans())
def test_any_conversation_reads_back(chunks: list[tuple[bool, bytes]], v6: bool, isn: int,
                                     reset: bool) -> None:
    client, server = (("::1", 40000), ("::2", 6379)) if v6 else (CLIENT, SERVER)

    def write(pcap: PcapWriter) -> None:
        # max_segment 100: payloads are cut into segments, and the sequence
        # numbers wrap when the ISN is near 2**32.
        conv = TcpConversation(pcap, client, server, client_isn=isn, server_isn=isn,
                               max_segment=100)
        conv.open(T0)
        for from_client, data in chunks:
            conv.data(from_client, data, T0)
        if reset:
            conv.reset(False, T0)

    [conn] = read_connections(capture(write))
    for side in (True, False):
        assert conn.bytes_from(side) == b"".join(d for c, d in chunks if c == side)
    assert [e.kind for e in conn.events if e.kind != "data"] == (["rst"] if reset else [])
    assert conn.gaps == 0


def raw_segment(src: tuple[str, int], dst: tuple[str, int], seq: int, flags: int,
                payload: bytes = b"") -> bytes:
    """An IPv4 packet with a TCP segment (checksums left 0: the reader ignores them)."""
    tcp = struct.pack("!HHIIHHHH", src[1], dst[1], seq, 0, 5 << 12 | flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6, 0,
                     bytes(map(int, src[0].split("."))), bytes(map(int, dst[0].split("."))))
    return ip + tcp + payload


def test_retransmissions_count_once_and_lost_bytes_are_counted() -> None:
    def write(pcap: PcapWriter) -> None:
        for seq, payload in ((100, b"hello"), (100, b"hello"), (103, b"lo wor"),
                             (120, b"!")):
            pcap.write_packet(T0, raw_segment(CLIENT, SERVER, seq, 0x18, payload))

    [conn] = read_connections(capture(write))
    # No handshake: the first packet's sender is the client.
    assert conn.client == CLIENT and conn.syn_index is None
    assert conn.bytes_from(True) == b"hello wor!"  # 109-119 lost
    assert conn.gaps == 120 - 109


def test_ethernet_frames_and_big_endian_files() -> None:
    frames = [b"\x00" * 12 + b"\x08\x00" + raw_segment(CLIENT, SERVER, 1, 0x18, b"abc"),
              b"\x00" * 12 + b"\x81\x00\x00\x05\x08\x00" + raw_segment(CLIENT, SERVER, 4, 0x18,
                                                                          b"def"),
              b"\x00" * 12 + b"\x08\x06" + b"arp"]
    data = struct.pack(">IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1)  # nanoseconds
    for frame in frames:
        data += struct.pack(">IIII", 1, 500_000_000, len(frame), len(frame)) + frame
    [(t, linktype, _), *_] = read_packets(io.BytesIO(data))
    assert (t, linktype) == (1.5, 1)
    [conn] = read_connections(io.BytesIO(data))
    assert conn.bytes_from(True) == b"abcdef"


def linktype_file(linktype: int, frames: list[bytes]) -> bytes:
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    for frame in frames:
        data += struct.pack("<IIII", 1, 0, len(frame), len(frame)) + frame
    return data


def test_linux_cooked_v2_frames_as_tcpdump_i_any_writes_them() -> None:
    # tcpdump -i any (libpcap 1.10 on) writes LINKTYPE_LINUX_SLL2: protocol, 2
    # reserved bytes, interface index, ARPHRD type, packet type, address length
    # and 8 address bytes.  Such a capture read as no TCP connection at all.
    def sll2(protocol: int, packet: bytes) -> bytes:
        return struct.pack("!HHIHBB8s", protocol, 0, 1, 772, 0, 6, b"") + packet

    data = linktype_file(276, [sll2(0x0800, raw_segment(CLIENT, SERVER, 1, 0x18, b"abc")),
                               sll2(0x0806, b"arp" * 10),
                               sll2(0x0800, raw_segment(SERVER, CLIENT, 1, 0x18, b"ok")),
                               b"short"])
    [conn] = read_connections(io.BytesIO(data))
    assert (conn.bytes_from(True), conn.bytes_from(False)) == (b"abc", b"ok")


def test_a_link_type_not_read_is_named() -> None:
    # It read as "no TCP connection recorded", whatever the file held.
    with pytest.raises(PcapReadError, match=r"link type 147 is not one that is read \(.*"
                                            r"Linux cooked v2\)"):
        read_connections(io.BytesIO(linktype_file(147, [raw_segment(CLIENT, SERVER, 1, 0x18)])))


def test_the_upstream_leg_of_each_proxied_connection() -> None:
    # midway writes both handshakes of a connection together, client leg first;
    # two connections accepted back to back must not pair the wrong legs.
    legs = [(("127.0.0.1", 5000 + i), ("127.0.0.1", 8080 if i % 2 == 0 else 6379))
            for i in range(4)]

    def write(pcap: PcapWriter) -> None:
        convs = [TcpConversation(pcap, c, s, rng=random.Random(i))
                 for i, (c, s) in enumerate(legs)]
        for conv in convs:
            conv.open(T0)
        for i, conv in enumerate(convs):
            conv.data(True, b"req %d" % i, T0)

    conns = read_connections(capture(write))
    assert [c.client[1] for c in upstream_legs(conns)] == [5001, 5003]
    alone = read_connections(capture(http))
    assert upstream_legs(alone) == alone  # a conversation with no partner stands alone


def test_a_new_syn_after_a_finished_connection_starts_another() -> None:
    def write(pcap: PcapWriter) -> None:
        http(pcap)
        http(pcap)  # the same ports again

    assert len(read_connections(capture(write))) == 2


@pytest.mark.parametrize(("data", "fragment"), [
    (b"", "shorter than its header"),
    (struct.pack("<I", 0x0A0D0D0A) + b"\0" * 28, "pcapng"),
    (b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 8, "not a pcap file"),
])
def test_files_that_are_not_classic_pcap_are_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(PcapReadError, match=fragment):
        read_connections(io.BytesIO(data))


def test_a_capture_cut_short_reads_up_to_the_cut() -> None:
    whole = capture(http).getvalue()
    [conn] = read_connections(io.BytesIO(whole[:-30]))
    assert conn.events[0] == Event(conn.events[0].t, True, "data", b"GET / HTTP/1.1\r\n\r\n")


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=200), cut=st.integers(0, 400))
def test_garbage_never_raises_anything_but_a_read_error(tail: bytes, cut: int) -> None:
    data = capture(http).getvalue()
    data = data[:24] + bytes(a ^ b for a, b in zip(data[24:24 + cut], tail + bytes(400),
                                                     strict=False)) + data[24 + cut:]
    try:
        read_connections(io.BytesIO(data))
    except PcapReadError:
        pass


@settings(max_examples=200, deadline=None)
@given(linktype=st.sampled_from([0, 1, 101, 113, 228, 229, 276]),
       frames=st.lists(st.binary(max_size=80), max_size=6))
def test_garbage_frames_of_every_link_type_read_as_nothing_or_segments(
        linktype: int, frames: list[bytes]) -> None:
    try:
        read_connections(io.BytesIO(linktype_file(linktype, frames)))
    except PcapReadError:
        pass
