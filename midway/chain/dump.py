"""The live dump: every connection's bytes, both directions, printed as they flow.

Theory of operation
-------------------
A :class:`DumpElement` attaches a small stage to each direction of every
connection.  The stage formats each chunk with a
:class:`~midway.chain.dumpfmt.DumpFormatter` (text, ``hexdump -C`` or auto, with
the wall-clock time it passes the dump) and passes the bytes on unchanged.  An
open line is printed when the connection's stages start (so connections refused
by a hook's ``on_connect`` are not shown), an end-of-stream line for each
half-close, and a close line with the reason and byte counts.

Nothing on the data path ever waits for the output.  Formatted text goes to a
:class:`DumpWriter`, a queue drained by one thread per output (standard output
or a file) that does the blocking writes.  The queue holds at most
:data:`DUMP_QUEUE_CHARS` characters; when it is full (the terminal, the pipe
reader or the disk cannot keep up) further chunks are *not formatted at all*,
only counted (open, end-of-stream and close lines have room of their own, so
every connection's end is still shown), and once the output has caught up one line says how many chunks
and bytes of traffic were skipped.  The traffic itself is always relayed in
full: the dump drops lines, never bytes.  A write error (``| head`` exiting,
disk full) is logged once and the dump stops; the proxy goes on.

Colour is on when the output is a terminal and ``NO_COLOR`` (no-color.org) is
not set, off otherwise: piped or written to a file, the dump has no escape
byte.  Writers are shared by output: several proxies dumping to standard output
use one writer and their lines never interleave inside a chunk.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .base import (
    DOWNSTREAM,
    UPSTREAM,
    Attachment,
    ConnectionInfo,
    Direction,
    Element,
    Output,
    Stage,
)
from .dumpfmt import DumpFormatter, DumpMode

__all__ = [
    "DUMP_CLOSE_TIMEOUT_S",
    "DUMP_QUEUE_CHARS",
    "DumpElement",
    "DumpWriter",
    "open_dump_writer",
    "reopen_dump_files",
]

log = logging.getLogger("midway")

DUMP_QUEUE_CHARS = 1 << 20
"""Characters of formatted dump waiting for a slow output (1 MiB of mostly ASCII
text): the same bound as the relay's read-ahead per chained direction
(:data:`midway.chain.runner.CHAIN_QUEUE_HIGH`), about fifty fully shown 4 KiB
chunks in hex.  Past it chunks are counted instead of shown."""

DUMP_CLOSE_TIMEOUT_S = 2.0
"""How long stopping waits for queued dump text to be written (a terminal or
pipe that is not being read would otherwise hold the shutdown forever)."""

STDOUT = "-"
"""The target name of standard output."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class DumpWriter:
    """Writes dump text to one file descriptor from a thread of its own.

    :meth:`write` never blocks: text goes to a queue bounded by ``max_chars``
    and a daemon thread writes it out.  The caller asks :meth:`has_room` first
    and, when there is none, reports the chunk it did not format with
    :meth:`skipped`; the next text written is preceded by a line counting what
    was skipped.  Not owned by any one element: :func:`open_dump_writer` counts
    users and the last :meth:`release` closes it."""

    def __init__(self, fd: int, *, target: str, owned: bool,
                 max_chars: int = DUMP_QUEUE_CHARS,
                 wall: Callable[[], float] = time.time) -> None:
        self.fd = fd
        self.target = target
        self.owned = owned
        self.max_chars = max_chars
        self.color = _isatty(fd) and "NO_COLOR" not in os.environ
        """Whether dump text for this output should be coloured."""
        self._wall = wall
        self._notices = DumpFormatter(color=self.color)
        self._cond = threading.Condition()
        self._items: deque[tuple[str, bool]] = deque()
        """Text to write, each with whether it is an event's (see :meth:`write`)."""
        self._queued = 0
        self._queued_events = 0
        """Characters of open, end-of-stream and close lines queued (not in
        ``_queued``, which counts chunks and notices)."""
        self._skipped_chunks = 0
        self._skipped_bytes = 0
        self._closing = False
        self._broken = False
        self._thread: threading.Thread | None = None
        self.users = 0
        self.skipped_total = 0
        """Chunks skipped since the writer opened (for tests and statistics)."""

    def has_room(self) -> bool:
        """Whether formatted text would be queued now (no lock: a hint that is
        at worst one chunk out of date, which the bound allows for)."""
        return self._queued < self.max_chars and not self._broken

    def skipped(self, traffic_bytes: int) -> None:
        """A chunk of ``traffic_bytes`` bytes was not shown for want of room."""
        with self._cond:
            self._skipped_chunks += 1
            self._skipped_bytes += traffic_bytes
            self.skipped_total += 1

    def write(self, text: str, *, event: bool = False) -> None:
        """Queue ``text`` (whole lines).  Dropped, and counted as skipped, if the
        queue is full or the output failed.  An ``event`` (an open, end-of-stream
        or close line) is bounded on its own, by another ``max_chars`` of event
        text, so that a flood of chunks cannot hide how its connections ended."""
        with self._cond:
            if self._broken or self._closing:
                return
            if (self._queued_events if event else self._queued) >= self.max_chars:
                self._skipped_chunks += 1
                self.skipped_total += 1
                return
            self._put_notice()
            self._items.append((text, event))
            if event:
                self._queued_events += len(text)
            else:
                self._queued += len(text)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"midway dump {self.target}")
                self._thread.start()
            self._cond.notify()

    def _put_notice(self) -> None:
        if self._skipped_chunks:
            notice = self._notices.dropped(self._wall(), self._skipped_chunks, self._skipped_bytes)
            self._items.append((notice, False))
            self._queued += len(notice)
            self._skipped_chunks = self._skipped_bytes = 0

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items:
                    return
                batch = list(self._items)
                self._items.clear()
            events = sum(len(text) for text, event in batch if event)
            size = sum(len(text) for text, event in batch if not event)
            try:
                _write_all(self.fd, "".join(text for text, _ in batch).encode(
                    "utf-8", "surrogateescape"))
            except OSError as exc:
                with self._cond:
                    self._broken = True
                    self._items.clear()
                    self._queued = self._queued_events = 0
                log.error("dump: cannot write to %s (%s); the dump stopped, traffic goes on",
                          "standard output" if self.target == STDOUT else self.target,
                          exc.strerror or exc)
                return
            with self._cond:
                self._queued -= size
                self._queued_events -= events

    def release(self) -> None:
        """One user is done; the last one closes the writer."""
        with _WRITERS_LOCK:
            self.users -= 1
            if self.users > 0:
                return
            _WRITERS.pop(self.target, None)
        self.close()

    def close(self, timeout_s: float = DUMP_CLOSE_TIMEOUT_S) -> None:
        """Write what is queued (waiting at most ``timeout_s``), then stop."""
        with self._cond:
            if self._closing:
                return
            self._put_notice()
            if self._items and self._thread is None and not self._broken:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"midway dump {self.target}")
                self._thread.start()
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.owned and (self._thread is None or not self._thread.is_alive()):
            os.close(self.fd)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


