"""The configuration schema: the one source of truth for TOML keys, command-line
flags and the reference documentation.

Every tunable is a field of a frozen dataclass declared with :func:`option`, which
records its meaning, unit, what 0 means and where the default comes from.  The TOML
loader (:mod:`midway.config.load`), the command line (:mod:`midway.cli`) and
``docs/configuration.md`` (:mod:`midway.config.reference`) are all generated from these
declarations, so an option is written once.

Units are in field names (``connect_timeout_s``); 0 has a documented meaning wherever
it is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..upstream.balancers import DEFAULT_BALANCE, MAX_WEIGHT, available
from ..upstream.health import (
    DEFAULT_EJECT_AFTER,
    DEFAULT_EJECT_S,
    DEFAULT_FALL,
    DEFAULT_RISE,
    DEFAULT_TIMEOUT_S,
)
from .addresses import Address

__all__ = [
    "option",
    "OptionInfo",
    "ProxyConfig",
    "ServerConfig",
    "ToxicSpec",
    "RouteSpec",
    "UpstreamConfig",
    "HealthConfig",
    "RETRIES_ALL",
    "Config",
    "options_of",
    "LOG_LEVELS",
    "BALANCERS",
    "DUMP_MODES",
    "PROXY_PROTOCOL_IN",
    "PROXY_PROTOCOL_OUT",
    "TLS_VERSIONS",
    "TLS_TERMINATION_KEYS",
    "TLS_ORIGINATION_KEYS",
    "NAME_MAX_LEN",
    "proxy_name_problem",
    "toxic_name_problem",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOOPS = ("auto", "asyncio", "uvloop")
BALANCERS = tuple(available())
"""The ``balance`` names: the balancer registry's (midway.upstream.balancers)."""
DUMP_MODES = ("off", "text", "hex", "auto")
PROXY_PROTOCOL_IN = ("off", "v1", "v2", "any")
ON_MARKED_DOWN = ("keep", "reset")
PROXY_PROTOCOL_OUT = ("off", "v1", "v2")
TLS_VERSIONS = ("1.2", "1.3")
TLS_TERMINATION_KEYS = ("tls_key", "tls_alpn", "tls_client_ca", "tls_min_version")
"""Options that mean something only with ``tls_cert`` (termination)."""
TLS_ORIGINATION_KEYS = ("upstream_tls_ca", "upstream_tls_sni", "upstream_tls_cert",
                        "upstream_tls_key", "upstream_tls_verify")
"""Options that mean something only with ``upstream_tls`` (origination)."""

# -- names -------------------------------------------------------------------
# Proxy and toxic names are path segments of the admin API
# (/proxies/NAME/toxics/NAME) and words of log lines, wherever they come from
# (config file, command line, admin API, library).

NAME_MAX_LEN = 64
"""Longest proxy or toxic name, in characters: enough for any descriptive name,
short enough for a log column and a URL (Toxiproxy sets no limit)."""
_PROXY_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.:-]{{0,{NAME_MAX_LEN - 1}}}")
"""A letter or digit, then letters, digits, ``_``, ``.``, ``-`` or ``:``.  The colon
is there for Toxiproxy's clients: testcontainers-java's
``ToxiproxyContainer.getProxy(host, port)`` names a proxy ``host:port``."""
_TOXIC_NAME_FORBIDDEN = frozenset("/?#%")
"""Characters that end or change a URL path segment when a client does not quote
them (toxiproxy-python does not)."""


def proxy_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a proxy, or ``None`` if it can."""
    if _PROXY_NAME_RE.fullmatch(name):
        return None
    return f"a proxy name is 1-{NAME_MAX_LEN} letters, digits, '_', '.', '-' or ':'"


def toxic_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a toxic, or ``None`` if it can.  Looser than a
    proxy name, as Toxiproxy's users may have named toxics freely, but never
    what breaks a URL or a log line."""
    if 1 <= len(name) <= NAME_MAX_LEN and name.isprintable() and not any(
            c.isspace() or c in _TOXIC_NAME_FORBIDDEN for c in name):
        return None
    return (f"a toxic name is 1-{NAME_MAX_LEN} characters, without spaces, control "
            "characters, '/', '?', '#' or '%'")


