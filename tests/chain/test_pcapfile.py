"""Synthesized TCP conversations in pcap files, checked by a small reader here
and, when it is installed, by tshark with checksum validation on."""

from __future__ import annotations

import errno
import io
import ipaddress
import os
import random
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from midway.chain.pcapfile import (
    DEFAULT_SNAPLEN,
    LINKTYPE_RAW,
    MAX_SEGMENT,
    PacketSink,
    PcapWriter,
    RotatingPcapFile,
    TcpConversation,
    internet_checksum,
)

from ..helpers import needs

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason=needs("tshark", apt="tshark"))
T0 = 1714566896.25

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

BODY = bytes(random.Random(3).getrandbits(8) for _ in range(200_000))  # > 65535
REQUEST = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nUser-Agent: midway-test\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
)


# --- a reader that checks what it reads --------------------------------------


def slow_checksum(data: bytes) -> int:
    """RFC 1071 as written: 16-bit words, end-around carry, complement."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass
class Seg:
    t: float
    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    ack: int
    flags: int
    payload: bytes
    options: bytes


def read_pcap(data: bytes) -> list[Seg]:
    magic, major, minor, zone, sigfigs, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, zone, sigfigs, linktype) == (0xA1B2C3D4, 2, 4, 0, 0, 101)
    segs, pos = [], 24
    while pos < len(data):
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, pos)
        assert incl == orig <= snaplen
        pkt = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        if pkt[0] >> 4 == 4:
            assert pkt[0] == 0x45
            total, proto = struct.unpack_from("!H", pkt, 2)[0], pkt[9]
            assert total == len(pkt) <= 0xFFFF and proto == 6
            assert slow_checksum(pkt[:20]) == 0, "bad IPv4 header checksum"
            src_ip, dst_ip = pkt[12:16], pkt[16:20]
            tcp = pkt[20:]
            pseudo = src_ip + dst_ip + struct.pack("!xBH", 6, len(tcp))
        else:
            assert pkt[0] >> 4 == 6
            plen, nxt = struct.unpack_from("!HB", pkt, 4)
            assert plen == len(pkt) - 40 <= 0xFFFF and nxt == 6
            src_ip, dst_ip = pkt[8:24], pkt[24:40]
            tcp = pkt[40:]
            pseudo = src_ip + dst_ip + struct.pack("!I3xB", len(tcp), 6)
        assert slow_checksum(pseudo + tcp) == 0, "bad TCP checksum"
        sport, dport, seq, ack, off_flags = struct.unpack_from("!HHIIH", tcp)
        hlen = (off_flags >> 12) * 4
        segs.append(
            Seg(
                sec + usec / 1e6,
                (str(ipaddress.ip_address(src_ip)), sport),
                (str(ipaddress.ip_address(dst_ip)), dport),
                seq,
                ack,
                off_flags & 0x3F,
                tcp[hlen:],
                tcp[20:hlen],
            )
        )
    return segs


def check_tcp_consistency(segs: list[Seg]) -> dict[tuple[str, int], bytes]:
    """Walk the conversation as a receiver would: every segment starts where
    its sender's previous one ended, and every ACK acknowledges exactly what
    the other side has sent.  Returns the byte stream sent by each endpoint."""
    next_seq: dict[tuple[str, int], int] = {}
    streams: dict[tuple[str, int], bytearray] = {}
    for s in segs:
        if s.flags & SYN:
            next_seq[s.src] = (s.seq + 1) % 2**32
            streams[s.src] = bytearray()
        else:
            if s.src not in next_seq:  # joined mid-stream
                next_seq[s.src] = s.seq
                streams[s.src] = bytearray()
            assert s.seq == next_seq[s.src], f"sequence gap at {s}"
            streams[s.src] += s.payload
            next_seq[s.src] = (s.seq + len(s.payload) + (1 if s.flags & FIN else 0)) % 2**32
        if s.flags & ACK and s.dst in next_seq:
            assert s.ack == next_seq[s.dst], f"wrong ACK in {s}"
    return {k: bytes(v) for k, v in streams.items()}


# --- the HTTP conversation used by several tests ------------------------------


def http_conversation(
    sink: PacketSink,
    client: tuple[str, int],
    server: tuple[str, int],
    client_isn: int | None = None,
    server_isn: int | None = None,
) -> TcpConversation:
    conv = TcpConversation(sink, client, server, client_isn=client_isn, server_isn=server_isn)
    conv.open(T0)
    conv.data(True, REQUEST[:20], T0 + 0.010)
    conv.data(True, REQUEST[20:], T0 + 0.011)
    conv.fin(True, T0 + 0.020)  # client half-closes; the server goes on
    conv.data(False, RESPONSE[:1000], T0 + 0.030)
    conv.data(False, RESPONSE[1000:], T0 + 0.040)  # > 65535 bytes: several segments
    conv.fin(False, T0 + 0.050)
    return conv


def write_http(
    path: Path,
    client: tuple[str, int],
    server: tuple[str, int],
    client_isn: int | None = None,
    server_isn: int | None = None,
) -> TcpConversation:
    with path.open("wb") as f:
        return http_conversation(PcapWriter(f), client, server, client_isn, server_isn)


# --- pure checks -------------------------------------------------------------


def test_global_header_bytes() -> None:
    buf = io.BytesIO()
    w = PcapWriter(buf)
    assert buf.getvalue() == bytes.fromhex("d4c3b2a1 0200 0400 00000000 00000000 00000400 65000000")
    assert w.bytes_written == 24
    assert LINKTYPE_RAW == 101 and DEFAULT_SNAPLEN == 262144


@pytest.mark.parametrize("n", [0, 1, 2, 3, 20, 1001, 65536])
def test_checksum_matches_rfc1071(n: int) -> None:
    rng = random.Random(n)
    data = bytes(rng.getrandbits(8) for _ in range(n))
    assert internet_checksum(data) == slow_checksum(data)
    for special in (bytes(n), b"\xff" * n, b"\xff\xff" + bytes(n)):
        assert internet_checksum(special) == slow_checksum(special)


@pytest.mark.parametrize(
    ("client", "server"),
    [(("192.0.2.1", 50000), ("198.51.100.7", 80)), (("2001:db8::1", 50000), ("2001:db8::2", 8080))],
)
def test_conversation_is_consistent(
    tmp_path: Path, client: tuple[str, int], server: tuple[str, int]
) -> None:
    path = tmp_path / "http.pcap"
    conv = write_http(path, client, server, client_isn=0xFFFFFFF0, server_isn=2**32 - 100_000)
    segs = read_pcap(path.read_bytes())
    assert conv.packets == len(segs) and conv.finished
    # Handshake.
    assert [s.flags for s in segs[:3]] == [SYN, SYN | ACK, ACK]
    assert segs[0].seq == 0xFFFFFFF0 and segs[1].ack == 0xFFFFFFF1  # ISNs as given
    assert segs[0].options == struct.pack("!BBH", 2, 4, MAX_SEGMENT)
    # Sequence numbers wrap around 2**32 and stay consistent; streams intact.
    streams = check_tcp_consistency(segs)
    assert streams[client] == REQUEST
    assert streams[server] == RESPONSE
    # Big payloads are cut so that no IP length field overflows.
    sizes = [len(s.payload) for s in segs if s.src == server and s.payload]
    assert max(sizes) == MAX_SEGMENT and len(sizes) == 5
    # Half-close: client FIN (acknowledged), then server data, then server FIN.
    fins = [i for i, s in enumerate(segs) if s.flags & FIN]
    assert [segs[i].src for i in fins] == [client, server]
    assert all(segs[i + 1].flags == ACK and segs[i + 1].ack == segs[i].seq + 1 for i in fins)
    assert any(s.src == server and s.payload for s in segs[fins[0] :])
    # Timestamps as passed in.
    assert segs[0].t == pytest.approx(T0) and segs[-1].t == pytest.approx(T0 + 0.05)


def test_reset_and_mid_stream_start() -> None:
    buf = io.BytesIO()
    conv = TcpConversation(
        PcapWriter(buf), ("10.0.0.1", 1), ("10.0.0.2", 2), client_isn=1, server_isn=500
    )
    conv.data(True, b"hello", T0)  # no open(): joined mid-stream
    conv.fin(True, T0)
    conv.reset(False, T0 + 1)
    segs = read_pcap(buf.getvalue())
    check_tcp_consistency(segs)
    assert segs[0].flags == PSH | ACK and segs[0].seq == 2
    assert segs[-1].flags == RST | ACK and segs[-1].seq == 501 and segs[-1].ack == 2 + 5 + 1
    assert conv.finished
    with pytest.raises(RuntimeError, match="reset"):
        conv.data(False, b"late", T0 + 2)
    with pytest.raises(RuntimeError, match="reset"):
        conv.reset(True, T0 + 2)


def test_times_never_go_back_within_a_conversation() -> None:
    """An event dated before what the conversation last wrote (a reply read at
    T0 + 1 but recorded after a request sent at T0 + 2, midway's queue for it
    being full) is written at the last time: Wireshark reads a stream in file
    order, and a stream going back in time shows negative deltas and RTTs."""
    buf = io.BytesIO()
    conv = TcpConversation(PcapWriter(buf), ("10.0.0.1", 1), ("10.0.0.2", 2))
    conv.open(T0)
    conv.data(True, b"request 2", T0 + 2)
    conv.data(False, b"reply 1", T0 + 1)
    conv.data(False, b"reply 2", T0 + 3)
    conv.fin(True, T0 + 2.5)
    times = [seg.t for seg in read_pcap(buf.getvalue())]
    assert times == sorted(times)
    assert times[3:] == pytest.approx([T0 + 2] * 4 + [T0 + 3] * 4)


def test_data_after_fin_is_refused_but_other_side_may_send() -> None:
    conv = TcpConversation(PcapWriter(io.BytesIO()), ("10.0.0.1", 1), ("10.0.0.2", 2))
    conv.open(T0)
    conv.fin(True, T0)
    with pytest.raises(RuntimeError, match="FIN"):
        conv.data(True, b"x", T0)
    with pytest.raises(RuntimeError, match="FIN"):
        conv.fin(True, T0)
    conv.data(False, b"still fine", T0)
    assert not conv.finished


def test_mixed_families_become_ipv6_and_mapped_addresses_ipv4() -> None:
    buf = io.BytesIO()
    TcpConversation(PcapWriter(buf), ("::1", 1), ("10.0.0.2", 2)).open(T0)
    segs = read_pcap(buf.getvalue())
    assert segs[0].src == ("::1", 1) and segs[0].dst == ("::ffff:a00:2", 2)
    buf = io.BytesIO()
    TcpConversation(PcapWriter(buf), ("::ffff:10.0.0.1", 1), ("10.0.0.2", 2)).open(T0)
    assert read_pcap(buf.getvalue())[0].src == ("10.0.0.1", 1)


@pytest.mark.parametrize(
    ("client", "kwargs"),
    [
        (("localhost", 1), {}),
        (("10.0.0.1", 70000), {}),
        (("10.0.0.1", 1), {"max_segment": 0}),
        (("10.0.0.1", 1), {"client_isn": 2**32}),
        (("10.0.0.1", 1), {"max_segment": MAX_SEGMENT + 1}),
    ],
)
def test_bad_arguments(client: tuple[str, int], kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        TcpConversation(PcapWriter(io.BytesIO()), client, ("10.0.0.2", 2), **kwargs)  # type: ignore[arg-type]


def test_small_max_segment_and_snaplen() -> None:
    buf = io.BytesIO()
    conv = TcpConversation(
        PcapWriter(buf, snaplen=60), ("10.0.0.1", 1), ("10.0.0.2", 2), max_segment=100
    )
    conv.data(True, b"a" * 250, T0)
    data = buf.getvalue()
    assert struct.unpack_from("<I", data, 16)[0] == 60  # snaplen in the header
    incl, orig = struct.unpack_from("<II", data, 24 + 8)
    assert (incl, orig) == (60, 140)  # cut to snaplen, real length kept
    assert conv.packets == 6  # 100 + 100 + 50, each acknowledged


def test_negative_time_is_refused() -> None:
    with pytest.raises(ValueError):
        PcapWriter(io.BytesIO()).write_packet(-1.0, b"x")


# --- rotation ----------------------------------------------------------------


def test_rotation_keeps_files_bounded_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    with RotatingPcapFile(path, max_bytes=100_000, keep=2) as sink:
        for i in range(3):
            http_conversation(sink, ("10.0.0.1", 40000 + i), ("10.0.0.2", 80))
        assert sink.rotations > 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cap.pcap", "cap.pcap.1", "cap.pcap.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 100_000
        segs = read_pcap(p.read_bytes())  # each file has its own header
        check_tcp_consistency(segs)  # conversations continue mid-stream
        assert segs


def test_rotation_loses_nothing_when_keep_is_large(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    path.write_bytes(b"previous capture")  # an existing file is rotated away, not lost
    sink = RotatingPcapFile(path, max_bytes=70_000, keep=50)
    conv = http_conversation(sink, ("10.0.0.1", 40000), ("10.0.0.2", 80))
    sink.close()
    sink.close()
    files = [path] + [Path(f"{path}.{i}") for i in range(1, sink.rotations + 2)]
    assert files[-1].read_bytes() == b"previous capture"
    segs = [s for f in reversed(files[:-1]) for s in read_pcap(f.read_bytes())]
    assert len(segs) == conv.packets
    streams = check_tcp_consistency(segs)
    assert streams[("10.0.0.2", 80)] == RESPONSE
    with pytest.raises(ValueError, match="closed"):
        sink.write_packet(T0, b"x")


def test_rotation_keep_zero_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    with RotatingPcapFile(path, max_bytes=1000, keep=0) as sink:
        conv = TcpConversation(sink, ("10.0.0.1", 1), ("10.0.0.2", 2))
        for _ in range(50):
            conv.data(True, b"x" * 100, T0)
    assert os.listdir(tmp_path) == ["cap.pcap"]
    assert path.stat().st_size <= 1000


# --- a full disk -------------------------------------------------------------


class FullDisk(io.RawIOBase):
    """An unbuffered file on a disk with ``room`` bytes free: like write(2), a
    write takes what fits and returns how much; with no room left it fails with
    ENOSPC.  Truncating frees the room again."""

    def __init__(self, room: int) -> None:
        self.data = bytearray()
        self.room = room
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def,override]
        free = self.room - len(self.data)
        if free <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = bytes(b[:free])
        self.data[self.pos:self.pos + len(taken)] = taken
        self.pos += len(taken)
        return len(taken)

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        assert whence == 0
        self.pos = pos
        return pos

    def truncate(self, size: int | None = None) -> int:
        del self.data[self.pos if size is None else size:]
        return len(self.data)


def fill(room: int) -> tuple[FullDisk, OSError]:
    """Write an HTTP conversation to a disk of ``room`` bytes until it fails;
    the disk and the error."""
    disk = FullDisk(room)
    try:
        conv = TcpConversation(PcapWriter(disk), ("10.0.0.1", 40000), ("10.0.0.2", 80),
                               client_isn=1, server_isn=500)
        conv.open(T0)
        for i in range(100):
            conv.data(True, REQUEST, T0 + i)
            conv.data(False, RESPONSE[: 1000 + 97 * i], T0 + i + 0.5)
    except OSError as exc:
        return disk, exc
    raise AssertionError("the disk never filled up")


@pytest.mark.parametrize("room", [20, 30, 500, 4099, 100_000, 300_001])
def test_a_full_disk_leaves_whole_records_only(room: int) -> None:
    disk, exc = fill(room)
    assert exc.errno == errno.ENOSPC
    data = bytes(disk.data)
    assert len(data) <= room
    if room < 24:  # not even the file header fitted: an empty file, not half a header
        assert data == b""
        return
    segs = read_pcap(data)  # every record whole: the reader asserts each length
    assert len(data) == 24 + sum(16 + 40 + len(s.payload) + len(s.options) for s in segs)
    check_tcp_consistency(segs)
    # Not a record more could have fitted: the next one is what failed.
    assert room - len(data) < 16 + 44 + MAX_SEGMENT


def test_a_full_disk_keeps_every_record_before_the_failure() -> None:
    whole = io.BytesIO()
    reference = TcpConversation(PcapWriter(whole), ("10.0.0.1", 40000), ("10.0.0.2", 80),
                                client_isn=1, server_isn=500)
    reference.open(T0)
    reference.data(True, REQUEST, T0)
    room = len(whole.getvalue()) + 30  # the next record cannot fit
    disk, _ = fill(room)
    assert bytes(disk.data) == whole.getvalue()


@needs_tshark
def test_tshark_reads_a_capture_cut_by_a_full_disk(tmp_path: Path) -> None:
    disk, _ = fill(300_001)
    path = tmp_path / "full.pcap"
    path.write_bytes(bytes(disk.data))
    # tshark exits 2 with "cut short in the middle of a packet" otherwise.
    frames = tshark_fields(path, "frame", "frame.number")
    assert len(frames) == len(read_pcap(bytes(disk.data)))


# --- tshark ------------------------------------------------------------------

TSHARK_CHECKSUMS = ["-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE"]


def tshark(path: Path, *args: str) -> str:
    assert TSHARK is not None
    result = subprocess.run(
        [TSHARK, "-n", "-r", str(path), *TSHARK_CHECKSUMS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def tshark_fields(path: Path, display_filter: str, *fields: str) -> list[str]:
    args = ["-Y", display_filter, "-T", "fields"]
    for f in fields:
        args += ["-e", f]
    return tshark(path, *args).splitlines()


def follow_raw(path: Path) -> tuple[bytes, bytes]:
    """The reassembled payload of TCP stream 0, client side then server side."""
    out = tshark(path, "-q", "-z", "follow,tcp,raw,0")
    client, server = bytearray(), bytearray()
    body = out.split("=" * 67)[1].splitlines()
    for line in body:
        if not line or line.startswith(("Follow:", "Filter:", "Node ")):
            continue
        (server if line.startswith("\t") else client).extend(bytes.fromhex(line.strip()))
    return bytes(client), bytes(server)


@needs_tshark
@pytest.mark.parametrize(
    ("client", "server"),
    [(("192.0.2.1", 50000), ("198.51.100.7", 80)), (("2001:db8::1", 50000), ("2001:db8::2", 80))],
    ids=["ipv4", "ipv6"],
)
def test_tshark_dissects_http_without_complaint(
    tmp_path: Path, client: tuple[str, int], server: tuple[str, int]
) -> None:
    path = tmp_path / "http.pcap"
    conv = write_http(path, client, server, client_isn=0xFFFFFFF0)
    # Reads every packet, and validates every checksum as good.
    statuses = tshark_fields(path, "", "ip.checksum.status", "tcp.checksum.status")
    assert len(statuses) == conv.packets
    want = "1\t1" if ":" not in client[0] else "\t1"  # 1 = good; IPv6 has no header checksum
    assert set(statuses) == {want}
    # Nothing malformed, no expert warning or error, no TCP analysis problem.
    assert (
        tshark_fields(path, "_ws.malformed || _ws.expert.severity >= warning", "frame.number") == []
    )
    assert tshark_fields(path, "tcp.analysis.flags", "frame.number") == []
    # HTTP is dissected, the response reassembled across segments.
    assert tshark_fields(path, 'http.request.method == "GET"', "http.request.uri") == [
        "/index.html"
    ]
    assert tshark_fields(path, "http.response.code == 200", "http.content_length") == [
        str(len(BODY))
    ]
    # Reassembled payload per direction is what was written.
    assert follow_raw(path) == (REQUEST, RESPONSE)


@needs_tshark
def test_tshark_filter_catches_a_bad_checksum(tmp_path: Path) -> None:
    """The test above could not fail if tshark ignored checksums: show it doesn't."""
    path = tmp_path / "bad.pcap"
    conv_path = tmp_path / "good.pcap"
    write_http(conv_path, ("192.0.2.1", 50000), ("198.51.100.7", 80))
    data = bytearray(conv_path.read_bytes())
    data[24 + 16 + 44 + 16 + 44 + 16 + 40 + 16 + 40 + 5] ^= 0x01  # a payload byte of packet 4
    path.write_bytes(data)
    assert tshark_fields(path, "_ws.expert.severity >= warning", "frame.number") == ["4"]


