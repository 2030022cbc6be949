"""The access log: one JSON line per finished connection, an observer like any
other (:mod:`midway.core.observer`); the fields are :class:`CloseRecord`'s.

A regular file is written on the event loop, each line as its connection closes:
such a write does not wait for anyone.  A pipe, a terminal or a socket (``-`` when
standard output is one) has a reader that may stall, and a blocking write there
would stop every proxy once its buffer (64 KiB for a pipe) is full.  Those are
written by a thread of their own, from a bounded queue: when the reader falls
:data:`QUEUE_LINES` lines behind, new lines are dropped and counted, and the
count is logged (HAProxy's log rings drop too; they never block the proxy)."""

from __future__ import annotations

import logging
import os
import queue
import select
import stat
import sys
import threading
import time
from typing import IO

from .observer import CloseRecord, Observer

__all__ = ["AccessLog", "QUEUE_LINES"]

log = logging.getLogger("midway")

QUEUE_LINES = 10_000
"""Lines a stalled pipe's reader may fall behind before lines are dropped: about
5 MiB of records, a few seconds of a busy proxy."""
DROP_REPORT_S = 10.0
"""Dropped lines are logged at most this often (with the count since)."""
_STOP = ""


class AccessLog(Observer):
    """Writes one JSON line per finished connection to a file or standard output.

    A write error is logged once and the access log stops; the proxy goes on."""

    def __init__(self, target: str) -> None:
        self._file: IO[str]
        if target == "-":
            self._file, self._owned = sys.stdout, False
        else:
            self._file, self._owned = open(target, "a", encoding="utf-8"), True
        self._target = "standard output" if target == "-" else target
        self._broken = False
        self._dropped = 0
        self._reported_at = 0.0
        self._queue: queue.Queue[str] | None = None
        self._writer: threading.Thread | None = None
        if not _regular(self._file):
            self._file.flush()  # what was written before goes first
            self._queue = queue.Queue(QUEUE_LINES)
            self._writer = threading.Thread(target=self._write_queued, daemon=True,
                                            name="midway access log")
            self._writer.start()

    def connection_closed(self, record: CloseRecord) -> None:
        if self._broken:
            return
        line = record.to_json() + "\n"
        if self._queue is not None:
            try:
                self._queue.put_nowait(line)
            except queue.Full:
                self._drop()
            return
        try:
            self._file.write(line)
            self._file.flush()
        except (OSError, ValueError) as exc:
            self._failed(exc)

    @property
    def dropped(self) -> int:
        """Lines dropped so far because the reader of a pipe fell behind."""
        return self._dropped

    def _drop(self) -> None:
        self._dropped += 1
        now = time.monotonic()
        if now - self._reported_at >= DROP_REPORT_S:
            self._reported_at = now
            log.warning("access log: the reader of %s is %d lines behind; %d lines "
                        "dropped so far", self._target, QUEUE_LINES, self._dropped)

    def _failed(self, exc: Exception) -> None:
        self._broken = True
        log.error("access log: cannot write (%s); access logging stopped", exc)

    def _write_queued(self) -> None:
        """The writer thread: blocking writes of what the queue holds, many lines
        a write, straight to the descriptor (the loop's thread never touches it)."""
        assert self._queue is not None
        fd = self._file.fileno()
        while True:
            lines = [self._queue.get()]
            while len(lines) < 256:
                try:
                    lines.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in lines
            data = "".join(lines).encode("utf-8")
            try:
                while data:
                    try:
                        data = data[os.write(fd, data):]
                    except BlockingIOError:  # O_NONBLOCK, set by whoever shares it
                        select.select([], [fd], [])
            except OSError as exc:
                self._failed(exc)  # a flag and a log line: both safe from a thread
                return
            if stop:
                return

    def close(self) -> None:
        if self._queue is not None and self._writer is not None:
            try:
                self._queue.put(_STOP, timeout=1.0)
            except queue.Full:
                pass
            self._writer.join(1.0)  # a reader that never reads does not hold the stop
        if self._owned:
            self._file.close()


def _regular(file: IO[str]) -> bool:
    """Whether ``file`` is a regular file (not a pipe, terminal or socket)."""
    try:
        return stat.S_ISREG(os.fstat(file.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # no descriptor (a test's StringIO)
        return True
