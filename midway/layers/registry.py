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
from .tls import build_tls_layers

__all__ = ["build_layers"]


def build_layers(config: ProxyConfig) -> tuple[tuple[InboundLayer, ...], tuple[OutboundLayer, ...]]:
    """The inbound and outbound layers ``config`` asks for, in order.  The
    configuration is already validated (:mod:`midway.config.load`); a
    ``proxy_protocol_trusted`` rule that does not parse raises ValueError."""
    tls_in, tls_out = build_tls_layers(config)  # certificates read (again) here
    inbound: list[InboundLayer] = []
    if config.proxy_protocol_in != "off":
        trusted = AccessList.parse(allow=config.proxy_protocol_trusted) \
            if config.proxy_protocol_trusted else None
        inbound.append(ProxyProtocolIn(cast(Mode, config.proxy_protocol_in), trusted,
                                       config.proxy_protocol_timeout_s))
    # TLS after the PROXY header (it travels in clear before the handshake); with
    # termination, routes match the handshake's SNI, so no ClientHello peek.
    inbound.extend(tls_in)
    if config.routes and not tls_in:
        inbound.append(SniPeek(config.sni_peek_timeout_s))
    outbound: list[OutboundLayer] = []
    if config.proxy_protocol_out != "off":
        version: Literal[1, 2] = 1 if config.proxy_protocol_out == "v1" else 2
        outbound.append(ProxyProtocolOut(version))
    outbound.extend(tls_out)
    return tuple(inbound), tuple(outbound)
