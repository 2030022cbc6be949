"""Capture to a pcap file: both TCP connections of every proxied connection,
as Wireshark and tshark would have seen them on the wire.

Theory of operation
-------------------
A proxied connection is two real TCP connections: the *client leg* (client ↔
the listener's address) and the *upstream leg* (midway's own address ↔ the
upstream).  The capture records both, with their real addresses and ports,
synthesized by :class:`~midway.chain.pcapfile.TcpConversation`: handshake,
data segments each acknowledged, FIN per half-close, RST on abort.

Which bytes go on which leg depends on where they are seen in the chain, so a
capture is two elements, :attr:`PcapCapture.head` and :attr:`PcapCapture.tail`,
and the registry puts the head first and the tail last (``keep_last``: elements
added while running go before it)::

    reader ─▶ head ─▶ hooks ─▶ dump ─▶ toxics ─▶ tail ─▶ writer

====================  ==========================  ===========================
direction             head records                tail records
====================  ==========================  ===========================
upstream (c → s)      client leg, client's data   upstream leg, midway's data
downstream (s → c)    upstream leg, server's data client leg, midway's data
====================  ==========================  ===========================

So each leg shows what really crossed it: with no hook or toxic the two legs
carry the same bytes; with a rewriting hook the client leg shows the original
request and the upstream leg the rewritten one; with a latency toxic the
client leg shows the responses late.  Bytes a stage sends with
``Output.reply`` go straight to a socket, past the tail, and are not recorded
(midway's hooks inject through the chain instead, so theirs are).

Times are wall-clock: the head stamps a chunk with the time it was read from
its socket (``Output.received_wall``, read at that moment: the loop's clock of
``received_at`` counts whole milliseconds on uvloop, and a time derived from it
could date a reply before its request), the tail with the time it passed on.  Both handshakes are written
when the connection's first stage starts (the client leg stamped with the
time the client was accepted), so connections refused by a hook's
``on_connect`` or never connected upstream are not recorded.  At the end,
a reset connection gets an RST on each leg not yet finished, from the side
that reset (the peer that did, midway on the other leg); any other close
gets midway's FIN on each leg where it was not yet written.  Legs on unix
sockets have no TCP addresses and are not recorded.

The file is written synchronously and unbuffered, one ``write`` per packet
record, so that a live ``tail -f | tshark -i -`` keeps up and a write that
fails (a full disk) leaves the file cut after its last whole record, never in
the middle of one.  A write error is logged once and the capture stops; the
proxy goes on.  Several proxies naming the same file
share one writer.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from .base import Attachment, ConnectionInfo, Element, Output, Stage
from .pcapfile import PcapWriter, RotatingPcapFile, TcpConversation

__all__ = ["PcapCapture", "CaptureFile", "open_capture_file", "MIN_ROTATE_BYTES"]

log = logging.getLogger("midway")

MIN_ROTATE_BYTES = 40
"""The smallest rotation size :class:`~midway.chain.pcapfile.RotatingPcapFile`
accepts: a 24-byte file header and one 16-byte record header."""

CLIENT_LEG, UPSTREAM_LEG = "client", "upstream"


class CaptureFile:
    """A pcap file (rotated by size when ``max_bytes`` > 0, keeping ``keep`` old
    files) that never raises on write: the first ``OSError`` is logged and the
    capture stops.  Shared by every capture of the same path; see
    :func:`open_capture_file`."""

    def __init__(self, path: str, max_bytes: int = 0, keep: int = 0) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._sink: PcapWriter | RotatingPcapFile
        if max_bytes > 0:
            self._sink = RotatingPcapFile(path, max_bytes, keep)
        else:
            # Unbuffered: each record is one write, so a full disk leaves a capture
            # cut after a whole record (see PcapWriter), never in the middle of one.
            self._file = open(path, "wb", buffering=0)  # owned; closed by close()
            self._sink = PcapWriter(self._file)
        self.broken = False
        self.users = 0

    def write_packet(self, t: float, packet: bytes) -> None:
        if self.broken:
            return
        try:
            self._sink.write_packet(t, packet)
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self._sink.flush()
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self.broken = True
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        log.error("pcap: cannot write %s (%s); the capture stopped, traffic goes on",
                  self.path, reason)

    def release(self) -> None:
        """One user is done; the last one closes the file."""
        with _FILES_LOCK:
            self.users -= 1
            if self.users > 0:
                return
            _FILES.pop(self.path, None)
        try:
            if isinstance(self._sink, RotatingPcapFile):
                self._sink.close()
            elif self._file is not None:
                self._file.close()
        except OSError as exc:
            if not self.broken:
                self._fail(exc)


_FILES: dict[str, CaptureFile] = {}
_FILES_LOCK = threading.Lock()


def open_capture_file(path: str, max_bytes: int = 0, keep: int = 0) -> CaptureFile:
    """The shared capture file for ``path``; the first user's rotation settings
    apply.  Raises ``OSError`` if it cannot be created."""
    key = os.path.abspath(path)
    with _FILES_LOCK:
        capture = _FILES.get(key)
        if capture is None:
            capture = _FILES[key] = CaptureFile(key, max_bytes, keep)
        capture.users += 1
        return capture


@dataclass
class _Legs:
    """One connection's two conversations and which FINs each has carried."""

    info: ConnectionInfo
    client: TcpConversation | None
    upstream: TcpConversation | None
    opened: bool = False
    fins: set[tuple[str, bool]] = field(default_factory=set)

    def conversation(self, leg: str) -> TcpConversation | None:
        return self.client if leg == CLIENT_LEG else self.upstream