@needs_tshark
def test_tshark_sees_the_reset(tmp_path: Path) -> None:
    path = tmp_path / "rst.pcap"
    with path.open("wb") as f:
        conv = TcpConversation(PcapWriter(f), ("::1", 50000), ("::1", 6379))
        conv.open(T0)
        conv.data(True, b"*1\r\n$4\r\nPING\r\n", T0 + 0.001)
        conv.data(False, b"+PONG\r\n", T0 + 0.002)
        conv.reset(True, T0 + 0.003)
    assert tshark_fields(path, "tcp.flags.reset == 1", "frame.number") == [str(conv.packets)]
    # The only complaint is the reset itself (Wireshark rates any RST a warning).
    assert tshark_fields(
        path, "_ws.malformed || _ws.expert.severity >= warning", "_ws.expert.message"
    ) == ["Connection reset (RST)"]
    assert tshark_fields(path, "tcp.analysis.flags", "frame.number") == []


@needs_tshark
def test_tshark_reads_every_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    with RotatingPcapFile(path, max_bytes=80_000, keep=10) as sink:
        http_conversation(sink, ("10.0.0.1", 40000), ("10.0.0.2", 80))
    for p in tmp_path.iterdir():
        assert tshark_fields(p, "_ws.malformed", "frame.number") == []