_WRITERS: dict[str, DumpWriter] = {}
_WRITERS_LOCK = threading.Lock()


_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


def reopen_dump_files() -> None:
    """Open every dump file again at its path (a reload does, as for the access
    log): after logrotate renamed one, what follows goes to a new file there.
    The new file takes the writer's descriptor (``dup2``), so a chunk being
    written goes whole to one file or the other.  A file that cannot be opened
    is logged and the dump goes on into the old one."""
    with _WRITERS_LOCK:  # a writer in _WRITERS is not closed (release pops it first)
        for writer in _WRITERS.values():
            if not writer.owned:
                continue
            try:
                fd = os.open(writer.target, _FILE_FLAGS, 0o644)
            except OSError as exc:
                log.error("dump: cannot open %s again (%s); the dump goes on into the file "
                          "open before", writer.target, exc.strerror or exc)
                continue
            try:
                os.dup2(fd, writer.fd, inheritable=False)
            finally:
                os.close(fd)


def open_dump_writer(target: str) -> DumpWriter:
    """The shared writer for ``target``: a file path (appended to, created if
    missing) or ``"-"`` for standard output.  Call :meth:`DumpWriter.release`
    when done.  Raises ``OSError`` if the file cannot be opened."""
    key = target if target == STDOUT else os.path.abspath(target)
    with _WRITERS_LOCK:
        writer = _WRITERS.get(key)
        if writer is None:
            if target == STDOUT:
                try:
                    fd, owned = sys.stdout.fileno(), False
                except (AttributeError, ValueError, OSError):
                    fd, owned = 1, False  # sys.stdout replaced (tests): the process's own
            else:
                fd = os.open(key, _FILE_FLAGS, 0o644)
                owned = True
            writer = _WRITERS[key] = DumpWriter(fd, target=key, owned=owned)
        writer.users += 1
        return writer


