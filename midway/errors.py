"""midway's small family of errors.

Library code raises these (with the low-level cause chained) and never calls
``sys.exit``; only the command line maps them to exit codes and one-line messages.
"""

from __future__ import annotations

import errno

__all__ = [
    "MidwayError",
    "ConfigError",
    "AddressError",
    "ListenError",
    "UpstreamError",
    "Rejected",
    "TlsFailed",
    "describe_oserror",
]


class MidwayError(Exception):
    """Base class of every error midway raises on purpose."""


class ConfigError(MidwayError):
    """The configuration is invalid.  ``path`` names the offending key, e.g.
    ``proxy.redis.upstreams[1]``; the message says what is wrong with it."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class AddressError(ValueError, MidwayError):
    """An address string could not be parsed (``host:port``, ``[v6]:port``,
    ``:port`` or ``unix:/path``)."""


class ListenError(MidwayError):
    """A listener could not be opened (address in use, permission denied,
    unresolvable host).  The message names the address."""


class UpstreamError(MidwayError):
    """No upstream could be reached for a connection."""


class Rejected(MidwayError):
    """Raised by a chain element (for example a hook's ``on_connect``) to refuse
    a connection.  The connection is closed; the proxy goes on."""


class TlsFailed(MidwayError):
    """A TLS handshake with the client or an upstream failed (raised by the TLS
    layers, :mod:`midway.layers.tls`).  The message says why in words (``client
    sent no certificate``); the connection is closed with the reason
    ``tls_failed``."""


# One place that turns errno values into words a user reads in a log line.
_ERRNO_WORDS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EADDRNOTAVAIL: "address not available on this host",
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by peer",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.EMFILE: "too many open files (process limit)",
    errno.ENFILE: "too many open files (system limit)",
    errno.ENOENT: "no such file or directory",
}


def describe_oserror(exc: BaseException) -> str:
    """A short human description of an OSError (or timeout), without a traceback."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        if exc.errno in _ERRNO_WORDS:
            return _ERRNO_WORDS[exc.errno]
        if exc.strerror:
            return exc.strerror.lower()
    return str(exc) or type(exc).__name__
