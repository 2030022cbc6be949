"""SNI routes: which route a TLS server name selects.

Theory of operation
-------------------
A route is named by a pattern: an exact host name (``api.example.com``) or a
wildcard for exactly one label (``*.example.com`` matches ``a.example.com``, not
``example.com`` and not ``a.b.example.com``), as in a certificate's wildcard
(RFC 6125 §6.4.3) and HAProxy's ``req.ssl_sni`` maps.  Matching is
case-insensitive (DNS names are, RFC 4343); a pattern or name with one trailing
dot is the same name without it.  A non-ASCII pattern is converted to its IDNA
A-label (``xn--...``), which is what clients put in the SNI.

The most specific route wins, whatever the order they were listed in: an exact
name before the wildcard of its parent.  Because a wildcard covers one label,
at most one wildcard can match a given name (``*.`` + its parent), so there is
nothing else to break ties on, and a lookup is two dictionary probes.  Two
routes with the same pattern are a configuration error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Generic, TypeVar

from midway.errors import MidwayError

__all__ = ["RoutePatternError", "SniRoutes", "normalize_pattern"]

T = TypeVar("T")

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")  # RFC 1035 §2.3.4: 63 octets
_NAME_MAX = 253  # RFC 1035 §2.3.4: 255 octets on the wire, 253 characters written


class RoutePatternError(ValueError, MidwayError):
    """An SNI route pattern is not a host name or a one-label wildcard."""


def normalize_pattern(pattern: str) -> str:
    """The canonical form of a route pattern (lower case, A-labels, no trailing
    dot).  Raises RoutePatternError naming what is wrong."""
    name = pattern.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    wildcard = name.startswith("*.")
    host = name[2:] if wildcard else name
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise RoutePatternError(f"SNI pattern {pattern!r} is not a valid IDNA name") from None
    if not host or len(host) > _NAME_MAX:
        raise RoutePatternError(f"SNI pattern {pattern!r} must be a host name of 1 to "
                                f"{_NAME_MAX} characters, or '*.' followed by one")
    if "*" in host:
        raise RoutePatternError(f"SNI pattern {pattern!r}: '*' may only be the whole first "
                                f"label, as in '*.example.com'")
    for label in host.split("."):
        if _LABEL.fullmatch(label) is None:
            raise RoutePatternError(f"SNI pattern {pattern!r} has an invalid label {label!r}")
    return f"*.{host}" if wildcard else host


class SniRoutes(Generic[T]):
    """A set of routes, each ``(pattern, target)``; :meth:`match` finds the
    target for a server name, or None."""

    __slots__ = ("_exact", "_wildcard")

    def __init__(self, routes: Iterable[tuple[str, T]]) -> None:
        self._exact: dict[str, T] = {}
        self._wildcard: dict[str, T] = {}  # keyed by the parent: "example.com"
        for pattern, target in routes:
            name = normalize_pattern(pattern)
            table, key = ((self._wildcard, name[2:]) if name.startswith("*.")
                          else (self._exact, name))
            if key in table:
                raise RoutePatternError(f"two SNI routes for {name!r}")
            table[key] = target

    def __len__(self) -> int:
        return len(self._exact) + len(self._wildcard)

    def match(self, server_name: str | None) -> T | None:
        """The target of the most specific route for ``server_name``; None when
        no route matches or the client sent no name."""
        if not server_name:
            return None
        name = server_name.lower()
        if name.endswith("."):
            name = name[:-1]
        if name in self._exact:
            return self._exact[name]
        label, _, parent = name.partition(".")
        if label and parent:
            return self._wildcard.get(parent)
        return None
