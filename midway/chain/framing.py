"""Incremental message framers: whole messages out of a TCP byte stream.

Theory of operation
-------------------
TCP delivers chunks, and chunk boundaries mean nothing.  A hook that wants to
look at whole protocol messages (a line of SMTP, a length-prefixed RPC, a
fixed-size record) puts a framer in front of itself::

    framer = make_framer("length:4:big")
    for message in framer.feed(chunk):       # zero, one or many per chunk
        await out.send(transform(message))
    ...
    if tail := framer.pending():              # at EOF / flush: the incomplete tail
        await out.send(tail)

A framer is a small state machine over bytes with no I/O (like h11's
``receive_data``).  :meth:`Framer.feed` takes any number of bytes and returns
the messages they complete, in order.  Every message is returned *with* its
framing (line delimiter, length prefix), so sending the messages on unchanged,
followed by :meth:`Framer.pending`, reproduces the stream byte for byte.

Memory is bounded: a framer never retains more than ``max_size`` bytes between
calls.  A message longer than ``max_size`` (delimiter or prefix included) raises
:class:`FrameTooLarge` as soon as that is known: for a length prefix, as soon as
the prefix is read, before any of the body is buffered.  The exception carries
the messages that the same :meth:`~Framer.feed` call completed before the
oversized one, so nothing already framed is lost.  A framer that has raised is
spent: the stream has no boundary to resynchronise on, so every later
:meth:`~Framer.feed` raises :class:`FramingError`.  The usual reaction is to
close the connection.
"""

from __future__ import annotations

import abc
import re
from typing import Literal

from midway.errors import MidwayError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "PREFIX_SIZES",
    "FixedFramer",
    "FrameTooLarge",
    "Framer",
    "FramingError",
    "LengthPrefixFramer",
    "LineFramer",
    "make_framer",
]

DEFAULT_MAX_SIZE = 1 << 20
"""1 MiB: the largest message a framer accepts unless told otherwise.  The same
default as the Python ``websockets`` library's ``max_size`` (2**20) and nginx's
``client_max_body_size`` (1m): generous for control protocols, and it keeps a
misbehaving peer from making one connection hold more than a megabyte."""

PREFIX_SIZES = (1, 2, 4, 8)
"""Length-prefix widths in bytes that :class:`LengthPrefixFramer` supports."""

ByteOrder = Literal["big", "little"]


