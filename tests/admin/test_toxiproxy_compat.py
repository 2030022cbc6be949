"""What real Toxiproxy clients send that Toxiproxy accepts, over raw HTTP: each
test is one request shape a published client uses, answered as Toxiproxy
answers it (``api.go``, ``stream/direction.go`` of Shopify/toxiproxy v2)."""

from __future__ import annotations

import socket
import time

import pytest

from .conftest import Admin, EchoServer, port_of, round_trip

pytestmark = pytest.mark.timeout(60)


def test_proxy_named_after_its_upstream_host_and_port(admin: Admin, echo: EchoServer) -> None:
    # testcontainers-java's ToxiproxyContainer.getProxy(host, port) names the proxy
    # "host:port" (client.createProxy(upstream, "0.0.0.0:" + port, upstream)).
    name = "rabbitmq:5672"
    reply = admin.post("/proxies", {"name": name, "listen": "127.0.0.1:0",
                                    "upstream": echo.address})
    assert reply.status == 201, reply.body
    assert reply.json["name"] == name
    assert round_trip(port_of(reply.json["listen"])) == b"ping"
    assert list(admin.get("/proxies").json) == [name]
    assert admin.get(f"/proxies/{name}").json["name"] == name
    reply = admin.post(f"/proxies/{name}/toxics", {"type": "latency",
                                                  "attributes": {"latency": 10}})
    assert reply.status == 200, reply.body
    assert admin.get(f"/proxies/{name}/toxics/latency_downstream").status == 200
    reply = admin.post("/populate", [{"name": "kafka:9092", "listen": "127.0.0.1:0",
                                      "upstream": echo.address}])
    assert reply.status == 201, reply.body
    assert admin.delete(f"/proxies/{name}").status == 204
    assert admin.delete("/proxies/kafka:9092").status == 204
    # A name still never starts with a colon or holds a slash.
    for bad in (":5672", "a/b:1"):
        assert admin.post("/proxies", {"name": bad, "upstream": echo.address}).status == 400


@pytest.mark.parametrize("stream, direction", [("UpStream", "upstream"),
                                               ("DOWNSTREAM", "downstream"),
                                               ("Upstream", "upstream")])
def test_stream_is_read_in_any_case(admin: Admin, echo: EchoServer, stream: str,
                                    direction: str) -> None:
    # Toxiproxy.Net sends its enum as "UpStream" / "DownStream"; Toxiproxy's
    # ParseDirection lower-cases the text, and the default name keeps it as sent.
    admin.post("/proxies", {"name": "cased", "listen": "127.0.0.1:0", "upstream": echo.address})
    reply = admin.post("/proxies/cased/toxics", {"type": "latency", "stream": stream,
                                                 "attributes": {"latency": 300}})
    assert reply.status == 200, reply.body
    assert reply.json["name"] == f"latency_{stream}"
    assert reply.json["stream"] == direction
    assert admin.get(f"/proxies/cased/toxics/latency_{stream}").json["stream"] == direction
    # The toxic is on that direction: the other one's default name is free.
    reply = admin.post("/proxies/cased/toxics", {"type": "latency", "stream": direction})
    assert reply.status == 200, reply.body
    listed = [(t["name"], t["stream"]) for t in admin.get("/proxies/cased/toxics").json]
    assert (f"latency_{stream}", direction) in listed
    assert admin.post("/proxies/cased/toxics", {"type": "latency",
                                                "stream": "sideways"}).status == 400


