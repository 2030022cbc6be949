"""``midway replay``: a fake upstream that answers from a recorded capture.

Usage::

    midway 127.0.0.1:8080 127.0.0.1:80 --pcap session.pcap     # record once
    midway replay session.pcap --listen 127.0.0.1:8081          # then, with no server

    async with midway.Replay("session.pcap") as replay:         # or inside a test
        reader, writer = await asyncio.open_connection(*replay.address)

Theory of operation
-------------------
A capture midway wrote with ``--pcap`` holds two TCP conversations per proxied
connection (see :mod:`midway.chain.pcap`).  Replay uses the **upstream leg**
of each (midway ↔ the real server), found by
:func:`~midway.chain.pcapread.upstream_legs`: its server bytes are what the
server really said, and its client bytes what the server was asked (after any
hook or toxic).  With no hook rewriting the requests the two legs carry the
same client bytes, so a client talking to the replay directly matches.

Each recorded connection becomes a :class:`Script`: the server's actions (data,
FIN, RST) in order, each with the client bytes the recording shows before it.
The Nth client accepted plays the Nth recorded connection, in the order of the
recording; a client past the last one is closed at once with a warning (record
as many connections as the test makes).  For each action the replay first reads
the client bytes recorded before it, checking them as they arrive (by content,
or only by length with ``loose``): the first byte that differs is logged with a
hex dump of both sides around it and the connection is closed; so is a client
that closes early, sends more than the recording after the server's last
action, or sends nothing for ``wait_s`` while the replay waits for it.  Then the
action is played: the recorded bytes are sent, the FIN sent, or the connection
reset.  With ``timing = "recorded"`` each action waits the time it took in the
recording since the event before it (the client's last bytes, or the server's
previous action); by default it does not wait.  Every failure is also kept in
:attr:`Replay.failures` for a test to assert on.

Limits (what replay cannot do):

- It answers; it does not initiate.  Data the server sent on its own is
  replayed only as the recording ordered it after the client's bytes: a banner
  (SMTP, Redis's ``HELLO``-less greeting, MySQL's handshake) is sent at once, but
  a push that came at a given time (pub/sub, keep-alive pings) comes right after
  the bytes that preceded it, or after its recorded delay with ``--timing
  recorded``, never on a clock of its own.
- Randomised protocols do not match: a nonce, a random key, a timestamp or a
  session id in the *client's* bytes differs from run to run (use ``loose``, which
  checks lengths only, when the lengths are fixed); in the *server's* bytes the
  recorded ones are sent, which a client that checks them (a challenge answer,
  a TLS handshake) rejects.
- TLS cannot be replayed: the keys differ on every handshake.  Record and replay
  the plain-text side (midway terminating TLS, or the upstream in plain text).
- One connection plays one recording: a client that opens connections in
  another order than the recording (a pool, concurrent clients) gets the wrong
  one; record with the same concurrency as the replay, ideally one connection
  at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, NoReturn

from .chain.dumpfmt import hexdump
from .chain.pcapread import PcapReadError, RecordedConnection, read_connections, upstream_legs
from .config.addresses import format_sockaddr, parse_address, resolve_listen
from .core.listener import bind_resolved
from .errors import AddressError, MidwayError, describe_oserror
from .testing import Background

__all__ = ["Replay", "BackgroundReplay", "Script", "Step", "load_scripts", "main", "WAIT_S"]

log = logging.getLogger("midway")

WAIT_S = 30.0
"""How long the replay waits for a client's next bytes before closing: as long
as Toxiproxy's client timeout (and well above any test's think time)."""

DIFF_CONTEXT = 32
"""Bytes shown on each side of a mismatch: two ``hexdump -C`` lines."""

GOODBYE_S = 2.0
"""How long a closing replay waits for the client's FIN (see ``_goodbye``)."""

READ_SIZE = 65536
Timing = Literal["fast", "recorded"]
TIMINGS: tuple[Timing, ...] = ("fast", "recorded")


