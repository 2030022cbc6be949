"""Who may connect: CIDR allow/deny lists and the live-connection limit per source.

Theory of operation
-------------------
**Rules.**  ``allow`` and ``deny`` are lists of IPv4 and IPv6 networks in CIDR
notation (``10.0.0.0/8``, ``2001:db8::/32``; a bare address is a /32 or /128).
A client is refused when it matches any ``deny`` rule (*deny wins*, whatever the
order), or when ``allow`` is not empty and it matches no ``allow`` rule.  Both
empty = everyone is allowed.  ``0.0.0.0/0`` and ``::/0`` are "everyone" for each
family.

**IPv4-mapped IPv6.**  A dual-stack listener (``[::]:port`` without
``IPV6_V6ONLY``) reports IPv4 clients as ``::ffff:1.2.3.4``.  Those are matched as
the IPv4 address they carry, and a rule written in mapped form
(``::ffff:10.0.0.0/104``) is read as its IPv4 network, so one rule set means the
same on every kind of listener.  :func:`client_ip` does that normalisation, and the
per-source counter and ``hash_source`` use the same key.

**Matching** costs one dictionary lookup per distinct prefix length in the rules,
not one comparison per rule: rules are stored as the set of masked network
integers for each prefix length, so long deny lists stay cheap at accept.

**Malformed rules** are refused when the configuration is read, with a message
naming the rule and what is wrong (host bits set says which network was meant).

**Per-source limit.**  :class:`SourceLimiter` counts live connections per client IP;
past ``max_connections_per_source`` (0 = off) a new one is refused.  ``acquire``
returns a :class:`SourceLease` that the connection releases once when it ends
(releasing twice is harmless), so the count cannot drift; an IP's entry is removed
when its count reaches zero, so memory follows live connections only.  It runs
for every accepted connection, so a dotted-quad string (what ``getpeername``
gives for IPv4, always in canonical form) is its own key without being parsed:
:func:`source_key` parses only what may need normalising (anything with a
``:``), which keeps the count at about 1 µs per connection instead of 3.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["IPAddress", "Network", "client_ip", "source_key", "parse_network", "AccessList",
           "SourceLimiter", "SourceLease"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
"""IPv4-mapped IPv6 addresses (RFC 4291 section 2.5.5.2)."""


def client_ip(host: str | IPAddress) -> IPAddress:
    """The client address as matched and counted: an IPv4-mapped IPv6 address is
    its IPv4 address; an IPv6 zone (``%eth0``) is dropped.  Raises
    :class:`ValueError` for a string that is not an IP address."""
    ip = ipaddress.ip_address(host.split("%", 1)[0]) if isinstance(host, str) else host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(int(ip))
    return ip


def source_key(host: str | IPAddress) -> str:
    """The per-source counter's key for ``host``: :func:`client_ip` as text, with
    an IPv4 string (no ``:``, as the kernel reports it) taken as it is.  Raises
    :class:`ValueError` for a string with a ``:`` that is not an IP address."""
    if isinstance(host, str) and ":" not in host:
        return host
    return str(client_ip(host))


def parse_network(text: str) -> Network:
    """One rule: a CIDR network or a bare address.  Raises :class:`ValueError`
    with a message a user can act on."""
    if not isinstance(text, str):
        raise ValueError(f"expected a CIDR string such as '10.0.0.0/8', got {type(text).__name__}")
    rule = text.strip()
    try:
        net: Network = ipaddress.ip_network(rule, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(rule, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IPv4 or IPv6 network{_why(rule)}") from None
        raise ValueError(f"{text!r} has host bits set; did you mean '{loose}'?") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def _why(rule: str) -> str:
    """What is wrong with a rule that is an address and a bad prefix length
    (``10.0.0.0/33``); ``ipaddress`` only repeats the rule."""
    address, slash, _ = rule.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    return f": an IPv{ip.version} prefix length is 0-{ip.max_prefixlen}" if slash else ""


class _NetSet:
    """Networks of one family, as {prefix length: masked network integers}."""

    __slots__ = ("_bits", "_by_len")

    def __init__(self, bits: int, nets: Iterable[Network]) -> None:
        self._bits = bits
        by_len: dict[int, set[int]] = {}
        for net in nets:
            by_len.setdefault(net.prefixlen, set()).add(int(net.network_address) >> (bits - net.prefixlen))
        # Longest prefixes first: no semantic effect, but the usual /32 host rules
        # are then a single lookup.
        self._by_len = sorted(((plen, frozenset(v)) for plen, v in by_len.items()), reverse=True)

    def __bool__(self) -> bool:
        return bool(self._by_len)

    def __contains__(self, value: int) -> bool:
        bits = self._bits
        return any(value >> (bits - plen) in nets for plen, nets in self._by_len)


class AccessList:
    """``allow``/``deny`` rules of one proxy.  Build with :meth:`parse` from the
    configuration's strings, or directly from parsed networks."""

    __slots__ = ("allow", "deny", "_allow4", "_allow6", "_deny4", "_deny6")

    def __init__(self, allow: Sequence[Network] = (), deny: Sequence[Network] = ()) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)

        def split(nets: Sequence[Network], version: int) -> list[Network]:
            return [n for n in nets if n.version == version]

        self._allow4 = _NetSet(32, split(self.allow, 4))
        self._allow6 = _NetSet(128, split(self.allow, 6))
        self._deny4 = _NetSet(32, split(self.deny, 4))
        self._deny6 = _NetSet(128, split(self.deny, 6))

    @classmethod
    def parse(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> AccessList:
        """Raises :class:`ValueError` naming the rule, e.g. ``deny[2]: '10.0.0.300'
        is not an IPv4 or IPv6 network``."""

        def parse_all(name: str, rules: Iterable[str]) -> list[Network]:
            nets = []
            for i, rule in enumerate(rules):
                try:
                    nets.append(parse_network(rule))
                except ValueError as exc:
                    raise ValueError(f"{name}[{i}]: {exc}") from None
            return nets

        return cls(parse_all("allow", allow), parse_all("deny", deny))

    @property
    def empty(self) -> bool:
        """No rules: the session may skip the check (and the address parse)."""
        return not self.allow and not self.deny

    def allows(self, host: str | IPAddress) -> bool:
        """Whether a client from ``host`` may connect.  Raises :class:`ValueError`
        when ``host`` is not an IP address."""
        ip = client_ip(host)
        value = int(ip)
        if ip.version == 4:
            allow, deny = self._allow4, self._deny4
        else:
            allow, deny = self._allow6, self._deny6
        if value in deny:
            return False
        if self.allow:
            return value in allow
        return True


class SourceLease:
    """One live connection counted against its source; :meth:`release` once it
    ends (a second call does nothing)."""

    __slots__ = ("_limiter", "key")

    def __init__(self, limiter: SourceLimiter, key: str) -> None:
        self._limiter: SourceLimiter | None = limiter
        self.key = key

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter.give_back(self.key)


class SourceLimiter:
    """Live connections per client IP, for ``max_connections_per_source``.
    Connections are counted even while the limit is 0 (off), so that turning it on
    in a reconfigure sees the connections already open."""

    __slots__ = ("limit", "_counts")

    def __init__(self, limit: int = 0) -> None:
        if limit < 0:
            raise ValueError("max_connections_per_source: must be 0 (off) or more")
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, host: str | IPAddress) -> SourceLease | None:
        """Count one more connection from ``host``; None (and nothing counted) when
        that would pass the limit: the caller closes it with ``source_limit``."""
        key = self.take(host)
        return None if key is None else SourceLease(self, key)

    def take(self, host: str | IPAddress) -> str | None:
        """:meth:`acquire` without the lease object (the service's, once a
        connection): the key counted, to be given to :meth:`give_back` exactly
        once; None when the limit is reached."""
        # source_key, inline for an IPv4 string
        key = host if type(host) is str and ":" not in host else source_key(host)
        count = self._counts.get(key, 0)
        if self.limit and count >= self.limit:
            return None
        self._counts[key] = count + 1
        return key

    def live(self, host: str | IPAddress) -> int:
        """Connections open now from ``host``."""
        return self._counts.get(source_key(host), 0)

    def __len__(self) -> int:
        """How many distinct sources have a connection open."""
        return len(self._counts)

    def give_back(self, key: str) -> None:
        """The connection :meth:`take` counted under ``key`` has ended."""
        count = self._counts[key] - 1
        if count:
            self._counts[key] = count
        else:
            del self._counts[key]
