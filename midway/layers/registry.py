"""Builds a proxy's connection layers from its configuration.

The one place that knows which keys turn into which layers, and in what order
they run (as :mod:`midway.chain.registry` is for chain elements).  The service
calls :func:`build_layers` when it is made and again on every reconfigure, so a
reload changes the layers of new connections.

Inbound order, each layer reading the client after the one before::

    PROXY header (proxy_protocol_in) · TLS termination or the ClientHello peek (routes)

The PROXY header comes first on the wire (the balancer writes it before the
client's first byte).  SNI routes read the server name from the ClientHello peek
only when midway does not terminate TLS; a terminating layer sets the same route
key (``sni``) after its handshake, and the route phase reads it whoever set it.

Outbound: the PROXY header (proxy_protocol_out), the first bytes the upstream
gets.  Nothing configured means no layer: the proxy dials at accept, with no task.
"""

from __future__ import annotations

from typing import Literal, cast

from ..config.schema import ProxyConfig
from ..upstream.access import AccessList
from .base import InboundLayer, OutboundLayer
from .proxy_in import ProxyProtocolIn
from .proxy_out import ProxyProtocolOut
from .proxy_protocol import Mode
from .sni import SniPeek

__all__ = ["build_layers"]


def _terminates_tls(config: ProxyConfig) -> bool:
    """Whether the proxy terminates TLS (then routes match the handshake's SNI,
    and the ClientHello peek is not needed).  ``tls_cert`` is the key of TLS
    termination (issue 11 item 1), read by name so that this module works with
    a schema that has it or not yet."""
    return bool(getattr(config, "tls_cert", ""))


def build_layers(config: ProxyConfig) -> tuple[tuple[InboundLayer, ...], tuple[OutboundLayer, ...]]:
    """The inbound and outbound layers ``config`` asks for, in order.  The
    configuration is already validated (:mod:`midway.config.load`); a
    ``proxy_protocol_trusted`` rule that does not parse raises ValueError."""
    inbound: list[InboundLayer] = []
    if config.proxy_protocol_in != "off":
        trusted = AccessList.parse(allow=config.proxy_protocol_trusted) \
            if config.proxy_protocol_trusted else None
        inbound.append(ProxyProtocolIn(cast(Mode, config.proxy_protocol_in), trusted,
                                       config.proxy_protocol_timeout_s))
    if config.routes and not _terminates_tls(config):
        inbound.append(SniPeek(config.sni_peek_timeout_s))
    outbound: list[OutboundLayer] = []
    if config.proxy_protocol_out != "off":
        version = cast(Literal[1, 2], 1 if config.proxy_protocol_out == "v1" else 2)
        outbound.append(ProxyProtocolOut(version))
    return tuple(inbound), tuple(outbound)
