"""The PROXY protocol, versions 1 and 2: an incremental parser and the two builders.

Theory of operation
-------------------
A load balancer that relays a TCP connection prepends one header carrying the
original client's address; the receiver parses it, takes the address as the
peer's, and passes every later byte on unchanged.  The facts below are from the
specification, HAProxy's ``doc/proxy-protocol.txt`` (§ numbers refer to it).

Version 1 (§2.1) is one line of US-ASCII::

    PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n
    PROXY TCP6 <ipv6> <ipv6> <port> <port>\\r\\n
    PROXY UNKNOWN[ anything]\\r\\n

with exactly one space between fields, no leading zeros in IPv4 octets or
ports, and at most 107 bytes including the CRLF (the worst case, ``UNKNOWN``
followed by two full IPv6 addresses).  "If the CRLF sequence is not found in the
first 107 characters, the receiver should declare the line invalid", and it
"must not tolerate a single CR or LF character to end the line".  ``UNKNOWN``
means: use the connection's real addresses.

Version 2 (§2.2) is binary: a 16-byte fixed part, then ``len`` more bytes::

    sig[12] = 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
    ver_cmd   high nibble 2 (the only version); low nibble 0 LOCAL, 1 PROXY
    fam       high nibble 0 AF_UNSPEC, 1 AF_INET, 2 AF_INET6, 3 AF_UNIX;
              low nibble 0 UNSPEC, 1 STREAM, 2 DGRAM; any other value is invalid
    len       big-endian u16: the header is exactly 16 + len bytes

followed by the addresses (source, destination, then source and destination
ports: 12 bytes for IPv4, 36 for IPv6, 2 x 108 for AF_UNIX) and then TLVs
(``type`` u8, ``length`` u16 big-endian, ``value``) up to the end of the header.
A ``LOCAL`` command (a health check from the proxy itself) means: use the real
endpoints and "discard the protocol block including the family".  An
unspecified family or transport also means the real endpoints (§2.2: "the
receiver should ignore address information").  TLV types read here: ALPN 0x01,
AUTHORITY 0x02 (the client's SNI, UTF-8), CRC32C 0x03 (checked when present,
§2.2.3: the CRC-32C of the whole header with the checksum field zeroed), NOOP
0x04, UNIQUE_ID 0x05 (at most 128 bytes), SSL 0x20 (``client`` u8 flags,
``verify`` u32, then sub-TLVs VERSION 0x21, CN 0x22, CIPHER 0x23, SIG_ALG 0x24,
KEY_ALG 0x25) and NETNS 0x30 (US-ASCII).  Others are kept as raw bytes.

Parsing
-------
:class:`ProxyProtocolParser` is a small state machine with no I/O::

    parser = ProxyProtocolParser("any")
    header = parser.feed(chunk)         # None until the header is complete
    ...                                 # (raises ProxyProtocolError if invalid)
    peer = header.source or real_peer   # None for LOCAL, UNKNOWN, unspecified
    forward(parser.rest)                # bytes after the header, untouched

It accepts the header split across any number of segments (§2 allows a receiver
to be "tolerant to partial headers"; nginx's bug #1400 was rejecting a v2 header
split in two) and rejects as early as the bytes allow: a first byte that starts
neither signature, a signature mismatch, a bad version, command, family or
transport nibble, and a ``len`` that would exceed the cap are refused before any
more is read.  It never buffers more than the cap (107 bytes for v1,
``max_length`` for v2) and never looks at bytes after the header, which it hands
back in :attr:`ProxyProtocolParser.rest`.  "any" tells the two versions apart by
the first byte (``P`` or CR); the specification's "16 bytes, or 8" rule is for a
receiver that peeks once and cannot wait for more.

The v2 cap defaults to 16384 bytes, not the format's 16 + 65535: HAProxy reads
the header into one buffer of ``tune.bufsize`` (16384 by default), so a header
it would accept fits, and a pending connection costs at most that much memory.

Building
--------
:func:`build_v1`, :func:`build_v2` and :func:`build_v2_local` write what
``proxy_protocol_out`` sends: v1 as HAProxy writes it (``UNKNOWN`` when an
address is not known), v2 with optional ALPN, AUTHORITY and UNIQUE_ID TLVs and
an optional CRC32C.  An IPv4 address paired with an IPv6 one is sent as its
IPv4-mapped IPv6 form (``::ffff:a.b.c.d``), as HAProxy does, so both ends share
one family.
"""

