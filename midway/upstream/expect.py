"""The pure part of an active health check: does the reply contain ``expect``?

Theory of operation
-------------------
A check with ``send``/``expect`` writes ``send`` after connecting, then reads the
reply in whatever pieces the network delivers, and passes as soon as ``expect``
appears anywhere in it (so ``expect = "+PONG"`` matches ``+PONG\\r\\n``).  This
module decides that over bytes alone, sans I/O, in the manner of h11: feed it
pieces with :meth:`ExpectMatcher.feed`, tell it about end of stream with
:meth:`ExpectMatcher.eof`, and it answers :data:`Verdict.PASS`, :data:`Verdict.FAIL`
or :data:`Verdict.NEED_MORE`.  The timeout belongs to the caller: NEED_MORE at the
deadline is a failure.

Memory is bounded twice over.  Only the last ``len(expect) - 1`` bytes are kept
between pieces (enough for a match that straddles two pieces), plus the first
:data:`HEAD_BYTES` of the reply for the log line.  And the match must end within
the first ``limit`` bytes (default :data:`REPLY_LIMIT`): an upstream that streams
megabytes of something else fails instead of being read forever.

Once decided, the verdict does not change; later bytes are ignored.
"""

from __future__ import annotations

import enum

__all__ = ["Verdict", "ExpectMatcher", "REPLY_LIMIT", "HEAD_BYTES"]

REPLY_LIMIT = 16384
"""How far into the reply ``expect`` may end: HAProxy's ``tcp-check expect`` looks
only at what fits in one buffer, ``tune.bufsize``, 16 KiB by default."""

HEAD_BYTES = 40
"""How much of a wrong reply the failure reason quotes (one log line's worth)."""


class Verdict(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    NEED_MORE = "need_more"


class ExpectMatcher:
    """Matches one reply against ``expect``.  An empty ``expect`` passes at once
    (the check is then a connect, plus ``send`` if any)."""

    __slots__ = ("expect", "limit", "verdict", "reason", "_tail", "_seen", "_head")

    def __init__(self, expect: bytes, limit: int = REPLY_LIMIT) -> None:
        if len(expect) > limit:
            raise ValueError(f"expect is {len(expect)} bytes, longer than the {limit}-byte reply limit")
        self.expect = expect
        self.limit = limit
        self.verdict = Verdict.PASS if not expect else Verdict.NEED_MORE
        self.reason = ""
        """Why it failed, for the log line; empty otherwise."""
        self._tail = b""
        self._seen = 0
        self._head = b""

    def feed(self, data: bytes) -> Verdict:
        """Take the next piece of the reply."""
        if self.verdict is not Verdict.NEED_MORE:
            return self.verdict
        data = data[: self.limit - self._seen]
        self._seen += len(data)
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
        window = self._tail + data
        if self.expect in window:
            self.verdict = Verdict.PASS
            return self.verdict
        keep = len(self.expect) - 1
        self._tail = window[-keep:] if keep else b""
        if self._seen >= self.limit:
            return self._fail(f"no {self.expect!r} in the first {self.limit} bytes of the reply")
        return self.verdict

    def eof(self) -> Verdict:
        """The upstream closed its side: without a match by now, the check fails."""
        if self.verdict is Verdict.NEED_MORE:
            return self._fail(f"closed before sending {self.expect!r}")
        return self.verdict

    def timed_out(self) -> Verdict:
        """The caller's deadline passed: without a match by now, the check fails."""
        if self.verdict is Verdict.NEED_MORE:
            return self._fail(f"no {self.expect!r} in the reply within the timeout")
        return self.verdict

    def _fail(self, why: str) -> Verdict:
        self.verdict = Verdict.FAIL
        got = f"reply {self._head!r}" + ("..." if self._seen > len(self._head) else "")
        self.reason = f"{why} ({got})" if self._seen else f"{why} (no reply)"
        return self.verdict
