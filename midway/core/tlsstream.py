"""A TLS session as a relay endpoint: an :class:`ssl.SSLObject` over two memory
BIOs, on a plain non-blocking socket that this stream reads and writes itself.

Theory of operation
-------------------
The relay sees a :class:`~midway.core.streams.Stream`: socket methods that return
and take plaintext.  Underneath, ciphertext moves between the socket and
OpenSSL's two memory BIOs (``incoming``: what the peer sent, ``outgoing``: what
OpenSSL wants sent); OpenSSL never touches the descriptor.

Why memory BIOs and not :class:`ssl.SSLSocket` (which moves 16 MiB each way
through the relay as well, tests/core/test_streams_tls.py): **half-close**.  To
end one direction a TLS endpoint sends ``close_notify`` and goes on reading
(RFC 8446 §6.1 allows it; OpenSSL 3 serves TLS 1.2 the same way).  The only way
Python offers to send one, ``unwrap()``, calls ``SSL_shutdown`` twice, and the
second call reads: application data already received is then a fatal error
(``APPLICATION_DATA_AFTER_CLOSE_NOTIFY``, OpenSSL 3.0), and an ``SSLSocket``
would read it straight from the kernel.  Here the stream decides what OpenSSL
has seen: before ``close_notify`` it decrypts what the incoming BIO holds into
a small buffer of its own (``pending()`` counts it), so ``unwrap()`` finds
nothing to fail on, and later records are read as usual.

Reading (``recv_into``): decrypt what OpenSSL can; when it needs more, one
``recv`` of up to :data:`READ_SIZE` from the socket into the incoming BIO, and
again; :exc:`BlockingIOError` when the socket has nothing.  ``pending()`` counts
decrypted bytes held and undecrypted *complete* records in the BIO (none after a
read ended wanting more), which no readiness event would announce, and counts an
end of stream read behind the last bytes returned as one (the peer's last record
and its ``close_notify`` often come in one segment, and then nothing).

Writing (``send``): encrypt up to :data:`SEND_CHUNK` bytes into the outgoing BIO
and send the ciphertext.  When the kernel takes all of it, the plaintext was
taken; when it does not, the rest of the ciphertext is kept, the plaintext is
counted as *consumed*, and :exc:`BlockingIOError` is raised, exactly as
``SSL_write`` does on a socket: the relay's sender keeps the bytes and calls
again with the same bytes in front; that call sends the kept ciphertext first and
reports the consumed count as taken.  So the relay's buffer is never empty while
this stream holds ciphertext, and back-pressure is the kernel's, as for a socket.

Ending:

* the peer's ``close_notify`` reads as an end of stream (``0``): the relay passes
  it on as a FIN;
* a TCP FIN without ``close_notify`` reads as an end of stream too (as HAProxy,
  nginx and Python's own ``suppress_ragged_eofs`` take it: browsers and many
  clients close that way); :attr:`TlsStream.truncated` records it;
* ``shutdown(SHUT_WR)``: ``close_notify``, then the TCP FIN once it is out;
  reading goes on;
* ``close()``: a ``close_notify`` first, if none was sent, unless the socket was
  set to reset (``SO_LINGER`` 0: the relay's abort) or the handshake never
  finished.  What the kernel does not take at once is sent from the poller for at
  most :data:`CLOSE_FLUSH_S`, then the descriptor is closed.
* an :class:`ssl.SSLError` (a bad record, a fatal alert) is an :exc:`OSError`:
  the relay resets the connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from .poller import poller_for

__all__ = ["TlsStream", "READ_SIZE", "SEND_CHUNK", "CLOSE_FLUSH_S", "FIRST_BYTES_KEPT"]

FIRST_BYTES_KEPT = 12
"""How many of the peer's first bytes :attr:`TlsStream.first` keeps: a PROXY v2
signature's length, enough to tell a PROXY header from TLS."""
READ_SIZE = 65536
"""Ciphertext bytes per socket read: the relay's read size (four full records)."""

SEND_CHUNK = 65536
"""Plaintext bytes encrypted per ``send``: four records of 2^14 bytes
(RFC 8446 §5.1), the relay's read size."""

CLOSE_FLUSH_S = 5.0
"""How long a closed stream may go on sending its last ciphertext (its
``close_notify``) when the kernel's buffer is full: nginx's
``lingering_timeout`` default."""

_RECORD = 16384
_LINGER = (socket.SOL_SOCKET, socket.SO_LINGER)