@dataclass(frozen=True)
class OptionInfo:
    """What the schema says about one option (kept in the field's metadata)."""

    doc: str
    unit: str = ""
    zero: str = ""
    """What the value 0 means, when 0 is allowed and special."""
    provenance: str = ""
    """Where the default comes from."""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    cli: bool = True
    """Whether the quick command line offers it as a flag."""
    metavar: str = ""
    words: tuple[tuple[str, Any], ...] = ()
    """Words accepted in place of a value, e.g. ``(("auto", 0),)``."""
    flag: str = ""
    """The command-line flag's name when it is not the key's (``hook`` for
    ``hooks``: a list option's flag is repeated, once per item)."""
    const: Any = None
    """The value a flag given without one means (``--dump`` alone is ``auto``)."""


def option(default: Any, doc: str, **info: Any) -> Any:
    """Declare one option: its default, its meaning and (in ``info``) the facts of
    :class:`OptionInfo`."""
    return field(default=default, metadata={"midway": OptionInfo(doc=doc, **info)})


def options_of(cls: type) -> list[tuple[dataclasses.Field[Any], OptionInfo]]:
    """The declared options of a schema class, in declaration order."""
    return [
        (f, f.metadata["midway"]) for f in dataclasses.fields(cls) if "midway" in f.metadata
    ]


DEFAULT_TOXIC_STREAM = "downstream"
"""A toxic's direction when none is given: server → client, Toxiproxy's default.
The one definition, used by the schema, the toxics, ``--toxic`` and the admin API."""

DEFAULT_TOXICITY = 1.0
"""A toxic's share of connections when none is given: all of them, Toxiproxy's
default.  The one definition, like :data:`DEFAULT_TOXIC_STREAM`."""


@dataclass(frozen=True)
class ToxicSpec:
    """One toxic of a ``[[proxy.NAME.toxics]]`` table (or a ``--toxic`` flag), already
    validated.  Fields mirror Toxiproxy's toxic JSON, plus midway's conditions and
    timeline; mappings are kept as sorted (key, value) pairs so the configuration
    stays immutable."""

    type: str
    name: str
    """Unique within the proxy while active; defaults to ``TYPE_STREAM`` as in Toxiproxy."""
    stream: str = DEFAULT_TOXIC_STREAM
    toxicity: float = DEFAULT_TOXICITY
    attributes: tuple[tuple[str, Any], ...] = ()
    conditions: tuple[tuple[str, Any], ...] = ()
    at_s: float = 0.0
    """Seconds after the proxy starts when the toxic is added (0: from the start)."""
    until_s: float | None = None
    """Seconds after the proxy starts when the toxic is removed (``None``: never)."""
    seed: int | None = None
    """The toxic's random seed: its own, else the proxy's (``None``: drawn and logged)."""


KEEPALIVE_MAX_S = 32767
"""The longest keepalive idle time or interval Linux accepts (``TCP_KEEPIDLE``)."""

RETRIES_ALL = -1
"""``retries``' default: after a failed connect, try every other eligible upstream
once (``all`` in the file and on the command line)."""


@dataclass(frozen=True)
class UpstreamConfig:
    """One entry of a proxy's ``upstreams``: an address, or a table
    ``{address = "10.0.0.6:6379", weight = 3, backup = true}``; on the command
    line ``10.0.0.6:6379,weight=3`` and ``10.0.0.7:6379,backup``."""

    address: Address
    weight: int = option(
        1,
        "Share of new connections relative to the other upstreams (a weight-3 "
        "upstream gets three times the connections of a weight-1 one).",
        zero="drained: no new connections; those already open go on",
        provenance="HAProxy's server weight (1 by default, 0-256)",
        minimum=0, maximum=MAX_WEIGHT, cli=False, metavar="N",
    )
    backup: bool = option(
        False,
        "Take connections only while no other (non-backup) upstream is up with a "
        "weight above 0.",
        cli=False,
    )

    def __str__(self) -> str:
        """The quick form: ``ADDRESS[,weight=N][,backup]`` (the address alone when
        both are defaults)."""
        text = str(self.address)
        if self.weight != 1:
            text += f",weight={self.weight}"
        if self.backup:
            text += ",backup"
        return text


