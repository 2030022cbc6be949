"""The admin HTTP server: the standard library's ``http.server`` on a thread of its
own, handing each request to the routes on the runtime's event loop.

Why a thread: ``http.server`` parses requests (request line, headers, keep-alive,
HTTP/1.0 and 1.1, malformed input) so midway does not hand-write a parser, and it
is blocking.  Each request is read and answered on a short-lived thread; the
route itself runs on the event loop through ``run_coroutine_threadsafe``, so the
proxies are only ever touched from their own loop and no lock is needed.  The
admin traffic is a handful of requests in a test run; the data path never waits
for it.

Limits (named constants below): a request body must be sent with Content-Length
(chunked bodies get 411) and be at most :data:`MAX_BODY` bytes; an idle
keep-alive connection is closed after :data:`IDLE_TIMEOUT_S`; a route that does
not answer within :data:`ROUTE_TIMEOUT_S` gets 503, as Toxiproxy's own timeout
handler does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import socketserver
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from ..config.addresses import parse_address
from ..errors import ListenError, describe_oserror
from .routes import Response, ToxiproxyAPI

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["AdminServer", "MAX_BODY", "IDLE_TIMEOUT_S", "ROUTE_TIMEOUT_S"]

log = logging.getLogger("midway")

MAX_BODY = 1 << 20
"""Largest request body (1 MiB): a populate of thousands of proxies fits."""
IDLE_TIMEOUT_S = 60.0
"""Idle keep-alive connections are closed after this long (Toxiproxy's IdleTimeout)."""
ROUTE_TIMEOUT_S = 25.0
"""A route that takes longer answers 503 (Toxiproxy's TimeoutHandler: 25 s)."""
_POLL_S = 0.2
"""How often the accept loop checks for shutdown (bounds how long stop() waits)."""


class AdminServer:
    """Serves :class:`~midway.admin.routes.ToxiproxyAPI` for ``runtime`` on
    ``address`` (``host:port``; port 0 picks one, see :attr:`address`).

    :meth:`start` binds (raising :class:`ListenError`) and must be called on the
    runtime's event loop; :meth:`stop` stops accepting and closes the socket."""

    def __init__(self, runtime: Runtime, address: str) -> None:
        self.api = ToxiproxyAPI(runtime)
        self.requested = address
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        addr = parse_address(self.requested, listen=True)
        try:
            infos = socket.getaddrinfo(addr.host or None, addr.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            httpd = _HTTPServer(sockaddr, family, self.api, loop)
        except OSError as exc:
            raise ListenError(f"cannot listen on {self.requested} for the admin API: "
                              f"{describe_oserror(exc)}") from exc
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(_POLL_S,),
                                        name="midway-admin", daemon=True)
        self._thread.start()
        log.info("admin API (Toxiproxy-compatible) listening on %s", self.address_text)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), with the real port."""
        assert self._httpd is not None, "not started"
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def address_text(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        """Stop accepting and close the listening socket (requests being answered
        finish on their own threads)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        await asyncio.to_thread(httpd.shutdown)
        httpd.server_close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sockaddr: Any, family: int, api: ToxiproxyAPI,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.address_family = family
        self.api = api
        self.loop = loop
        super().__init__(sockaddr, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up our own name (socket.getfqdn), which
        # can stall on a misconfigured resolver; we do not need it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server_version = "midway-admin"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch()

    do_POST = do_PATCH = do_DELETE = do_PUT = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # the body is not read: the connection is unusable
            self._send(Response(411, _error_body("send the body with a Content-Length", 411)))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._send(Response(413 if length > 0 else 400,
                                _error_body("bad Content-Length", 413 if length > 0 else 400)))
            return
        body = self.rfile.read(length) if length else b""
        coro = self.server.api.handle(self.command, self.path, body,
                                      self.headers.get("User-Agent", ""))
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.server.loop)
        except RuntimeError:  # the event loop is closed: we are shutting down
            coro.close()
            self._send(Response(503, _error_body("shutting down", 503)))
            return
        try:
            response = future.result(ROUTE_TIMEOUT_S)
        except FutureTimeout:
            future.cancel()
            response = Response(503, _error_body("timed out", 503))
        except Exception as exc:
            log.error("admin API: %s %s failed", self.command, self.path, exc_info=exc)
            response = Response(500, _error_body(f"{type(exc).__name__}: {exc}", 500))
        self._send(response)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        if response.status != 204:  # RFC 9110: a 204 has neither
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin API: %s: %s", self.address_string(), format % args)


def _error_body(message: str, status: int) -> bytes:
    return json.dumps({"error": message, "status": status}, separators=(",", ":")).encode()
