"""Listen and upstream addresses: ``host:port``, ``[v6addr]:port``, ``:port`` and
``unix:/path``, parsed once at configuration time."""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

from ..errors import AddressError

__all__ = ["Address", "parse_address", "format_sockaddr", "privileged_port", "unmapped",
           "resolve_listen"]


@dataclass(frozen=True)
class Address:
    """A parsed address.  ``path`` is set for unix sockets, ``host``/``port``
    otherwise; ``host == ""`` means every interface (listeners only)."""

    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @functools.cached_property
    def is_ip_literal(self) -> bool:
        """True when ``host`` is an IP address, so no name lookup is needed."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str, *, listen: bool, unix: bool = True) -> Address:
    """Parse ``text``; ``listen`` allows port 0 and an empty host (all interfaces);
    ``unix=False``: the caller refuses ``unix:/path`` (the admin API), so a
    message does not offer it.

    Raises :class:`AddressError` with a message that says what is wrong."""
    if not isinstance(text, str):
        raise AddressError(f"expected an address string, got {type(text).__name__}")
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise AddressError("unix: address needs a path, e.g. unix:/run/midway.sock")
        _check_unix_path(text, path)
        return Address(path=path)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise AddressError(f"{text!r}: expected [ipv6-address]:port")
        host, port_text = text[1:end], text[end + 2:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise AddressError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            forms = "[ipv6]:port, :port or unix:/path" if unix else "[ipv6]:port or :port"
            raise AddressError(f"{text!r}: expected host:port, {forms}")
        if ":" in host:
            raise AddressError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:{port_text}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise AddressError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if listen else 1
    if not low <= port <= 65535:
        raise AddressError(f"{text!r}: port must be between {low} and 65535")
    if not host and not listen:
        raise AddressError(f"{text!r}: an upstream needs a host, e.g. 127.0.0.1:{port}")
    if host and not text.startswith("["):
        _check_host_name(text, host)
    return Address(host=host, port=port)


def _check_host_name(text: str, host: str) -> None:
    """Refuse a host that no lookup could take: ``getaddrinfo`` encodes a name
    with IDNA, which fails on an empty label (``a..b``), one over 63 characters or
    a lone surrogate (it raised UnicodeError at bind or dial time), and no name
    holds whitespace or a control character."""
    if any(c.isspace() or not c.isprintable() for c in host):
        raise AddressError(f"{text!r}: host {host!r} is not a host name "
                           f"(it holds whitespace or an unprintable character)")
    try:
        host.encode("idna")
    except UnicodeError as exc:
        reason = exc.__cause__ or exc
        raise AddressError(f"{text!r}: host {host!r} is not a host name ({reason})") from None


_SUN_PATH_MAX = 107
"""The longest unix socket path, in bytes: ``sockaddr_un``'s ``sun_path`` is 108
on Linux, less the terminating NUL Python's ``bind`` and ``connect`` need."""


def _check_unix_path(text: str, path: str) -> None:
    """Refuse a path no ``bind``/``connect`` could take (a NUL was a ValueError
    traceback at start; a long path passed --check and failed at bind)."""
    if "\0" in path:
        raise AddressError(f"{text!r}: a unix socket path cannot hold a NUL character")
    try:
        size = len(os.fsencode(path))
    except UnicodeError:
        raise AddressError(f"{text!r}: the path is not a file name this system can "
                           f"encode") from None
    if size > _SUN_PATH_MAX:
        raise AddressError(f"{text!r}: a unix socket path is at most {_SUN_PATH_MAX} "
                           f"bytes (sockaddr_un), this one has {size}")


def format_sockaddr(addr: object) -> str:
    """Text for a socket address as returned by ``accept``/``getpeername``."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(addr, (str, bytes)):
        path = addr.decode(errors="replace") if isinstance(addr, bytes) else addr
        return f"unix:{path}" if path else "unix:"
    return str(addr)


_CAP_NET_BIND_SERVICE = 1 << 10


def privileged_port(port: int) -> str:
    """Why this process may not bind TCP ``port``, known without binding: on
    Linux a port below net.ipv4.ip_unprivileged_port_start (1024 unless set)
    needs the CAP_NET_BIND_SERVICE capability, which root has.  "" when it may,
    or where it cannot be told."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            start = int(f.read())
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, ValueError, StopIteration, IndexError):
        return ""
    if not 0 < port < start or caps & _CAP_NET_BIND_SERVICE:
        return ""
    return f"a port below {start} needs root or CAP_NET_BIND_SERVICE"


def resolve_listen(address: Address) -> tuple[int, Any, bool]:
    """Where TCP ``address`` binds: (family, sockaddr, dual stack).  An empty
    host or ``::`` is every interface, IPv6 and IPv4 together where the system
    can (else IPv4's); a name is resolved for a passive socket; an IPv4-mapped
    IPv6 address (``[::ffff:127.0.0.1]``) is its IPv4 address, which Linux
    refuses on an IPv6-only socket.  The one resolution of a start and of
    ``--check``.  Raises :class:`AddressError` when the name does not resolve."""
    if address.host in ("", "::") and socket.has_dualstack_ipv6():
        return socket.AF_INET6, ("::", address.port), True
    if address.host == "":
        return socket.AF_INET, ("0.0.0.0", address.port), False
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressError(f"cannot resolve {address.host!r} ({exc.strerror})") from exc
    family, _, _, _, sockaddr = infos[0]
    host = str(sockaddr[0])
    if family == socket.AF_INET6 and (v4 := unmapped(host)) != host:
        return socket.AF_INET, (v4, address.port), False  # [::ffff:127.0.0.1]
    return family, sockaddr, False


def unmapped(host: str) -> str:
    """``host``, or the IPv4 address an IPv4-mapped IPv6 one stands for
    (``::ffff:127.0.0.1`` is ``127.0.0.1``): Linux refuses to bind a mapped
    address on an IPv6-only socket."""
    try:
        v4 = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
    except ValueError:
        return host
    return str(v4) if v4 else host
