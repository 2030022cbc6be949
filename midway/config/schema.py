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
from dataclasses import dataclass, field
from typing import Any

from .addresses import Address

__all__ = [
    "option",
    "OptionInfo",
    "ProxyConfig",
    "ServerConfig",
    "Config",
    "options_of",
    "LOG_LEVELS",
    "BALANCERS",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOOPS = ("auto", "asyncio", "uvloop")
BALANCERS = ("round_robin",)


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


def option(default: Any, doc: str, **info: Any) -> Any:
    """Declare one option: its default, its meaning and (in ``info``) the facts of
    :class:`OptionInfo`."""
    return field(default=default, metadata={"midway": OptionInfo(doc=doc, **info)})


def options_of(cls: type) -> list[tuple[dataclasses.Field[Any], OptionInfo]]:
    """The declared options of a schema class, in declaration order."""
    return [
        (f, f.metadata["midway"]) for f in dataclasses.fields(cls) if "midway" in f.metadata
    ]


@dataclass(frozen=True)
class ProxyConfig:
    """One named proxy: where it listens, where it forwards, and how."""

    name: str = "default"
    listen: tuple[Address, ...] = ()
    """Addresses to accept clients on (``host:port``, ``[v6]:port``, ``:port`` for
    every interface, ``unix:/path``).  Port 0 picks a free port."""
    upstreams: tuple[Address, ...] = ()
    """Where to forward each connection; several are used round-robin."""

    connect_timeout_s: float = option(
        5.0,
        "How long to wait for an upstream to accept a connection (name lookup "
        "included) before trying the next upstream.",
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
        "accepting; new clients wait in the kernel's listen queue until a slot frees.",
        zero="no per-proxy limit (the process-wide server.max_connections still applies)",
        minimum=0, metavar="N",
    )
    tcp_nodelay: bool = option(
        True,
        "Set TCP_NODELAY on both sockets so small writes are not delayed by Nagle's "
        "algorithm (what HAProxy and Envoy do).",
    )
    splice: bool = option(
        True,
        "Move bytes with zero-copy splice(2) through pooled pipes when no chain "
        "element is attached (Linux; elsewhere, or when off, bytes are copied through "
        "a 64 KiB buffer).",
    )
    balance: str = option(
        "round_robin",
        "How to choose an upstream for each connection.  On a connect failure the "
        "next upstream is tried before the client is closed.",
        choices=BALANCERS,
    )
    backlog: int = option(
        511,
        "Length of each listener's accept queue (the kernel caps it at "
        "net.core.somaxconn).",
        provenance="nginx's default listen backlog on Linux",
        minimum=1, maximum=65535, metavar="N",
    )


@dataclass(frozen=True)
class ServerConfig:
    """Process-wide settings (the ``[server]`` table)."""

    max_connections: int = option(
        0,
        "Most connections served at once by the whole process, all proxies together.  "
        "Past it every listener stops accepting until a connection closes.",
        zero="automatic: (open-file limit - 64) / 2, after raising the soft open-file "
        "limit to the hard one, as HAProxy derives maxconn from ulimit-n",
        minimum=0, metavar="N", cli=False,
    )
    drain_timeout_s: float = option(
        30.0,
        "On SIGTERM/SIGINT, stop accepting and let open connections finish for at "
        "most this long, then close them.  A second signal exits at once.",
        unit="seconds", zero="close open connections at once",
        provenance="Kubernetes' default termination grace period", minimum=0,
        metavar="SECONDS",
    )
    access_log: str = option(
        "",
        "Write one JSON line per finished connection to this file ('-' for standard "
        "output).",
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
        "worker, forwards signals and drains them all on shutdown.",
        zero="one worker per CPU ('auto' means the same)", minimum=0, maximum=1024,
        metavar="N|auto", words=(("auto", 0),),
    )


@dataclass(frozen=True)
class Config:
    """A whole configuration: server settings and any number of named proxies."""

    server: ServerConfig = field(default_factory=ServerConfig)
    proxies: tuple[ProxyConfig, ...] = ()
