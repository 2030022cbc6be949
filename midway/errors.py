"""midway's small family of errors.

Library code raises these (with the low-level cause chained) and never calls
``sys.exit``; only the command line maps them to exit codes and one-line messages.
"""

from __future__ import annotations

import errno
import functools
import inspect
import ssl
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

__all__ = [
    "MidwayError",
    "ConfigError",
    "AddressError",
    "ListenError",
    "UpstreamError",
    "Rejected",
    "TlsFailed",
    "ElementError",
    "describe_oserror",
    "traceback_of",
    "at_callers_line",
]

P = ParamSpec("P")
R = TypeVar("R")


class MidwayError(Exception):
    """Base class of every error midway raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take their parts (``ConfigError(path, message)``) and pass
        # Exception one formatted message, which is all ``args`` keeps: the default
        # reduction would call them with it alone, so pickle (multiprocessing, a
        # process pool) and copy failed or nested the message.  Rebuilt as they
        # are instead: the same args and attributes, no __init__ run.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[MidwayError], args: tuple[Any, ...],
             state: dict[str, Any]) -> MidwayError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


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


class ElementError(MidwayError):
    """A chain element's failure told in full by its message (``hook
    myhooks:Audit raised in on_data: ValueError: ...``, ``... returned str``): the
    connection is closed, and the log shows that message, with the traceback of
    the user's exception chained as ``__cause__`` if there is one, and none of
    midway's own frames, which would only bury the user's (see
    :func:`traceback_of`)."""


def traceback_of(exc: BaseException) -> BaseException | None:
    """The exception whose traceback to log with a failure ``exc``: for an
    :class:`ElementError`, the user's exception it chains (``None``: no traceback,
    the message says it all); for anything else, ``exc`` itself (a defect, where
    every frame counts)."""
    if isinstance(exc, ElementError):
        return exc.__cause__
    return exc


def at_callers_line(fn: Callable[P, R]) -> Callable[P, R]:
    """For the entry points of the Python API (functions and coroutine
    functions): a :class:`MidwayError` (a mistake in the caller's settings, a name
    in use, a port taken) leaves with midway's own frames dropped, so its
    traceback ends at the caller's line, and pytest hides this wrapper's frame too
    (``__tracebackhide__``).  The message names the problem; the frames that built
    it are not the caller's concern.  A cause that is a MidwayError too (a
    translation whose message includes it) is dropped; any other cause (an
    ``OSError``, a user's hook) is kept.  Other exceptions, midway's defects, keep
    every frame."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def entry_async(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True  # noqa: F841 (read by pytest)
            try:
                return await fn(*args, **kwargs)
            except MidwayError as exc:
                raise _bare(exc)  # noqa: B904 (re-raised as it is)
        return cast("Callable[P, R]", entry_async)

    @functools.wraps(fn)
    def entry(*args: P.args, **kwargs: P.kwargs) -> R:
        __tracebackhide__ = True  # noqa: F841 (read by pytest)
        try:
            return fn(*args, **kwargs)
        except MidwayError as exc:
            raise _bare(exc)  # noqa: B904 (re-raised as it is)
    return entry


def _bare(exc: MidwayError) -> MidwayError:
    if isinstance(exc.__cause__, MidwayError):
        exc.__cause__ = None
        exc.__suppress_context__ = True
    return exc.with_traceback(None)


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
    if isinstance(exc, ssl.SSLError):  # an OSError whose errno is OpenSSL's, not the kernel's
        return "tls: " + (exc.reason or exc.strerror or str(exc)).lower().replace("_", " ")
    if isinstance(exc, OSError):
        if exc.errno in _ERRNO_WORDS:
            return _ERRNO_WORDS[exc.errno]
        if exc.strerror:
            return exc.strerror.lower()
    return str(exc) or type(exc).__name__