class TlsStream:
    """A TLS endpoint over ``sock`` (connected, non-blocking), server or client
    side of ``context``.  Call :meth:`handshake` first; then the relay owns it.

    ``initial`` is ciphertext already read from ``sock`` (bytes an earlier layer
    read past its own header)."""

    __slots__ = ("sock", "obj", "incoming", "outgoing", "out", "consumed", "held", "partial",
                 "eof", "eof_told", "truncated", "sent_close", "aborting", "closed", "established",
                 "first", "_flusher", "_loop")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None, initial: bytes = b"") -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        if initial:
            self.incoming.write(initial)
        self.first = bytes(initial[:FIRST_BYTES_KEPT])
        """The peer's first bytes, for the words of a failed handshake."""
        self.out = bytearray()
        """Ciphertext not yet taken by the kernel."""
        self.consumed = 0
        """Plaintext encrypted into :attr:`out` and not yet reported as taken."""
        self.held = bytearray()
        """Plaintext decrypted ahead of the relay (before a ``close_notify``)."""
        self.partial = False
        """The incoming BIO holds only part of a record (a read wanted more)."""
        self.eof = False
        """The stream has ended towards midway (``close_notify`` or FIN)."""
        self.eof_told = False
        """That end was returned (a ``0``); until then :meth:`pending` counts it."""
        self.truncated = False
        """It ended with a TCP FIN and no ``close_notify``."""
        self.sent_close = False
        self.aborting = False
        self.closed = False
        self.established = False
        self._flusher: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the handshake, before the relay --------------------------------------

    async def handshake(self) -> None:
        """Run the TLS handshake on the loop's relay poller (no thread, no
        blocking call).  Raises :class:`ssl.SSLError` (the handshake failed),
        :class:`OSError` (the socket failed or closed); no timeout of its own."""
        loop = self._loop = asyncio.get_running_loop()
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush_all(loop)
                try:
                    n = self.sock.recv_into(_RECV)
                except (BlockingIOError, InterruptedError):
                    await _ready(loop, self.sock, write=False)
                    continue
                if n == 0:
                    self.incoming.write_eof()
                else:
                    self.incoming.write(_RECV_VIEW[:n])
                    if not self.first:
                        self.first = bytes(_RECV_VIEW[:min(n, FIRST_BYTES_KEPT)])
                continue
            except ssl.SSLError:
                self.out += self.outgoing.read()  # the alert that says why, if it fits
                self._send_out()
                raise
            break
        self.established = True
        await self._flush_all(loop)

    async def _flush_all(self, loop: asyncio.AbstractEventLoop) -> None:
        self.out += self.outgoing.read()
        while self.out:
            try:
                del self.out[:self.sock.send(self.out)]
            except (BlockingIOError, InterruptedError):
                await _ready(loop, self.sock, write=True)

    # -- for a short exchange outside the relay (an active health check) -------

    async def sendall(self, data: bytes) -> None:
        """Send all of ``data``, waiting on the relay's poller while the kernel
        takes no more.  Raises :class:`OSError` as :meth:`send` does."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                view = view[self.send(view):]
            except (BlockingIOError, InterruptedError):
                await _ready(loop, self.sock, write=True)

    async def receive(self, size: int) -> bytes:
        """At most ``size`` plaintext bytes, waiting until some arrive; ``b""`` at
        the end of the stream.  Raises :class:`OSError` as :meth:`recv` does."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return self.recv(size)
            except (BlockingIOError, InterruptedError):
                await _ready(loop, self.sock, write=False)

    # -- what the handshake told ----------------------------------------------

    def alpn(self) -> str | None:
        """The application protocol agreed (ALPN), if any."""
        return self.obj.selected_alpn_protocol()

    def version(self) -> str | None:
        return self.obj.version()

    def peer_certificate(self) -> dict[str, Any] | None:
        """The peer's certificate, decoded, when it sent one that was verified."""
        return self.obj.getpeercert() or None

    # -- the Stream protocol (midway.core.streams) --------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int:
        view = memoryview(buffer)
        want = nbytes or len(view)
        if self.held:
            n = min(want, len(self.held))
            view[:n] = self.held[:n]
            del self.held[:n]
            return n
        if self.eof:
            self.eof_told = True
            return 0
        got = 0
        while got < want:
            try:
                n = self.obj.read(want - got, view[got:])  # type: ignore[assignment]
            except ssl.SSLWantReadError:
                self.partial = self.incoming.pending > 0
                if got:
                    break
                self._receive()  # BlockingIOError when the socket has nothing
                continue
            except ssl.SSLZeroReturnError:  # close_notify
                n = 0
            except ssl.SSLEOFError:  # a FIN without close_notify
                n, self.truncated = 0, True
            if n == 0:
                self.eof = True
                self.eof_told = got == 0
                break
            got += n
        if self.outgoing.pending:  # a reply OpenSSL made while reading (a KeyUpdate)
            self.out += self.outgoing.read()
            self._send_out()
        return got

    def recv(self, bufsize: int, /) -> bytes:
        buffer = bytearray(bufsize)
        return bytes(buffer[:self.recv_into(buffer)])

    def send(self, data: bytes | bytearray | memoryview, /) -> int:
        if self.out:
            self._send_out()
            if self.out:
                raise BlockingIOError
            if self.consumed:
                taken, self.consumed = self.consumed, 0
                return taken
        take = memoryview(data)[:SEND_CHUNK]
        self.obj.write(take)  # into the memory BIO: always whole
        self.out += self.outgoing.read()
        self._send_out()
        if self.out:
            self.consumed = len(take)
            raise BlockingIOError
        return len(take)

    def shutdown(self, how: int, /) -> None:
        if how == socket.SHUT_RD:
            self.sock.shutdown(how)
            return
        self._close_notify()
        self._send_out()
        if self.out:
            self._flush_later()
        else:
            self.sock.shutdown(socket.SHUT_WR)

    def setsockopt(self, level: int, option: int, value: int | bytes, /) -> None:
        if (level, option) == _LINGER:
            self.aborting = True  # the relay resets this side: no close_notify
        self.sock.setsockopt(level, option, value)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.aborting or not self.established:
            self._close_now()
            return
        try:
            self._close_notify()
            self._send_out()
        except OSError:
            self.out.clear()
        if self.out:
            self._flush_later()
        else:
            self._close_now()

    def pending(self) -> int:
        held = len(self.held) + self.obj.pending()
        if not self.partial:
            held += self.incoming.pending
        # An end read behind the last bytes returned: no readiness event will come
        # for it (the peer may wait for midway's answer), so it counts as one.
        return held + (self.eof and not self.eof_told)

    # -- inside ---------------------------------------------------------------

    def _receive(self) -> None:
        """One socket read into the incoming BIO (the end of the socket's stream
        as the BIO's end).  Raises :exc:`BlockingIOError` when there is nothing."""
        n = self.sock.recv_into(_RECV)
        if n == 0:
            self.incoming.write_eof()
        else:
            self.incoming.write(_RECV_VIEW[:n])
        self.partial = False

    def _send_out(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        del self.out[:sent]

    def _close_notify(self) -> None:
        """Queue a ``close_notify`` (once), after decrypting what the incoming BIO
        holds (see the module's theory: ``unwrap`` would otherwise fail on it)."""
        if self.sent_close:
            return
        self.sent_close = True
        while not self.eof and (self.incoming.pending or self.obj.pending()):
            try:
                chunk = self.obj.read(_RECORD)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            if not chunk:
                self.eof = True
                break
            self.held += chunk
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's close_notify has not come: the usual case
        self.out += self.outgoing.read()

    def _flush_later(self) -> None:
        """Send :attr:`out` from the poller (the relay writes no more here), then
        the FIN (or the close, if closed meanwhile); bounded by :data:`CLOSE_FLUSH_S`."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.out.clear()
            if self.closed:
                self._close_now()
            return
        poller = poller_for(loop)
        fd = self.sock.fileno()

        def done() -> None:
            poller.remove_writer(fd)
            if self._flusher is not None:
                self._flusher.cancel()
                self._flusher = None
            if self.closed:
                self._close_now()
            else:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the peer is gone: the reader sees it

        def writable() -> None:
            try:
                self._send_out()
            except OSError:
                self.out.clear()
            if not self.out:
                done()

        def give_up() -> None:
            self._flusher = None
            self.out.clear()
            done()

        poller.add_writer(fd, writable)
        if self._flusher is None:
            self._flusher = loop.call_later(CLOSE_FLUSH_S, give_up)

    def _close_now(self) -> None:
        if self._flusher is not None:  # closed while a FIN waited: the close sends it
            self._flusher.cancel()
            self._flusher = None
            if self._loop is not None:
                poller_for(self._loop).forget(self.sock.fileno())
        self.sock.close()


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    """Wait until ``sock`` is readable (writable), or failed, on the relay's poller."""
    poller = poller_for(loop)
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    (poller.add_writer if write else poller.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (poller.remove_writer if write else poller.remove_reader)(fd)


# One receive buffer for every stream: its bytes are copied into a BIO before the
# call returns.
_RECV = bytearray(READ_SIZE)
_RECV_VIEW = memoryview(_RECV)