class _Tap(Stage):
    """Records what passes into one leg, as one of its two sides, and passes it on."""

    def __init__(self, capture: PcapCapture, legs: _Legs, leg: str, from_client: bool,
                 head: bool) -> None:
        self.capture = capture
        self.legs = legs
        self.leg = leg
        self.from_client = from_client
        self.head = head

    def start(self, out: Output) -> None:
        self.capture._open(self.legs)

    async def data(self, data: bytes, out: Output) -> None:
        capture = self.capture
        capture._open(self.legs)
        conv = self.legs.conversation(self.leg)
        if conv is not None and (self.leg, self.from_client) not in self.legs.fins:
            # The head dates a chunk by when it was read, not when it reached the
            # head; the tail by when midway passed it on.
            t = out.received_wall if self.head else capture.wall()
            _safely(conv.data, self.from_client, data, t)
            capture.file.flush()
        await out.send(data)

    async def eof(self, out: Output) -> None:
        self.capture._fin(self.legs, self.leg, self.from_client)
        await out.send_eof()


def _safely(action: Callable[..., None], *args: object) -> None:
    try:
        action(*args)
    except RuntimeError as exc:  # an event the conversation cannot take (after a reset)
        log.debug("pcap: %s", exc)


class _CaptureElement(Element):
    """One of the capture's two chain positions.  The head sees what each peer
    sent (client leg upstream, upstream leg downstream); the tail, kept last in the
    chain, sees what midway sends on (the other leg of each direction)."""

    def __init__(self, capture: PcapCapture, name: str, *, head: bool) -> None:
        self.name = name
        self.capture = capture
        self.head = head
        self.keep_last = not head

    def attach(self, info: ConnectionInfo) -> Attachment | None:
        capture = self.capture
        legs = capture._legs(info)
        if legs is None:
            return None
        head = self.head
        up_leg, down_leg = (CLIENT_LEG, UPSTREAM_LEG) if head else (UPSTREAM_LEG, CLIENT_LEG)
        return Attachment(
            upstream=_Tap(capture, legs, up_leg, True, head=head),
            downstream=_Tap(capture, legs, down_leg, False, head=head),
            on_close=(lambda info, reason: capture._finish(legs)) if head else None,
        )

    def close(self) -> None:
        if self.head:
            self.capture.close()


