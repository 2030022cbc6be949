"""Read TCP conversations back out of a classic pcap file (the reverse of
:mod:`midway.chain.pcapfile`), for ``midway replay``.

Usage::

    with open("capture.pcap", "rb") as f:
        for conn in read_connections(f):
            conn.client, conn.server          # ("127.0.0.1", 47294), ("127.0.0.1", 8080)
            for event in conn.events:         # in capture order
                event.from_client, event.kind, event.data   # "data" | "fin" | "rst"

Theory of operation
-------------------
:func:`read_packets` walks the classic format (draft-ietf-opsawg-pcap): either
byte order, microsecond or nanosecond timestamps, and the link types a Linux
capture uses (raw IP as midway writes it, Ethernet with VLAN tags, Linux
cooked v1 and v2, BSD loopback); another link type is refused, naming it, and
pcapng with a hint (``editcap -F pcap``).

:func:`read_connections` groups TCP segments by their two endpoints and
reassembles each direction by sequence number: a segment that repeats bytes
already taken (a retransmission) gives only its new bytes, one that starts past
the next expected byte (bytes the capture lost) is taken anyway and counted in
:attr:`RecordedConnection.gaps`.  The client is the side that sent the SYN, or,
for a connection whose handshake is not in the file, the sender of its first
packet.  A new SYN on the endpoints of a finished connection starts a new one.

midway records each proxied connection as two conversations (the client leg
and the upstream leg, see :mod:`midway.chain.pcap`) and writes both handshakes
together, the client leg's first.  :func:`upstream_legs` uses that: a
conversation whose SYN is the packet right after another's handshake is that
one's upstream leg; a conversation with no such partner stands for itself (a
capture of a direct connection by tcpdump, or a leg whose partner was a unix
socket).

Pure: reads a binary file object, never a socket.  Memory is the payload of the
file's TCP conversations.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from midway.errors import MidwayError

__all__ = ["PcapReadError", "Event", "RecordedConnection", "read_packets", "read_connections",
           "upstream_legs"]

_MAGICS = {  # magic as read little-endian -> (byte order, ticks per second)
    0xA1B2C3D4: ("<", 1_000_000), 0xD4C3B2A1: (">", 1_000_000),
    0xA1B23C4D: ("<", 1_000_000_000), 0x4D3CB2A1: (">", 1_000_000_000),
}
_PCAPNG_MAGIC = 0x0A0D0D0A  # section header block type (pcapng spec §4.1)

# Link types (tcpdump.org link-layer header types) -> bytes before the IP header,
# or a function of the frame that finds it.
LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL = 0, 1, 101, 113
LINKTYPE_IPV4, LINKTYPE_IPV6 = 228, 229
LINKTYPE_LINUX_SLL2 = 276  # what `tcpdump -i any` writes since libpcap 1.10
LINKTYPES = {LINKTYPE_NULL: "BSD loopback", LINKTYPE_ETHERNET: "Ethernet",
             LINKTYPE_RAW: "raw IP", LINKTYPE_LINUX_SLL: "Linux cooked",
             LINKTYPE_IPV4: "raw IPv4", LINKTYPE_IPV6: "raw IPv6",
             LINKTYPE_LINUX_SLL2: "Linux cooked v2"}
_ETHERTYPE_IPV4, _ETHERTYPE_IPV6, _ETHERTYPE_VLAN = 0x0800, 0x86DD, 0x8100
_IPPROTO_TCP = 6
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
_SEQ_MOD = 1 << 32

Address = tuple[str, int]


class PcapReadError(MidwayError, ValueError):
    """The file is not a classic pcap file midway can read; the message says why."""


@dataclass(frozen=True)
class Event:
    """One thing one side did, in capture order."""

    t: float
    """Wall-clock time of the packet (seconds since the epoch)."""
    from_client: bool
    kind: Literal["data", "fin", "rst"]
    data: bytes = b""


@dataclass
class RecordedConnection:
    """One TCP connection of the capture."""

    client: Address
    server: Address
    opened_at: float
    """Time of its SYN (or of its first packet, without a handshake)."""
    events: list[Event] = field(default_factory=list)
    gaps: int = 0
    """Bytes the capture is missing (segments that start past the next byte)."""
    syn_index: int | None = None
    """Packet number of its SYN in the file; ``None`` without a handshake."""
    handshake_end: int | None = None
    """Packet number of the ACK that completed its handshake."""
    _next: dict[bool, int | None] = field(default_factory=lambda: {True: None, False: None})
    _isn_server: bool = False

    def bytes_from(self, from_client: bool) -> bytes:
        """Everything one side sent, concatenated."""
        return b"".join(e.data for e in self.events if e.kind == "data" and
                        e.from_client == from_client)

    @property
    def finished(self) -> bool:
        ended = {e.from_client for e in self.events if e.kind == "fin"}
        return len(ended) == 2 or any(e.kind == "rst" for e in self.events)


def read_packets(f: BinaryIO) -> Iterator[tuple[float, int, bytes]]:
    """``(time, link type, frame)`` for every record of a classic pcap file.
    Raises :class:`PcapReadError` for anything else (pcapng, a link type not
    in :data:`LINKTYPES`) or a file cut inside a header; a last record cut
    short (a capture still being written) ends the iteration."""
    head = f.read(24)
    if len(head) < 24:
        raise PcapReadError(f"not a pcap file: {len(head)} bytes, shorter than its header")
    magic = struct.unpack("<I", head[:4])[0]
    if magic == _PCAPNG_MAGIC:
        raise PcapReadError("a pcapng file; convert it with `editcap -F pcap IN OUT`")
    if magic not in _MAGICS:
        raise PcapReadError(f"not a pcap file (magic {magic:#010x})")
    order, ticks = _MAGICS[magic]
    linktype = struct.unpack(order + "I", head[20:24])[0] & 0x0FFFFFFF
    if linktype not in LINKTYPES:
        raise PcapReadError(f"link type {linktype} is not one that is read "
                            f"({', '.join(LINKTYPES.values())})")
    record = struct.Struct(order + "IIII")
    while True:
        header = f.read(record.size)
        if len(header) < record.size:
            return
        sec, frac, caplen, _ = record.unpack(header)
        frame = f.read(caplen)
        if len(frame) < caplen:
            return
        yield sec + frac / ticks, linktype, frame


def _ip_payload(linktype: int, frame: bytes) -> bytes | None:
    """The IP packet in a frame, or ``None`` for another protocol or link type."""
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return frame
    if linktype == LINKTYPE_NULL:
        return frame[4:]
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None
        ethertype, offset = struct.unpack_from("!H", frame, 14)[0], 16
    elif linktype == LINKTYPE_LINUX_SLL2:  # protocol first, then 18 bytes to the packet
        if len(frame) < 20:
            return None
        ethertype, offset = struct.unpack_from("!H", frame, 0)[0], 20
    elif linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        ethertype, offset = struct.unpack_from("!H", frame, 12)[0], 14
        while ethertype == _ETHERTYPE_VLAN and len(frame) >= offset + 4:
            ethertype, offset = struct.unpack_from("!H", frame, offset + 2)[0], offset + 4
    else:
        return None
    return frame[offset:] if ethertype in (_ETHERTYPE_IPV4, _ETHERTYPE_IPV6) else None


@dataclass(frozen=True)
class _Segment:
    src: Address
    dst: Address
    seq: int
    flags: int
    payload: bytes


def _tcp_segment(packet: bytes) -> _Segment | None:
    """The TCP segment of an IPv4/IPv6 packet (no IPv6 extension headers), or
    ``None`` for anything else or a packet cut short."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, 2)[0]
        if packet[9] != _IPPROTO_TCP or ihl < 20:
            return None
        src_ip, dst_ip = str(ipaddress.IPv4Address(packet[12:16])), str(
            ipaddress.IPv4Address(packet[16:20]))
        tcp = packet[ihl:total]
    elif version == 6 and len(packet) >= 40:
        if packet[6] != _IPPROTO_TCP:
            return None
        length = struct.unpack_from("!H", packet, 4)[0]
        src_ip, dst_ip = str(ipaddress.IPv6Address(packet[8:24])), str(
            ipaddress.IPv6Address(packet[24:40]))
        tcp = packet[40:40 + length]
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq, _, offset_flags = struct.unpack_from("!HHIIH", tcp)
    data_at = (offset_flags >> 12) * 4
    if data_at < 20 or data_at > len(tcp):
        return None
    return _Segment((src_ip, sport), (dst_ip, dport), seq, offset_flags & 0x3F, tcp[data_at:])


