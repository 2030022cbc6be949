"""A peek at a TLS ClientHello: the server name (SNI) and ALPN list, without terminating.

Theory of operation
-------------------
To route a TLS connection by name without decrypting it, a proxy reads the
client's first flight up to the end of the ClientHello, takes the
``server_name`` and ``application_layer_protocol_negotiation`` extensions, and
then forwards every byte it read, unchanged, to the chosen upstream: the
parser only *peeks*, it consumes nothing.

The wire facts it relies on:

- TLS records (RFC 8446 §5.1; the same since SSL 3.0): ``type`` u8 (22 is
  handshake), ``legacy_record_version`` u16 (major byte 3), ``length`` u16, then
  the fragment.  "The length MUST NOT exceed 2^14 bytes", and zero-length
  handshake fragments "MUST NOT" be sent.  A handshake message may be split
  across any number of records (§5.1: "Handshake messages MAY be fragmented
  across multiple TLSPlaintext records"), and records across any number of TCP
  segments: the parser reassembles both.
- The handshake header (§4): ``msg_type`` u8 (1 is client_hello), ``length``
  u24.  The ClientHello (§4.1.2): ``legacy_version`` u16, ``random`` [32],
  ``legacy_session_id`` <0..32>, ``cipher_suites`` <2..2^16-2>,
  ``legacy_compression_methods`` <1..2^8-1>, ``extensions`` <8..2^16-1>
  (absent in some TLS 1.0-1.2 hellos, RFC 5246 §7.4.1.2).  "There MUST NOT be
  more than one extension of the same type" (§4.2).
- ``server_name`` (RFC 6066 §3): a ServerNameList <1..2^16-1> of (``name_type``
  u8, ``HostName`` <1..2^16-1>); type 0 is host_name, "represented as a byte
  string using ASCII encoding without a trailing dot", and the list "MUST NOT
  contain more than one name of the same name_type".
- ALPN (RFC 7301 §3.1): a ProtocolNameList <2..2^16-1> of ProtocolName
  <1..2^8-1>; "Empty strings MUST NOT be included".

Verdicts.  :meth:`ClientHelloParser.feed` returns None while it needs more bytes,
a :class:`NotTLS` as soon as the first bytes cannot start a TLS handshake (one
byte is usually enough: anything but 0x16; an SSLv2-compatible hello, first byte
with the high bit set, is reported as not TLS too, since it carries no
extensions and every TLS 1.0+ client has stopped sending it), a
:class:`ClientHello` when the hello is complete, or raises
:class:`ClientHelloError` when the bytes claim to be TLS but break a length, a
"MUST" above, or the cap.  Every length is checked against its container, so
a length that points outside its vector is an error, never an over-read.

The cap is 16 KiB of peeked bytes (record headers included), the size issue 11
sets: large enough for today's biggest hellos (a post-quantum key share makes
Chrome's about 1.8 KB), small enough that a pending connection costs little.
The parser never holds more than the cap and ignores bytes fed beyond it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from midway.errors import MidwayError

__all__ = [
    "CLIENTHELLO_MAX_BYTES",
    "ClientHello",
    "ClientHelloError",
    "ClientHelloParser",
    "NotTLS",
]

CLIENTHELLO_MAX_BYTES = 16384  # issue 11: the peek is capped at 16 KiB

_CONTENT_HANDSHAKE = 22  # RFC 8446 §5.1 ContentType.handshake
_HANDSHAKE_CLIENT_HELLO = 1  # RFC 8446 §4 HandshakeType.client_hello
_RECORD_HEADER = 5
_RECORD_MAX = 1 << 14  # RFC 8446 §5.1: "MUST NOT exceed 2^14 bytes"
_HANDSHAKE_HEADER = 4
_EXT_SERVER_NAME = 0  # RFC 6066 §3
_EXT_ALPN = 16  # RFC 7301 §3.1
_EXT_SUPPORTED_VERSIONS = 43  # RFC 8446 §4.2.1
_NAME_TYPE_HOST_NAME = 0
_SESSION_ID_MAX = 32
# What a DNS name (and the underscore some internal names use) can hold; the
# SNI is lower-cased first.  Anything else is refused rather than routed or logged.
_HOST_NAME = re.compile(rb"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")
_HOST_NAME_MAX = 253  # RFC 1035 §2.3.4 (255 octets on the wire)


class ClientHelloError(MidwayError):
    """The bytes start like TLS but are not a well-formed ClientHello within the cap."""


@dataclass(frozen=True, slots=True)
class NotTLS:
    """The connection does not start with a TLS handshake record."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the ClientHello says.  ``length`` is how many bytes of the stream the
    records carrying it took (the caller forwards them all, and the rest)."""

    server_name: str | None  # lower-cased host_name, None without the extension
    alpn: tuple[bytes, ...]  # the protocols offered, in the client's order
    legacy_version: int  # 0x0303 for TLS 1.2 and 1.3
    supported_versions: tuple[int, ...]  # from the extension (TLS 1.3 clients)
    length: int
    records: int


def _fail(message: str) -> ClientHelloError:
    return ClientHelloError(f"TLS ClientHello: {message}")


class ClientHelloParser:
    """Peeks at the start of a connection, fed in any number of pieces.

    :meth:`feed` returns None (feed more), a :class:`NotTLS`, or the
    :class:`ClientHello` -- once; or raises :class:`ClientHelloError` (and
    again on any later call).  The parser copies at most ``max_bytes`` bytes;
    it never consumes: the caller still forwards every byte it fed.
    """

    __slots__ = ("_max", "_buf", "_pos", "_records", "_hello", "_done", "_error")

    def __init__(self, max_bytes: int = CLIENTHELLO_MAX_BYTES) -> None:
        if max_bytes < _RECORD_HEADER + _HANDSHAKE_HEADER:
            raise ValueError(f"max_bytes must be at least {_RECORD_HEADER + _HANDSHAKE_HEADER}")
        self._max = max_bytes
        self._buf = bytearray()  # the raw peeked bytes, at most max_bytes
        self._pos = 0  # offset in _buf of the next record header
        self._records = 0
        self._hello = bytearray()  # the handshake bytes of complete records
        self._done: ClientHello | NotTLS | None = None
        self._error: ClientHelloError | None = None

    @property
    def buffered(self) -> int:
        """How many bytes the parser holds (never more than the cap)."""
        return len(self._buf)

    @property
    def cap(self) -> int:
        return self._max

    def feed(self, data: bytes | bytearray | memoryview) -> ClientHello | NotTLS | None:
        """Take the next bytes the client sent; a verdict once there is one."""
        if self._error is not None:
            raise self._error
        if self._done is not None:
            raise RuntimeError("the ClientHello peek is finished; forward the bytes")
        room = self._max - len(self._buf)
        self._buf += memoryview(data).cast("B")[:room]
        try:
            self._done = self._advance()
        except ClientHelloError as exc:
            self._error = exc
            self._buf = bytearray()
            self._hello = bytearray()
            raise
        if self._done is not None:
            self._buf = bytearray()
            self._hello = bytearray()
        return self._done

    def _advance(self) -> ClientHello | NotTLS | None:
        buf = self._buf
        if self._pos == 0:
            verdict = _first_bytes(buf)
            if verdict is not None:
                return verdict
        while len(buf) - self._pos >= _RECORD_HEADER:
            pos = self._pos
            kind, major, size = buf[pos], buf[pos + 1], (buf[pos + 3] << 8) | buf[pos + 4]
            if kind != _CONTENT_HANDSHAKE:
                raise _fail(f"record of content type {kind} before the ClientHello ended")
            if major != 3:
                raise _fail(f"record version {major}.{buf[pos + 2]} is not 3.x")
            if size == 0:
                raise _fail("empty handshake record (RFC 8446 §5.1 forbids it)")
            if size > _RECORD_MAX:
                raise _fail(f"record of {size} bytes exceeds 2^14 (RFC 8446 §5.1)")
            end = pos + _RECORD_HEADER + size
            if end > self._max:
                raise _fail(f"does not fit in {self._max} bytes")
            if len(self._hello) < _HANDSHAKE_HEADER:
                start = pos + _RECORD_HEADER
                head = buf[start : min(end, start + _HANDSHAKE_HEADER)]  # this record only
                self._check_handshake_header(self._hello + head)
            if end > len(buf):
                return None
            self._hello += buf[pos + _RECORD_HEADER : end]
            self._pos = end
            self._records += 1
            if len(self._hello) >= _HANDSHAKE_HEADER:
                size = int.from_bytes(self._hello[1:4], "big")
                if len(self._hello) >= _HANDSHAKE_HEADER + size:
                    body = bytes(self._hello[_HANDSHAKE_HEADER : _HANDSHAKE_HEADER + size])
                    return _parse_client_hello(body, end, self._records)
        if len(buf) >= self._max:
            raise _fail(f"does not fit in {self._max} bytes")
        return None

    def _check_handshake_header(self, head: bytearray) -> None:
        """Reject early, from the first bytes of the handshake message: it must
        be a ClientHello whose length can fit in the cap."""
        if head and head[0] != _HANDSHAKE_CLIENT_HELLO:
            raise _fail(f"first handshake message has type {head[0]}, not client_hello (1)")
        if len(head) >= _HANDSHAKE_HEADER:
            size = int.from_bytes(head[1:4], "big")
            # At the least: the record headers up to this one, then the message.
            least = (self._records + 1) * _RECORD_HEADER + _HANDSHAKE_HEADER + size
            if least > self._max:
                raise _fail(f"a ClientHello of {size} bytes does not fit in {self._max} bytes")


def _first_bytes(buf: bytearray) -> NotTLS | None:
    """Decide "not TLS" from as few bytes as possible (None: could still be TLS)."""
    if not buf:
        return None
    first = buf[0]
    if first != _CONTENT_HANDSHAKE:
        if first & 0x80:
            return NotTLS(f"SSLv2-style record header (first byte 0x{first:02x})")
        return NotTLS(f"first byte 0x{first:02x} is not a TLS handshake record")
    if len(buf) >= 2 and buf[1] != 3:
        return NotTLS(f"record version major {buf[1]} is not 3")
    return None


class _Reader:
    """Bounds-checked big-endian reads over one vector; an over-read is an error."""

    __slots__ = ("data", "pos", "end", "what")

    def __init__(self, data: bytes, what: str, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end
        self.what = what

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.end - self.pos:
            raise _fail(f"{field} needs {n} bytes, {self.what} has {self.end - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, field: str) -> int:
        return int.from_bytes(self.take(n, field), "big")

    def vector(self, length_bytes: int, field: str, low: int = 0, high: int = 1 << 24) -> _Reader:
        size = self.uint(length_bytes, f"{field} length")
        if not low <= size <= high:
            raise _fail(f"{field} length {size} outside {low}..{high}")
        start = self.pos
        self.take(size, field)
        return _Reader(self.data, field, start, start + size)

    def rest(self) -> bytes:
        return self.data[self.pos : self.end]


def _parse_client_hello(body: bytes, length: int, records: int) -> ClientHello:
    r = _Reader(body, "ClientHello")
    legacy_version = r.uint(2, "legacy_version")
    r.take(32, "random")
    r.vector(1, "legacy_session_id", 0, _SESSION_ID_MAX)
    suites = r.vector(2, "cipher_suites", 2, 0xFFFE)
    if suites.left() % 2:
        raise _fail("cipher_suites has an odd length")
    r.vector(1, "legacy_compression_methods", 1, 0xFF)
    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    versions: tuple[int, ...] = ()
    if r.left():
        extensions = r.vector(2, "extensions")
        if r.left():
            raise _fail(f"{r.left()} bytes after the extensions")
        seen: set[int] = set()
        while extensions.left():
            kind = extensions.uint(2, "extension type")
            data = extensions.vector(2, f"extension {kind}")
            if kind in seen:
                raise _fail(f"extension {kind} appears twice (RFC 8446 §4.2)")
            seen.add(kind)
            if kind == _EXT_SERVER_NAME:
                server_name = _server_name(data)
            elif kind == _EXT_ALPN:
                alpn = _alpn(data)
            elif kind == _EXT_SUPPORTED_VERSIONS:
                listed = data.vector(1, "supported_versions", 2, 254)
                _no_trailing(data, "supported_versions")
                if listed.left() % 2:
                    raise _fail("supported_versions has an odd length")
                versions = tuple(listed.uint(2, "version") for _ in range(listed.left() // 2))
    return ClientHello(server_name, alpn, legacy_version, versions, length, records)


def _no_trailing(r: _Reader, what: str) -> None:
    if r.left():
        raise _fail(f"{r.left()} stray bytes after the {what} list")


def _server_name(ext: _Reader) -> str | None:
    names = ext.vector(2, "server_name_list", 1, 0xFFFF)
    _no_trailing(ext, "server_name")
    host: str | None = None
    while names.left():
        name_type = names.uint(1, "name_type")
        name = names.vector(2, "server name", 1, 0xFFFF).rest()
        if name_type != _NAME_TYPE_HOST_NAME:
            continue  # RFC 6066 allows other types; none is defined
        if host is not None:
            raise _fail("server_name lists two host names (RFC 6066 §3)")
        lowered = name.lower()
        if lowered.endswith(b"."):  # RFC 6066 says without one; be lenient, as for DNS
            lowered = lowered[:-1]
        if len(lowered) > _HOST_NAME_MAX or _HOST_NAME.fullmatch(lowered) is None:
            raise _fail(f"server name {name[:64]!r} is not a host name")
        host = lowered.decode("ascii")
    return host


def _alpn(ext: _Reader) -> tuple[bytes, ...]:
    listed = ext.vector(2, "protocol_name_list", 2, 0xFFFF)
    _no_trailing(ext, "ALPN")
    out = []
    while listed.left():
        out.append(listed.vector(1, "protocol name", 1, 0xFF).rest())
    return tuple(out)
