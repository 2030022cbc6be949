"""The relay's endpoints: a raw socket that can splice, or a stream that can only copy.

Theory of operation
-------------------
The relay calls a handful of socket methods on each of its two endpoints and
nothing else: ``fileno``, ``recv_into``, ``recv``, ``send``, ``shutdown``,
``setsockopt`` (``SO_LINGER`` 0 for a reset) and ``close``.  A plain, connected,
non-blocking :class:`socket.socket` *is* an endpoint, and the only kind that may
take the zero-copy path: ``splice(2)`` moves the bytes of its descriptor, which are
the connection's bytes only when nothing sits between the socket and the relay.

Anything else (a TLS session, :mod:`midway.core.tlsstream`) is a :class:`Stream`: the same methods with the
same meaning, so the relay's logic does not change, but the bytes it returns are not
those of its descriptor, so a connection with a stream endpoint always copies.  The
descriptor is still the source of readiness: the relay's poller
(:mod:`midway.core.poller`) watches ``fileno()`` and calls the relay when it becomes
readable or writable, and ``SO_ERROR`` on it still reports a reset.

A stream's contract, as the relay relies on it:

* ``recv_into(buffer)`` / ``recv(n)`` return what could be decoded now; ``0`` /
  ``b""`` if and only if the peer ended its stream (a clean end: a TLS
  ``close_notify``, or a TCP FIN where the layer accepts one).  When nothing can be
  returned before the descriptor is ready again, they raise :exc:`BlockingIOError`
  (a TLS stream maps want-read and want-write to it).  A reset or a protocol error
  raises another :exc:`OSError`, which resets the connection.
* ``send(data)`` takes a prefix of ``data`` (its length is returned) or raises
  :exc:`BlockingIOError` when it takes nothing.  A call after a would-block gets the
  same bytes again at the front of ``data`` (the relay's sender keeps them), possibly
  followed by more: what a TLS engine that accepts a moving write buffer needs.
* ``shutdown(socket.SHUT_WR)`` ends the stream towards the peer (a half-close) once
  everything sent so far is out; ``close()`` releases it and its descriptor.
* ``pending()`` counts bytes already decoded inside the stream that no readiness
  event will announce (a TLS record holds up to 16 KiB of plaintext and the kernel
  has nothing left to report).  After a read, and when it resumes reading, the relay
  reads again at once while ``pending()`` is above zero, so those bytes are never
  stranded.

An endpoint may also arrive with bytes already read from it (a peeked ClientHello,
the bytes after a PROXY header): the relay is given them as a *prefix*
(``Relay(..., client_prefix=...)``) and relays them first, in order, before
anything it reads later, exactly as if it had read them itself.
"""

from __future__ import annotations

import socket
from typing import Protocol, runtime_checkable

__all__ = ["Stream", "Endpoint", "can_splice", "pending"]


@runtime_checkable
class Stream(Protocol):
    """A copy-only endpoint: socket methods with the relay's semantics (above)."""

    def fileno(self) -> int:
        """The descriptor whose readiness announces this stream's readiness."""

    def recv_into(self, buffer: bytearray, nbytes: int = 0, /) -> int:
        """Decode up to ``len(buffer)`` bytes into ``buffer``; 0 only at the end."""

    def recv(self, bufsize: int, /) -> bytes:
        """Decode up to ``bufsize`` bytes; ``b""`` only at the end."""

    def send(self, data: bytes | bytearray | memoryview, /) -> int:
        """Take a prefix of ``data``; raises :exc:`BlockingIOError` when none."""

    def shutdown(self, how: int, /) -> None:
        """``socket.SHUT_WR``: end the stream towards the peer (half-close)."""

    def setsockopt(self, level: int, option: int, value: bytes, /) -> None:
        """Set an option of the underlying socket (``SO_LINGER`` for a reset)."""

    def close(self) -> None:
        """Release the stream and its descriptor."""

    def pending(self) -> int:
        """Bytes decoded and held, that no readiness event will announce."""


Endpoint = socket.socket | Stream
"""What the relay relays between: a plain socket, or a stream."""


def can_splice(endpoint: Endpoint) -> bool:
    """Whether ``endpoint``'s bytes are its descriptor's bytes (zero-copy capable).

    Only a plain socket: a subclass such as :class:`ssl.SSLSocket` has a descriptor
    too, but its bytes are ciphertext, so the exact type is what counts."""
    return type(endpoint) is socket.socket


def pending(endpoint: Endpoint) -> int:
    """Bytes held decoded inside ``endpoint`` (always 0 for a plain socket)."""
    if type(endpoint) is socket.socket:
        return 0
    held = getattr(endpoint, "pending", None)
    return held() if held is not None else 0
