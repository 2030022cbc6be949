"""The admin server's reading of untrusted bytes, fuzzed (hypothesis): a chunked
body decodes to what was chunked and anything else is a 400 or 413, never
another exception; headers pass or get 400; and a real midway fed arbitrary
request bytes answers each with a status line and a JSON or text body (or
closes), logs no traceback, and serves the next client."""

from __future__ import annotations

import http.client
import io
import json
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from midway.admin.server import MAX_BODY, _BodyError, _check_headers, _read_chunked

from ..helpers import ProxyProcess
from .conftest import Admin
from .test_limits import read_reply

pieces = st.lists(st.binary(min_size=1, max_size=64), max_size=8)


def chunked(parts: list[bytes], extension: bytes, trailer: bytes) -> bytes:
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in parts) \
        + b"0\r\n" + trailer + b"\r\n"


@given(pieces, st.sampled_from([b"", b";a=b", b";x"]),
       st.sampled_from([b"", b"X-Trailer: 1\r\n"]), st.binary(max_size=16))
def test_a_chunked_body_decodes_to_its_pieces(parts: list[bytes], extension: bytes,
                                              trailer: bytes, after: bytes) -> None:
    stream = io.BytesIO(chunked(parts, extension, trailer) + after)
    assert _read_chunked(stream) == b"".join(parts)
    assert stream.read() == after  # the next request is left alone


@given(st.one_of(st.binary(max_size=200),
                 pieces.map(lambda p: chunked(p, b"", b"")).flatmap(
                     lambda good: st.integers(0, len(good)).flatmap(
                         lambda cut: st.binary(max_size=8).map(
                             lambda junk: good[:cut] + junk + good[cut:])))))
def test_any_chunked_bytes_decode_or_get_400_or_413(data: bytes) -> None:
    try:
        body = _read_chunked(io.BytesIO(data))
    except _BodyError as exc:
        assert exc.status in (400, 413)
    else:
        assert len(body) <= MAX_BODY


@given(st.binary(max_size=300))
def test_any_header_bytes_pass_or_get_400(data: bytes) -> None:
    try:
        headers = http.client.parse_headers(io.BytesIO(data))
    except http.client.HTTPException:
        return  # http.server answers those itself (431)
    try:
        _check_headers(headers)
    except _BodyError as exc:
        assert exc.status == 400


methods = st.sampled_from([b"GET", b"POST", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"BREW"])
targets = st.sampled_from([b"/version", b"/proxies", b"/ui/", b"/ui/../x", b"/reset",
                           b"http://127.0.0.1/version", b"*", b"/proxies/%ff"]) \
    | st.binary(max_size=20)
header_lines = st.lists(st.sampled_from([
    b"Host: 127.0.0.1", b"Host: evil.example", b"Content-Length: 2", b"Content-Length: -1",
    b"Content-Length: 99999999999", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
    b"User-Agent: Mozilla/5.0", b"X-Midway-UI: 1", b"Expect: 100-continue", b"Host : x",
    b"Connection: close"]) | st.binary(max_size=30), max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(methods, targets, st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b""]),
       header_lines, st.binary(max_size=40))
def test_any_request_bytes_get_an_answer_and_the_server_lives(
        admin_process: ProxyProcess, method: bytes, target: bytes, version: bytes,
        headers: list[bytes], body: bytes) -> None:
    request = b" ".join(x for x in (method, target, version) if x) + b"\r\n" \
        + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    with socket.create_connection(("127.0.0.1", admin_process.port), timeout=15) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # a request cut short is answered or closed
        try:
            status, answer_headers, answer = read_reply(sock)
        except (ConnectionError, AssertionError, ValueError):
            status = 0  # closed without an answer (or mid-way through one)
        if status:
            assert 100 <= status < 600
            if status >= 500 and status != 501 and status != 505:
                raise AssertionError(f"{status} for {request!r}: {answer!r}")
            if status >= 400 and answer and answer_headers.get(
                    "content-type", "").startswith("application/json"):
                assert json.loads(answer)["status"] == status
    assert "Traceback" not in admin_process.stderr_text()
    assert Admin(admin_process).get("/version").status == 200
