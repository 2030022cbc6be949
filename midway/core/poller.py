"""The relay's own readiness poller: one ``epoll`` per event loop.

Theory of operation
-------------------
The listening, relayed and connecting sockets are watched by one
:func:`select.epoll` per event loop, not by the loop's ``add_reader``/``add_writer``.
The epoll descriptor itself is registered once with the loop as an ordinary
reader; when it is readable :meth:`Poller._dispatch` takes up to
:data:`MAX_EVENTS` events with ``poll(0, n)`` and calls the callbacks (inline: a
new connection passes through this loop several times).  With the compiled relay
(:mod:`midway.core.accel`) the epoll is its ``Engine``'s, of which the poller holds
a ``dup``: the engine is the loop's reader, relays its own connections in C and
hands the other events to :meth:`Poller._run` in one call.  Timers (see
:mod:`midway.core.deadlines`), tasks and everything else stay on the loop.

Why, and not the loop's watchers:

* **Errors are delivered.**  uvloop (libuv's ``uv_poll``) treats ``EPOLLERR`` as
  fatal: when a reset arrives together with data (the peer wrote a reply and closed
  with ``SO_LINGER 0``), libuv stops the watcher and uvloop never calls the reader
  (uvloop #552, libuv #3449).  The connection then stayed open until its idle
  timeout, and a connect-send-reset storm filled the process with descriptors.
  Here ``EPOLLERR``/``EPOLLHUP`` go to both the reader and the writer of the
  descriptor (as the stdlib selectors do), so ``recv``/``send`` raise and the
  relay sees the reset, whatever the loop.
* **A paused socket still reports its reset.**  A socket nobody reads (its reader
  removed for back-pressure) stays registered, so a reset on it is seen at once.
  When an error or hang-up fires on a descriptor with no callback wanted, the
  poller reads ``SO_ERROR``: an error goes to the descriptor's ``on_error`` (see
  :meth:`Poller.watch`); a hang-up with no error (both directions shut, the EOF not
  yet read) unregisters it, so a level-triggered ``EPOLLHUP`` cannot spin the
  loop; the next ``add_reader``/``add_writer`` registers it again.  ``SO_ERROR``
  clears the error, which is why the poller hands it on rather than leave a later
  ``recv`` to return 0 (a reset must never turn into a clean end).
* **No per-socket watcher object** (issue 14): libuv creates and destroys a poll
  handle per socket and per watcher change; here a socket costs one small table
  entry and ``epoll_ctl`` calls only when its interest grows.  Interest that
  shrinks is dropped lazily: ``remove_reader`` only updates the table, and the
  kernel mask is narrowed the first time an unwanted event actually fires.  A
  connecting socket handed to the relay (writable → readable) thus costs one
  ``epoll_ctl``, not a remove and an add.

Semantics are the loop's: level-triggered, one reader and one writer per
descriptor, ``add_*`` replaces the callback, ``remove_*`` returns whether one was
registered.  :meth:`Poller.forget` drops everything about a descriptor and must be
called before it is closed: descriptor numbers are reused at once, and an event
already fetched in the current batch for a forgotten descriptor is skipped, so a
stale callback is never called.  A callback that raises is reported to the loop's
exception handler (as the loop does for its own callbacks) and dispatching goes on.

Where ``select.epoll`` does not exist (not Linux), :class:`LoopPoller` offers the
same methods on the loop's own watchers.

One poller per loop, made lazily by :func:`poller_for`; a forked child starts with
none (worker processes never share an epoll with their parent).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import weakref
from collections.abc import Callable

from . import accel
from .perloop import PerLoop

__all__ = ["Poller", "LoopPoller", "poller_for", "engine_for", "MAX_EVENTS", "AVAILABLE"]

log = logging.getLogger("midway")

AVAILABLE = hasattr(select, "epoll")
"""Whether this platform has epoll (else :class:`LoopPoller` is used)."""

MAX_EVENTS = 200
"""Events taken per wake-up: HAProxy's ``tune.maxpollevents`` default.  More ready
descriptors keep the epoll readable, so the loop calls back on its next turn (after
its timers and other callbacks had their share)."""

_IN = select.EPOLLIN if AVAILABLE else 1
_OUT = select.EPOLLOUT if AVAILABLE else 4
_ERR = (select.EPOLLERR | select.EPOLLHUP) if AVAILABLE else 0x18
_READ_EVENTS = _IN | _ERR
_WRITE_EVENTS = _OUT | _ERR

Callback = Callable[[], None]
ErrorCallback = Callable[[OSError], None]


class _Entry:
    """What the poller knows of one descriptor."""

    __slots__ = ("reader", "writer", "on_error", "kernel")

    def __init__(self) -> None:
        self.reader: Callback | None = None
        self.writer: Callback | None = None
        self.on_error: ErrorCallback | None = None
        self.kernel = -1
        """The mask registered with epoll; -1 when not registered."""


class Poller:
    """Readiness callbacks for descriptors, on one ``epoll`` inside ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._fds: dict[int, _Entry] = {}
        self._stale: set[int] | None = None
        """During a dispatch, descriptors forgotten since the batch was fetched."""
        self.failed = True
        """Inside a writer callback: whether its event reported an error or a
        hang-up (``EPOLLERR``/``EPOLLHUP``).  A connecting socket's writer reads
        ``SO_ERROR`` only then: a connect that succeeded reports ``EPOLLOUT`` alone."""
        self._loop = weakref.ref(loop)
        self.engine: accel.Engine | None = None
        """The compiled relay's engine (:mod:`midway.core.accel`), when there is one:
        it owns the epoll, shared (through a ``dup``) with this poller, and the loop's
        one reader; it relays its connections and passes the other events here."""
        if accel.AVAILABLE:
            engine = self.engine = accel.Engine(self._report, self._run)
            self._epoll = select.epoll.fromfd(os.dup(engine.epfd))
            loop.add_reader(engine.epfd, engine.dispatch)
        else:
            self._epoll = select.epoll()
            loop.add_reader(self._epoll.fileno(), self._dispatch)

    # -- the loop's interface -------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            entry = self._fds[fd] = _Entry()
        entry.reader = callback
        if entry.kernel < 0 or not entry.kernel & _IN:
            self._arm(fd, entry)

    def add_writer(self, fd: int, callback: Callback) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            entry = self._fds[fd] = _Entry()
        entry.writer = callback
        if entry.kernel < 0 or not entry.kernel & _OUT:
            self._arm(fd, entry)

    def remove_reader(self, fd: int) -> bool:
        entry = self._fds.get(fd)
        if entry is None or entry.reader is None:
            return False
        entry.reader = None  # the kernel mask is narrowed when an event fires
        return True

    def remove_writer(self, fd: int) -> bool:
        entry = self._fds.get(fd)
        if entry is None or entry.writer is None:
            return False
        entry.writer = None
        return True

    # -- beyond the loop's ----------------------------------------------------

    def watch(self, fd: int, on_error: ErrorCallback, *, register: bool = False) -> None:
        """Call ``on_error(exc)`` when ``fd`` fails (reset, ...) while it has no
        reader and no writer.  Lasts until :meth:`forget`; it does not register
        the descriptor by itself (a socket is registered by its first reader or
        writer and stays registered while watched) unless ``register``: then it
        is registered at once, for errors only, if it is not yet (a socket
        nobody will read or write, such as one taken over half-closed)."""
        entry = self._fds.get(fd)
        if entry is None:
            entry = self._fds[fd] = _Entry()
        entry.on_error = on_error
        if register and entry.kernel < 0:
            self._arm(fd, entry)

    def forget(self, fd: int, *, closing: bool = False) -> None:
        """Drop every callback of ``fd`` and unregister it; call before closing it.

        ``closing``: the caller closes the descriptor right after and holds the
        only reference to its socket, so the kernel drops it from the epoll set by
        itself on that close and the ``epoll_ctl`` is saved (two system calls per
        connection).  Were the socket still open elsewhere (a ``dup``, a child
        between ``fork`` and ``exec``), its stale registration could only report
        readiness for a reused number: a spurious wake-up, which every callback
        here tolerates (a read that would block)."""
        entry = self._fds.pop(fd, None)
        if entry is None:
            return
        if entry.kernel >= 0 and not closing:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # already closed by its owner: the kernel dropped it itself
        if self._stale is not None:
            self._stale.add(fd)

    def hand_over(self, fd: int) -> int:
        """Drop every callback of ``fd`` but leave it registered, for the engine,
        which shares the epoll, to take over: the mask it is registered with (-1:
        none).  The relay of a dialled upstream thus costs one ``epoll_ctl`` (its
        interest changed), not an unregister here and a register there."""
        entry = self._fds.pop(fd, None)
        if self._stale is not None:
            self._stale.add(fd)
        return -1 if entry is None else entry.kernel

    def close(self) -> None:
        """Stop polling (the loop is closing); callbacks are dropped."""
        loop = self._loop()
        engine = self.engine
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._epoll.fileno() if engine is None else engine.epfd)
        self._fds.clear()
        self._epoll.close()
        if engine is not None:
            engine.close()

    def __len__(self) -> int:
        return len(self._fds)

    # -- internals ----------------------------------------------------------

    def _arm(self, fd: int, entry: _Entry) -> None:
        mask = (_IN if entry.reader is not None else 0) | (_OUT if entry.writer is not None else 0)
        if entry.kernel < 0:
            self._epoll.register(fd, mask)
        else:
            self._epoll.modify(fd, mask)
        entry.kernel = mask

    def _dispatch(self) -> None:
        try:
            events = self._epoll.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        self._run(events)

    def _run(self, events: list[tuple[int, int]]) -> None:
        """Call the callbacks of ``events``: polled here, or passed on by the engine."""
        fds = self._fds
        stale: set[int] = set()
        self._stale = stale
        try:
            for fd, ev in events:
                if fd in stale:
                    continue
                entry = fds.get(fd)
                if entry is None:
                    continue
                # The callbacks are called inline (not through _call): this loop
                # runs several times per connection, a frame less each time.
                called = False
                reader = entry.reader
                if reader is not None and ev & _READ_EVENTS:
                    called = True
                    try:
                        reader()
                    except (SystemExit, KeyboardInterrupt):
                        raise
                    except BaseException as exc:
                        self._report(exc, reader)
                    if fd in stale:
                        continue
                writer = entry.writer
                if writer is not None and ev & _WRITE_EVENTS:
                    called = True
                    self.failed = bool(ev & _ERR)
                    try:
                        writer()
                    except (SystemExit, KeyboardInterrupt):
                        raise
                    except BaseException as exc:
                        self._report(exc, writer)
                    if fd in stale:
                        continue
                if called:
                    wanted = ((_IN if entry.reader is not None else 0)
                              | (_OUT if entry.writer is not None else 0))
                    if entry.kernel & ~wanted:
                        self._narrow(fd, entry, ev)
                elif ev & _ERR:
                    self._failed(fd, entry)
                else:  # readiness nobody wants any more: narrow the kernel mask
                    self._narrow(fd, entry, ev)
        finally:
            self._stale = None

    @staticmethod
    def _wanted(entry: _Entry) -> int:
        return (_IN if entry.reader is not None else 0) | (_OUT if entry.writer is not None else 0)

    def _narrow(self, fd: int, entry: _Entry, ev: int) -> None:
        """Drop interest that fired but is no longer wanted."""
        if entry.kernel < 0 or not entry.kernel & ev & (_IN | _OUT) & ~self._wanted(entry):
            return
        wanted = self._wanted(entry)
        if not wanted and entry.on_error is None:
            self._unregister(fd, entry)
            if entry.reader is None and entry.writer is None:
                del self._fds[fd]
            return
        self._epoll.modify(fd, wanted)
        entry.kernel = wanted

    def _unregister(self, fd: int, entry: _Entry) -> None:
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        entry.kernel = -1

    def _failed(self, fd: int, entry: _Entry) -> None:
        """An error or hang-up on a descriptor nobody reads or writes."""
        on_error = entry.on_error
        if on_error is not None:
            err = _so_error(fd)
            if err:
                self._call_error(on_error, OSError(err, os.strerror(err)))
                return
        # A plain hang-up (both directions shut, the EOF not read yet), or an error
        # nobody watches (left pending for the next reader: SO_ERROR is not read):
        # stop polling it until someone wants it again.
        self._unregister(fd, entry)

    def _call_error(self, callback: ErrorCallback, exc: OSError) -> None:
        try:
            callback(exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as error:
            self._report(error, callback)

    def _report(self, exc: BaseException, callback: object) -> None:
        """A callback raised (the engine's: ``callback`` is the relay)."""
        loop = self._loop()
        context = {"message": f"Exception in poller callback {callback!r}", "exception": exc}
        if loop is not None:
            loop.call_exception_handler(context)
        else:
            log.error("%s", context["message"], exc_info=exc)


def _so_error(fd: int) -> int:
    """The pending error of socket ``fd`` (reading it clears it), or 0."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return 0
    finally:
        sock.detach()


class LoopPoller:
    """The same interface on the loop's own watchers (no epoll on this platform)."""

    failed = True
    """Not known here: a connecting socket's writer always reads ``SO_ERROR``."""
    engine = None
    """No compiled relay here (it needs epoll)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)

    def _the_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        assert loop is not None
        return loop

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._the_loop().add_reader(fd, callback)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._the_loop().add_writer(fd, callback)

    def remove_reader(self, fd: int) -> bool:
        return self._the_loop().remove_reader(fd)

    def remove_writer(self, fd: int) -> bool:
        return self._the_loop().remove_writer(fd)

    def watch(self, fd: int, on_error: ErrorCallback, *, register: bool = False) -> None:
        """Nothing to do: errors reach the reader or writer when there is one."""

    def forget(self, fd: int, *, closing: bool = False) -> None:
        self.remove_reader(fd)
        self.remove_writer(fd)

    def hand_over(self, fd: int) -> int:
        self.forget(fd)
        return -1

    def close(self) -> None:
        pass


AnyPoller = Poller | LoopPoller

_pollers: PerLoop[AnyPoller] = PerLoop(lambda loop: Poller(loop) if AVAILABLE else LoopPoller(loop))


poller_for: Callable[[asyncio.AbstractEventLoop], AnyPoller] = _pollers.get
"""``poller_for(loop)``: the poller of ``loop`` (made on first use).  The cache's
own method, not a function around it: one call less, several times a connection."""


def engine_for(loop: asyncio.AbstractEventLoop) -> accel.Engine | None:
    """The compiled relay's engine of ``loop`` (its poller's), or None when the
    compiled relay is not available."""
    return _pollers.get(loop).engine


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pollers.forget_all)  # never share an epoll