def read_connections(f: BinaryIO) -> list[RecordedConnection]:
    """Every TCP connection in the file, in the order of its first packet
    (see the module doc).  Raises :class:`PcapReadError`."""
    conns: list[RecordedConnection] = []
    live: dict[frozenset[Address], RecordedConnection] = {}
    for index, (t, linktype, frame) in enumerate(read_packets(f)):
        packet = _ip_payload(linktype, frame)
        seg = _tcp_segment(packet) if packet is not None else None
        if seg is None:
            continue
        key = frozenset((seg.src, seg.dst))
        conn = live.get(key)
        syn_only = seg.flags & (_SYN | _ACK) == _SYN
        if conn is None or (syn_only and conn.finished):
            client, server = (seg.dst, seg.src) if seg.flags & _SYN and seg.flags & _ACK \
                else (seg.src, seg.dst)
            conn = live[key] = RecordedConnection(client, server, t)
            conns.append(conn)
            if syn_only:
                conn.syn_index = index
        _take(conn, seg, t, index)
    return conns


def _take(conn: RecordedConnection, seg: _Segment, t: float, index: int) -> None:
    from_client = seg.src == conn.client
    if seg.flags & _SYN:
        conn._next[from_client] = (seg.seq + 1) % _SEQ_MOD
        if not from_client:
            conn._isn_server = True
        return
    if (from_client and conn._isn_server and conn.handshake_end is None
            and conn.syn_index is not None and not seg.payload):
        conn.handshake_end = index
    expected = conn._next[from_client]
    payload, seq = seg.payload, seg.seq
    if payload and expected is not None:
        ahead = (seq - expected) % _SEQ_MOD
        if ahead >= _SEQ_MOD // 2:  # starts before the next byte: a retransmission
            payload, seq = payload[_SEQ_MOD - ahead:], expected
        elif ahead:
            conn.gaps += ahead
    if payload:
        conn.events.append(Event(t, from_client, "data", payload))
        conn._next[from_client] = (seq + len(payload)) % _SEQ_MOD
    if seg.flags & _FIN and not any(e.kind == "fin" and e.from_client == from_client
                                    for e in conn.events):  # not a retransmitted FIN
        conn.events.append(Event(t, from_client, "fin"))
    if seg.flags & _RST:
        conn.events.append(Event(t, from_client, "rst"))


def upstream_legs(conns: list[RecordedConnection]) -> list[RecordedConnection]:
    """The upstream leg of each proxied connection of a midway capture, in
    order; a conversation with no partner stands for itself (module doc)."""
    by_syn = {c.syn_index: c for c in conns if c.syn_index is not None}
    paired: set[int] = set()  # ids of conversations already in a pair
    client_legs: set[int] = set()
    for c in conns:  # in order, so that A-B C-D is never read as A-B B-C
        if id(c) in paired or c.handshake_end is None:
            continue
        partner = by_syn.get(c.handshake_end + 1)
        if partner is not None and partner is not c and id(partner) not in paired:
            paired.update((id(c), id(partner)))
            client_legs.add(id(c))
    return [c for c in conns if id(c) not in client_legs]