@dataclass(frozen=True)
class Step:
    """One server action of a recording."""

    expect: bytes
    """The client bytes recorded between the previous action and this one."""
    kind: Literal["data", "fin", "rst"]
    data: bytes
    delay_s: float
    """Recorded time since the event before it (``timing = "recorded"``)."""


@dataclass(frozen=True)
class Script:
    """One recorded connection, as the replay plays it."""

    steps: tuple[Step, ...]
    tail: bytes
    """Client bytes recorded after the server's last action."""
    label: str
    """Which recorded connection (its addresses), for the log."""
    client_reset: bool = False
    """The recorded client ended with a reset (after the tail): one now is expected."""

    @classmethod
    def of(cls, conn: RecordedConnection) -> Script:
        steps: list[Step] = []
        pending = bytearray()
        previous = conn.opened_at
        client_reset = False
        for event in conn.events:
            if event.from_client:
                if event.kind == "data":
                    pending += event.data
                elif event.kind == "rst":
                    client_reset = True
                    break
            else:
                steps.append(Step(bytes(pending), event.kind, event.data,
                                  max(0.0, event.t - previous)))
                pending.clear()
                if event.kind == "rst":
                    break
            previous = event.t
        label = f"{format_sockaddr(conn.client)} -> {format_sockaddr(conn.server)}"
        return cls(tuple(steps), bytes(pending), label, client_reset)


def load_scripts(path: str | os.PathLike[str]) -> list[Script]:
    """The scripts of a capture's upstream legs, in recording order.  Raises
    ``OSError`` or :class:`~midway.chain.pcapread.PcapReadError`."""
    with open(path, "rb") as f:
        conns = read_connections(f)
    return [Script.of(conn) for conn in upstream_legs(conns)]


class _Closed(Exception):
    """The session ends here (already logged)."""