@dataclass
class _Counts:
    """One connection's dump state, shared by its two stages."""

    info: ConnectionInfo
    started: bool = False
    up: int = 0
    down: int = 0


class _DumpStage(Stage):
    def __init__(self, element: DumpElement, counts: _Counts, direction: Direction) -> None:
        self.element = element
        self.counts = counts
        self.direction = direction

    def start(self, out: Output) -> None:
        self.element._opened(self.counts)

    async def data(self, data: bytes, out: Output) -> None:
        counts = self.counts
        if self.direction == UPSTREAM:
            counts.up += len(data)
        else:
            counts.down += len(data)
        element = self.element
        writer = element.writer
        if writer.has_room():
            # The time midway passes the chunk on (after the hooks, which may have
            # made it or held it), not the time some earlier chunk was read.
            writer.write(element.formatter.chunk(counts.info.id, self.direction,
                                                 element.wall(), data))
        else:
            writer.skipped(len(data))
        await out.send(data)

    async def eof(self, out: Output) -> None:
        element = self.element
        element.writer.write(
            element.formatter.half_closed(self.counts.info.id, self.direction, element.wall()),
            event=True)
        await out.send_eof()


class DumpElement(Element):
    """Prints every chunk of every connection it attaches to (see the module doc).

    Owns one use of ``writer`` and releases it in :meth:`close`."""

    def __init__(self, formatter: DumpFormatter, writer: DumpWriter, *,
                 wall: Callable[[], float] = time.time, name: str = "dump") -> None:
        self.name = name
        self.formatter = formatter
        self.writer = writer
        self.wall = wall
        self._closed = False

    @classmethod
    def open(cls, target: str, mode: DumpMode = "auto", max_bytes: int | None = 4096, *,
             wall: Callable[[], float] = time.time, name: str = "dump") -> DumpElement:
        """A dump to ``target`` (a path, or ``"-"`` for standard output) whose
        colour follows the output (a terminal, and ``NO_COLOR`` unset).  Raises
        ``OSError`` if the file cannot be opened."""
        writer = open_dump_writer(target)
        formatter = DumpFormatter(mode=mode, color=writer.color, max_bytes=max_bytes)
        return cls(formatter, writer, wall=wall, name=name)

    def attach(self, info: ConnectionInfo) -> Attachment:
        counts = _Counts(info)
        return Attachment(
            upstream=_DumpStage(self, counts, UPSTREAM),
            downstream=_DumpStage(self, counts, DOWNSTREAM),
            on_close=lambda info, reason: self._closed_conn(counts, reason),
        )

    def _opened(self, counts: _Counts) -> None:
        if counts.started:
            return
        counts.started = True
        info = counts.info
        self.writer.write(self.formatter.opened(
            info.id, self.wall(), client=info.client, upstream=info.upstream, proxy=info.proxy),
            event=True)

    def _closed_conn(self, counts: _Counts, reason: str) -> None:
        if not counts.started:
            return
        info = counts.info
        if info.close_detail:
            reason = f"{reason}: {info.close_detail}"
        now = self.wall()
        self.writer.write(self.formatter.closed(
            info.id, now, reason=reason, bytes_up=counts.up, bytes_down=counts.down,
            duration_s=max(0.0, now - info.started_at)), event=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.writer.release()