class FramingError(MidwayError):
    """The stream does not follow the framing (for example a length prefix that
    counts itself but is smaller than the prefix).  The framer is spent."""

    def __init__(self, message: str, complete: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.complete: list[bytes] = complete if complete is not None else []
        """Messages completed by the same ``feed`` call before the error, in order."""


class FrameTooLarge(FramingError):
    """A message is longer than the framer's ``max_size``."""

    def __init__(
        self, size: int | None, max_size: int, complete: list[bytes] | None = None
    ) -> None:
        if size is None:
            text = f"message longer than the limit of {max_size} bytes (no end found within it)"
        else:
            text = f"message of {size} bytes exceeds the limit of {max_size} bytes"
        super().__init__(text, complete)
        self.size = size
        """The message's full size when known (length prefix), else ``None``."""
        self.max_size = max_size


class Framer(abc.ABC):
    """Common interface of all framers.  Not thread-safe; one per direction."""

    max_size: int
    """Largest message accepted, framing included."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._failed: FramingError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` to the stream; return the messages completed, in order,
        each with its framing.  Raises :class:`FrameTooLarge` or
        :class:`FramingError` (carrying the messages completed before the fault);
        after either, the framer is spent and every later call raises
        :class:`FramingError`."""
        if self._failed is not None:
            raise FramingError(f"framer unusable after an earlier error: {self._failed}")
        if not data:
            return []
        try:
            return self._feed(data)
        except FramingError as exc:
            self._failed = exc
            self._buf.clear()
            raise

    def pending(self) -> bytes:
        """The buffered bytes of an incomplete message (empty if none).  Does not
        consume them: call it once the stream has ended (EOF, flush)."""
        return bytes(self._buf)

    @abc.abstractmethod
    def _feed(self, data: bytes) -> list[bytes]: ...


class LineFramer(Framer):
    """Messages end with ``delimiter`` (included in each message)."""

    def __init__(self, delimiter: bytes = b"\n", max_size: int = DEFAULT_MAX_SIZE) -> None:
        super().__init__()
        if not delimiter:
            raise ValueError("line delimiter must not be empty")
        if max_size < len(delimiter):
            raise ValueError(
                f"max_size {max_size} is smaller than the delimiter ({len(delimiter)} bytes)"
            )
        self.delimiter = bytes(delimiter)
        self.max_size = max_size

    def __repr__(self) -> str:
        return f"LineFramer(delimiter={self.delimiter!r}, max_size={self.max_size})"

    def _feed(self, data: bytes) -> list[bytes]:
        delim, limit = self.delimiter, self.max_size
        buf = self._buf
        # The buffered tail holds no complete delimiter, so a new one can start
        # at most len(delim) - 1 bytes before its end: no rescanning.
        search_from = max(0, len(buf) - len(delim) + 1)
        stream: bytes | bytearray
        if buf:
            buf += data
            stream = buf
        else:
            stream = data  # common case: nothing held, no copy
        messages: list[bytes] = []
        start = 0
        # Messages are cut from a bytes chunk by slicing (one copy each, none for a
        # chunk that is exactly one message) and from the buffer through a view
        # (one copy each, not a bytearray slice and then bytes of it).
        with memoryview(stream) as view:
            cut = stream if stream is data else view
            while True:
                i = stream.find(delim, max(start, search_from))
                if i < 0:
                    break
                end = i + len(delim)
                if end - start > limit:
                    raise FrameTooLarge(end - start, limit, messages)
                messages.append(bytes(cut[start:end]))
                start = end
        # An unfinished message needs at least one more byte: reject it now if
        # it can no longer fit, so the buffer never exceeds max_size - 1 bytes.
        if len(stream) - start >= limit:
            raise FrameTooLarge(None, limit, messages)
        if stream is buf:
            del buf[:start]
        else:
            buf += stream[start:]
        return messages


class LengthPrefixFramer(Framer):
    """Messages start with an unsigned length of ``prefix_size`` bytes.

    The length counts the body only, or the whole message when
    ``includes_prefix`` is true.  ``max_size`` limits the whole message
    (prefix included) and is checked as soon as the prefix is read."""

    def __init__(
        self,
        prefix_size: int = 4,
        byteorder: ByteOrder = "big",
        includes_prefix: bool = False,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        super().__init__()
        if prefix_size not in PREFIX_SIZES:
            raise ValueError(f"prefix size must be 1, 2, 4 or 8 bytes, not {prefix_size}")
        if byteorder not in ("big", "little"):
            raise ValueError(f"byte order must be 'big' or 'little', not {byteorder!r}")
        if max_size < prefix_size:
            raise ValueError(f"max_size {max_size} is smaller than the prefix ({prefix_size})")
        self.prefix_size = prefix_size
        self.byteorder: ByteOrder = byteorder
        self.includes_prefix = includes_prefix
        self.max_size = max_size
        self._need: int | None = None  # total size of the message in the buffer

    def __repr__(self) -> str:
        return (
            f"LengthPrefixFramer(prefix_size={self.prefix_size}, byteorder={self.byteorder!r},"
            f" includes_prefix={self.includes_prefix}, max_size={self.max_size})"
        )

    def _total_size(self, prefix: bytes | bytearray | memoryview, complete: list[bytes]) -> int:
        value = int.from_bytes(prefix, self.byteorder)
        if self.includes_prefix:
            if value < self.prefix_size:
                raise FramingError(
                    f"length prefix {value} is smaller than the prefix itself"
                    f" ({self.prefix_size} bytes)",
                    complete,
                )
            total = value
        else:
            total = self.prefix_size + value
        if total > self.max_size:
            raise FrameTooLarge(total, self.max_size, complete)
        return total

    def _feed(self, data: bytes) -> list[bytes]:
        buf, psize = self._buf, self.prefix_size
        messages: list[bytes] = []
        view = memoryview(data)
        n, pos = len(view), 0
        while pos < n:
            if self._need is None:
                if buf:  # completing a prefix split across chunks
                    take = min(psize - len(buf), n - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < psize:
                        break
                    self._need = self._total_size(buf, messages)
                elif n - pos >= psize:
                    self._need = self._total_size(view[pos : pos + psize], messages)
                    if n - pos >= self._need:  # whole message at hand: no copy into buf
                        if pos == 0 and n == self._need and type(data) is bytes:
                            messages.append(data)  # the chunk is the message: no copy
                        else:
                            messages.append(bytes(view[pos : pos + self._need]))
                        pos += self._need
                        self._need = None
                        continue
                else:
                    buf += view[pos:]
                    break
            take = min(self._need - len(buf), n - pos)
            buf += view[pos : pos + take]
            pos += take
            if len(buf) == self._need:
                messages.append(bytes(buf))
                buf.clear()
                self._need = None
        return messages


class FixedFramer(Framer):
    """Every message is exactly ``size`` bytes (``max_size`` is ``size``)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"fixed message size must be at least 1, not {size}")
        self.size = size
        self.max_size = size

    def __repr__(self) -> str:
        return f"FixedFramer(size={self.size})"

    def _feed(self, data: bytes) -> list[bytes]:
        size, buf = self.size, self._buf
        messages: list[bytes] = []
        view = memoryview(data)
        pos = 0
        if buf:
            take = min(size - len(buf), len(view))
            buf += view[:take]
            pos = take
            if len(buf) < size:
                return messages
            messages.append(bytes(buf))
            buf.clear()
        while len(view) - pos >= size:
            messages.append(bytes(view[pos : pos + size]))
            pos += size
        buf += view[pos:]
        return messages


# --- compact specs, as written on the command line and in TOML ---------------

_SPEC_FORMS = "'line[:DELIMITER]', 'length:SIZE[:big|little][:inclusive]' or 'fixed:SIZE'"
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)
_SIMPLE_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "0": b"\0", "\\": b"\\"}


def _unescape(spec: str, text: str) -> bytes:
    """Turn a delimiter as written (``\\r\\n``, ``\\x00``, ``;``) into bytes.
    Characters that are not escapes are encoded as UTF-8."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos : m.start()].encode()
        code = m.group(1)
        if code[0] == "x" and len(code) == 3:
            out.append(int(code[1:], 16))
        elif code in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[code]
        else:
            raise ValueError(
                f"bad framing spec {spec!r}: unknown escape '\\{code}'"
                " (use \\n, \\r, \\t, \\0, \\\\ or \\xNN)"
            )
        pos = m.end()
    if text.endswith("\\") and (pos < len(text)):
        raise ValueError(f"bad framing spec {spec!r}: delimiter ends with a lone backslash")
    out += text[pos:].encode()
    return bytes(out)


def _parse_int(spec: str, what: str, text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError(f"bad framing spec {spec!r}: {what} {text!r} is not a number") from None


def make_framer(spec: str, *, max_size: int = DEFAULT_MAX_SIZE) -> Framer:
    """Build a framer from a compact spec:

    - ``line`` — lines ending in ``\\n``; ``line:DELIMITER`` another delimiter,
      with escapes ``\\n \\r \\t \\0 \\\\ \\xNN`` (``line:\\r\\n``).  Everything
      after the first colon is the delimiter, colons included.
    - ``length:SIZE[:big|little][:inclusive]`` — a SIZE-byte (1, 2, 4 or 8)
      unsigned length before each message; big-endian (network order) unless
      ``little``; ``inclusive`` when the length counts the prefix too.
    - ``fixed:SIZE`` — messages of exactly SIZE bytes (``max_size`` ignored).

    ``max_size`` bounds each message (framing included).  Raises ``ValueError``
    with the spec and what is wrong with it."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"empty framing spec: expected {_SPEC_FORMS}")
    kind, sep, rest = spec.partition(":")
    try:
        if kind == "line":
            delimiter = _unescape(spec, rest) if sep else b"\n"
            if not delimiter:
                raise ValueError(f"bad framing spec {spec!r}: the delimiter is empty")
            return LineFramer(delimiter, max_size=max_size)
        if kind == "length":
            parts = rest.split(":") if sep else []
            if not parts or not parts[0]:
                raise ValueError(
                    f"bad framing spec {spec!r}: give the prefix size, e.g. 'length:4:big'"
                )
            size = _parse_int(spec, "prefix size", parts[0])
            if size not in PREFIX_SIZES:
                raise ValueError(
                    f"bad framing spec {spec!r}: prefix size must be 1, 2, 4 or 8, not {size}"
                )
            byteorder: ByteOrder = "big"
            inclusive = False
            for word in parts[1:]:
                if word in ("big", "little"):
                    byteorder = "big" if word == "big" else "little"
                elif word == "inclusive":
                    inclusive = True
                else:
                    raise ValueError(
                        f"bad framing spec {spec!r}: unknown option {word!r}"
                        " (expected 'big', 'little' or 'inclusive')"
                    )
            return LengthPrefixFramer(size, byteorder, inclusive, max_size=max_size)
        if kind == "fixed":
            if not rest:
                raise ValueError(f"bad framing spec {spec!r}: give the size, e.g. 'fixed:16'")
            size = _parse_int(spec, "size", rest)
            if size < 1:
                raise ValueError(f"bad framing spec {spec!r}: size must be at least 1")
            return FixedFramer(size)
    except ValueError as exc:
        if str(exc).startswith(("bad framing spec", "empty framing spec")):
            raise
        raise ValueError(f"bad framing spec {spec!r}: {exc}") from None
    raise ValueError(f"bad framing spec {spec!r}: unknown kind {kind!r}; expected {_SPEC_FORMS}")