from __future__ import annotations

import ipaddress
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from midway.errors import MidwayError
from midway.layers.crc32c import crc32c

__all__ = [
    "Address",
    "Mode",
    "ProxyHeader",
    "ProxyProtocolError",
    "ProxyProtocolParser",
    "SslInfo",
    "V1_MAX_LENGTH",
    "V2_DEFAULT_MAX_LENGTH",
    "V2_HEADER_LENGTH",
    "V2_SIGNATURE",
    "build_v1",
    "build_v2",
    "build_v2_local",
]

Mode = Literal["v1", "v2", "any"]
# (host, port) for IPv4/IPv6, the host as Python writes it (``str(ip_address)``);
# a path for AF_UNIX ("\0name" for an abstract socket).
Address = tuple[str, int] | str

V1_SIGNATURE = b"PROXY "
# §2.1: "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n" => 107 chars.
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16
# The format allows 16 + 65535; HAProxy's tune.bufsize (16384) bounds what it reads.
V2_DEFAULT_MAX_LENGTH = 16384
# The smallest cap that still admits every address block (AF_UNIX: 2 x 108).
_V2_MIN_CAP = V2_HEADER_LENGTH + 216

# §2.2: the 13th byte's high nibble is the version, the low one the command.
_V2_VERSION = 0x2
COMMAND_LOCAL = "LOCAL"
COMMAND_PROXY = "PROXY"
_COMMANDS = {0x0: COMMAND_LOCAL, 0x1: COMMAND_PROXY}
_FAMILIES = {0x0: "AF_UNSPEC", 0x1: "AF_INET", 0x2: "AF_INET6", 0x3: "AF_UNIX"}
_TRANSPORTS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
# Address block sizes of the combinations §2.2 lists; other combinations carry
# no usable address.
_ADDRESS_LENGTHS = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_UNIX_PATH_LENGTH = 108

# §2.2 TLV types.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
_UNIQUE_ID_MAX = 128  # §2.2.5: "an opaque byte sequence of up to 128 bytes"
_TLV_HEADER = 3
_TLV_VALUE_MAX = 0xFFFF

_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")  # then ipaddress decides
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyProtocolError(MidwayError):
    """A PROXY protocol header is malformed, unsupported or too long.  The
    message says what was wrong, for the log line that closes the connection."""


@dataclass(frozen=True, slots=True)
class SslInfo:
    """The PP2_TYPE_SSL TLV (§2.2.6): how the client reached the sender."""

    client: int  # PP2_CLIENT_SSL 0x01 | PP2_CLIENT_CERT_CONN 0x02 | PP2_CLIENT_CERT_SESS 0x04
    verify: int  # 0: the client presented a certificate and it was verified
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()  # every sub-TLV, in order


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY header.  ``source``/``destination`` are None when the
    connection's own addresses apply (LOCAL, UNKNOWN, an unspecified family)."""

    version: int  # 1 or 2
    command: str  # "PROXY" or "LOCAL" (v1 has only PROXY)
    family: str  # "AF_INET", "AF_INET6", "AF_UNIX" or "AF_UNSPEC"
    transport: str  # "STREAM", "DGRAM" or "UNSPEC"
    source: Address | None
    destination: Address | None
    length: int  # bytes the header took from the stream
    tlvs: tuple[tuple[int, bytes], ...] = ()  # every TLV in order, raw
    alpn: bytes | None = None
    authority: str | None = None
    unique_id: bytes | None = None
    netns: str | None = None
    ssl: SslInfo | None = None
    crc32c: int | None = None  # present and verified

    @property
    def uses_connection_addresses(self) -> bool:
        """True when the receiver must keep the connection's real addresses."""
        return self.source is None


def _fail(message: str) -> ProxyProtocolError:
    return ProxyProtocolError(f"PROXY protocol: {message}")


