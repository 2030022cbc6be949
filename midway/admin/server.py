"""The admin HTTP server: the standard library's ``http.server`` on a thread of its
own, handing each request to the routes on the runtime's event loop.

Why a thread: ``http.server`` parses requests (request line, headers, keep-alive,
HTTP/1.0 and 1.1, malformed input) so midway does not hand-write a parser, and it
is blocking.  Each request is read and answered on a short-lived thread; the
route itself runs on the event loop through ``run_coroutine_threadsafe``, so the
proxies are only ever touched from their own loop and no lock is needed.  The
admin traffic is a handful of requests in a test run; the data path never waits
for it.

Limits (named constants below), so that a burst of clients is served and a slow
or hostile one costs a bounded share:

* the listen queue is the proxies' (:data:`BACKLOG`), not socketserver's 5, so
  a burst of connects is not dropped (each drop costs the client a 1 s SYN
  retransmit);
* at most :data:`MAX_CONNECTIONS` connections are served at once (a thread
  each); a new connection past that takes the place of the one idle longest
  (waiting for its first request, or a keep-alive's next), which is closed, so
  idle connections cannot lock anyone out; only when none is idle is it
  answered 503 and closed at once;
* a request (line, headers and body) must arrive within :data:`REQUEST_TIMEOUT_S`
  of its first byte, however the client dribbles it (slowloris), or the
  connection is dropped; an idle keep-alive connection is closed after
  :data:`IDLE_TIMEOUT_S`;
* a body is sent with Content-Length or chunked (another transfer coding gets
  501) and is at most :data:`MAX_BODY` bytes (413); http.server caps a request or header line
  at 64 KiB (414, 431) and a request at 100 headers (431); what a front proxy
  could read otherwise (two Host or Content-Length headers, a Content-Length
  that is not digits, a header line http.server cannot parse) gets 400;
* a route that does not answer within :data:`ROUTE_TIMEOUT_S` gets 503, as
  Toxiproxy's own timeout handler does;
* with an admin token set (``admin_token`` or ``admin_token_file``), a request
  without ``Authorization: Bearer TOKEN`` gets 401 (the token compared in
  constant time); with none set, as by default, no header is needed, so
  Toxiproxy's clients work unchanged on loopback;
* a request from a browser (:func:`_from_browser`) whose ``Host`` names a host
  other than an IP address, ``localhost`` or one of ``admin_hosts`` gets 403
  (:func:`host_allowed`): a web page whose name an attacker pointed at this
  address (DNS rebinding) is same-origin with the API, and its Host is all that
  tells it apart;
* ``/`` and ``/ui/...`` (the dashboard's files, :mod:`midway.admin.static`) are
  answered before the token check: they hold no data, and the page asks for
  the token when the API it calls answers 401.

Every error is a JSON ``{"error", "status"}`` body, and what a peer does
(resetting, leaving before its answer, timing out) is logged at debug level,
never as a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import json
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from ..config.addresses import parse_address
from ..config.schema import ProxyConfig
from ..core.listener import bind_tcp
from . import static
from .routes import UI_HEADER, Response, ToxiproxyAPI

__all__ = ["AdminServer", "BACKLOG", "MAX_BODY", "MAX_CONNECTIONS", "IDLE_TIMEOUT_S",
           "REQUEST_TIMEOUT_S", "ROUTE_TIMEOUT_S", "host_allowed"]

log = logging.getLogger("midway")

BACKLOG: int = ProxyConfig.backlog
"""Length of the admin listener's accept queue: the proxies' default (511,
nginx's); socketserver's own 5 dropped connects from a burst of 200 clients."""
MAX_CONNECTIONS = 256
"""Admin connections served at once, one thread each; a connection past it
closes the one idle longest in its place (:class:`_Slots`), or when none is
idle gets 503 and is closed.  Toxiproxy has no cap (a goroutine each); a test
suite's clients need a handful, 256 leaves room for bursts while bounding
threads."""
MAX_BODY = 1 << 20
"""Largest request body (1 MiB): a populate of thousands of proxies fits."""
REQUEST_TIMEOUT_S = 10.0
"""A request must be read whole (line, headers, body) within this long of its
first byte, or the connection is dropped.  Admin clients on loopback send a
request in one write; a deadline for the whole request, not per read, is what
stops a client that sends a byte now and then (nginx's client_header_timeout is
60 s per read; Apache's mod_reqtimeout gives headers 20-40 s in all)."""
IDLE_TIMEOUT_S = 60.0
"""Idle keep-alive connections are closed after this long (Toxiproxy's IdleTimeout)."""
ROUTE_TIMEOUT_S = 25.0
"""A route that takes longer answers 503 (Toxiproxy's TimeoutHandler: 25 s)."""
_POLL_S = 0.2
"""How often the accept loop checks for shutdown (bounds how long stop() waits)."""
_REFUSED_LOG_EVERY_S = 10.0
"""At most one warning this often while connections are refused at the cap."""


class AdminServer:
    """Serves ``api`` (:class:`~midway.admin.routes.ToxiproxyAPI`) on ``address``
    (``host:port``; port 0 picks one, see :attr:`address`).  ``token`` gives the
    admin token in force (asked at each request, so a reload can change it):
    when it is not empty, every request must carry ``Authorization: Bearer
    TOKEN`` or is answered 401.  ``hosts`` gives the names besides IP addresses
    and ``localhost`` that a request's Host may name (``admin_hosts`` and the
    admin address's own host; asked at each request too), else 403.

    :meth:`start` binds (raising :class:`ListenError`), unless :meth:`bind` did
    already, and must be called on the event loop the routes run on; :meth:`stop`
    stops accepting and closes the socket."""

    def __init__(self, api: ToxiproxyAPI, address: str,
                 token: Callable[[], str] = lambda: "",
                 hosts: Callable[[], Collection[str]] = lambda: ()) -> None:
        self.api = api
        self.requested = address
        self.token = token
        self.hosts = hosts
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def bind(self) -> None:
        """Take the address now (raising :class:`ListenError`), to serve it from
        :meth:`start`: clients that come meanwhile wait in the listen queue."""
        if self._sock is None:
            self._sock = bind_tcp(parse_address(self.requested, listen=True), backlog=BACKLOG,
                                  what=" for the admin API")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.bind()
        sock, self._sock = self._sock, None
        assert sock is not None
        httpd = _HTTPServer(sock, self.api, loop, self.token, self.hosts)
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
        sock, self._sock = self._sock, None
        if sock is not None:  # bound, never served
            sock.close()
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
    request_queue_size = BACKLOG

    def __init__(self, sock: socket.socket, api: ToxiproxyAPI,
                 loop: asyncio.AbstractEventLoop, token: Callable[[], str],
                 hosts: Callable[[], Collection[str]]) -> None:
        self.address_family = sock.family
        self.api = api
        self.loop = loop
        self.token = token
        self.hosts = hosts
        self.slots = _Slots(MAX_CONNECTIONS)
        self._refused_logged_at = -_REFUSED_LOG_EVERY_S
        self._host_logged_at = -_REFUSED_LOG_EVERY_S
        super().__init__(sock.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()  # the one socketserver made: ours is bound and listening
        self.socket = sock
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        """Called by the accept loop: serve on a thread of its own if there is a
        slot (or an idle connection to give up its own), else answer 503 without
        blocking and close."""
        if not self.slots.take():
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        now = time.monotonic()
        if now - self._refused_logged_at >= _REFUSED_LOG_EVERY_S:
            self._refused_logged_at = now
            log.warning("admin API: %d connections already open, none idle: refusing new "
                        "ones (503)", MAX_CONNECTIONS)
        body = _error_body(f"too many admin connections (at most {MAX_CONNECTIONS})", 503)
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)  # the accept loop must never wait on a client
            request.send(head + body)  # a fresh socket's send buffer takes it whole
        except OSError as exc:
            log.debug("admin API: %s: cannot send the 503: %s", client_address, exc)
        self.shutdown_request(request)

    def wrong_host(self, host: str) -> Response:
        """The 403 for a Host :func:`host_allowed` refuses, logged (at most one
        warning per :data:`_REFUSED_LOG_EVERY_S`: a page may ask each second)."""
        now = time.monotonic()
        if now - self._host_logged_at >= _REFUSED_LOG_EVERY_S:
            self._host_logged_at = now
            log.warning("admin API: refused a request for Host %r (add the name to "
                        "admin_hosts if it is yours)", host)
        return Response(403, _error_body(
            f"Host {host!r} not allowed: the admin API answers requests for an IP address, "
            "localhost or a name in admin_hosts (a web page under another name may be a "
            "DNS rebinding attack)", 403))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """What a peer does (resets, leaves before its answer, times out) is not
        an error of ours: debug level.  Anything else is a bug: logged with its
        traceback through logging (socketserver would print it to stderr)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("admin API: %s: %s", client_address, exc)
        else:
            log.error("admin API: request from %s failed", client_address, exc_info=exc)



class _Slots:
    """The connections served at once, at most ``limit`` but for those closed
    to make room whose threads are still ending, and which of them are idle:
    blocked waiting for a request to begin, with nothing of it received.  Those
    are the ones a new connection at the limit may take the place of: a client
    that keeps connections open and silent (256 of them would have locked
    everyone else out for :data:`IDLE_TIMEOUT_S`) loses them to the next
    request, as an HTTP server may close an idle keep-alive connection at any
    time (RFC 9112 section 9.8; clients retry on another)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._served = 0
        self._idle: dict[socket.socket, None] = {}  # in the order they became idle

    def take(self) -> bool:
        """A slot for a new connection: a free one, else the one of the
        connection idle longest (with no request bytes waiting), which is shut
        down (its thread reads the end of stream and ends).  False when every
        connection is busy."""
        with self._lock:
            if self._served >= self._limit:
                oldest = self._idlest()
                if oldest is None:
                    return False
                del self._idle[oldest]
                try:
                    oldest.shutdown(socket.SHUT_RDWR)
                except OSError as exc:  # the peer has gone already: its thread ends too
                    log.debug("admin API: closing an idle connection: %s", exc)
                else:
                    log.debug("admin API: %d connections open: closed the one idle longest "
                              "for a new one", self._served)
            self._served += 1
            return True

    def _idlest(self) -> socket.socket | None:
        """The connection idle longest that is idle indeed: one marked idle
        whose thread has not yet woken to read the request bytes already
        waiting in its receive buffer is busy, not a slot to take.  A
        connection its peer has closed, or that is broken, is idle: its thread
        is about to end anyway.  Called with the lock held, so it never blocks:
        one poll without a timeout (a socket with a timeout would wait in
        ``recv`` even with ``MSG_DONTWAIT``), then a peek only at the readable."""
        poller = select.poll()
        for sock in self._idle:
            poller.register(sock, select.POLLIN)
        readable = {fd for fd, _ in poller.poll(0)}
        for sock in self._idle:
            if sock.fileno() not in readable:
                return sock  # nothing of a request received
            try:
                waiting = sock.recv(1, socket.MSG_PEEK)  # returns at once: readable
            except OSError:
                return sock  # broken: its thread sees it too and ends
            if not waiting:
                return sock  # closed by the peer
        return None

    def release(self) -> None:
        with self._lock:
            self._served -= 1

    def idle(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle[sock] = None

    def busy(self, sock: socket.socket) -> bool:
        """``sock`` is no longer idle; False when :meth:`take` closed it meanwhile."""
        with self._lock:
            return self._idle.pop(sock, False) is None


class _DeadlineReader(io.RawIOBase):
    """The socket as the raw stream under the handler's ``rfile``: each read
    waits at most what is left of :attr:`deadline` (or :data:`IDLE_TIMEOUT_S`
    when none is set, the connection idle in ``slots`` meanwhile), so a whole
    request shares one deadline."""

    def __init__(self, sock: socket.socket, slots: _Slots) -> None:
        self._sock = sock
        self._slots = slots
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is None:  # waiting for a request to begin: idle
            self._sock.settimeout(IDLE_TIMEOUT_S)
            self._slots.idle(self._sock)
            try:
                received = self._sock.recv_into(buffer)
            finally:
                evicted = not self._slots.busy(self._sock)
            return 0 if evicted else received  # closed for a new connection: its end
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"request not complete within {REQUEST_TIMEOUT_S:g} s")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server_version = "midway-admin"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by one that keeps the request's deadline
        self._reader = _DeadlineReader(self.connection, self.server.slots)
        self.rfile = self._buffered = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """Wait (up to the idle timeout) for a request to begin, then give it
        :data:`REQUEST_TIMEOUT_S` to arrive whole (http.server closes the
        connection on the timeout)."""
        self._reader.deadline = None
        try:
            begun = self._buffered.peek(1)
        except TimeoutError:
            log.debug("admin API: %s: idle keep-alive connection closed",
                      self.address_string())
            begun = b""
        if not begun:
            self.close_connection = True
            return
        self._reader.deadline = time.monotonic() + REQUEST_TIMEOUT_S
        super().handle_one_request()

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own errors (malformed request line, headers too long or
        too many, unknown method) as JSON, like every other error."""
        self.close_connection = True  # what follows a malformed request is unknown
        # A request line too bad to parse leaves http.server assuming HTTP/0.9,
        # which has no status line: answer with one.
        self.request_version = self.protocol_version
        if message is None:
            message = self.responses.get(code, ("error", ""))[0]
        self._send(Response(code, _error_body(message, code)))

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch()

    do_POST = do_PATCH = do_DELETE = do_PUT = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        try:
            _check_headers(self.headers)
            body = self._body()
        except _BodyError as exc:
            self.close_connection = True  # the body is not read whole: the connection is unusable
            self._send(Response(exc.status, _error_body(exc.message, exc.status)))
            return
        # An absolute URI's authority stands for the Host (RFC 9112 section 3.2.2).
        host = _authority(self.path) or self.headers.get("Host")
        if _from_browser(self.headers) and not host_allowed(host, self.server.hosts()):
            self._send(self.server.wrong_host(str(host)))
            return
        target = _origin_form(self.path)
        page = static.serve(self.command, target)
        if page is not None:  # the dashboard's files: no data in them, no token
            self._send(page)
            return
        token = self.server.token()
        if token and not _authorized(self.headers.get("Authorization", ""), token):
            self._send(Response(401, _error_body(
                "this admin API needs a token: send Authorization: Bearer TOKEN", 401),
                headers=(("WWW-Authenticate", 'Bearer realm="midway"'),)))
            return
        coro = self.server.api.handle(self.command, target, body,
                                      self.headers.get("User-Agent", ""),
                                      from_ui=_from_ui(self.headers))
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

    def _body(self) -> bytes:
        """The request body: ``Content-Length`` bytes, or a chunked body decoded
        (RFC 9112 section 7.1; .NET's ``PostAsJsonAsync`` and Refit send one),
        at most :data:`MAX_BODY` bytes either way."""
        coding = self.headers.get("Transfer-Encoding")
        if coding is not None:
            if coding.strip().lower() != "chunked":
                raise _BodyError(501, f"transfer coding {coding!r} not supported: "
                                      "send the body chunked or with a Content-Length")
            # A Content-Length beside it is ignored (RFC 9112 section 6.3), and the
            # connection closed after the answer, as such a request may be an attack.
            if self.headers.get("Content-Length") is not None:
                self.close_connection = True
            return _read_chunked(self.rfile)
        text = (self.headers.get("Content-Length") or "").strip(" \t") or "0"
        if not text.isascii() or not text.isdigit():  # int() takes "+2" and "1_0"
            raise _BodyError(400, f"bad Content-Length: {text[:20]!r}")
        length = int(text)
        if length > MAX_BODY:
            raise _BodyError(413, f"request body larger than {MAX_BODY} bytes")
        return self.rfile.read(length) if length else b""

    def _send(self, response: Response) -> None:
        # The answer gets a timeout of its own, not what is left of the request's.
        self.connection.settimeout(REQUEST_TIMEOUT_S)
        self.send_response(response.status)
        if response.status != 204:  # RFC 9110: a 204 has neither
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin API: %s: %s", self.address_string(), format % args)


class _BodyError(Exception):
    """A request body that cannot be read: answered with ``status`` and the
    connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_CHUNK_LINE_MAX = 4096
"""Longest chunk-size line (size and extensions) or trailer line, in bytes."""
_TRAILERS_MAX = 100
"""Most trailer lines, as http.server's cap on header lines."""


def _read_chunked(rfile: io.BufferedIOBase) -> bytes:
    """A chunked body (RFC 9112 section 7.1) from ``rfile``, decoded: chunk
    extensions and trailers are read and ignored.  More than :data:`MAX_BODY`
    bytes answer 413, a malformed chunk 400; the request's deadline bounds the
    whole read."""
    body = bytearray()
    while True:
        line = rfile.readline(_CHUNK_LINE_MAX + 1)
        if not line.endswith(b"\n"):
            raise _BodyError(400, "bad chunked body: chunk size line too long or cut")
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or any(
                c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise _BodyError(400, f"bad chunked body: chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > MAX_BODY:
            raise _BodyError(413, f"request body larger than {MAX_BODY} bytes")
        data = rfile.read(size)
        if len(data) < size or rfile.readline(3) not in (b"\r\n", b"\n"):
            raise _BodyError(400, "bad chunked body: a chunk is cut or not followed by CRLF")
        body += data
    for _ in range(_TRAILERS_MAX + 1):
        line = rfile.readline(_CHUNK_LINE_MAX + 1)
        if line in (b"\r\n", b"\n"):
            return bytes(body)
        if not line.endswith(b"\n"):
            raise _BodyError(400, "bad chunked body: trailer line too long or cut")
    raise _BodyError(400, f"bad chunked body: more than {_TRAILERS_MAX} trailer lines")


def _check_headers(headers: Any) -> None:
    """Refuse (400, :class:`_BodyError`) what two parsers could read apart (RFC
    9112 sections 3.2, 5.1 and 6.3): a header line http.server's parser cannot
    read (``Host : x``, no colon; it would drop it and every line after it), two
    Host headers, two Content-Length headers."""
    if headers.defects:
        raise _BodyError(400, "malformed header line: a name followed by a space, "
                              "or no colon")
    if len(headers.get_all("Host") or ()) > 1:
        raise _BodyError(400, "more than one Host header")
    lengths = headers.get_all("Content-Length") or ()
    if len(lengths) > 1:
        raise _BodyError(400, f"bad Content-Length: {len(lengths)} of them")


def _origin_form(target: str) -> str:
    """The path and query of a request target.  An absolute URI
    (``GET http://127.0.0.1:8474/version``, what a client that takes the API for
    its HTTP proxy sends) becomes its path: RFC 9112 section 3.2.2 has servers
    accept that form, and Go's net/http, Toxiproxy's server, does."""
    if not target[:8].lower().startswith(("http://", "https://")):
        return target
    try:
        parts = urlsplit(target)
    except ValueError:  # "http://[::1/x": no path can be told; it names no route
        return target
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _authority(target: str) -> str | None:
    """The ``host:port`` of an absolute-URI request target, else None."""
    if not target[:8].lower().startswith(("http://", "https://")):
        return None
    return target.split("/", 3)[2] or None


def _authorized(header: str, token: str) -> bool:
    """Whether ``header`` is ``Bearer TOKEN`` (RFC 6750; the scheme's case is
    free), compared in constant time so the answer's timing reveals nothing."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())


def host_allowed(host: str | None, names: Collection[str]) -> bool:
    """Whether a request's ``Host`` header (None: it has none, as HTTP/1.0 may)
    can name this API without a DNS rebinding behind it: an IP address (a page
    whose origin is an address was served by no name an attacker could point
    here), ``localhost`` or a name under ``.localhost`` (which browsers resolve to
    loopback themselves, RFC 6761), or one of ``names`` (``*``: any), the port
    and case aside."""
    if not host:
        return True
    name = host.strip().lower()
    if name.startswith("["):  # [v6] or [v6]:port
        literal, bracket, rest = name[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return False
        try:
            return ipaddress.ip_address(literal).version == 6
        except ValueError:
            return False
    base, colon, port = name.rpartition(":")
    if colon and port.isdigit():
        name = base
    try:
        ipaddress.IPv4Address(name)
        return True
    except ValueError:
        pass
    name = name.removesuffix(".")
    return (name == "localhost" or name.endswith(".localhost") or "*" in names
            or name in (n.lower().removesuffix(".") for n in names))


_BROWSER_HEADERS = ("Origin", "Referer", "Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest",
                    UI_HEADER)
"""Headers that a web page's requests carry and that its script cannot take off:
browsers send ``Sec-Fetch-*`` with every request (Chrome 76, Firefox 90, Safari
16.4) and ``Origin`` with every POST; the dashboard sends :data:`UI_HEADER`."""


def _from_browser(headers: Any) -> bool:
    """Whether a request may come from a web page, which is what DNS rebinding
    needs: a browser's ``User-Agent`` (``Mozilla/...``), or one of
    :data:`_BROWSER_HEADERS` (a page may set its own User-Agent in Firefox).
    Other clients (curl, Toxiproxy's clients, midway's own commands) choose their
    Host themselves, so checking theirs would refuse a remote API reached by a
    name (``toxiproxy:8474`` from another container) and protect nothing."""
    return headers.get("User-Agent", "").startswith("Mozilla/") \
        or any(name in headers for name in _BROWSER_HEADERS)


def _from_ui(headers: Any) -> bool:
    """Whether a request comes from the dashboard: it carries :data:`UI_HEADER`,
    and a browser that says where the request comes from says same-origin."""
    site = headers.get("Sec-Fetch-Site", "same-origin")
    return bool(headers.get(UI_HEADER)) and site in ("same-origin", "none")


def _error_body(message: str, status: int) -> bytes:
    return json.dumps({"error": message, "status": status}, separators=(",", ":")).encode()