class PcapCapture:
    """Records connections to ``file`` through two chain elements, :attr:`head`
    (first in the chain) and :attr:`tail` (last); see the module doc.

    ``wall`` is the wall clock (``time.time``); ``rng`` draws the initial
    sequence numbers.  Owns one use of ``file``, released by :meth:`close`."""

    def __init__(self, file: CaptureFile, *, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None, name: str = "pcap") -> None:
        self.file = file
        self.wall = wall
        self.rng = rng if rng is not None else random.Random()
        self._key = f"midway.pcap.{id(self)}"
        self.head: Element = _CaptureElement(self, name, head=True)
        self.tail: Element = _CaptureElement(self, f"{name} (tail)", head=False)
        self._closed = False

    @classmethod
    def open(cls, path: str, max_bytes: int = 0, keep: int = 0, *,
             wall: Callable[[], float] = time.time, rng: random.Random | None = None,
             name: str = "pcap") -> PcapCapture:
        """A capture to ``path``.  Raises ``OSError`` if it cannot be created."""
        return cls(open_capture_file(path, max_bytes, keep), wall=wall, rng=rng, name=name)

    def _legs(self, info: ConnectionInfo) -> _Legs | None:
        """This connection's legs, made by whichever element attaches first."""
        legs = info.extra.get(self._key)
        if isinstance(legs, _Legs):
            return legs
        client = upstream = None
        if info.client_addr is not None and info.local_addr is not None:
            client = self._conversation(info.client_addr, info.local_addr)
        if info.upstream_local_addr is not None and info.upstream_addr is not None:
            upstream = self._conversation(info.upstream_local_addr, info.upstream_addr)
        if client is None and upstream is None:
            return None
        legs = _Legs(info, client, upstream)
        info.extra[self._key] = legs
        return legs

    def _conversation(self, client: tuple[str, int],
                      server: tuple[str, int]) -> TcpConversation | None:
        try:
            return TcpConversation(self.file, client, server, rng=self.rng)
        except ValueError as exc:  # not an IP address after all
            log.debug("pcap: not recording %s -> %s: %s", client, server, exc)
            return None

    def _open(self, legs: _Legs) -> None:
        if legs.opened:
            return
        legs.opened = True
        now = self.wall()
        if legs.client is not None:
            legs.client.open(min(legs.info.started_at or now, now))
        if legs.upstream is not None:
            legs.upstream.open(now)
        self.file.flush()

    def _fin(self, legs: _Legs, leg: str, from_client: bool) -> None:
        self._open(legs)
        conv = legs.conversation(leg)
        if conv is not None and (leg, from_client) not in legs.fins:
            legs.fins.add((leg, from_client))
            _safely(conv.fin, from_client, self.wall())
            self.file.flush()

    def _finish(self, legs: _Legs) -> None:
        """The connection has ended: RST or midway's FIN where not yet written."""
        if not legs.opened:
            return
        info = legs.info
        now = self.wall()
        for leg, conv in ((CLIENT_LEG, legs.client), (UPSTREAM_LEG, legs.upstream)):
            if conv is None or conv.finished:
                continue
            # midway is the server side of the client leg, the client side of the other.
            midway_is_client = leg == UPSTREAM_LEG
            if info.reset:
                by_peer = info.reset_by == leg  # else midway's RST on this leg
                _safely(conv.reset, midway_is_client != by_peer, now)
            elif (leg, midway_is_client) not in legs.fins:
                legs.fins.add((leg, midway_is_client))
                _safely(conv.fin, midway_is_client, now)
        info.extra.pop(self._key, None)
        self.file.flush()

    def close(self) -> None:
        """Release the file (idempotent; both elements call it)."""
        if not self._closed:
            self._closed = True
            self.file.release()