def test_absolute_form_request_target(admin: Admin, echo: EchoServer) -> None:
    # RFC 9112 3.2.2: a server must accept a request line with an absolute URI
    # (what a client configured to use the API as its HTTP proxy sends); Go's
    # net/http does.
    with socket.create_connection((admin.host, admin.port), timeout=10) as sock:
        sock.sendall(f"GET http://{admin.host}:{admin.port}/version HTTP/1.1\r\n"
                     f"Host: {admin.host}:{admin.port}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    assert b'"version"' in body


def _exchange(admin: Admin, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes (or 10 s)."""
    with socket.create_connection((admin.host, admin.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n" + trailer + b"\r\n"


def test_chunked_request_bodies(admin: Admin, echo: EchoServer) -> None:
    # .NET's PostAsJsonAsync and Refit stream a JSON body as Transfer-Encoding:
    # chunked (no Content-Length); Go's server, Toxiproxy's, reads it.
    body = b'{"name": "chunky", "listen": "127.0.0.1:0", "upstream": "%s"}' % echo.address.encode()
    head = (b"POST /proxies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    with socket.create_connection((admin.host, admin.port), timeout=10) as sock:
        # Cut anywhere, with a chunk extension and a trailer; then a second request
        # on the same connection is read from where the first body ended.
        chunks = (b"7;ext=1\r\n" + body[:7] + b"\r\n"
                  + _chunked(body[7:30], body[30:], trailer=b"X-Trailer: 1\r\n"))
        sock.sendall(head + chunks
                     + b"GET /proxies/chunky HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 201 "), answer
    assert answer.count(b'"name":"chunky"') == 2 and b"HTTP/1.1 200 " in answer, answer
    assert round_trip(port_of(admin.get("/proxies/chunky").json["listen"])) == b"ping"
    toxic = b'{"type": "latency", "stream": "UpStream"}'
    answer = _exchange(admin, b"POST /proxies/chunky/toxics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                       + _chunked(toxic))
    assert answer.startswith(b"HTTP/1.1 200 ") and b"latency_UpStream" in answer, answer


@pytest.mark.parametrize("coding, chunks, status", [
    (b"chunked", b"zz\r\n{}\r\n0\r\n\r\n", 400),              # not a hex size
    (b"chunked", b"-2\r\n{}\r\n0\r\n\r\n", 400),
    (b"chunked", b"2\r\n{}XX0\r\n\r\n", 400),                  # no CRLF after the data
    (b"chunked", b"%x\r\n" % (2 << 20), 413),                   # past MAX_BODY
    (b"gzip, chunked", b"2\r\n{}\r\n0\r\n\r\n", 501),           # a coding midway cannot undo
])
def test_bad_chunked_bodies_are_refused_and_change_nothing(
        admin: Admin, coding: bytes, chunks: bytes, status: int) -> None:
    answer = _exchange(admin, b"POST /populate HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: "
                              + coding + b"\r\n\r\n" + chunks)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer
    assert b"Connection: close" in answer
    assert admin.get("/proxies").json == {}


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the proxy closes ``sock`` (EOF or reset) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_updating_a_timeout_toxic_keeps_its_connections(admin: Admin, echo: EchoServer) -> None:
    # Toxiproxy's link update interrupts the toxic and runs the new one; only a
    # removal runs the timeout toxic's Cleanup, which closes the connection.
    proxy = admin.post("/proxies", {"name": "hole", "listen": "127.0.0.1:0",
                                    "upstream": echo.address}).json
    admin.post("/proxies/hole/toxics", {"type": "timeout", "attributes": {"timeout": 0}})
    with socket.create_connection(("127.0.0.1", port_of(proxy["listen"])), timeout=5) as sock:
        sock.sendall(b"lost")                       # dropped by the toxic
        assert not _closed_within(sock, 0.3)
        # Healing it by toxicity: the connection goes on, and carries data again.
        reply = admin.request("PATCH", "/proxies/hole/toxics/timeout_downstream",
                              {"toxicity": 0})
        assert reply.status == 200, reply.body
        assert not _closed_within(sock, 0.3)
        sock.settimeout(5)
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"
        # Back on, with a timeout: the close comes that long after the update.
        started = time.monotonic()
        reply = admin.request("PATCH", "/proxies/hole/toxics/timeout_downstream",
                              {"toxicity": 1, "attributes": {"timeout": 400}})
        assert reply.status == 200, reply.body
        assert not _closed_within(sock, 0.2)
        assert _closed_within(sock, 5)
        assert 0.35 <= time.monotonic() - started < 5
    # Removing it still closes the connections it was dropping data on.
    admin.request("PATCH", "/proxies/hole/toxics/timeout_downstream", {"attributes": {"timeout": 0}})
    with socket.create_connection(("127.0.0.1", port_of(proxy["listen"])), timeout=5) as sock:
        sock.sendall(b"lost")
        assert not _closed_within(sock, 0.2)
        assert admin.delete("/proxies/hole/toxics/timeout_downstream").status == 204
        assert _closed_within(sock, 5)