class ProxyProtocolParser:
    """Reads one PROXY header from the start of a stream, fed in any pieces.

    :meth:`feed` returns None while more bytes are needed, then the
    :class:`ProxyHeader` once; the bytes of that last chunk after the header are
    in :attr:`rest`.  Raises :class:`ProxyProtocolError` as soon as the input
    cannot be a valid header (the parser is then spent and raises it again).
    It never holds more than the cap: 107 bytes for v1, ``max_length`` for v2.
    """

    __slots__ = ("_mode", "_max_length", "_buf", "_version", "_total", "_error", "header", "rest")

    def __init__(self, mode: Mode = "any", max_length: int = V2_DEFAULT_MAX_LENGTH) -> None:
        if mode not in ("v1", "v2", "any"):
            raise ValueError(f"PROXY protocol mode must be 'v1', 'v2' or 'any', not {mode!r}")
        if not _V2_MIN_CAP <= max_length <= V2_HEADER_LENGTH + 0xFFFF:
            raise ValueError(f"max_length must be in [{_V2_MIN_CAP}, {V2_HEADER_LENGTH + 0xFFFF}]")
        self._mode = mode
        self._max_length = max_length
        self._buf = bytearray()
        self._version = 0  # 0 until the first byte is seen
        self._total = 0  # v2: 16 + len, once the fixed part is read
        self._error: ProxyProtocolError | None = None
        self.header: ProxyHeader | None = None
        self.rest = b""

    @property
    def buffered(self) -> int:
        """How many bytes the parser holds (never more than the cap)."""
        return len(self._buf)

    @property
    def cap(self) -> int:
        """The most bytes a header may have, given what is known so far."""
        if self._version == 1 or self._mode == "v1":
            return V1_MAX_LENGTH
        return self._max_length

    @property
    def wanted(self) -> int:
        """The most bytes worth reading next.  Never past the end of a v2 header
        (exact once its 16 fixed bytes are in: a reader that reads this much takes
        nothing after the header); for v1, whose end is its CRLF, what is left of
        the 107-byte cap, so only bytes after a v1 line can be read with it (they
        are handed back in :attr:`rest`).  At the start, 16 (a v2 header's fixed
        part; the shortest v1 line, ``PROXY UNKNOWN\\r\\n``, has 15, so one byte
        after it may be read and handed back)."""
        if self._version == 1 or (self._version == 0 and self._mode == "v1"):
            return max(V1_MAX_LENGTH - len(self._buf), 1)
        return max((self._total or V2_HEADER_LENGTH) - len(self._buf), 1)

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyHeader | None:
        """Take the next bytes of the stream; the header when it is complete."""
        if self._error is not None:
            raise self._error
        if self.header is not None:
            raise RuntimeError("the PROXY header is already parsed; pass later bytes on")
        try:
            return self._feed(memoryview(data).cast("B"))
        except ProxyProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise

    def _feed(self, data: memoryview) -> ProxyHeader | None:
        buf = self._buf
        before = len(buf)
        pos = 0
        while pos < len(data):
            want = self._want() - len(buf)
            chunk = data[pos : pos + want]
            buf += chunk
            pos += len(chunk)
            header = self._advance()
            if header is not None:
                self.header = header
                # The header's last byte came from this chunk (else it would
                # have completed earlier), so what follows it is all in `data`.
                self.rest = bytes(data[header.length - before :])
                self._buf = bytearray()
                return header
        return None

    def _want(self) -> int:
        """How many bytes the buffer may hold before the next decision."""
        if self._version == 0:
            return 1
        if self._version == 1:
            return V1_MAX_LENGTH
        return self._total or V2_HEADER_LENGTH

    def _advance(self) -> ProxyHeader | None:
        buf = self._buf
        if self._version == 0:
            first = buf[0]
            if first == V1_SIGNATURE[0] and self._mode != "v2":
                self._version = 1
            elif first == V2_SIGNATURE[0] and self._mode != "v1":
                self._version = 2
            else:
                expected = {"v1": "a v1 header", "v2": "a v2 header", "any": "a v1 or v2 header"}
                raise _fail(f"expected {expected[self._mode]}, got first byte 0x{first:02x}"
                            f"{_first_byte_hint(first)}")
        if self._version == 1:
            return self._advance_v1()
        return self._advance_v2()

    # --- version 1 ----------------------------------------------------------------

    def _advance_v1(self) -> ProxyHeader | None:
        buf = self._buf
        n = min(len(buf), len(V1_SIGNATURE))
        if buf[:n] != V1_SIGNATURE[:n]:
            raise _fail(f"v1 header must start with 'PROXY ', got {bytes(buf[:n])!r}")
        lf = buf.find(b"\n")
        cr = buf.find(b"\r")
        if cr >= 0 and cr + 1 < len(buf) and buf[cr + 1] != 0x0A:
            raise _fail("v1 header has a CR not followed by LF")
        if lf >= 0:
            if cr != lf - 1:
                raise _fail("v1 header line ends with a bare LF, not CRLF")
            return _parse_v1(bytes(buf[: lf + 1]))
        if len(buf) >= V1_MAX_LENGTH:
            raise _fail(f"v1 header has no CRLF within {V1_MAX_LENGTH} bytes")
        return None

    # --- version 2 ----------------------------------------------------------------

    def _advance_v2(self) -> ProxyHeader | None:
        buf = self._buf
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise _fail("v2 signature mismatch")
        if len(buf) > 12:
            version, command = buf[12] >> 4, buf[12] & 0x0F
            if version != _V2_VERSION:
                raise _fail(f"v2 header has version {version}, only 2 exists")
            if command not in _COMMANDS:
                raise _fail(f"v2 header has unknown command 0x{command:x}")
        if len(buf) > 13:
            family, transport = buf[13] >> 4, buf[13] & 0x0F
            if family not in _FAMILIES:
                raise _fail(f"v2 header has unknown address family 0x{family:x}")
            if transport not in _TRANSPORTS:
                raise _fail(f"v2 header has unknown transport 0x{transport:x}")
        if len(buf) < V2_HEADER_LENGTH:
            return None
        if not self._total:
            total = V2_HEADER_LENGTH + int.from_bytes(buf[14:16], "big")
            if total > self._max_length:
                raise _fail(f"v2 header of {total} bytes exceeds the cap of {self._max_length}")
            self._total = total
        if len(buf) < self._total:
            return None
        return _parse_v2(bytes(buf))


