"""The admin API under load and abuse, over raw sockets: a burst of clients, more
connections than the cap, slow (slowloris) clients, malformed requests, and peers
that leave before reading their answer.  Each module gets its own midway process
(``admin`` fixture), so these tests do not disturb the other admin tests and can
read its stderr."""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
from typing import Any

import pytest

from midway.admin.server import MAX_BODY, MAX_CONNECTIONS, REQUEST_TIMEOUT_S

from .conftest import Admin

pytestmark = pytest.mark.timeout(90)

_TCPI_TOTAL_RETRANS = 100
"""Offset of ``tcpi_total_retrans`` in Linux's ``struct tcp_info`` (linux/tcp.h):
8 one-byte fields, then 23 ``__u32`` before it."""


def total_retransmits(sock: socket.socket) -> int:
    """Segments this socket retransmitted (a dropped SYN counts)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    value: int = struct.unpack_from("I", info, _TCPI_TOTAL_RETRANS)[0]
    return value


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response whose body has a Content-Length (or none)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip()
               for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def raw_request(admin: Admin, data: bytes) -> tuple[int, dict[str, str], Any]:
    """Send ``data`` as is; the answer, its body parsed as JSON."""
    with socket.create_connection((admin.host, admin.port), timeout=10) as sock:
        sock.sendall(data)
        status, headers, body = read_reply(sock)
    return status, headers, json.loads(body)


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


# -- load ------------------------------------------------------------------------


def test_a_burst_of_200_clients_is_accepted_at_once(admin: Admin) -> None:
    """The admin listener's queue is the proxies' backlog (511), not socketserver's
    5: a burst of connects needs no SYN retransmit (each would cost 1 s)."""
    count = 200
    barrier = threading.Barrier(count, timeout=30)
    results: list[tuple[int, float, int] | BaseException] = []
    lock = threading.Lock()

    def client() -> None:
        try:
            with socket.socket() as sock:
                sock.settimeout(20)
                barrier.wait()
                started = time.monotonic()
                sock.connect((admin.host, admin.port))
                connected = time.monotonic() - started
                sock.sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: t\r\n"
                             b"Connection: close\r\n\r\n")
                status, _, _ = read_reply(sock)
                result: tuple[int, float, int] | BaseException = (
                    status, connected, total_retransmits(sock))
        except BaseException as exc:  # reported below, with the others
            result = exc
        with lock:
            results.append(result)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert len(results) == count
    done = [r for r in results if not isinstance(r, BaseException)]
    assert [status for status, _, _ in done] == [200] * count
    slow = sorted(connected for _, connected, _ in done if connected >= 0.9)
    assert not slow, f"{len(slow)} connects waited for a SYN retransmit: {slow[:5]}"
    assert sum(retransmits for _, _, retransmits in done) == 0


def test_connections_past_the_cap_get_503_and_the_cap_frees_up(admin: Admin) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.create_connection((admin.host, admin.port), timeout=10)
            held.append(sock)
            # Served, so it holds a slot of its own (a connection of an earlier
            # test whose thread is still ending could have had it refused):
            sock.sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: t\r\n\r\n")
            assert read_reply(sock)[0] == 200
            sock.sendall(b"GET /version HTTP/1.1\r\n")  # a request begun, never finished
        status, headers, body = raw_request(
            admin, b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: t\r\n\r\n")
        assert status == 503
        assert headers["connection"] == "close"
        assert body == {"error": f"too many admin connections (at most {MAX_CONNECTIONS})",
                        "status": 503}
    finally:
        for sock in held:
            sock.close()
    # The held connections' threads see the close and free their slots.
    deadline = time.monotonic() + 10
    while True:
        reply = raw_request(admin, b"GET /proxies HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: t\r\n\r\n")
        if reply[0] == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply[:1] == (200,) and reply[2] == {}


def test_idle_connections_at_the_cap_give_way_to_a_new_request(admin: Admin) -> None:
    """A client holding the cap's worth of connections open and silent locks no
    one out: a new connection takes the place of the one idle longest, closed
    with a FIN (an idle HTTP connection may be closed at any time), and the
    others are still served."""
    request = b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: t\r\n\r\n"
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(socket.create_connection((admin.host, admin.port), timeout=10))
        deadline = time.monotonic() + 10
        while True:  # once the held connections' threads wait for a request
            status, _, body = raw_request(admin, request)
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 200, body
        poller = select.poll()
        for sock in held:
            poller.register(sock, select.POLLIN)
        ready = [fd for fd, _ in poller.poll(1000)]
        assert len(ready) == 1, ready
        [closed] = [sock for sock in held if sock.fileno() in ready]
        assert closed.recv(100) == b""
        other = held[-1] if closed is not held[-1] else held[0]
        other.sendall(request)
        assert read_reply(other)[0] == 200
    finally:
        for sock in held:
            sock.close()


def test_slow_headers_and_slow_bodies_are_dropped_after_the_request_timeout(
        admin: Admin) -> None:
    """A slowloris client dribbling a byte at a time is cut off REQUEST_TIMEOUT_S
    after its request began, however often it sends."""
    headers = socket.create_connection((admin.host, admin.port), timeout=0.3)
    body = socket.create_connection((admin.host, admin.port), timeout=0.3)
    headers.sendall(b"GET /version HTTP/1.1\r\n")
    body.sendall(b"POST /proxies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{")
    started = time.monotonic()
    open_ = {"headers": headers, "body": body}
    dropped: dict[str, float] = {}
    try:
        while open_ and time.monotonic() - started < REQUEST_TIMEOUT_S + 10:
            for what, sock in list(open_.items()):
                try:
                    sock.sendall(b"X-Slow: 1\r\n" if what == "headers" else b" ")
                except OSError:  # reset by the server
                    dropped[what] = time.monotonic() - started
                    del open_[what]
                    continue
                if closed_by_server(sock):
                    dropped[what] = time.monotonic() - started
                    del open_[what]
    finally:
        headers.close()
        body.close()
    assert set(dropped) == {"headers", "body"}, dropped
    assert all(REQUEST_TIMEOUT_S - 1 <= t <= REQUEST_TIMEOUT_S + 3 for t in dropped.values()), \
        dropped


# -- malformed requests: a JSON error, never a traceback ------------------------------


def test_malformed_requests_get_a_json_4xx(admin: Admin) -> None:
    ua = b"Host: 127.0.0.1\r\nUser-Agent: t\r\n"
    cases: list[tuple[bytes, int, str]] = [
        (b"GET /version HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
        (b"GET /version HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "Too many headers"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, ""),
        (b"NONSENSE\r\n\r\n", 400, "Bad request"),
        (b"GET /version HTTP/7.0\r\n\r\n", 505, ""),
        (b"BREW /version HTTP/1.1\r\n" + ua + b"\r\n", 501, "Unsupported method"),
        (b"POST /proxies HTTP/1.1\r\n" + ua + b"Content-Length: " + str(MAX_BODY + 1).encode()
         + b"\r\n\r\n", 413, "body"),
        (b"POST /proxies HTTP/1.1\r\n" + ua + b"Content-Length: -1\r\n\r\n", 400, "Content-Length"),
    ]
    for data, status, words in cases:
        got, headers, body = raw_request(admin, data)
        assert (got, body["status"]) == (status, status), (data[:40], body)
        assert words in body["error"], (data[:40], body)
        assert headers["content-type"] == "application/json"
    assert_no_traceback(admin)


def test_deeply_nested_json_is_400_not_500(admin: Admin) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    for path in ("/proxies", "/populate"):
        reply = admin.post(path, raw=nested)
        assert reply.status == 400, reply.body
        assert reply.json["error"].startswith("bad request body: nested too deeply")
    assert_no_traceback(admin)


# -- peers leaving early: no traceback -------------------------------------------------


def assert_no_traceback(admin: Admin) -> None:
    # A request after the others: their threads are done or about to be.
    assert admin.get("/version").status == 200
    time.sleep(0.3)
    text = admin.process.stderr_text()
    for word in ("Traceback", "BrokenPipe", "ConnectionReset", "Exception occurred"):
        assert word not in text, text


def test_clients_that_leave_before_the_answer_leave_no_traceback(admin: Admin) -> None:
    request = b"GET /proxies HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: t\r\n\r\n"
    for i in range(10):
        sock = socket.create_connection((admin.host, admin.port), timeout=5)
        sock.sendall(request * 3)  # pipelined: the later answers meet a closed socket
        if i % 2:  # a reset rather than a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    # And one that reads half an answer, then resets.
    sock = socket.create_connection((admin.host, admin.port), timeout=5)
    sock.sendall(request * 50)
    sock.recv(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert_no_traceback(admin)


@pytest.mark.parametrize("head, error", [
    # What a front proxy and midway could read apart (request smuggling), or a
    # header the parser would drop with every header after it (the Host's).
    (b"Content-Length: 2\r\nContent-Length: 40\r\n", "bad Content-Length"),
    (b"Content-Length: +2\r\n", "bad Content-Length"),
    (b"Content-Length: 0x2\r\n", "bad Content-Length"),
    (b"Content-Length: 1_0\r\n", "bad Content-Length"),
    (b"Host: 127.0.0.1\r\n", "more than one Host header"),
    (b"Host : evil.example\r\n", "malformed header line"),
    (b"X-Nothing\r\n", "malformed header line"),
])
def test_ambiguous_framing_and_headers_get_400_and_close(admin: Admin, head: bytes,
                                                         error: str) -> None:
    with socket.create_connection((admin.host, admin.port), timeout=10) as sock:
        sock.sendall(b"POST /proxies HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\n{}"
                     b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = read_reply(sock)
        assert (status, json.loads(body)["error"].split(":")[0]) == (400, error)
        assert closed_by_server(sock)  # the GET behind it is never answered
    assert admin.get("/proxies").json == {}


def test_at_the_cap_only_a_connection_with_nothing_received_gives_way() -> None:
    """The slots' own bookkeeping, driven directly: a connection marked idle
    whose request bytes already wait in its receive buffer (its thread not yet
    woken to read them) is busy, not the one to close for a newcomer; one with
    nothing received is closed, and when every connection has bytes waiting the
    newcomer is refused."""
    from midway.admin.server import _Slots

    pairs = [socket.socketpair() for _ in range(3)]
    for pair in pairs:
        for sock in pair:
            sock.settimeout(5)
    try:
        slots = _Slots(2)
        (ours_a, peer_a), (ours_b, peer_b), (ours_c, peer_c) = pairs
        assert slots.take() and slots.take()
        slots.idle(ours_a)  # idle longest, but its request has arrived
        slots.idle(ours_b)  # idle, nothing received
        peer_a.sendall(b"GET / HTTP/1.1\r\n")
        assert slots.take()  # in b's place, not a's
        assert ours_b.recv(1) == b""  # b was shut down
        assert ours_a.recv(100) == b"GET / HTTP/1.1\r\n"  # a is untouched
        assert not slots.busy(ours_b) and slots.busy(ours_a)
        slots.release()  # b's thread ends
        slots.idle(ours_c)
        peer_c.sendall(b"G")
        assert not slots.take()  # c has bytes waiting: no slot
        slots.idle(ours_a)  # a waits for its next request; its client leaves
        peer_a.close()
        assert slots.take()  # a connection its peer closed gives way
        assert slots.busy(ours_c) and not slots.busy(ours_a)
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()
