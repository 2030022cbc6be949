"""TLS termination (an inbound layer) and origination (an outbound layer).

Theory of operation
-------------------
Both are one handshake on the connection's socket, then a
:class:`~midway.core.tlsstream.TlsStream` handed to the relay in the socket's
place (:meth:`~midway.layers.base.LayerConnection.replace_client`,
``replace_upstream``).  The relay does not change: a stream only copies, so a TLS
connection never takes the zero-copy path.

* **Termination** (``tls_cert``): the handshake runs in the connection's inbound
  task, on the relay's poller, bounded by ``tls_handshake_timeout_s``; the
  accept loop never waits for it.  The name the client asked for (SNI) becomes
  the ``sni`` route key and ``info.sni``; the agreed ALPN protocol ``info.alpn``
  and the ``alpn`` route key (which a v2 ``proxy_protocol_out`` header carries).
  Bytes an earlier layer read past its own header (a PROXY header's) are the
  first ciphertext.
* **Origination** (``upstream_tls``): after the dial (and after a PROXY header,
  which travels in clear), midway is the TLS client: the upstream's certificate
  is checked against ``upstream_tls_ca`` or the system store, for the name
  ``upstream_tls_sni`` or the upstream's configured host.

A failed handshake raises :class:`~midway.errors.TlsFailed` with the reason in
words (:func:`describe_tls_error`); the service logs one line and closes the
connection with the reason ``tls_failed``, never a traceback.

Contexts (certificates, CAs, ALPN, versions) are built when a proxy is made or
reconfigured (:func:`build_tls_layers`), so a reconfigure reads the files again;
a file that cannot be used is a :class:`~midway.errors.ConfigError` naming its
key, which :func:`check_tls` (``midway --check``) finds before any start.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import socket
import ssl
import time

from ..config.addresses import Address
from ..config.schema import TLS_ORIGINATION_KEYS, TLS_TERMINATION_KEYS, ProxyConfig
from ..core.tlsstream import TlsStream
from ..errors import ConfigError, TlsFailed, describe_oserror
from .base import InboundLayer, LayerConnection, OutboundLayer
from .proxy_protocol import V1_SIGNATURE, V2_SIGNATURE
from .routes import SniRoutes

__all__ = ["TlsTermination", "TlsOrigination", "build_tls_layers", "check_tls",
           "certificate_warnings", "server_context", "client_context", "describe_tls_error"]

log = logging.getLogger("midway")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_SNI_ATTR = "_midway_sni"
_ALPN_MAX = 255
"""Longest ALPN protocol name, in bytes (RFC 7301 §3.1: a one-byte length)."""

# OpenSSL's reason codes, in the words a log line uses.  The peer is "client" or
# "upstream", filled in.
_REASON_WORDS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "{peer} sent no certificate",
    "NO_SHARED_CIPHER": "no shared cipher",
    "UNSUPPORTED_PROTOCOL": "no shared protocol version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no shared protocol version",
    "WRONG_VERSION_NUMBER": "{peer} does not speak TLS (or a version midway refuses)",
    "HTTP_REQUEST": "{peer} sent plain HTTP to a TLS port",
    "HTTPS_PROXY_REQUEST": "{peer} sent an HTTP CONNECT to a TLS port",
    "NO_APPLICATION_PROTOCOL": "no shared ALPN protocol",
    "TLSV1_ALERT_UNKNOWN_CA": "{peer} does not trust midway's certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "{peer} refused midway's certificate (bad certificate)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "{peer} refused midway's certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "{peer} requires a client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "{peer} ended the handshake (handshake failure alert)",
    "UNEXPECTED_EOF_WHILE_READING": "{peer} closed the connection during the handshake",
}


def describe_tls_error(exc: ssl.SSLError, peer: str) -> str:
    """A failed handshake in words: ``client sent no certificate``,
    ``certificate verify failed: self-signed certificate``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = "client certificate" if peer == "client" else "certificate"
        return f"{what} verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return f"{peer} closed the connection during the handshake"
    reason = exc.reason or ""
    if reason in _REASON_WORDS:
        return _REASON_WORDS[reason].format(peer=peer)
    if reason:
        return reason.lower().replace("_", " ")
    return str(exc)


# -- contexts ------------------------------------------------------------------