def _first_byte_hint(first: int) -> str:
    """What a refused first byte most likely is, for the operator reading the log."""
    if first == V1_SIGNATURE[0]:
        return " (a v1 header? the sender uses send-proxy: set proxy_protocol_in to v1 or any)"
    if first == V2_SIGNATURE[0]:
        return (" (a v2 header? the sender uses send-proxy-v2: set proxy_protocol_in to v2 "
                "or any)")
    if first == 0x16:
        return " (a TLS handshake: the sender sent no PROXY header)"
    if 0x20 < first < 0x7f:
        return " (plain data: the sender sent no PROXY header)"
    return ""


def _parse_v1(line: bytes) -> ProxyHeader:
    fields = line[:-2].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        # §2.1: "the receiver must ignore anything presented before the CRLF".
        return ProxyHeader(1, COMMAND_PROXY, "AF_UNSPEC", "UNSPEC", None, None, len(line))
    proto = fields[1] if len(fields) >= 2 else b""
    if proto not in (b"TCP4", b"TCP6"):
        raise _fail(f"v1 protocol must be TCP4, TCP6 or UNKNOWN, got {proto[:16]!r}")
    if len(fields) != 6:
        raise _fail(f"v1 {proto.decode()} line needs 4 fields after the protocol, "
                    f"separated by one space")
    v4 = proto == b"TCP4"
    src = _v1_address(fields[2], v4, "source")
    dst = _v1_address(fields[3], v4, "destination")
    sport = _v1_port(fields[4], "source")
    dport = _v1_port(fields[5], "destination")
    family = "AF_INET" if v4 else "AF_INET6"
    return ProxyHeader(1, COMMAND_PROXY, family, "STREAM", (src, sport), (dst, dport), len(line))


