"""The channel between the supervisor and one worker: a stream socket pair made
before the worker starts, carrying commands down and answers up.

Theory of operation
-------------------
A frame is a 4-byte big-endian length and that many bytes of a pickled tuple:
``(request id, command)`` down, ``(request id, ok, answer)`` up, where a failed
command's answer is its :class:`~.commands.CommandFailed`.  Pickle, not JSON,
because both ends are the same program of the same version and the messages
are the configuration schema's frozen dataclasses (a whole
:class:`~midway.config.schema.Config` for a reload): a second encoding of the
schema would have to be kept in step with it by hand.  Pickle runs code from
what it reads, which is safe here only because the channel is a socket pair
that no other process holds (made by the supervisor, inherited by that one
worker alone, closed on exec everywhere else) and that nothing outside midway
writes to.

The worker answers commands one at a time, in the order they came
(:func:`serve`), so a change never overtakes the one before it.  The supervisor
(:class:`Channel`) may have several commands in flight (a change and a
``/metrics`` scrape); each waits for the answer carrying its id, for at most
its timeout.  When the worker's end closes (it died, however it died), every
waiting call fails at once with :class:`~.commands.WorkerLost` rather than
waiting out its timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from ..config.target import Target
from .commands import Command, CommandFailed, WorkerLost

__all__ = ["Channel", "serve", "read_frame", "write_frame", "MAX_FRAME", "Hello", "Begin"]

log = logging.getLogger("midway")

_LENGTH = struct.Struct(">I")
MAX_FRAME = 256 << 20
"""Largest frame, 256 MiB: a configuration of a hundred thousand proxies fits; a
length past it means the stream is out of step, and the channel is closed."""


@dataclass(frozen=True)
class Hello(Command):
    """The worker's first frame: it is imported and waits for its target."""


@dataclass(frozen=True)
class Begin(Command):
    """The supervisor's first frame, answered once the worker serves (or with
    why it could not start): the target to start with."""

    target: Target


def encode(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


def write_frame(sock: socket.socket, message: object) -> None:
    """Send one frame on a blocking socket (the worker's first exchange)."""
    sock.sendall(encode(message))


def read_frame(sock: socket.socket) -> Any:
    """Read one frame from a blocking socket; raises EOFError at end of stream."""
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    if length > MAX_FRAME:
        raise EOFError(f"frame of {length} bytes: out of step")
    return pickle.loads(_recv_exactly(sock, length))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the channel closed")
        data += chunk
    return bytes(data)


async def _read(reader: asyncio.StreamReader) -> Any:
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length > MAX_FRAME:
            raise EOFError(f"frame of {length} bytes: out of step")
        return pickle.loads(await reader.readexactly(length))
    except asyncio.IncompleteReadError as exc:
        raise EOFError("the channel closed") from exc


class Channel:
    """The supervisor's end: :meth:`call` sends a command and waits for its
    answer.  ``who`` names the worker in errors."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 who: str) -> None:
        self._reader = reader
        self._writer = writer
        self.who = who
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._closed: str | None = None
        self._task = asyncio.get_running_loop().create_task(self._answers(),
                                                            name=f"midway channel {who}")

    @classmethod
    async def open(cls, sock: socket.socket, who: str) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer, who)

    async def receive(self, timeout_s: float) -> Any:
        """The worker's next unsolicited frame (its :class:`Hello`), before any call."""
        async with asyncio.timeout(timeout_s):
            return await self._first

    async def call(self, command: Command, timeout_s: float) -> Any:
        if self._closed is not None:
            raise WorkerLost(self._closed)
        request = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request] = future
        try:
            self._writer.write(encode((request, command)))
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise WorkerLost(f"no answer to {type(command).__name__} within "
                             f"{timeout_s:g} s") from None
        except (ConnectionError, OSError) as exc:
            raise WorkerLost(f"the channel failed: {exc}") from exc
        finally:
            self._waiting.pop(request, None)

    @property
    def _first(self) -> asyncio.Future[Any]:
        future = self._waiting.get(0)
        if future is None:
            future = self._waiting[0] = asyncio.get_running_loop().create_future()
        return future

    async def _answers(self) -> None:
        why = "it exited before answering"
        try:
            while True:
                message = await _read(self._reader)
                if isinstance(message, Hello):
                    future = self._first
                    if not future.done():
                        future.set_result(message)
                    continue
                request, ok, answer = message
                waiting = self._waiting.get(request)
                if waiting is None or waiting.done():
                    continue  # its caller gave up (timeout)
                if ok:
                    waiting.set_result(answer)
                else:
                    waiting.set_exception(answer if isinstance(answer, CommandFailed)
                                          else CommandFailed(str(answer)))
        except (EOFError, ConnectionError, OSError) as exc:
            if not isinstance(exc, EOFError) or str(exc) != "the channel closed":
                why = f"the channel failed: {exc}"
        except Exception as exc:  # a frame that does not decode: out of step for good
            log.exception("%s: an answer could not be read; closing its channel", self.who)
            why = f"the channel failed: {type(exc).__name__}: {exc}"
        self.close(why)

    def close(self, why: str = "closed") -> None:
        """Fail every waiting call with :class:`WorkerLost` (``why``)."""
        if self._closed is None:
            self._closed = why
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(WorkerLost(self._closed))
                future.exception()  # retrieved: a caller that left logs nothing
        self._waiting.clear()
        self._writer.close()
        if self._task is not asyncio.current_task():
            self._task.cancel()


class _Executor(Protocol):
    async def execute(self, command: Command) -> Any: ...


async def serve(agent: _Executor, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    """The worker's end: run each command in order and answer it, until the
    supervisor's end closes (returns then)."""
    while True:
        try:
            request, command = await _read(reader)
        except (EOFError, ConnectionError, OSError) as exc:
            log.debug("control channel closed: %s", exc)
            return
        try:
            answer: tuple[Any, ...] = (request, True, await agent.execute(command))
        except CommandFailed as exc:
            answer = (request, False, exc)
        except Exception as exc:  # a bug: answer it, log it, keep serving
            log.exception("control command %s failed", type(command).__name__)
            answer = (request, False, CommandFailed(f"{type(exc).__name__}: {exc}"))
        try:
            writer.write(encode(answer))
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.debug("control channel closed: %s", exc)
            return