def _pem(path: str, key: str, marker: str, what: str) -> None:
    """``path`` can be read and holds a PEM block of ``marker``; else a
    :class:`ConfigError` at ``key`` (OpenSSL's own message, ``PEM lib``, names
    neither the file nor the problem)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in text or marker.encode() not in text:
        raise ConfigError(key, f"{path} holds no PEM {what}")
    if b"ENCRYPTED" in text and what == "private key":
        raise ConfigError(key, f"{path}: the private key is encrypted (midway cannot "
                               "ask for a passphrase; store it unencrypted, readable "
                               "by midway only)")


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


def _certificates_in(path: str) -> int:
    """How many PEM certificates the file ``path`` holds (0 if unreadable)."""
    try:
        with open(path, "rb") as f:
            return sum(m.group(1) == b"CERTIFICATE" for m in _PEM_BLOCK.finditer(f.read()))
    except OSError:
        return 0


def _damaged_certificate(path: str) -> str | None:
    """Why a certificate of the PEM file ``path`` cannot be used, in words
    (``certificate 2 of the file is damaged (...)``), or None when each one
    can.  For OpenSSL's ``PEM lib``, which names neither the file nor the block."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        return None
    blocks = [m.group(2) for m in _PEM_BLOCK.finditer(text) if m.group(1) == b"CERTIFICATE"]
    for n, body in enumerate(blocks, 1):
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except binascii.Error:
            return f"certificate {n} of the file is damaged (its PEM block is not valid base64)"
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=der)
        except ssl.SSLError:
            return f"certificate {n} of the file is damaged (not a valid X.509 certificate)"
    return None


def _no_passphrase() -> bytes:
    raise ConfigError("", "the private key asks for a passphrase")


