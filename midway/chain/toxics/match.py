"""Find a regular expression in one direction's byte stream, chunk by chunk.

Usage::

    m = StreamMatcher(rb"EXEC\\r\\n")
    m.feed(b"MULTI\\r\\nSET a 1\\r\\nEX")   # None: no match yet
    m.feed(b"EC\\r\\nGET a\\r\\n")          # 0: the match began before this chunk
    m.start                                # 18: where it began in the stream

Theory of operation
-------------------
TCP has no message boundaries, so a pattern may arrive split across any number of
chunks.  The matcher keeps the last :data:`MATCH_WINDOW` bytes it was fed and
searches them together with each new chunk.  The first match found is the
trigger: :meth:`StreamMatcher.feed` returns where it starts *in the chunk just
fed* (so a caller can pass the bytes before it untouched and act from its first
byte), or 0 when it began in an earlier chunk, and :attr:`StreamMatcher.start`
says where it began in the whole stream.  After that the matcher is done and
keeps nothing.

Guarantees and limits, all from that window:

- A match of at most ``MATCH_WINDOW`` + 1 bytes is always found, wherever the
  chunk boundaries fall, and found in the chunk that completes it; a longer one
  is found only if it happens to fit in the window plus one chunk.
- The window's cut is not the start of the stream: ``^`` and ``\\A`` match only at
  the real start of the stream (the search starts one byte into a guard byte
  kept before the window, so look-behinds and ``\\b`` see real context too).
- The end of what has arrived looks like the end of the data: ``$``, ``\\Z``,
  ``\\b`` and a greedy quantifier may match at a chunk's end although more bytes
  follow (``EXEC\\b`` matches the ``EXEC`` of an ``EXECUTE`` cut after ``EXEC``).
  Spell the end out (``EXEC\\r\\n``) where that matters.
- A match that began in an earlier chunk began in bytes that have already been
  passed on; the caller can only act from the current chunk's first byte.

Cost: each chunk costs one search over at most ``MATCH_WINDOW`` + 1 + its length
bytes; memory is the window.
"""

from __future__ import annotations

import re

__all__ = ["MATCH_WINDOW", "StreamMatcher", "compile_pattern"]

MATCH_WINDOW = 8192
"""Bytes of earlier chunks searched with each new one: the longest match always
found across chunk boundaries.  8 KiB is nginx's default limit on one request line
or header line (``large_client_header_buffers 4 8k``): a protocol's command or
header line fits."""


def compile_pattern(pattern: str | bytes) -> re.Pattern[bytes]:
    """A regular expression over bytes; a ``str`` is encoded as UTF-8 first (so
    TOML and JSON strings can name it).  Raises ``re.error`` for bad syntax."""
    raw = pattern.encode() if isinstance(pattern, str) else pattern
    return re.compile(raw)


class StreamMatcher:
    """The first match of ``pattern`` in a byte stream fed chunk by chunk.  Pure:
    no I/O, no clock."""

    __slots__ = ("pattern", "window", "tail", "fed", "start", "error")

    def __init__(self, pattern: str | bytes | re.Pattern[bytes], window: int = MATCH_WINDOW) -> None:
        if window < 0:
            raise ValueError(f"window must not be negative, got {window}")
        self.pattern = pattern if isinstance(pattern, re.Pattern) else compile_pattern(pattern)
        self.window = window
        self.tail = b""
        """Up to ``window`` + 1 bytes from just before the next chunk (the +1 is the
        guard byte that keeps ``^`` and look-behinds honest at the window's cut)."""
        self.fed = 0
        """Bytes fed so far."""
        self.start: int | None = None
        """Stream offset where the match began, once found."""
        self.error: str | None = None
        """Always ``None``: a matcher never gives up (see ``Finder``)."""

    @property
    def matched(self) -> bool:
        return self.start is not None

    def feed(self, chunk: bytes) -> int | None:
        """Search ``chunk`` (after everything fed before).  Returns the offset in
        ``chunk`` where the first match starts (0 if it began in an earlier
        chunk), or ``None`` when there is no match yet, or the match was already
        reported."""
        if self.start is not None:
            self.fed += len(chunk)
            return None
        buf = self.tail + chunk
        # The tail is either the whole stream so far or window + 1 bytes cut from
        # it.  Cut: its first byte is the guard, where no match may start but
        # which ^, \b and look-behinds see (search's pos keeps ^ from matching).
        pos = 1 if self.fed > len(self.tail) else 0
        m = self.pattern.search(buf, pos)
        chunk_at = len(buf) - len(chunk)
        if m is not None:
            self.start = self.fed - chunk_at + m.start()
            self.fed += len(chunk)
            self.tail = b""
            return max(0, m.start() - chunk_at)
        self.fed += len(chunk)
        self.tail = buf[-(self.window + 1):] if self.window else buf[-1:]
        return None