def _v1_address(field: bytes, v4: bool, which: str) -> str:
    try:
        if v4:
            if _V1_IPV4.fullmatch(field) is None:
                raise ValueError
            return str(ipaddress.IPv4Address(field.decode("ascii")))
        if _V1_IPV6.fullmatch(field) is None:
            raise ValueError
        return _ip_text(ipaddress.IPv6Address(field.decode("ascii")))
    except ValueError:
        kind = "IPv4" if v4 else "IPv6"
        raise _fail(f"v1 {which} address {field[:45]!r} is not a canonical {kind} address") from None


def _v1_port(field: bytes, which: str) -> int:
    if _V1_PORT.fullmatch(field) is None or int(field) > 0xFFFF:
        raise _fail(f"v1 {which} port {field[:8]!r} is not a decimal in 0..65535 "
                    f"without leading zeros")
    return int(field)


def _parse_v2(header: bytes) -> ProxyHeader:
    command = _COMMANDS[header[12] & 0x0F]
    family = _FAMILIES[header[13] >> 4]
    transport = _TRANSPORTS[header[13] & 0x0F]
    length = len(header)
    if command == COMMAND_LOCAL:
        # §2.2: "discard the protocol block including the family".
        return ProxyHeader(2, command, family, transport, None, None, length)
    if header[13] not in _ADDRESS_LENGTHS and header[13] != 0x00:
        # A family without a transport or the reverse: §2.2 lists no layout
        # for it, so where the TLVs would start is unknown; skip the block.
        return ProxyHeader(2, command, family, transport, None, None, length)
    addr_len = _ADDRESS_LENGTHS.get(header[13], 0)
    block = header[V2_HEADER_LENGTH:]
    if len(block) < addr_len:
        raise _fail(f"v2 {family}/{transport} needs {addr_len} address bytes, "
                    f"the header has {len(block)}")
    src: Address | None = None
    dst: Address | None = None
    if addr_len == 12:
        src = (str(ipaddress.IPv4Address(block[0:4])), int.from_bytes(block[8:10], "big"))
        dst = (str(ipaddress.IPv4Address(block[4:8])), int.from_bytes(block[10:12], "big"))
    elif addr_len == 36:
        src = (_ip_text(ipaddress.IPv6Address(block[0:16])), int.from_bytes(block[32:34], "big"))
        dst = (_ip_text(ipaddress.IPv6Address(block[16:32])), int.from_bytes(block[34:36], "big"))
    elif addr_len == 216:
        src = _unix_path(block[:_UNIX_PATH_LENGTH])
        dst = _unix_path(block[_UNIX_PATH_LENGTH : 2 * _UNIX_PATH_LENGTH])
    tlv_start = V2_HEADER_LENGTH + addr_len
    tlvs = _parse_tlvs(header, tlv_start, length, "TLV")
    fields: dict[str, object] = {}
    crc_at = -1
    for offset, kind, value in tlvs:
        if kind == PP2_TYPE_ALPN:
            fields["alpn"] = value
        elif kind == PP2_TYPE_AUTHORITY:
            fields["authority"] = _text(value, "utf-8", "AUTHORITY")
        elif kind == PP2_TYPE_CRC32C:
            if len(value) != 4:
                raise _fail(f"v2 CRC32C TLV must hold 4 bytes, not {len(value)}")
            if crc_at >= 0:
                raise _fail("v2 header has two CRC32C TLVs")
            crc_at = offset
        elif kind == PP2_TYPE_UNIQUE_ID:
            if len(value) > _UNIQUE_ID_MAX:
                raise _fail(f"v2 UNIQUE_ID TLV of {len(value)} bytes exceeds {_UNIQUE_ID_MAX}")
            fields["unique_id"] = value
        elif kind == PP2_TYPE_SSL:
            fields["ssl"] = _parse_ssl(header, offset, len(value))
        elif kind == PP2_TYPE_NETNS:
            fields["netns"] = _text(value, "ascii", "NETNS")
    if crc_at >= 0:
        received = int.from_bytes(header[crc_at : crc_at + 4], "big")
        computed = crc32c(header[:crc_at] + bytes(4) + header[crc_at + 4 :])
        if received != computed:
            raise _fail(f"v2 CRC32C mismatch: header says 0x{received:08x}, "
                        f"computed 0x{computed:08x}")
        fields["crc32c"] = received
    return ProxyHeader(
        2, command, family, transport, src, dst, length,
        tlvs=tuple((kind, value) for _, kind, value in tlvs),
        **fields,  # type: ignore[arg-type]
    )


