"""Classic libpcap files of synthesized TCP conversations, for Wireshark/tshark.

Theory of operation
-------------------
midway sees a connection as byte chunks and events (open, data, half-close,
reset), never as packets.  To let Wireshark dissect what went through, this
module makes up the packets a single TCP connection between the client and the
upstream server would have carried, and writes them to a classic libpcap file::

    with open("capture.pcap", "wb") as f:
        pcap = PcapWriter(f)
        conv = TcpConversation(pcap, client=("10.0.0.1", 50000), server=("10.0.0.2", 80))
        conv.open(t0)                                   # SYN, SYN-ACK, ACK
        conv.data(True, b"GET / HTTP/1.1\\r\\n\\r\\n", t1)  # segment + ACK
        conv.fin(True, t2)                              # FIN + ACK, one side
        conv.data(False, response, t3)
        conv.fin(False, t4)

The file format is the original one (draft-ietf-opsawg-pcap): a 24-byte global
header, then per packet a 16-byte record header and the packet bytes.  Choices:

- Link type ``LINKTYPE_RAW`` (101): each packet starts at its IP header, and
  readers tell IPv4 from IPv6 by the version nibble.  No made-up MAC addresses;
  Wireshark, tshark and tcpdump all read it.
- Microsecond timestamps (magic ``0xa1b2c3d4``), the variant every reader
  understands; a ``time.time()`` float holds no more than microseconds anyway.
- Little-endian header fields; readers detect the byte order from the magic.

Every packet carries correct checksums (IPv4 header, TCP over the pseudo
header), so checksum validation in Wireshark stays quiet.  Sequence and
acknowledgement numbers follow RFC 9293: SYN and FIN each take one sequence
number, and every data segment and FIN is acknowledged at once by a bare ACK
from the other side.  Nothing is ever in flight unacknowledged beyond one
segment, so Wireshark's analysis sees no lost segments and no full windows.
Payloads larger than :data:`MAX_SEGMENT` are cut into several segments, since
an IPv4 total length (or IPv6 payload length) is a 16-bit field.

A conversation whose :meth:`TcpConversation.open` was never called (a capture
attached to a connection already open) starts with its first data segment, as
a capture started mid-connection would; Wireshark handles that.

:class:`RotatingPcapFile` limits disk use: when the next record would take the
current file past ``max_bytes``, it starts a new file with its own global
header, keeping ``keep`` older ones.  Conversations in progress simply go on in
the new file, so there Wireshark sees them mid-stream, without their handshake.

Nothing here is thread-safe: one event loop owns a writer and its conversations.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import random
import struct
from typing import BinaryIO, Protocol, Self

__all__ = [
    "DEFAULT_SNAPLEN",
    "GLOBAL_HEADER_SIZE",
    "LINKTYPE_RAW",
    "MAX_SEGMENT",
    "PCAP_MAGIC_USEC",
    "RECORD_HEADER_SIZE",
    "PacketSink",
    "PcapWriter",
    "RotatingPcapFile",
    "TcpConversation",
    "internet_checksum",
]

PCAP_MAGIC_USEC = 0xA1B2C3D4
"""Classic pcap, microsecond timestamps (draft-ietf-opsawg-pcap §4)."""
PCAP_VERSION = (2, 4)
"""The only version of the classic format in use since libpcap 0.4 (1998)."""
LINKTYPE_RAW = 101
"""Raw IP, version from the first nibble (tcpdump.org link-layer header types)."""
DEFAULT_SNAPLEN = 262144
"""tcpdump's and libpcap's default snapshot length (MAXIMUM_SNAPLEN, 2**18):
larger than any packet written here, so nothing is cut short by default."""

log = logging.getLogger("midway")

_GLOBAL_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")
GLOBAL_HEADER_SIZE = _GLOBAL_HEADER.size  # 24
RECORD_HEADER_SIZE = _RECORD_HEADER.size  # 16

_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_IPV6_HEADER = struct.Struct("!IHBB16s16s")
_TCP_HEADER = struct.Struct("!HHIIHHHH")
_IPV4_HEADER_SIZE = 20  # RFC 791, no options
_TCP_HEADER_SIZE = 20  # RFC 9293, no options

MAX_SEGMENT = 0xFFFF - _IPV4_HEADER_SIZE - _TCP_HEADER_SIZE
"""65495: the most TCP payload one IPv4 packet can carry (16-bit total length
minus the two headers).  Used for IPv6 too (whose limit is 20 bytes higher),
so both families cut a payload the same way."""

_IPPROTO_TCP = 6
_IP_TTL = 64  # RFC 1700's recommended default TTL, and Linux's
_IPV4_DONT_FRAGMENT = 0x4000
_TCP_WINDOW = 0xFFFF  # largest window without the window-scale option
_TCP_OPT_MSS = 2  # RFC 9293 §3.2: kind 2, length 4

_FIN, _SYN, _RST, _PSH, _ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_SEQ_MOD = 1 << 32

Address = tuple[str, int]


def internet_checksum(data: bytes) -> int:
    """The RFC 1071 16-bit one's complement checksum of ``data``.

    Summing 16-bit words with end-around carry is arithmetic modulo 0xFFFF
    (2**16 ≡ 1), so the whole buffer is read as one big integer and reduced
    once, in C, instead of word by word in Python."""
    if len(data) % 2:
        data += b"\0"
    n = int.from_bytes(data, "big")
    folded = n % 0xFFFF
    if folded == 0 and n != 0:
        folded = 0xFFFF  # one's complement "negative zero": the sum of non-zero words
    return ~folded & 0xFFFF


class PacketSink(Protocol):
    """Where a :class:`TcpConversation` writes its packets."""

    def write_packet(self, t: float, packet: bytes) -> None:
        """Write one packet captured at wall-clock time ``t``."""


def _timestamp(t: float) -> tuple[int, int]:
    if t < 0:
        raise ValueError(f"timestamp must not be negative: {t}")
    return divmod(round(t * 1_000_000), 1_000_000)


class PcapWriter:
    """Writes a pcap global header to ``fileobj`` at once, then one record per
    :meth:`write_packet`.  Packets longer than ``snaplen`` are stored cut to
    ``snaplen`` bytes, with their real length in the record header.

    Whole records or nothing: each record (and the global header) goes out in
    one ``write`` call, repeated while the file takes only part of it (as a raw,
    unbuffered file does when the disk fills up).  When a write fails part-way
    (``ENOSPC``, ``EIO``...), the file is truncated back to the end of the last
    whole record and the error raised, so the capture stays readable, by
    tshark too, up to that record.  That guarantee needs ``fileobj`` unbuffered
    (``open(path, "wb", buffering=0)``): a buffered file hides how much of its
    buffer reached the disk.

    The writer does not own ``fileobj``: it never closes it and flushes it only
    when :meth:`flush` is called."""

    def __init__(self, fileobj: BinaryIO, snaplen: int = DEFAULT_SNAPLEN) -> None:
        if not 1 <= snaplen <= 0xFFFFFFFF:
            raise ValueError(f"snaplen must be between 1 and 2**32 - 1, not {snaplen}")
        self._file = fileobj
        self.snaplen = snaplen
        try:
            self._origin: int | None = fileobj.tell()
        except OSError:  # a pipe: nothing to truncate
            self._origin = None
        self.bytes_written = 0
        """Bytes written to ``fileobj`` so far, the global header included: always
        a whole number of records."""
        self._write(
            _GLOBAL_HEADER.pack(PCAP_MAGIC_USEC, *PCAP_VERSION, 0, 0, snaplen, LINKTYPE_RAW)
        )

    def _write(self, record: bytes) -> None:
        view = memoryview(record)
        done = 0
        try:
            while done < len(record):
                n = self._file.write(view[done:])
                if not n:  # None: a non-blocking file that would block
                    raise BlockingIOError(errno.EAGAIN, "the capture file took no byte")
                done += n
        except OSError:
            self._cut()
            raise
        self.bytes_written += len(record)

    def _cut(self) -> None:
        """Drop a record written in part: back to the last whole one."""
        if self._origin is None:
            return
        end = self._origin + self.bytes_written
        try:
            self._file.truncate(end)
            self._file.seek(end)
        except OSError as exc:  # a buffered file whose buffer cannot be written
            log.debug("pcap: cannot truncate the capture to its last whole record: %s", exc)

    def record_size(self, packet_len: int) -> int:
        """Bytes that writing a packet of ``packet_len`` bytes adds to the file."""
        return RECORD_HEADER_SIZE + min(packet_len, self.snaplen)

    def write_packet(self, t: float, packet: bytes) -> None:
        sec, usec = _timestamp(t)
        stored = packet[: self.snaplen]
        self._write(_RECORD_HEADER.pack(sec, usec, len(stored), len(packet)) + stored)

    def flush(self) -> None:
        self._file.flush()


class RotatingPcapFile:
    """A :class:`PacketSink` over ``path`` that keeps each file at most
    ``max_bytes`` long (a single record larger than that still gets a file of
    its own).

    Rotation is that of :class:`logging.handlers.RotatingFileHandler`: the file
    being written is always ``path``; when full it becomes ``path.1``, the
    previous ``path.1`` becomes ``path.2``, and so on up to ``path.<keep>``;
    older files are deleted.  ``keep=0`` keeps no old file: ``path`` starts
    over.  An existing ``path`` is rotated away when this object opens, not
    overwritten.  Raises ``OSError`` from the file system as it is."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        keep: int,
        *,
        snaplen: int = DEFAULT_SNAPLEN,
    ) -> None:
        if max_bytes < GLOBAL_HEADER_SIZE + RECORD_HEADER_SIZE:
            raise ValueError(
                f"max_bytes must be at least 40 (one header and one record), not {max_bytes}"
            )
        if keep < 0:
            raise ValueError(f"keep must be ≥ 0, not {keep}")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.snaplen = snaplen
        self.rotations = 0
        """Number of times a full file was rotated away."""
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            self._shift()
        self._file: BinaryIO | None = None
        self._writer = self._open()

    def _open(self) -> PcapWriter:
        # Unbuffered, so that a full disk leaves whole records (see PcapWriter).
        self._file = open(self.path, "wb", buffering=0)  # owned; closed by close()
        return PcapWriter(self._file, self.snaplen)

    def _shift(self) -> None:
        if self.keep == 0:
            return  # "wb" truncates
        oldest = f"{self.path}.{self.keep}"
        if os.path.exists(oldest):
            os.remove(oldest)
        for i in range(self.keep - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")

    def write_packet(self, t: float, packet: bytes) -> None:
        writer = self._writer
        if self._file is None:
            raise ValueError(f"{self.path}: write to a closed capture")
        if (
            writer.bytes_written > GLOBAL_HEADER_SIZE
            and writer.bytes_written + writer.record_size(len(packet)) > self.max_bytes
        ):
            self._file.close()
            self._shift()
            self.rotations += 1
            writer = self._writer = self._open()
        writer.write_packet(t, packet)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Close the current file.  Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _ipv4_header(src: bytes, dst: bytes, ident: int, payload_len: int) -> bytes:
    header = bytearray(
        _IPV4_HEADER.pack(
            0x45,  # version 4, header length 5 words
            0,  # DSCP/ECN
            _IPV4_HEADER_SIZE + payload_len,
            ident,
            _IPV4_DONT_FRAGMENT,
            _IP_TTL,
            _IPPROTO_TCP,
            0,  # checksum, filled in next
            src,
            dst,
        )
    )
    struct.pack_into("!H", header, 10, internet_checksum(bytes(header)))
    return bytes(header)


class _Side:
    """One endpoint's sending state."""

    __slots__ = ("fin_sent", "ip", "ip_id", "isn", "next_seq", "port")

    def __init__(self, ip: bytes, port: int, isn: int) -> None:
        self.ip = ip
        self.port = port
        self.isn = isn
        self.next_seq = (isn + 1) % _SEQ_MOD  # the SYN takes the ISN
        self.ip_id = 0
        self.fin_sent = False


class TcpConversation:
    """Packets of one TCP connection from ``client`` to ``server``, each an
    ``(ip, port)`` pair, written to ``sink``.

    IPv4-mapped IPv6 addresses count as IPv4.  If one side is IPv4 and the other
    IPv6 (a proxy listening on IPv6 with an IPv4 upstream) the IPv4 side is
    written as an IPv4-mapped IPv6 address, since one TCP connection has one
    address family.  Initial sequence numbers (0 to 2**32 - 1) are drawn from
    ``rng`` (a fresh ``random.Random``) unless given.  Payloads are cut into
    segments of at most ``max_segment`` bytes, also announced as the MSS option
    of the SYNs.

    Every ``t`` is the wall-clock time (``time.time()``) of the event.  Times never
    go back within the conversation: an event dated before the last packet written
    (a chunk read long ago but recorded after later traffic of this connection,
    while midway's queue for it was full) is written at that packet's time, since
    Wireshark analyses a stream in file order.  Raises
    ``ValueError`` for bad addresses, and ``RuntimeError`` for an event that
    cannot follow the ones before it (data after that side's FIN, anything
    after a reset)."""

    def __init__(
        self,
        sink: PacketSink,
        client: Address,
        server: Address,
        *,
        client_isn: int | None = None,
        server_isn: int | None = None,
        max_segment: int = MAX_SEGMENT,
        rng: random.Random | None = None,
    ) -> None:
        cip, sip = _parse_ip(client[0]), _parse_ip(server[0])
        if cip.version != sip.version:
            cip = ipaddress.IPv6Address(f"::ffff:{cip}") if cip.version == 4 else cip
            sip = ipaddress.IPv6Address(f"::ffff:{sip}") if sip.version == 4 else sip
        for port in (client[1], server[1]):
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"not a TCP port: {port}")
        for isn in (client_isn, server_isn):
            if isn is not None and not 0 <= isn < _SEQ_MOD:
                raise ValueError(f"not a TCP sequence number: {isn}")
        if not 1 <= max_segment <= MAX_SEGMENT:
            raise ValueError(f"max_segment must be between 1 and {MAX_SEGMENT}, not {max_segment}")
        rand = rng if rng is not None else random.Random()
        self._sink = sink
        self._v6 = cip.version == 6
        self._max_segment = max_segment
        self._client = _Side(
            cip.packed,
            client[1],
            client_isn if client_isn is not None else rand.getrandbits(32),
        )
        self._server = _Side(
            sip.packed,
            server[1],
            server_isn if server_isn is not None else rand.getrandbits(32),
        )
        self._reset = False
        self._last_t = -math.inf
        self.packets = 0
        """Packets written so far."""

    @property
    def finished(self) -> bool:
        """True once both sides sent FIN, or either sent RST."""
        return self._reset or (self._client.fin_sent and self._server.fin_sent)

    def _sides(self, from_client: bool) -> tuple[_Side, _Side]:
        return (self._client, self._server) if from_client else (self._server, self._client)

    def _emit(
        self,
        t: float,
        src: _Side,
        dst: _Side,
        seq: int,
        ack: int,
        flags: int,
        payload: bytes = b"",
        options: bytes = b"",
    ) -> None:
        if t < self._last_t:
            t = self._last_t
        self._last_t = t
        header_len = _TCP_HEADER_SIZE + len(options)
        tcp_len = header_len + len(payload)
        tcp = bytearray(
            _TCP_HEADER.pack(
                src.port,
                dst.port,
                seq,
                ack if flags & _ACK else 0,
                (header_len // 4) << 12 | flags,
                _TCP_WINDOW,
                0,
                0,
            )
        )
        tcp += options
        if self._v6:
            pseudo = src.ip + dst.ip + struct.pack("!I3xB", tcp_len, _IPPROTO_TCP)
        else:
            pseudo = src.ip + dst.ip + struct.pack("!xBH", _IPPROTO_TCP, tcp_len)
        struct.pack_into("!H", tcp, 16, internet_checksum(pseudo + tcp + payload))
        if self._v6:
            ip = _IPV6_HEADER.pack(6 << 28, tcp_len, _IPPROTO_TCP, _IP_TTL, src.ip, dst.ip)
        else:
            src.ip_id = (src.ip_id + 1) & 0xFFFF
            ip = _ipv4_header(src.ip, dst.ip, src.ip_id, tcp_len)
        self._sink.write_packet(t, ip + tcp + payload)
        self.packets += 1

    def _ack(self, t: float, receiver: _Side, sender: _Side) -> None:
        self._emit(t, receiver, sender, receiver.next_seq, sender.next_seq, _ACK)

    def _check(self, side: _Side, what: str) -> None:
        if self._reset:
            raise RuntimeError(f"{what} after the connection was reset")
        if side.fin_sent:
            raise RuntimeError(f"{what} after this side's FIN")

    def open(self, t: float) -> None:
        """The three-way handshake: SYN, SYN-ACK, ACK, all at time ``t``."""
        c, s = self._client, self._server
        mss = struct.pack("!BBH", _TCP_OPT_MSS, 4, self._max_segment)
        self._emit(t, c, s, c.isn, 0, _SYN, options=mss)
        self._emit(t, s, c, s.isn, c.next_seq, _SYN | _ACK, options=mss)
        self._emit(t, c, s, c.next_seq, s.next_seq, _ACK)

    def data(self, from_client: bool, payload: bytes, t: float) -> None:
        """``payload`` sent by the client (``from_client``) or the server, as
        segments of at most ``max_segment`` bytes, each acknowledged."""
        src, dst = self._sides(from_client)
        self._check(src, "data")
        view = memoryview(payload)
        for off in range(0, len(view), self._max_segment):
            chunk = bytes(view[off : off + self._max_segment])
            self._emit(t, src, dst, src.next_seq, dst.next_seq, _PSH | _ACK, chunk)
            src.next_seq = (src.next_seq + len(chunk)) % _SEQ_MOD
            self._ack(t, dst, src)

    def fin(self, from_client: bool, t: float) -> None:
        """A half-close by one side: its FIN, and the other side's ACK of it.
        The other direction may go on sending."""
        src, dst = self._sides(from_client)
        self._check(src, "FIN")
        self._emit(t, src, dst, src.next_seq, dst.next_seq, _FIN | _ACK)
        src.next_seq = (src.next_seq + 1) % _SEQ_MOD
        src.fin_sent = True
        self._ack(t, dst, src)

    def reset(self, from_client: bool, t: float) -> None:
        """An abort: one RST from that side.  Nothing may follow."""
        src, dst = self._sides(from_client)
        if self._reset:
            raise RuntimeError("reset after the connection was reset")
        self._emit(t, src, dst, src.next_seq, dst.next_seq, _RST | _ACK)
        self._reset = True