@dataclass(frozen=True)
class HealthConfig:
    """A proxy's ``[proxy.NAME.health]`` table: active checks and passive
    ejection (docs/balancing.md).  On the command line each key is a
    ``--health-KEY`` flag."""

    interval_s: float = option(
        0.0,
        "Seconds between active checks of each upstream (each spread by ±5 %, the "
        "first at a random point of the first interval).  The other keys of active "
        "checks (all but eject_after and eject_s) need it: in a proxy's own table "
        "while it is 0 they are refused ([defaults.health]: when no proxy checks).",
        unit="seconds", zero="no active checks", minimum=0, metavar="SECONDS",
    )
    timeout_s: float = option(
        DEFAULT_TIMEOUT_S,
        "A check that has not passed within this time fails (connecting counts "
        "towards it).  Must be more than 0.",
        unit="seconds", minimum=0, metavar="SECONDS",
        provenance="HAProxy's check interval 'inter 2s', its check timeout when "
                   "'timeout check' is unset",
    )
    rise: int = option(
        DEFAULT_RISE,
        "Consecutive passing checks that bring a down upstream up.",
        minimum=1, metavar="N", provenance="HAProxy's default rise",
    )
    fall: int = option(
        DEFAULT_FALL,
        "Consecutive failing checks that take an up upstream down (until it has "
        "passed a check, one failure is enough: upstreams start up).",
        minimum=1, metavar="N", provenance="HAProxy's default fall",
    )
    send: str = option(
        "",
        "Bytes a check writes after connecting (TOML escapes such as \"PING\\r\\n\" "
        "work, on the command line too; sent as UTF-8).  For binary bytes, send_hex.",
        zero="(empty) send nothing", metavar="TEXT",
    )
    expect: str = option(
        "",
        "Bytes that must appear in the reply, within timeout_s and the first 16 KiB, "
        "for the check to pass (escapes as for send).  For binary bytes, expect_hex.",
        zero="(empty) the check passes once connected (and send written)", metavar="TEXT",
    )
    send_hex: str = option(
        "",
        "send's bytes written in hex, for binary protocols (HAProxy's tcp-check "
        "send-binary): two digits a byte, either case, spaces allowed between bytes "
        "(PostgreSQL's SSLRequest: \"00 00 00 08 04 d2 16 2f\").  Give send or "
        "send_hex, not both; either one set in a proxy's table replaces the other "
        "inherited from [defaults.health].",
        zero="(empty) send as send says", metavar="HEX",
    )
    expect_hex: str = option(
        "",
        "expect's bytes written in hex (HAProxy's tcp-check expect binary), as for "
        "send_hex.  Give expect or expect_hex, not both.",
        zero="(empty) expect as expect says", metavar="HEX",
    )
    eject_after: int = option(
        DEFAULT_EJECT_AFTER,
        "Passive health: consecutive failed connects (or connections the upstream "
        "reset before its first byte) that mark an upstream down.",
        zero="no passive health", minimum=0, metavar="N",
        provenance="the default fall, so passive and active health need the same "
                   "evidence (nginx ejects after 1, Envoy after 5)",
    )
    eject_s: float = option(
        DEFAULT_EJECT_S,
        "How long a passively ejected upstream stays down before it is tried again, "
        "when active checks are off (with them, rise passing checks bring it back).",
        unit="seconds", minimum=0, metavar="SECONDS",
        provenance="nginx's default fail_timeout",
    )
    on_marked_down: str = option(
        "keep",
        "What happens to the open connections of an upstream when it is marked down "
        "(by active checks or passive ejection): keep (they go on until they end) or "
        "reset (each is reset both ways at once, reason upstream_down, so that its "
        "clients reconnect to an upstream that is up; HAProxy's on-marked-down "
        "shutdown-sessions).",
        choices=ON_MARKED_DOWN, metavar="WHAT",
        provenance="HAProxy's default (sessions are kept)",
    )