def _load_chain(context: ssl.SSLContext, where: str, cert_key: str, cert: str,
                key_key: str, key: str) -> None:
    _pem(cert, f"{where}.{cert_key}", "CERTIFICATE-----", "certificate")
    _pem(key or cert, f"{where}.{key_key if key else cert_key}", "PRIVATE KEY-----",
         "private key")
    try:
        context.load_cert_chain(cert, key or None, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            order = (" (its first certificate: the leaf must come first, then its chain)"
                     if _certificates_in(cert) > 1 else "")
            raise ConfigError(f"{where}.{key_key if key else cert_key}",
                              f"the private key does not match the certificate in "
                              f"{cert}{order}") from exc
        if exc.reason == "NO_CERTIFICATE_ASSIGNED":  # OpenSSL's words for a key of the other type
            raise ConfigError(f"{where}.{key_key if key else cert_key}",
                              f"the private key does not match the certificate in "
                              f"{cert} (a key of another type: RSA for an ECDSA "
                              "certificate, or the reverse)") from exc
        if exc.reason is None:  # "PEM lib": a damaged block, of the certificates or the key
            damaged = _damaged_certificate(cert)
            if damaged is not None:
                raise ConfigError(f"{where}.{cert_key}", f"cannot load {cert}: {damaged}") from exc
            raise ConfigError(f"{where}.{key_key if key else cert_key}",
                              f"cannot load {key or cert}: the private key is damaged "
                              "(not a valid PEM private key)") from exc
        raise ConfigError(f"{where}.{cert_key}", f"cannot load {cert}: "
                          f"{describe_tls_error(exc, 'peer')}") from exc


def _out_of_date(path: str, key: str) -> str | None:
    """Why the first certificate of ``path`` (the leaf) will be refused, when it
    has expired or is not valid yet; None else.  It is served all the same (as
    HAProxy and nginx do): a renewal that comes late must not stop the proxy, but
    every client will refuse it, so each start, reload and ``--check`` says so."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # not in this Python: nothing to say
        return None
    try:
        fields = decode(path)
        not_before, not_after = fields["notBefore"], fields["notAfter"]
        start, end = ssl.cert_time_to_seconds(not_before), ssl.cert_time_to_seconds(not_after)
    except (ssl.SSLError, OSError, KeyError, ValueError):
        return None
    now = time.time()
    if now >= end:
        return (f"{key}: the certificate in {path} expired on {not_after}: clients will "
                "refuse it; renew it and reload")
    if now < start:
        return (f"{key}: the certificate in {path} is not valid before {not_before} (is "
                "the clock right?): clients will refuse it until then")
    return None


def certificate_warnings(config: ProxyConfig) -> list[str]:
    """What is wrong with the dates of ``config``'s own certificates
    (``tls_cert``, the routes' ``tls_cert``, ``upstream_tls_cert``), in words: logged by
    :func:`build_tls_layers`, printed by ``--check``."""
    where = f"proxy.{config.name}"
    found = [_out_of_date(path, f"{where}.{key}") for key, path in (
        ("tls_cert", config.tls_cert),
        *((f"routes[{i}].tls_cert", route.tls_cert) for i, route in enumerate(config.routes)),
        ("upstream_tls_cert", config.upstream_tls_cert if config.upstream_tls else ""))
        if path]
    return [warning for warning in found if warning is not None]


def _load_ca(context: ssl.SSLContext, key: str, path: str) -> None:
    _pem(path, key, "CERTIFICATE-----", "CA certificate")
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        why = _damaged_certificate(path) or describe_tls_error(exc, "peer")
        raise ConfigError(key, f"cannot load {path}: {why}") from exc


def server_context(config: ProxyConfig) -> ssl.SSLContext:
    """The termination context of ``config`` (``tls_cert`` set), serving
    ``tls_cert``, or the ``tls_cert`` of the SNI route a server name takes when
    that route has one.  Raises :class:`ConfigError` naming the key of a file
    that cannot be used."""
    where = f"proxy.{config.name}"
    context = _server_context(config, where, config.tls_cert, config.tls_key)
    if not any(route.tls_cert for route in config.routes):
        context.sni_callback = _remember_sni
        return context
    # A route without a certificate of its own maps to None (the proxy's), so that
    # the route a name takes (the most specific) decides, as for its upstreams.
    own = {route.name: _server_context(config, f"{where}.routes[{i}]", route.tls_cert,
                                       route.tls_key) if route.tls_cert else None
           for i, route in enumerate(config.routes)}
    chosen = SniRoutes((pattern, own[route.name]) for route in config.routes
                       for pattern in route.sni)

    def choose(obj: ssl.SSLObject | ssl.SSLSocket, name: str | None,
               context: ssl.SSLContext) -> None:
        _remember_sni(obj, name, context)
        found = chosen.match(name)
        if found is not None:
            obj.context = found

    context.sni_callback = choose
    return context


def _server_context(config: ProxyConfig, where: str, cert: str, key: str) -> ssl.SSLContext:
    """A termination context of ``config``'s settings, serving ``cert`` (with
    ``key``); the file keys are named under ``where`` in errors."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[config.tls_min_version]
    _load_chain(context, where, "tls_cert", cert, "tls_key", key)
    if config.tls_alpn:
        for i, name in enumerate(config.tls_alpn):
            if len(name.encode("utf-8")) > _ALPN_MAX:
                raise ConfigError(f"proxy.{config.name}.tls_alpn[{i}]",
                                  f"an ALPN protocol name is at most {_ALPN_MAX} bytes")
        context.set_alpn_protocols(list(config.tls_alpn))
    if config.tls_client_ca:
        _load_ca(context, f"proxy.{config.name}.tls_client_ca", config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(config: ProxyConfig) -> ssl.SSLContext:
    """The origination context of ``config`` (``upstream_tls`` on).  Raises
    :class:`ConfigError` naming the key of a file that cannot be used."""
    where = f"proxy.{config.name}"
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if config.upstream_tls_ca:
        _load_ca(context, f"{where}.upstream_tls_ca", config.upstream_tls_ca)
    if not config.upstream_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.upstream_tls_cert:
        _load_chain(context, where, "upstream_tls_cert", config.upstream_tls_cert,
                    "upstream_tls_key", config.upstream_tls_key)
    return context


def _remember_sni(obj: ssl.SSLObject | ssl.SSLSocket, name: str | None,
                  context: ssl.SSLContext) -> None:
    """The server-name callback: keep the name the client asked for."""
    if name:
        setattr(obj, _SNI_ATTR, name.lower().rstrip("."))


def check_tls(config: ProxyConfig) -> None:
    """Everything about TLS that would stop ``config`` from starting: keys that
    need another key, files, contexts.  Raises :class:`ConfigError`."""
    _check_keys(config)
    if config.tls_cert:
        server_context(config)
    if config.upstream_tls:
        client_context(config)


def _check_keys(config: ProxyConfig) -> None:
    where = f"proxy.{config.name}"
    defaults = ProxyConfig()
    if not config.tls_cert:
        for key in TLS_TERMINATION_KEYS:
            if getattr(config, key) != getattr(defaults, key):
                raise ConfigError(f"{where}.{key}", "needs tls_cert (TLS termination)")
        for i, route in enumerate(config.routes):
            if route.tls_cert:
                raise ConfigError(f"{where}.routes[{i}].tls_cert",
                                  "needs the proxy's tls_cert (TLS termination): without "
                                  "it the backend makes the handshake, with its own "
                                  "certificate")
    if not config.upstream_tls:
        for key in TLS_ORIGINATION_KEYS:
            if getattr(config, key) != getattr(defaults, key):
                raise ConfigError(f"{where}.{key}", "needs upstream_tls = true")
    if config.upstream_tls_key and not config.upstream_tls_cert:
        raise ConfigError(f"{where}.upstream_tls_key", "needs upstream_tls_cert")
    if config.upstream_tls_sni and not _sendable_server_name(config.upstream_tls_sni):
        raise ConfigError(f"{where}.upstream_tls_sni",
                          f"{config.upstream_tls_sni!r} is not a host name (labels of 1 "
                          "to 63 characters, dots between) or an IP address")
    if (config.upstream_tls and config.upstream_tls_verify and not config.upstream_tls_sni
            and any(u.address.is_unix for u in config.upstreams)):
        raise ConfigError(f"{where}.upstream_tls_sni",
                          "a unix-socket upstream has no host name to verify: set "
                          "upstream_tls_sni (or turn upstream_tls_verify off)")


def _sendable_server_name(name: str) -> bool:
    """Whether ``ssl`` can send ``name`` as SNI: ``wrap_bio(server_hostname=)``
    IDNA-encodes it, refusing an empty label, one over 63 characters, a NUL."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(
            ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=name)
    except (UnicodeError, ValueError, TypeError):
        return False
    return True


def build_tls_layers(config: ProxyConfig) -> tuple[tuple[InboundLayer, ...],
                                                   tuple[OutboundLayer, ...]]:
    """The TLS layers ``config`` asks for, with their contexts built now (files
    read now).  Raises :class:`ConfigError`."""
    if not config.tls_cert and not config.upstream_tls:
        _check_keys(config)
        return (), ()
    check_tls(config)
    inbound: tuple[InboundLayer, ...] = ()
    outbound: tuple[OutboundLayer, ...] = ()
    if config.tls_cert:
        inbound = (TlsTermination(server_context(config), config.tls_handshake_timeout_s),)
    if config.upstream_tls:
        if not config.upstream_tls_verify:
            log.warning("%s: upstream_tls_verify is off: upstream certificates are not "
                        "checked (anyone on the path can pose as the upstream)", config.name)
        outbound = (TlsOrigination(client_context(config), config.tls_handshake_timeout_s,
                                   config.upstream_tls_sni),)
    for warning in certificate_warnings(config):
        log.warning("%s", warning)
    return inbound, outbound


# -- the layers ----------------------------------------------------------------

async def _handshake(stream: TlsStream, timeout_s: float, peer: str, prefix: str) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await stream.handshake()
    except TimeoutError:
        raise TlsFailed(f"{prefix}handshake timed out after {timeout_s:g} s") from None
    except ssl.SSLError as exc:
        if peer == "client" and stream.first.startswith((V1_SIGNATURE, V2_SIGNATURE)):
            # OpenSSL's words would be "wrong version number": say what came.
            raise TlsFailed(f"{prefix}client sent a PROXY protocol header (behind a load "
                            "balancer with send-proxy? set proxy_protocol_in)") from exc
        raise TlsFailed(prefix + describe_tls_error(exc, peer)) from exc
    except OSError as exc:
        if peer == "client":
            raise  # a client's reset is a reset (docs/tls.md), in any phase
        # An upstream that accepts, then resets mid-handshake, failed the
        # handshake: the next upstream is tried, as for a bad certificate.
        raise TlsFailed(prefix + describe_oserror(exc)) from exc


class TlsTermination:
    """The inbound layer of ``tls_cert``: midway is the TLS server."""

    name = "tls"

    def __init__(self, context: ssl.SSLContext, handshake_timeout_s: float) -> None:
        self.context = context
        self.handshake_timeout_s = handshake_timeout_s

    async def accept(self, conn: LayerConnection) -> None:
        stream = TlsStream(conn.client_socket, self.context, server_side=True,
                           initial=conn.take_unread())
        await _handshake(stream, self.handshake_timeout_s, "client", "")
        conn.replace_client(stream)
        info = conn.info
        info.alpn = stream.alpn()
        if info.alpn is not None:
            conn.route["alpn"] = info.alpn  # what proxy_protocol_out v2 sends as ALPN
        sni = getattr(stream.obj, _SNI_ATTR, None)
        if sni is not None:
            info.sni = sni
            conn.route["sni"] = sni


class TlsOrigination:
    """The outbound layer of ``upstream_tls``: midway is the TLS client."""

    name = "upstream_tls"

    def __init__(self, context: ssl.SSLContext, handshake_timeout_s: float,
                 server_name: str = "") -> None:
        self.context = context
        self.handshake_timeout_s = handshake_timeout_s
        self.server_name = server_name

    async def connect(self, conn: LayerConnection) -> None:
        conn.replace_upstream(await self.secure(conn.upstream_socket, conn.upstream_address))

    async def secure(self, sock: socket.socket, address: Address) -> TlsStream:
        """The handshake with ``address`` on ``sock`` (connected): the stream,
        which owns ``sock`` from then on.  Active health checks make it too, so
        that they check what a connection needs.  Raises :class:`TlsFailed`
        (the message starts ``upstream ADDRESS: ``); on failure the caller still
        owns ``sock``."""
        name = self.server_name or (None if address.is_unix else address.host)
        stream = TlsStream(sock, self.context, server_side=False, server_hostname=name)
        await _handshake(stream, self.handshake_timeout_s, "upstream", f"upstream {address}: ")
        return stream