def _parse_tlvs(data: bytes, start: int, end: int, what: str) -> list[tuple[int, int, bytes]]:
    """(offset of the value, type, value) of every TLV in ``data[start:end]``,
    which must be exactly a sequence of whole TLVs."""
    out = []
    pos = start
    while pos < end:
        if end - pos < _TLV_HEADER:
            raise _fail(f"v2 {what} truncated: {end - pos} bytes left, a TLV needs 3")
        kind = data[pos]
        size = (data[pos + 1] << 8) | data[pos + 2]
        pos += _TLV_HEADER
        if pos + size > end:
            raise _fail(f"v2 {what} 0x{kind:02x} of {size} bytes runs past the end")
        out.append((pos, kind, data[pos : pos + size]))
        pos += size
    return out


def _parse_ssl(header: bytes, offset: int, size: int) -> SslInfo:
    if size < 5:
        raise _fail(f"v2 SSL TLV must hold at least 5 bytes, not {size}")
    client = header[offset]
    verify = int.from_bytes(header[offset + 1 : offset + 5], "big")
    subs = _parse_tlvs(header, offset + 5, offset + size, "SSL sub-TLV")
    names = {
        PP2_SUBTYPE_SSL_VERSION: ("version", "ascii"),
        PP2_SUBTYPE_SSL_CN: ("cn", "utf-8"),
        PP2_SUBTYPE_SSL_CIPHER: ("cipher", "ascii"),
        PP2_SUBTYPE_SSL_SIG_ALG: ("sig_alg", "ascii"),
        PP2_SUBTYPE_SSL_KEY_ALG: ("key_alg", "ascii"),
    }
    fields: dict[str, str] = {}
    for _, kind, value in subs:
        if kind in names:
            name, encoding = names[kind]
            fields[name] = _text(value, encoding, f"SSL {name}")
    return SslInfo(client, verify, tlvs=tuple((k, v) for _, k, v in subs), **fields)


def _text(value: bytes, encoding: str, what: str) -> str:
    try:
        return value.decode(encoding)
    except UnicodeDecodeError:
        raise _fail(f"v2 {what} TLV is not {encoding.upper()} text") from None


def _ip_text(ip: ipaddress.IPv6Address) -> str:
    """Python's compressed form, but an IPv4-mapped address as ``::ffff:a.b.c.d``
    (as inet_ntop writes it, and HAProxy logs it)."""
    mapped = ip.ipv4_mapped
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


def _unix_path(raw: bytes) -> str:
    if raw[:1] == b"\0":  # Linux abstract namespace: every byte counts, up to the padding
        return "\0" + os.fsdecode(raw[1:].rstrip(b"\0"))
    return os.fsdecode(raw.split(b"\0", 1)[0])


# --- builders -------------------------------------------------------------------------

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_pair(source: tuple[str, int], destination: tuple[str, int]) -> tuple[_IP, _IP]:
    """Both addresses as ipaddress objects of one family (IPv4-mapped if mixed)."""
    try:
        src = ipaddress.ip_address(source[0])
        dst = ipaddress.ip_address(destination[0])
    except ValueError as exc:
        raise ValueError(f"a PROXY header carries IP addresses, not names: {exc}") from None
    for _, port in (source, destination):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is not in 0..65535")
    if src.version != dst.version:
        src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a
                    for a in (src, dst))
    return src, dst


