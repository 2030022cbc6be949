"""Text formatting for the live traffic dump: chunks, opens and closes as lines.

Theory of operation
-------------------
This module only turns facts into text; it never prints, reads a clock or looks
at a socket.  The dump element (elsewhere) calls a :class:`DumpFormatter` with a
connection id, a direction, a wall-clock time and the bytes, and writes the
returned text wherever it likes::

    fmt = DumpFormatter(mode="auto", color=True)
    sys.stderr.write(fmt.chunk(12, "upstream", time.time(), b"GET / HTTP/1.1\\r\\n"))

    2024-05-01 12:34:56.789 #12 client → server 16 bytes
    GET / HTTP/1.1\\r

Each chunk becomes a header line (time, ``#id``, an arrow that always points the
way the bytes flow, the byte count) followed by the data in one of three modes:

- ``text``: printable characters as they are, newlines kept as line breaks, and
  everything else escaped (``\\r``, ``\\\\``, ``\\x00``, ``\\u202e``): bytes that are
  not valid UTF-8 as ``\\xNN``, decoded characters that are not printable as
  ``\\uNNNN``.  Nothing from the wire reaches the terminal unescaped, so traffic
  can never move the cursor, change colours or retitle the window.
- ``hex``: exactly what ``hexdump -C`` prints for the same bytes, ``*`` lines
  for repeats and the final offset line included.
- ``auto``: per chunk, ``text`` when the bytes are UTF-8 that is mostly
  printable (see :func:`looks_like_text`), else ``hex``.

At most ``max_bytes`` of a chunk are shown; a truncated chunk ends with a line
saying how many bytes were left out.  With ``color`` on, each line is wrapped
in its own ANSI colour and reset, so lines from concurrent connections never
bleed into each other; with it off, the output contains no escape byte at all.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Literal

from midway.chain.base import Direction

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DUMP_MODES",
    "TEXT_MAX_UNPRINTABLE",
    "DumpFormatter",
    "DumpMode",
    "escape_text",
    "format_timestamp",
    "hexdump",
    "looks_like_text",
]

DumpMode = Literal["text", "hex", "auto"]
DUMP_MODES: tuple[DumpMode, ...] = ("text", "hex", "auto")

DEFAULT_MAX_BYTES = 4096
"""Bytes of one chunk shown by default: one page, 256 lines of ``hexdump -C`` or
a screenful of text; enough to recognise a protocol without a 64 KiB read
flooding the terminal.  ``None`` shows everything."""

TEXT_MAX_UNPRINTABLE = 0.10
"""``auto`` shows a chunk as text only if at most this share of its characters
are unprintable (tab, CR and LF count as printable).  Perl's ``-T`` file test
uses 30% (and, as here, any NUL byte means binary); a dump is read by eye, and
a chunk that would be more than a tenth escapes reads better in hex."""

# ECMA-48 SGR parameters.  Client → server red and server → client cyan follow
# Wireshark's "Follow TCP Stream" (client red, server blue); cyan instead of
# blue because dark-blue text is hard to read on a dark terminal.
_SGR_RESET = "\x1b[0m"
_SGR_BY_DIRECTION = {"upstream": "31", "downstream": "36"}
_SGR_BOLD = "1"
_SGR_EVENT = "33"  # open/close lines: yellow

_ARROW = {"upstream": "client → server", "downstream": "client ← server"}

# hexdump -C: 16 bytes a line, two groups of 8, "." for anything outside 0x20-0x7e.
_HEX_PER_LINE = 16
_HEX_ASCII = bytes(b if 0x20 <= b <= 0x7E else 0x2E for b in range(256))

# Characters that may need escaping: anything but tab, LF and printable ASCII
# other than the backslash (escaped so that "\x00" in the data is unambiguous).
_MAYBE_ESCAPE = re.compile(r"[^\t\n\x20-\x5b\x5d-\x7e]")
_NAMED_ESCAPES = {"\\": "\\\\", "\r": "\\r"}
_TEXT_OK = frozenset("\t\n\r")
_CONTINUATION = range(0x80, 0xC0)  # UTF-8 continuation bytes


def format_timestamp(t: float, tz: tzinfo | None = None) -> str:
    """``2024-05-01 12:34:56.789`` for the wall-clock time ``t`` (``time.time()``
    seconds) in ``tz``; ``None`` means the local time zone.  Milliseconds are
    truncated, as in the ``logging`` module."""
    dt = datetime.fromtimestamp(t, tz)
    return f"{dt:%Y-%m-%d %H:%M:%S}.{dt.microsecond // 1000:03d}"


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:  # ASCII control character: the byte itself
        return f"\\x{code:02x}"
    if ch.isprintable():
        return ch
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _escape_str(text: str) -> str:
    return _MAYBE_ESCAPE.sub(_escape_char, text)


def escape_text(data: bytes) -> str:
    """``data`` as UTF-8 text that is safe to print: printable characters and
    newlines kept, the rest escaped (see the module doc).  Distinct inputs give
    distinct outputs."""
    return _escape_str(data.decode("utf-8", "surrogateescape"))


def looks_like_text(data: bytes) -> bool:
    """Whether ``auto`` mode shows ``data`` as text: it is valid UTF-8 (a
    character cut at either end of the chunk is allowed, since chunk boundaries
    fall anywhere), has no NUL, and at most :data:`TEXT_MAX_UNPRINTABLE` of its
    characters are unprintable."""
    if b"\0" in data:
        return False
    skip = 0
    while skip < min(3, len(data)) and data[skip] in _CONTINUATION:
        skip += 1
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data[skip:], final=False)
    except UnicodeDecodeError:
        return False
    if not text:
        return False
    unprintable = sum(
        1
        for m in _MAYBE_ESCAPE.finditer(text)
        if m.group() not in _TEXT_OK and not m.group().isprintable()
    )
    return unprintable <= len(text) * TEXT_MAX_UNPRINTABLE


def hexdump(data: bytes) -> list[str]:
    """The lines ``hexdump -C`` prints for ``data`` (no newlines), including the
    ``*`` for runs of identical lines and the final offset line; ``[]`` for no
    data, as ``hexdump`` prints nothing then."""
    if not data:
        return []
    lines: list[str] = []
    previous: bytes | None = None
    squeezing = False
    for off in range(0, len(data), _HEX_PER_LINE):
        row = data[off : off + _HEX_PER_LINE]
        if row == previous:
            if not squeezing:
                lines.append("*")
                squeezing = True
            continue
        previous, squeezing = row, False
        cells = [f"{b:02x} " for b in row] + ["   "] * (_HEX_PER_LINE - len(row))
        left, right = "".join(cells[:8]), "".join(cells[8:])
        ascii_ = row.translate(_HEX_ASCII).decode("ascii")
        lines.append(f"{off:08x}  {left} {right} |{ascii_}|")
    lines.append(f"{len(data):08x}")
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True)
class DumpFormatter:
    """Settings of one dump, and the functions that apply them.  Every method
    returns whole lines, each ending in ``\\n``, ready to write."""

    mode: DumpMode = "auto"
    """``text``, ``hex`` or ``auto`` (see the module doc)."""
    color: bool = False
    """ANSI colours, one per direction.  Off: no escape byte in the output."""
    max_bytes: int | None = DEFAULT_MAX_BYTES
    """Bytes shown per chunk; the rest is counted, not shown.  ``0`` shows only
    the header; ``None`` shows everything."""
    tz: tzinfo | None = None
    """Time zone of the timestamps; ``None`` is the local zone."""

    def __post_init__(self) -> None:
        if self.mode not in DUMP_MODES:
            raise ValueError(f"dump mode must be one of {', '.join(DUMP_MODES)}, not {self.mode!r}")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"max_bytes must be ≥ 0 or None, not {self.max_bytes}")

    def _paint(self, lines: list[str], sgr: str) -> str:
        if self.color:
            return "".join(f"\x1b[{sgr}m{line}{_SGR_RESET}\n" for line in lines)
        return "".join(f"{line}\n" for line in lines)

    def chunk(self, conn_id: int, direction: Direction, t: float, data: bytes) -> str:
        """A chunk of ``data`` that flowed in ``direction`` at wall-clock time ``t``."""
        shown = data if self.max_bytes is None else data[: self.max_bytes]
        header = (
            f"{format_timestamp(t, self.tz)} #{conn_id} {_ARROW[direction]}"
            f" {_plural(len(data), 'byte')}"
        )
        if not shown:
            body: list[str] = []
        elif self.mode == "hex" or (self.mode == "auto" and not looks_like_text(shown)):
            body = hexdump(shown)
        else:
            body = escape_text(shown).split("\n")
            if body[-1] == "":
                body.pop()
        if len(shown) < len(data):
            body.append(f"... {_plural(len(data) - len(shown), 'more byte')} not shown")
        colour = _SGR_BY_DIRECTION[direction]
        return self._paint([header], f"{_SGR_BOLD};{colour}") + self._paint(body, colour)

    def opened(
        self, conn_id: int, t: float, *, client: str, upstream: str | None, proxy: str
    ) -> str:
        """Connection ``conn_id`` from ``client`` through proxy ``proxy`` was
        connected to ``upstream`` (``None``: not connected)."""
        target = _escape_str(upstream) if upstream is not None else "(not connected)"
        line = (
            f"{format_timestamp(t, self.tz)} #{conn_id} open: client {_escape_str(client)}"
            f" → proxy {_escape_str(proxy)} → upstream {target}"
        )
        return self._paint([line], _SGR_EVENT)

    def half_closed(self, conn_id: int, direction: Direction, t: float) -> str:
        """The sending side of ``direction`` ended its stream (a FIN): nothing more
        flows that way; the other direction may go on."""
        line = f"{format_timestamp(t, self.tz)} #{conn_id} {_ARROW[direction]} end of stream (FIN)"
        return self._paint([line], _SGR_BY_DIRECTION[direction])

    def dropped(self, t: float, chunks: int, nbytes: int) -> str:
        """The dump's output fell behind and skipped ``chunks`` chunks carrying
        ``nbytes`` bytes of traffic (the traffic itself was relayed)."""
        line = (
            f"{format_timestamp(t, self.tz)} dump output fell behind: {_plural(chunks, 'chunk')}"
            f" ({_plural(nbytes, 'byte')} of traffic) not shown"
        )
        return self._paint([line], _SGR_EVENT)

    def closed(
        self,
        conn_id: int,
        t: float,
        *,
        reason: str,
        bytes_up: int,
        bytes_down: int,
        duration_s: float,
    ) -> str:
        """Connection ``conn_id`` ended for ``reason`` after ``duration_s``
        seconds, having carried ``bytes_up`` client → server and ``bytes_down``
        server → client."""
        line = (
            f"{format_timestamp(t, self.tz)} #{conn_id} closed ({_escape_str(reason)})"
            f" after {duration_s:.3f} s: {_ARROW['upstream']} {_plural(bytes_up, 'byte')},"
            f" {_ARROW['downstream']} {_plural(bytes_down, 'byte')}"
        )
        return self._paint([line], _SGR_EVENT)
