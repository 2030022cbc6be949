"""Zero-copy support: ``os.splice`` through pooled pipes (Linux).

The relay's fast path moves bytes socket → pipe → socket with ``splice(2)``, so
they never enter Python: the interpreter only reacts to readiness.  A pipe is
borrowed from :class:`PipePool` when data arrives and returned as soon as it is
empty again, as HAProxy does, so an idle connection holds no pipe and no extra
descriptors.  If no pipe can be made (out of descriptors) the relay copies that
read through user space instead; if the kernel refuses splice for a socket type,
that direction falls back to copying for good.
"""

from __future__ import annotations

import fcntl
import os
import sys

__all__ = ["AVAILABLE", "PIPE_SIZE", "SPLICE_ROUNDS", "FLAGS", "PipePool", "pipes", "splice"]

AVAILABLE = sys.platform.startswith("linux") and hasattr(os, "splice")
"""Whether this platform can splice at all."""

PIPE_SIZE = 1 << 16
"""Bytes one pipe may hold (F_SETPIPE_SZ), and bytes asked of each splice: 64 KiB,
Linux's default pipe size and HAProxy's (``tune.pipesize``).  Measured against
1 MiB and 256 KiB (docs/benchmarks.md, "Bulk through the splice path"): a big
pipe drains a socket's whole receive queue in one call, the sender's window never
closes, and the kernel's TCP work for both legs then runs on the *sender's* CPU
(on loopback: the load generator's); 64 KiB steps, repeated while the pipe fills
(:data:`SPLICE_ROUNDS`), keep that work on the proxy's CPU, as HAProxy's do, for
about a third less CPU per GB on the load's side.  The kernel keeps the default if
it refuses the size."""

SPLICE_ROUNDS = 16
"""Pipes filled and emptied per readiness callback at most (1 MiB), looping while
each splice fills the whole pipe (more is surely waiting): one loop round trip per
MiB instead of one per 64 KiB, and a bound so that one busy connection cannot keep
the others waiting."""

MAX_IDLE_PIPES = 64
"""Empty pipes kept for reuse; more are closed when returned (HAProxy keeps a
similar small cache of free pipes)."""

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
splice = getattr(os, "splice", None)


class PipePool:
    """Empty, non-blocking pipes ready to borrow."""

    def __init__(self, size: int = PIPE_SIZE, keep: int = MAX_IDLE_PIPES) -> None:
        self.size = size
        self.keep = keep
        self._idle: list[tuple[int, int]] = []
        self.created = 0
        self.lent = 0
        """Pipes handed out so far (a cheap counter for tests and statistics)."""

    def acquire(self) -> tuple[int, int] | None:
        """An empty pipe (read fd, write fd), or ``None`` if none can be made."""
        self.lent += 1
        if self._idle:
            return self._idle.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, self.size)
        except OSError:
            pass  # keep the default size
        self.created += 1
        return r, w

    def release(self, pipe: tuple[int, int]) -> None:
        """Give back an empty pipe."""
        if len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        """Close a pipe (one that may still hold data)."""
        for fd in pipe:
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def idle(self) -> int:
        return len(self._idle)

    def clear(self) -> None:
        while self._idle:
            self.discard(self._idle.pop())


pipes = PipePool()
"""The process-wide pool."""