def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """The v1 line for a TCP connection from ``source`` to ``destination``
    (``(ip, port)``); ``PROXY UNKNOWN`` when either is None.  Raises ValueError
    for a host that is not an IP address or a port outside 0..65535."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = _ip_pair(source, destination)
    proto = "TCP4" if src.version == 4 else "TCP6"
    texts = [str(ip) if ip.version == 4 else _ip_text(ip) for ip in (src, dst)]
    return f"PROXY {proto} {texts[0]} {texts[1]} {source[1]} {destination[1]}\r\n".encode("ascii")


def build_v2(
    source: Address | None,
    destination: Address | None,
    *,
    alpn: bytes | str | None = None,
    authority: str | None = None,
    unique_id: bytes | None = None,
    tlvs: Iterable[tuple[int, bytes]] = (),
    crc: bool = False,
    transport: Literal["STREAM", "DGRAM"] = "STREAM",
) -> bytes:
    """A v2 PROXY header: ``(ip, port)`` addresses, or two AF_UNIX paths, or (an
    address is None: not known, a unix-socket client) family AF_UNSPEC, as
    HAProxy writes for a client that has no IP address, which tells the receiver
    to keep the connection's own; then the ALPN, AUTHORITY (the client's SNI) and
    UNIQUE_ID TLVs when given, any extra ``(type, value)`` TLVs, and a CRC32C TLV
    last when ``crc`` is true.  Raises ValueError for addresses that do not fit
    the format or a header over 16 + 65535."""
    proto = 0x1 if transport == "STREAM" else 0x2
    if source is None or destination is None:
        block, fam = b"", 0x00
    elif isinstance(source, str) or isinstance(destination, str):
        if not (isinstance(source, str) and isinstance(destination, str)):
            raise ValueError("an AF_UNIX path can only be paired with another path")
        block = _unix_block(source) + _unix_block(destination)
        fam = 0x30 | proto
    else:
        src, dst = _ip_pair(source, destination)
        ports = struct.pack("!HH", source[1], destination[1])
        block = src.packed + dst.packed + ports
        fam = (0x10 if src.version == 4 else 0x20) | proto
    body = bytearray(block)
    if alpn is not None:
        body += _tlv(PP2_TYPE_ALPN, alpn.encode("ascii") if isinstance(alpn, str) else alpn)
    if authority is not None:
        body += _tlv(PP2_TYPE_AUTHORITY, authority.encode("utf-8"))
    if unique_id is not None:
        if len(unique_id) > _UNIQUE_ID_MAX:
            raise ValueError(f"UNIQUE_ID is at most {_UNIQUE_ID_MAX} bytes")
        body += _tlv(PP2_TYPE_UNIQUE_ID, unique_id)
    for kind, value in tlvs:
        body += _tlv(kind, value)
    return _finish_v2(0x20 | 0x1, fam, body, crc)


def build_v2_local(*, crc: bool = False) -> bytes:
    """A v2 LOCAL header (a connection the proxy makes for itself, e.g. a health
    check): no address, family AF_UNSPEC."""
    return _finish_v2(0x20 | 0x0, 0x00, bytearray(), crc)


def _finish_v2(ver_cmd: int, fam: int, body: bytearray, crc: bool) -> bytes:
    if crc:
        body += _tlv(PP2_TYPE_CRC32C, bytes(4))
    if len(body) > 0xFFFF:
        raise ValueError(f"a v2 header holds at most 65535 bytes after its 16, not {len(body)}")
    header = bytearray(V2_SIGNATURE + bytes((ver_cmd, fam)) + len(body).to_bytes(2, "big"))
    header += body
    if crc:
        header[-4:] = crc32c(header).to_bytes(4, "big")
    return bytes(header)


def _tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"TLV type {kind} is not a byte")
    if len(value) > _TLV_VALUE_MAX:
        raise ValueError(f"TLV 0x{kind:02x} holds at most 65535 bytes")
    return bytes((kind,)) + len(value).to_bytes(2, "big") + value


def _unix_block(path: str) -> bytes:
    raw = os.fsencode(path)
    if len(raw) > _UNIX_PATH_LENGTH:
        raise ValueError(f"AF_UNIX path of {len(raw)} bytes exceeds {_UNIX_PATH_LENGTH}")
    return raw.ljust(_UNIX_PATH_LENGTH, b"\0")
