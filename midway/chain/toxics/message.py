"""Find where the Nth message of a framed byte stream begins, chunk by chunk.

Usage::

    c = MessageCounter(3, "line")          # the 3rd line
    c.feed(b"GET a\\nGET b\\nGE")            # 12: the 3rd message starts there
    c.start                                # 12: where it began in the stream

Theory of operation
-------------------
The stream is cut into messages by one of the framers of
:mod:`midway.chain.framing` (``line``, ``line:\\r\\n``, ``length:4:big``,
``fixed:16``...), counting from 1.  The Nth message begins right after the
(N-1)th ends, so :meth:`MessageCounter.feed` adds up the sizes of the messages
the framer completes and, as soon as N-1 are complete, knows the offset of the
Nth's first byte.  It returns that offset *in the chunk just fed* once that byte
has arrived: in the same chunk when more follows the (N-1)th message, else at
offset 0 of the next non-empty chunk.  ``N = 1`` is the first byte of the
stream.  After that the counter is done, keeps nothing and costs nothing.

So the trigger is the arrival of the first byte of the Nth message, not its
completion: "reset at the 3rd request" lets the first two requests through
whole and not one byte of the third, wherever TCP cut them.

Limits: the framer buffers at most one incomplete message, of at most
``max_size`` bytes (:data:`~midway.chain.framing.DEFAULT_MAX_SIZE`, 1 MiB).  A
stream that breaks its framing (a longer message, a length prefix smaller than
itself) has no boundaries left to count: the counter gives up (:attr:`error`
says why) and never reports a start.  Bytes are only counted, never changed.
"""

from __future__ import annotations

from midway.chain.framing import DEFAULT_MAX_SIZE, Framer, FramingError, make_framer

__all__ = ["DEFAULT_FRAMING", "MessageCounter"]

DEFAULT_FRAMING = "line"
"""Lines ending in ``\\n``: also right for ``\\r\\n`` protocols (SMTP, Redis inline
commands, memcached), whose lines end in ``\\n`` too."""


class MessageCounter:
    """Where message number ``n`` (from 1) of a framed stream begins.  Pure: no
    I/O, no clock.  ``framing`` is a spec of
    :func:`~midway.chain.framing.make_framer` (raises ``ValueError`` if bad)."""

    __slots__ = ("n", "framer", "fed", "boundary", "start", "error", "_complete",
                 "_complete_bytes")

    def __init__(self, n: int, framing: str = DEFAULT_FRAMING,
                 max_size: int = DEFAULT_MAX_SIZE) -> None:
        if n < 1:
            raise ValueError(f"messages are counted from 1, got {n}")
        self.n = n
        self.framer: Framer | None = make_framer(framing, max_size=max_size) if n > 1 else None
        self.fed = 0
        """Bytes fed so far."""
        self.boundary: int | None = 0 if n == 1 else None
        """Stream offset of the Nth message's first byte, once known."""
        self.start: int | None = None
        """Stream offset where the Nth message began, once its first byte arrived."""
        self.error: str | None = None
        """Why counting stopped (the stream broke its framing), else ``None``."""
        self._complete = 0  # messages completed, and the bytes they took:
        self._complete_bytes = 0

    @property
    def matched(self) -> bool:
        return self.start is not None

    def feed(self, chunk: bytes) -> int | None:
        """Count ``chunk`` (after everything fed before).  Returns the offset in
        ``chunk`` of the Nth message's first byte if it is in this chunk, else
        ``None`` (not yet, already reported, or the framing broke)."""
        before = self.fed
        self.fed += len(chunk)
        if self.start is not None or self.error is not None or not chunk:
            return None
        if self.boundary is None:
            self._count(chunk)
            if self.boundary is None:
                return None
        at = self.boundary - before
        if at >= len(chunk):  # the (N-1)th ended with this chunk: the Nth starts the next
            return None
        self.start = self.boundary
        self.framer = None
        return at

    def _count(self, chunk: bytes) -> None:
        assert self.framer is not None
        try:
            messages = self.framer.feed(chunk)
        except FramingError as exc:
            messages = exc.complete
            self.error = str(exc)
        for message in messages:
            self._complete += 1
            self._complete_bytes += len(message)
            if self._complete == self.n - 1:
                self.boundary = self._complete_bytes
                self.error = None  # the boundary was found before the fault
                return
