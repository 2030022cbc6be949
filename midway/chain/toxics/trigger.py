"""Content-triggered toxics: the ``match`` and ``message`` conditions and their
``for_s`` window.

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

``message`` works the same way with a
:class:`~midway.chain.toxics.message.MessageCounter` in place of the matcher:
the trigger is the first byte of the Nth message under the toxic's ``framing``,
on ``message_stream`` (default: the toxic's own).  On the toxic's own stream the
toxic applies from that byte on ("reset at the 3rd request": the first two pass
whole, not one byte of the third); on the other, from the next chunk of the
toxic's stream after that byte was seen.  Both are finders (:class:`Finder`): anything
that takes chunks and says where in the chunk the trigger starts.

``for_s`` (0: for the rest of the connection) ends the toxic that many seconds
after the trigger.  Like ``after_s`` it is checked when a chunk or the end of
the stream arrives: the first one after the window ends the toxic's stage as a
removal would (what it holds is flushed, its timers are cancelled; a
``timeout`` toxic closes the connection, as on removal) and it and everything
after pass untouched.  A stage that holds a chunk without end (``blackhole``)
is not cut short by ``for_s``; use ``stall``, which ends by itself.
"""

from __future__ import annotations

import logging
from typing import Protocol

from midway.chain.base import Output, Stage

__all__ = ["Finder", "Trigger", "MatchGate", "MatchWatch"]

log = logging.getLogger("midway")


class Finder(Protocol):
    """Finds a trigger in a stream fed chunk by chunk
    (:class:`~midway.chain.toxics.match.StreamMatcher`,
    :class:`~midway.chain.toxics.message.MessageCounter`)."""

    @property
    def error(self) -> str | None:
        """Why the finder gave up for good (the trigger will never come), else ``None``."""
        ...

    def feed(self, chunk: bytes) -> int | None:
        """The offset in ``chunk`` where the trigger starts (0: it began in an
        earlier chunk), or ``None``: not in this chunk, or already reported."""
        ...


def _feed(finder: Finder, data: bytes, out: Output) -> int | None:
    """``finder.feed(data)``, logging once if that made the finder give up."""
    if finder.error is not None:
        return None
    at = finder.feed(data)
    if finder.error is not None:
        log.warning("conn %d: a toxic's %s trigger gives up, so the toxic will not apply: %s",
                    out.info.id, out.direction, finder.error)
    return at


class Trigger:
    """One connection's "the match was seen" flag, shared by the two directions."""

    __slots__ = ("fired",)

    def __init__(self) -> None:
        self.fired = False


class MatchWatch(Stage):
    """Watches the other direction for the match; passes everything on."""

    def __init__(self, finder: Finder, trigger: Trigger) -> None:
        self.finder = finder
        self.trigger = trigger

    async def data(self, data: bytes, out: Output) -> None:
        if not self.trigger.fired and _feed(self.finder, data, out) is not None:
            self.trigger.fired = True
        await out.send(data)


class MatchGate(Stage):
    """The toxic's stage behind its ``match`` or ``message`` condition (see the
    module doc).  ``finder`` is ``None`` when the trigger is watched on the other
    direction."""

    def __init__(self, inner: Stage, finder: Finder | None, trigger: Trigger,
                 for_s: float = 0.0) -> None:
        self.inner = inner
        self.finder = finder
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
            if self.finder is not None:
                at = _feed(self.finder, data, out)
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
        if self.active_since is None and self.finder is None and self.trigger.fired:
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
