"""The admin API under test: ``python -m midway --admin 127.0.0.1:0`` with no proxy
(toxiproxy-server mode), shared by the tests of a module and emptied after each."""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ..helpers import ProxyProcess


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Admin:
    """A raw HTTP client of the admin API (no Toxiproxy client involved)."""

    def __init__(self, process: ProxyProcess) -> None:
        self.process = process
        self.host, self.port = "127.0.0.1", process.port
        self.url = f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            data = raw if raw is not None else (
                None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data,
                         headers={"User-Agent": "midway-tests", **(headers or {})})
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return self.request("POST", path, body, **kwargs)

    def delete(self, path: str) -> Reply:
        return self.request("DELETE", path)

    def clear(self) -> None:
        for name in self.get("/proxies").json:
            assert self.delete(f"/proxies/{name}").status == 204


@pytest.fixture(scope="module")
def admin_process() -> Iterator[ProxyProcess]:
    process = ProxyProcess("--admin", "127.0.0.1:0")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def admin(admin_process: ProxyProcess) -> Iterator[Admin]:
    api = Admin(admin_process)
    yield api
    assert admin_process.proc.poll() is None, admin_process.stderr_text()
    api.clear()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def round_trip(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> bytes:
    """Send ``payload`` through a proxy to the echo server and read it back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # the proxy could not reach an upstream
                break
            if not chunk:
                break
            got += chunk
        return got


def checked_route(*upstreams: str) -> str:
    """TOML for proxy web: active checks every 0.1 s (down at the first failed
    one), and the SNI route api (``api.example.test``) to ``upstreams``."""
    listed = ", ".join(f'"{u}"' for u in upstreams)
    return f"""
[proxy.web.health]
interval_s = 0.1
fall = 1

[[proxy.web.routes]]
name = "api"
sni = "api.example.test"
upstreams = [{listed}]
"""


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False