@dataclass(frozen=True)
class RouteSpec:
    """One ``[[proxy.NAME.routes]]`` table, already validated: connections whose
    TLS server name matches one of ``sni`` go to its own ``upstreams``."""

    name: str
    """What the access log's ``route`` field says: the table's ``name``, else its
    first pattern.  Unique within the proxy; a reconfigure keeps a route's
    upstream state (active connections, the balancer's rotation) by this name."""
    sni: tuple[str, ...]
    """Patterns in canonical form (lower case, no trailing dot): an exact host
    name or ``*.`` and one label (see :mod:`midway.layers.routes`)."""
    upstreams: tuple[Address, ...]
    balance: str = "round_robin"
    """The route's own balancer (default: the proxy's ``balance``)."""
    tls_cert: str = ""
    """With termination (the proxy's ``tls_cert``): the certificate (and chain)
    served to clients whose server name takes this route; empty = the proxy's."""
    tls_key: str = ""
    """``tls_cert``'s private key, when not in that file."""


@dataclass(frozen=True)
class ProxyConfig:
    """One named proxy: where it listens, where it forwards, and how."""

    name: str = "default"
    listen: tuple[Address, ...] = ()
    """Addresses to accept clients on (``host:port``, ``[v6]:port``, ``:port`` for
    every interface, ``unix:/path``).  Port 0 picks a free port."""
    upstreams: tuple[UpstreamConfig, ...] = ()
    """Where to forward each connection, with weights and backups; several are
    chosen as ``balance`` says."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """The ``[proxy.NAME.health]`` table (``[defaults.health]`` is inherited key by key)."""
    toxics: tuple[ToxicSpec, ...] = ()
    """Toxics (fault injection) declared for this proxy, optionally on a timeline;
    see docs/faults.md.  Checked by :mod:`midway.chain.toxics.config`."""

    connect_timeout_s: float = option(
        5.0,
        "How long to wait for an upstream to accept a connection (name lookup "
        "included) before trying the next upstream.  A name's addresses share it: "
        "each gets the time left over the addresses left, at least 2 s.",
        unit="seconds", zero="no timeout: wait as long as the operating system does",
        provenance="Envoy's cluster connect_timeout default", minimum=0, metavar="SECONDS",
    )
    idle_timeout_s: float = option(
        3600.0,
        "Close a connection when no byte has moved in either direction for this long.",
        unit="seconds", zero="never close an idle connection",
        provenance="Envoy tcp_proxy idle_timeout default (1 hour)", minimum=0,
        metavar="SECONDS",
    )
    half_close_timeout_s: float = option(
        60.0,
        "After one side has half-closed (sent FIN), how long the other direction may "
        "go on before the connection is closed.",
        unit="seconds", zero="wait forever for the other side to finish",
        provenance="Linux's tcp_fin_timeout default for FIN-WAIT-2", minimum=0,
        metavar="SECONDS",
    )
    max_connections: int = option(
        0,
        "Most connections this proxy serves at once.  Past it the proxy stops "
        "accepting; new clients wait in the kernel's listen queue until a slot frees.  "
        "With workers, each worker counts its own (N workers serve up to N times it).",
        zero="no per-proxy limit (the process-wide server.max_connections still applies)",
        minimum=0, metavar="N",
    )
    tcp_nodelay: bool = option(
        True,
        "Set TCP_NODELAY on both sockets so small writes are not delayed by Nagle's "
        "algorithm (what HAProxy and Envoy do).",
    )
    tcp_keepalive_s: float = option(
        0.0,
        "Send TCP keepalive probes on both sockets of a connection once it has been "
        "idle this long, so that a peer that vanished (powered off, its network cut) "
        "is noticed and the connection closed, and firewalls and NAT keep the flow "
        "(HAProxy's option tcpka, nginx's so_keepalive; rounded up to whole seconds).",
        unit="seconds", zero="no keepalive probes (the operating system's default)",
        minimum=0, maximum=KEEPALIVE_MAX_S, metavar="SECONDS",
    )
    tcp_keepalive_interval_s: float = option(
        0.0,
        "With tcp_keepalive_s: how long to wait for an answer to a keepalive probe "
        "before sending the next (rounded up to whole seconds).",
        unit="seconds", zero="the operating system's interval (Linux: 75 s)",
        minimum=0, maximum=KEEPALIVE_MAX_S, metavar="SECONDS",
    )
    tcp_keepalive_probes: int = option(
        0,
        "With tcp_keepalive_s: unanswered probes after which the kernel gives up on "
        "the peer; the connection is then closed as if reset.",
        zero="the operating system's count (Linux: 9)",
        minimum=0, maximum=127, metavar="N",
    )
    splice: bool = option(
        True,
        "Move bytes with zero-copy splice(2) through pooled pipes when no chain "
        "element is attached (Linux; elsewhere, or when off, bytes are copied through "
        "a 64 KiB buffer).",
    )
    balance: str = option(
        DEFAULT_BALANCE,
        "How to choose an upstream for each connection: round_robin (smooth "
        "weighted), least_connections, random_two (two random choices, the less "
        "loaded wins) or hash_source (a client IP keeps its upstream); see "
        "docs/balancing.md.  On a failed connect the next upstream in the policy's "
        "order is tried (see retries).",
        choices=BALANCERS, provenance="nginx's default (round-robin)",
    )
    backlog: int = option(
        511,
        "Length of each listener's accept queue (the kernel caps it at "
        "net.core.somaxconn).",
        provenance="nginx's default listen backlog on Linux",
        minimum=1, maximum=65535, metavar="N",
    )
    unix_mode: str = option(
        "",
        "The permissions of a unix listener's socket file, in octal, set before it "
        "accepts: connecting needs write permission, so \"660\" lets midway's user and "
        "group connect and \"666\" everyone (HAProxy's bind mode). Refused on a proxy "
        "without a unix: listener ([defaults]: when no proxy has one).",
        zero="(empty) what midway's umask gives (with 022, srwxr-xr-x: only midway's "
             "user and root can connect)",
        metavar="OCTAL",
    )
    # TLS termination and origination (docs/tls.md).
    tls_cert: str = option(
        "",
        "Terminate TLS from clients with this certificate (a PEM file; the chain, "
        "leaf first, may follow it in the same file).  Read at start, on every "
        "reconfigure and at every reload (SIGHUP, POST /reload), even with the "
        "configuration unchanged: renew the files in place, then reload.",
        zero="(empty) no termination: bytes are relayed as they come", metavar="PATH",
    )
    tls_key: str = option(
        "",
        "The private key of tls_cert (a PEM file, not encrypted).",
        zero="(empty) the key is in the tls_cert file", metavar="PATH",
    )
    tls_alpn: tuple[str, ...] = option(
        (),
        "Application protocols offered to clients by ALPN, in midway's order of "
        "preference (e.g. h2, http/1.1); a client that offers none of them is still "
        "served, with no protocol agreed.  On the command line, repeat the flag.",
        zero="(empty) no ALPN", metavar="PROTOCOL",
    )
    tls_client_ca: str = option(
        "",
        "Mutual TLS: every client must present a certificate signed by a CA of this "
        "PEM file, or its handshake fails.",
        zero="(empty) clients are not asked for a certificate", metavar="PATH",
    )
    tls_min_version: str = option(
        "1.2",
        "Oldest TLS version accepted from clients.  Ciphers are the standard "
        "library's modern defaults (ssl.create_default_context).",
        choices=TLS_VERSIONS,
        provenance="Mozilla's 'intermediate' server configuration (TLS 1.2 and 1.3)",
    )
    tls_handshake_timeout_s: float = option(
        10.0,
        "Longest a TLS handshake may take: a client's (termination, counted from "
        "accept) and an upstream's (origination, from the connect).  Past it the "
        "connection is closed (reason tls_failed).  Refused on a proxy with neither "
        "tls_cert nor upstream_tls ([defaults]: when no proxy has either).",
        unit="seconds", minimum=0.001, metavar="SECONDS",
        provenance="Go's http.DefaultTransport TLSHandshakeTimeout",
    )
    upstream_tls: bool = option(
        False,
        "Speak TLS to the upstreams (origination): midway is the TLS client, and the "
        "upstream's certificate is verified unless upstream_tls_verify is off.",
    )
    upstream_tls_ca: str = option(
        "",
        "Verify upstream certificates against the CAs of this PEM file.",
        zero="(empty) the system's trust store", metavar="PATH",
    )
    upstream_tls_verify: bool = option(
        True,
        "Verify the upstream's certificate and host name.  Off accepts any "
        "certificate (logged as a warning when the proxy starts).",
    )
    upstream_tls_sni: str = option(
        "",
        "Server name sent to upstreams (SNI) and checked against their certificate.",
        zero="(empty) each upstream's configured host name; none for an IP address, "
        "whose certificate must then name the IP", metavar="NAME",
    )
    upstream_tls_cert: str = option(
        "",
        "Client certificate presented to upstreams that ask for one (a PEM file, the "
        "chain may follow).",
        zero="(empty) none", metavar="PATH",
    )
    upstream_tls_key: str = option(
        "",
        "The private key of upstream_tls_cert (a PEM file, not encrypted).",
        zero="(empty) the key is in the upstream_tls_cert file", metavar="PATH",
    )
    # Seeing and changing traffic (docs/inspection.md).
    dump: str = option(
        "off",
        "Print both directions of every connection as they flow: printable data as "
        "text, binary as hexdump -C, auto choosing per chunk; with open, end-of-stream "
        "and close lines.  Coloured on a terminal.  When the output cannot keep up, "
        "chunks are counted instead of shown; the traffic is never slowed.",
        choices=DUMP_MODES, const="auto",
    )
    dump_file: str = option(
        "",
        "Write the dump to this file (appending; opened again at each reload, so "
        "logrotate may rename it first) instead of standard output; given alone, it "
        "turns the dump on in auto mode.",
        zero="(empty) standard output", metavar="PATH",
    )
    dump_max_bytes: int = option(
        4096,
        "Bytes of each chunk the dump shows; the rest are counted, not shown.  "
        "Refused without dump or dump_file ([defaults]: when no proxy dumps).",
        unit="bytes", zero="show every byte", minimum=0, metavar="BYTES",
        provenance="one page: 256 lines of hexdump -C",
    )
    pcap: str = option(
        "",
        "Record every connection to this pcap file for Wireshark or tshark: both TCP "
        "legs (client to midway, midway to upstream) with their real addresses, "
        "handshake, FIN and RST.  An existing file is replaced (with rotation on, it "
        "becomes PATH.1).",
        zero="(empty) no capture", metavar="PATH",
    )
    pcap_max_bytes: int = option(
        0,
        "Rotate the capture when it would grow past this size: PATH is renamed "
        "PATH.1 (PATH.1 to PATH.2, and so on) and a new PATH begins.  Must be at "
        "least 40 (one header and one packet record) when not 0.  Refused without "
        "pcap ([defaults]: when no proxy captures).",
        unit="bytes", zero="one file, never rotated", minimum=0, metavar="BYTES",
    )
    pcap_keep: int = option(
        4,
        "Rotated capture files kept (PATH.1 ... PATH.N); older ones are deleted.  "
        "Refused without pcap ([defaults]: when no proxy captures).",
        zero="keep none: a full capture starts over", minimum=0, metavar="N",
        provenance="the 'rotate 4' of Debian's logrotate.conf",
    )
    seed: int = option(
        0,
        "Seed of the toxics' random draws (toxicity, jitter, slice sizes, corrupted "
        "bytes): the same seed and connection order repeat a run exactly.  A toxic's "
        "own seed takes precedence; see docs/faults.md.",
        zero="no seed: each toxic draws one and logs it on its first connection",
        minimum=0, metavar="N",
    )
    hooks: tuple[str, ...] = option(
        (),
        "Python hooks that see and change the data, as MODULE:ATTR (or FILE.py:ATTR), "
        "chained in order; see docs/inspection.md.  On the command line, repeat "
        "--hook once per hook.",
        flag="hook", metavar="MODULE:ATTR",
    )
    # Upstream choice and who may connect (docs/balancing.md; issue 10).
    retries: int = option(
        RETRIES_ALL,
        "How many other upstreams a connection tries after a failed or timed-out "
        "connect to the first, in the balancer's order; the client sees nothing of a "
        "failed attempt.  all (the default) = every eligible upstream once.",
        zero="no retry: a failed connect closes the client (connect_failed)",
        minimum=RETRIES_ALL, metavar="N|all", words=(("all", RETRIES_ALL),),
    )
    allow: tuple[str, ...] = option(
        (),
        "Client networks that may connect (CIDR, IPv4 or IPv6; a bare address is one "
        "host); a client matching none is closed at accept, reason denied.  A "
        "proxy's list replaces the one of [defaults].  On the command line, repeat "
        "--allow.",
        zero="(empty) every client not denied", metavar="CIDR",
    )
    deny: tuple[str, ...] = option(
        (),
        "Client networks that may not connect (CIDR); deny wins over allow.  "
        "Refused at accept, before any upstream is dialled, reason denied.  A "
        "proxy's list replaces the one of [defaults].  On the command line, repeat "
        "--deny.",
        zero="(empty) deny no one", metavar="CIDR",
    )
    max_connections_per_source: int = option(
        0,
        "Most live connections from one client IP (an IPv4-mapped IPv6 address "
        "counts as its IPv4 address); past it a new one is closed at accept, "
        "reason source_limit.  With workers, each worker counts its own.",
        zero="no per-source limit", minimum=0, metavar="N",
    )

    # The PROXY protocol and SNI routing (docs/proxy-protocol.md, docs/tls.md).
    proxy_protocol_in: str = option(
        "off",
        "Expect a PROXY protocol header (HAProxy's send-proxy, send-proxy-v2) at the "
        "start of every connection and take the client address from it: access log, "
        "balancer key, hooks and capture see the real client.  v1 is the text form, "
        "v2 the binary one, any accepts both.  Connections from peers outside "
        "proxy_protocol_trusted, and connections whose header is missing, malformed "
        "or late, are closed (as HAProxy's accept-proxy does).",
        choices=PROXY_PROTOCOL_IN, metavar="VERSION",
    )
    proxy_protocol_trusted: tuple[str, ...] = option(
        (),
        "The networks (CIDR, e.g. 10.0.0.0/8, or a bare address) of the load "
        "balancers allowed to send a PROXY header; required when proxy_protocol_in "
        "is on, unless every listener is a unix socket (whose file permissions "
        "decide who connects), and an error when it is off (the list would do "
        "nothing).  On the command line, repeat the flag once per network.",
        metavar="CIDR",
    )
    proxy_protocol_timeout_s: float = option(
        5.0,
        "How long a connection may take to send its whole PROXY header; past it the "
        "connection is closed (bad_proxy_header).  Refused where proxy_protocol_in is "
        "off ([defaults]: when it is off in every proxy).",
        unit="seconds", minimum=0.001, metavar="SECONDS",
        provenance="the PROXY protocol specification asks for at least 3 s (one TCP "
        "retransmission); nginx's proxy_protocol_timeout is 30 s",
    )
    proxy_protocol_out: str = option(
        "off",
        "Send a PROXY protocol header to the upstream before any other byte, carrying "
        "the client's address (the one a received header gave, when chained); v2 "
        "also carries the TLS server name (AUTHORITY) and the negotiated ALPN when "
        "known.  The upstream must expect it (nginx: listen ... proxy_protocol).",
        choices=PROXY_PROTOCOL_OUT, metavar="VERSION",
    )
    sni_peek_timeout_s: float = option(
        5.0,
        "With [[proxy.NAME.routes]], how long a client may take to send its whole TLS "
        "ClientHello (which names the server the route is chosen by); past it the "
        "connection is closed (peek_timeout).  Refused on a proxy without routes, or "
        "with tls_cert, whose routes take the handshake's server name ([defaults]: "
        "when no proxy peeks).  Not a flag: routes are declared in a file only.",
        unit="seconds", minimum=0.001, metavar="SECONDS", cli=False,
        provenance="HAProxy's documented tcp-request inspect-delay 5s for SNI routing "
        "(nginx's preread_timeout is 30 s)",
    )
    routes: tuple[RouteSpec, ...] = ()
    """SNI routes (``[[proxy.NAME.routes]]``), checked by :mod:`midway.config.load`:
    a TLS connection whose server name matches one goes to that route's upstreams,
    any other to the proxy's own ``upstreams`` (closed with ``no_route`` when it has
    none)."""


@dataclass(frozen=True)
class ServerConfig:
    """Process-wide settings (the ``[server]`` table)."""

    max_connections: int = option(
        0,
        "Most connections served at once by the whole process, all proxies together.  "
        "Past it every listener stops accepting until a connection closes.  With "
        "workers, each worker process counts its own (N workers serve up to N times "
        "it, as HAProxy's maxconn was per process with nbproc).  midway "
        "raises the soft open-file limit to the hard one at start, whatever this is "
        "(a connection holds two descriptors; a value they cannot hold is logged as "
        "a warning).",
        zero="automatic: (open-file limit - 64) / 2, as HAProxy derives maxconn from "
        "ulimit-n",
        minimum=0, metavar="N", cli=False,
    )
    drain_timeout_s: float = option(
        30.0,
        "On SIGTERM/SIGINT, stop accepting and let open connections finish for at "
        "most this long, then close them.  A second signal exits at once.  A proxy "
        "that a reload removes drains for as long.",
        unit="seconds", zero="close open connections at once",
        provenance="Kubernetes' default termination grace period", minimum=0,
        metavar="SECONDS",
    )
    access_log: str = option(
        "",
        "Write one JSON line per finished connection to this file ('-' for standard "
        "output), appending; opened again at each reload (SIGHUP), so logrotate may "
        "rename it first.",
        zero="(empty) no access log", metavar="PATH|-",
    )
    log_level: str = option(
        "info", "Least severity of the log lines written to standard error.",
        choices=LOG_LEVELS,
    )
    loop: str = option(
        "auto",
        "Event loop: uvloop (faster; pip install 'midway[fast]'), the standard "
        "library's asyncio, or auto (uvloop when installed).",
        choices=LOOPS,
    )
    workers: int = option(
        1,
        "Worker processes, each serving every listener through SO_REUSEPORT so the "
        "kernel spreads connections across them.  A supervisor restarts a crashed "
        "worker, forwards signals and drains them all on shutdown; workers whose "
        "supervisor dies (even by SIGKILL) stop accepting, drain and exit.",
        zero="one worker per CPU ('auto' means the same)", minimum=0, maximum=1024,
        metavar="N|auto", words=(("auto", 0),),
    )
    admin: str = option(
        "",
        "Serve the admin HTTP API, compatible with Toxiproxy 2.x (create proxies, add "
        "and remove toxics), with GET /metrics (Prometheus) and POST /reload, on this "
        "host:port.  With no proxies configured, midway then behaves like "
        "toxiproxy-server.  With workers, the supervisor serves it and every change "
        "reaches every worker.  Only a loopback address is accepted unless "
        "admin_allow_remote is set.  Cannot change on reload (restart midway).",
        zero="(empty) no admin API", metavar="HOST:PORT",
    )
    admin_allow_remote: bool = option(
        False,
        "Allow the admin API on a non-loopback address.  Whoever reaches the API can "
        "reconfigure and stop every proxy: set a token too (admin_token_file, "
        "--admin-token-file; or admin_token in the file).  A browser that reaches "
        "it by a name (not an address) needs that name in admin_hosts.",
    )
    admin_hosts: tuple[str, ...] = option(
        (),
        "Host names by which a browser may reach the admin API, besides IP addresses, "
        "localhost (and names under .localhost) and admin's own host: a browser's "
        "request (a Mozilla/ User-Agent, or an Origin, Referer, Sec-Fetch-* or "
        "X-Midway-UI header) whose Host header names another is answered 403, so that "
        "a web page whose name an attacker points at this address (DNS rebinding) "
        "cannot drive it.  Other clients (curl, Toxiproxy's clients, midway top) are "
        "not checked: they choose their Host.  '*' allows any name.  On the command "
        "line, repeat the flag.",
        zero="(empty) IP addresses, localhost and admin's own host only",
        metavar="NAME",
    )
    admin_token: str = option(
        "",
        "A secret every admin API request must carry as 'Authorization: Bearer TOKEN' "
        "(else 401).  Not a command-line flag, where other users could read it in the "
        "process list: use admin_token_file there.",
        zero="(empty) no token needed, as Toxiproxy's clients expect", cli=False,
        metavar="TOKEN",
    )
    admin_token_file: str = option(
        "",
        "Read the admin token from this file (its first line; surrounding whitespace "
        "is ignored), again at each reload.  A warning is logged when other users "
        "may read it (chmod 600 it).",
        zero="(empty) the token is admin_token of the configuration file's [server] "
             "table; without one, no token is needed", metavar="PATH",
    )


@dataclass(frozen=True)
class Config:
    """A whole configuration: server settings and any number of named proxies."""

    server: ServerConfig = field(default_factory=ServerConfig)
    proxies: tuple[ProxyConfig, ...] = ()