class Replay:
    """Serves ``capture`` (a path, or scripts) on ``listen`` while in ``async
    with``; see the module doc.  ``listen`` may use port 0: the bound address is
    :attr:`address`.  Raises :class:`~midway.errors.AddressError` for a bad
    ``listen`` (checked first), ``OSError``/:class:`PcapReadError` for the file and
    ``OSError`` when the address cannot be bound."""

    def __init__(self, capture: str | os.PathLike[str] | Sequence[Script],
                 listen: str = "127.0.0.1:0", *, loose: bool = False,
                 timing: Timing = "fast", wait_s: float = WAIT_S) -> None:
        if timing not in TIMINGS:
            raise ValueError(f"timing must be 'fast' or 'recorded', not {timing!r}")
        self.listen = parse_address(listen, listen=True)
        # Resolved once, here (a name that does not resolve: AddressError now), and
        # bound as resolved by start(): a second look-up could answer otherwise.
        self._resolved = None if self.listen.is_unix else resolve_listen(self.listen)
        self.scripts = load_scripts(capture) if isinstance(capture, str | os.PathLike) \
            else list(capture)
        self.loose = loose
        self.timing = timing
        self.wait_s = wait_s
        self.accepted = 0
        """Clients accepted so far (the next one plays script number ``accepted``)."""
        self.completed = 0
        """Sessions played to the end with no mismatch."""
        self.failures: list[str] = []
        """One line per session that failed (mismatch, early close, no script left)."""
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._resolved is None:
            assert self.listen.path is not None
            self._server = await asyncio.start_unix_server(self._accept, self.listen.path)
        else:
            sock = bind_resolved(self._resolved, backlog=None)  # start_server listens
            try:
                self._server = await asyncio.start_server(self._accept, sock=sock)
            except BaseException:
                sock.close()
                raise
        count = len(self.scripts)
        log.info("replay: %d recorded connection%s, listening on %s", count,
                 "" if count == 1 else "s", format_sockaddr(self._server.sockets[0].getsockname()))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._sessions):
                task.cancel()
            await asyncio.gather(*self._sessions, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Replay:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise MidwayError("the replay is not running")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    # -- one client --------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        index = self.accepted
        self.accepted += 1
        client = format_sockaddr(writer.get_extra_info("peername"))
        try:
            reset = False
            if index >= len(self.scripts):
                self._fail(f"client {client}: no recorded connection left (the capture has "
                           f"{len(self.scripts)}); closing")
            else:
                session = _Session(self, reader, writer, self.scripts[index],
                                   f"connection {index + 1} (client {client}, recorded "
                                   f"{self.scripts[index].label})")
                with contextlib.suppress(_Closed):
                    reset = await session.play()
                    self.completed += 1
            if not reset:
                await _goodbye(reader, writer)
        except (ConnectionError, OSError) as exc:
            self._fail(f"client {client}: {exc.strerror or exc}")
        except asyncio.CancelledError:
            # stop() ends it (and waits for it): the task ends normally, as the
            # streams' done callback calls task.exception(), which raises for a
            # cancelled task: a logged traceback (CPython gh-113538).
            pass
        finally:
            self._sessions.discard(task)
            writer.close()

    def _fail(self, message: str) -> None:
        log.warning("replay: %s", message)
        self.failures.append(message)


async def _goodbye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End with a FIN, not a reset: closing a socket with unread bytes makes the
    kernel send a RST, which can destroy replies the client has not read yet.
    So send our FIN, then read and drop what the client still sends until its
    own FIN, for at most :data:`GOODBYE_S`."""
    if writer.is_closing():
        return
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(GOODBYE_S):
            while await reader.read(READ_SIZE):
                pass


class _Session:
    """One client playing one script."""

    def __init__(self, replay: Replay, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, script: Script, label: str) -> None:
        self.replay = replay
        self.reader = reader
        self.writer = writer
        self.script = script
        self.label = label
        self.buffer = bytearray()  # received, not yet matched
        self.offset = 0  # client bytes matched so far

    async def play(self) -> bool:
        """Play the script; ``True`` if it ended with a reset (nothing more to do)."""
        for step in self.script.steps:
            await self.expect(step.expect)
            if self.replay.timing == "recorded" and step.delay_s > 0:
                await asyncio.sleep(step.delay_s)
            if step.kind == "data":
                self.writer.write(step.data)
                await self.writer.drain()
            elif step.kind == "fin":
                if self.writer.can_write_eof():
                    self.writer.write_eof()
            else:  # an abortive close: SO_LINGER 0 makes close() send a RST
                sock = self.writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return True
        await self.expect(self.script.tail)
        try:
            extra = self.buffer or await self.read()
        except ConnectionResetError:
            if not self.script.client_reset:
                raise
            return True  # as recorded: the client reset here
        if extra:
            self.fail(f"the client sent {len(extra)} bytes more than the recording, at byte "
                      f"{self.offset}:", "received", bytes(extra[:DIFF_CONTEXT]))
        return False

    async def read(self) -> bytes:
        try:
            return await asyncio.wait_for(self.reader.read(READ_SIZE), self.replay.wait_s)
        except TimeoutError:
            self.fail(f"no bytes from the client for {self.replay.wait_s:g} s at byte "
                      f"{self.offset}")

    async def expect(self, expected: bytes) -> None:
        matched = 0
        while matched < len(expected):
            if not self.buffer:
                chunk = await self.read()
                if not chunk:
                    self.fail(f"the client closed after {self.offset} bytes; the recording "
                              f"has {len(expected) - matched} more before the next reply")
                self.buffer += chunk
            take = min(len(self.buffer), len(expected) - matched)
            got = bytes(self.buffer[:take])
            want = expected[matched:matched + take]
            if not self.replay.loose and got != want:
                at = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
                self.mismatch(expected, matched, got, at)
            del self.buffer[:take]
            matched += take
            self.offset += take

    def mismatch(self, expected: bytes, matched: int, got: bytes, at: int) -> NoReturn:
        """Log where the client's bytes first differ from the recording: both
        sides from the 16-byte line before the difference (the bytes before
        ``matched`` were equal, so the received side starts with them too)."""
        start = max(0, matched + at - DIFF_CONTEXT // 2) // 16 * 16
        received = expected[:matched] + got
        self.fail(f"the client's bytes differ from the recording at byte {self.offset + at} "
                  f"(shown from byte {self.offset - matched + start}):",
                  "recorded", expected[start:start + 2 * DIFF_CONTEXT],
                  "received", received[start:start + 2 * DIFF_CONTEXT])

    def fail(self, message: str, *dumps: str | bytes) -> NoReturn:
        lines = [f"{self.label}: {message}"]
        for item in dumps:
            if isinstance(item, str):
                lines.append(f"  {item}:")
            else:
                lines.extend(f"    {line}" for line in hexdump(item))
        self.replay._fail("\n".join(lines) + "\n  closing the connection")
        raise _Closed


class BackgroundReplay(Background[Replay]):
    """A :class:`Replay` on a background thread, for synchronous tests; its
    arguments are :class:`Replay`'s."""

    def __init__(self, capture: str | os.PathLike[str] | Sequence[Script],
                 listen: str = "127.0.0.1:0", **options: object) -> None:
        super().__init__(Replay(capture, listen, **options))  # type: ignore[arg-type]

    @property
    def replay(self) -> Replay:
        return self.service

    @property
    def failures(self) -> list[str]:
        return self.call(lambda: list(self.service.failures))

    @property
    def accepted(self) -> int:
        return self.call(lambda: self.service.accepted)

    @property
    def completed(self) -> int:
        return self.call(lambda: self.service.completed)


# -- the command line: midway replay CAPTURE --listen ADDR --------------------------


def _seconds(text: str) -> float:
    """A ``--wait-s`` value: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="midway replay",
        description="Serve as a fake upstream from a capture midway recorded with --pcap: "
                    "each client gets the recorded server bytes of one recorded connection, "
                    "in order, each once it has sent what preceded it.")
    parser.add_argument("capture", help="a pcap file written by midway --pcap")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="ADDR",
                        help="address to listen on (host:port, [ipv6]:port, unix:/path). "
                             "Default: 127.0.0.1:0 (a free port, logged).")
    parser.add_argument("--loose", action="store_true",
                        help="check the client's bytes by length only, not by content")
    parser.add_argument("--timing", choices=TIMINGS, default="fast",
                        help="'recorded': wait the recorded delay before each reply. "
                             "Default: fast (no waiting).")
    parser.add_argument("--wait-s", type=_seconds, default=WAIT_S, metavar="SECONDS",
                        help=f"close a client silent this long while a reply waits on it. "
                             f"Default: {WAIT_S:g}.")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"),
                        help="least severity of the log lines written to standard error. "
                             "Default: info.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``midway replay``; returns the exit code (0 after a signal, 2 for a bad
    command line or capture, 1 when the address cannot be bound)."""
    from .control.process import setup_logging

    args = build_parser().parse_args(argv)
    try:
        replay = Replay(args.capture, args.listen, loose=args.loose, timing=args.timing,
                        wait_s=args.wait_s)
    except AddressError as exc:
        print(f"midway replay: --listen: {exc}", file=sys.stderr)
        return 2
    except PcapReadError as exc:
        print(f"midway replay: {args.capture}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"midway replay: cannot read {args.capture}: {describe_oserror(exc)}",
              file=sys.stderr)
        return 2
    if not replay.scripts:  # every client would be closed: a wrong file, surely
        print(f"midway replay: {args.capture}: no TCP connection recorded, nothing to replay",
              file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    return asyncio.run(_serve(replay))


async def _serve(replay: Replay) -> int:
    try:
        await replay.start()
    except OSError as exc:
        log.error("replay: cannot listen on %s: %s", replay.listen, describe_oserror(exc))
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await replay.stop()
    log.info("replay: stopped (%d client%s, %d played to the end, %d failed)", replay.accepted,
             "" if replay.accepted == 1 else "s", replay.completed, len(replay.failures))
    return 0
