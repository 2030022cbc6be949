"""Content-triggered toxics: the ``match`` condition and its ``for_s`` window.

Theory of operation
-------------------
A toxic with ``conditions.match`` does nothing on a connection until a regular
expression over bytes is found in one direction's stream (``match_stream``, by
default the toxic's own).  :class:`~midway.chain.toxics.match.StreamMatcher`
finds it across chunk boundaries, within its bounded window.

On the toxic's own stream, :class:`MatchGate` feeds every chunk to the matcher
and passes it on unchanged until the match; in the chunk where the match is
found, the bytes before the match's first byte are passed on untouched and the
rest, from the first byte of the match, goes to the toxic's stage, as does
everything after it.  (A match that began in an earlier chunk began in bytes
already passed on: the toxic applies from the start of the chunk that completed
it.)  "Reset the connection at ``EXEC``" therefore delivers every command before
``EXEC`` and not one byte of it.

On the other stream, :class:`MatchWatch` (a stage that passes everything on
unchanged) watches for the match and fires a per-connection
:class:`Trigger`; the gate on the toxic's stream then applies the toxic from the
next chunk it sees ("every reply after the client sends ``MULTI``").  The
watched direction then leaves the relay's zero-copy path for as long as the
toxic is there.

``for_s`` (0: for the rest of the connection) ends the toxic that many seconds
after the trigger.  Like ``after_s`` it is checked when a chunk or the end of
the stream arrives: the first one after the window ends the toxic's stage as a
removal would (what it holds is flushed, its timers are cancelled; a
``timeout`` toxic closes the connection, as on removal) and it and everything
after pass untouched.  A stage that holds a chunk without end (``blackhole``)
is not cut short by ``for_s``; use ``stall``, which ends by itself.
"""

from __future__ import annotations

from midway.chain.base import Output, Stage
from midway.chain.toxics.match import StreamMatcher

__all__ = ["Trigger", "MatchGate", "MatchWatch"]


class Trigger:
    """One connection's "the match was seen" flag, shared by the two directions."""

    __slots__ = ("fired",)

    def __init__(self) -> None:
        self.fired = False


class MatchWatch(Stage):
    """Watches the other direction for the match; passes everything on."""

    def __init__(self, matcher: StreamMatcher, trigger: Trigger) -> None:
        self.matcher = matcher
        self.trigger = trigger

    async def data(self, data: bytes, out: Output) -> None:
        if not self.trigger.fired and self.matcher.feed(data) is not None:
            self.trigger.fired = True
        await out.send(data)


class MatchGate(Stage):
    """The toxic's stage behind its ``match`` condition (see the module doc).
    ``matcher`` is ``None`` when the match is watched on the other direction."""

    def __init__(self, inner: Stage, matcher: StreamMatcher | None, trigger: Trigger,
                 for_s: float = 0.0) -> None:
        self.inner = inner
        self.matcher = matcher
        self.trigger = trigger
        self.for_s = for_s
        self.active_since: float | None = None
        """Clock time the toxic started applying; ``None`` before."""
        self.over = False
        """``for_s`` has passed: everything passes untouched for good."""

    def _activate(self, out: Output) -> None:
        self.active_since = out.now()
        self.inner.start(out)

    async def _expired(self, out: Output) -> bool:
        """Whether ``for_s`` is over; ends the stage the first time it is."""
        if self.over:
            return True
        if self.for_s <= 0 or self.active_since is None:
            return False
        if out.now() < self.active_since + self.for_s:
            return False
        self.over = True
        await self.inner.flush(out)
        self.inner.close()
        return True

    async def data(self, data: bytes, out: Output) -> None:
        if self.active_since is None:
            if self.matcher is not None:
                at = self.matcher.feed(data)
                if at is None:
                    await out.send(data)
                    return
                self.trigger.fired = True
                if at > 0:
                    await out.send(data[:at])
                    data = data[at:]
            elif not self.trigger.fired:
                await out.send(data)
                return
            self._activate(out)
        if await self._expired(out):
            await out.send(data)
        else:
            await self.inner.data(data, out)

    async def eof(self, out: Output) -> None:
        if self.active_since is None and self.matcher is None and self.trigger.fired:
            self._activate(out)
        if self.active_since is None or await self._expired(out):
            await out.send_eof()
        else:
            await self.inner.eof(out)

    async def flush(self, out: Output) -> None:
        if self.active_since is not None and not self.over:
            await self.inner.flush(out)

    def close(self) -> None:
        if not self.over:
            self.inner.close()
