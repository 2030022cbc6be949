"""TLS through the stream seam: the relay's client end is a real, non-blocking
:class:`ssl.SSLSocket` (handshake done before the relay), wrapped in a few lines
that map want-read/want-write to :exc:`BlockingIOError`.  The relay terminates TLS
with no change to its logic: ciphertext on the client leg, plaintext upstream.

The certificate is self-signed, made by ``openssl req`` at test time; loopback only.
Not the future TLS layer: here a half-close is a bare TCP FIN (no ``close_notify``),
which both ends accept as an end of stream (``OP_IGNORE_UNEXPECTED_EOF``; OpenSSL 3
would otherwise fail the session, and the other direction with it).  The TLS layer
must decide how ``shutdown(SHUT_WR)`` maps to ``close_notify``."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from midway.chain.base import DOWNSTREAM, UPSTREAM, Stage
from midway.chain.runner import set_stages
from midway.core.observer import CloseReason
from midway.core.relay import Relay
from midway.core.streams import Stream

from .. import helpers
from .endpoints import TIMEOUT_S, in_threads, make_relay, read_to_eof, send_all_then_fin, sha

BLOB_SIZE = 16 << 20


class TlsStream:
    """A non-blocking server-side ``SSLSocket`` as a relay :class:`Stream`."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, bufsize: int, /) -> bytes:
        try:
            return self.sock.recv(bufsize)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None

    def recv_into(self, buffer: bytearray, nbytes: int = 0, /) -> int:
        try:
            return self.sock.recv_into(buffer, nbytes or len(buffer))  # 0 means 0 here
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None

    def send(self, data: bytes | bytearray | memoryview, /) -> int:
        try:
            return self.sock.send(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None

    def shutdown(self, how: int, /) -> None:
        # SSLSocket.shutdown drops its TLS state (a later read would return
        # ciphertext); the socket's own shutdown sends the FIN and keeps it.
        socket.socket.shutdown(self.sock, how)

    def setsockopt(self, level: int, option: int, value: bytes, /) -> None:
        self.sock.setsockopt(level, option, value)

    def close(self) -> None:
        self.sock.close()

    def pending(self) -> int:
        return self.sock.pending()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip(helpers.needs("openssl", apt="openssl"))
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30)
    return cert, key


def tls_pair(cert: Path, key: Path) -> tuple[ssl.SSLSocket, TlsStream]:
    """(TLS client app end, blocking; relay's TLS server end, non-blocking, shaken hands)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    for context in (server_ctx, client_ctx):
        context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF  # a FIN ends the stream (above)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        raw_app = socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT_S)
        raw_end, _ = listener.accept()
    raw_end.settimeout(TIMEOUT_S)
    app = client_ctx.wrap_socket(raw_app, server_hostname="localhost",
                                 do_handshake_on_connect=False)
    end = server_ctx.wrap_socket(raw_end, server_side=True, do_handshake_on_connect=False)
    with_threads = [lambda: app.do_handshake(), lambda: end.do_handshake()]
    asyncio.run(in_threads(*with_threads))
    end.setblocking(False)
    return app, TlsStream(end)


def plain_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        app = socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT_S)
        end, _ = listener.accept()
    end.setblocking(False)
    return app, end


def tls_client_exchange(app: ssl.SSLSocket, blob: bytes) -> bytes:
    """One thread (an SSL object is not for two at once): send, FIN, read to EOF."""
    app.sendall(blob)
    socket.socket.shutdown(app, socket.SHUT_WR)
    return read_to_eof(app)


@pytest.mark.parametrize("chained", [False, True], ids=["fast", "chain"])
def test_16_mib_each_way_through_a_tls_endpoint(
        chained: bool, certificate: tuple[Path, Path]) -> None:
    up_blob, down_blob = os.urandom(BLOB_SIZE), os.urandom(BLOB_SIZE)
    client_app, client_end = tls_pair(*certificate)
    assert isinstance(client_end, Stream)
    server_app, upstream_end = plain_pair()

    async def main() -> None:
        closed: asyncio.Future[Relay[Any]] = asyncio.get_running_loop().create_future()
        relay = make_relay(client_end, upstream_end, closed, splice=True)
        assert not relay.splice
        if chained:
            set_stages(relay, UPSTREAM, [("pass", Stage())])
            set_stages(relay, DOWNSTREAM, [("pass", Stage())])
        relay.start()
        with client_app, server_app:
            at_client, _, at_server = await in_threads(
                lambda: tls_client_exchange(client_app, up_blob),
                lambda: send_all_then_fin(server_app, down_blob),
                lambda: read_to_eof(server_app))
            done = await asyncio.wait_for(closed, 10)
        assert sha(at_server) == sha(up_blob)  # decrypted by the relay's endpoint
        assert sha(at_client) == sha(down_blob)  # encrypted by it
        assert done.reason is CloseReason.EOF
        assert (done.bytes_up, done.bytes_down) == (BLOB_SIZE, BLOB_SIZE)

    asyncio.run(asyncio.wait_for(main(), 120))
