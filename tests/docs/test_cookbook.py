"""docs/faults.md's cookbook, run: every fenced block marked ``cookbook=NAME``
is extracted and played against a real service on loopback (redis-server, a
TLS server, http.server, small echo and line servers here), with the doc's
addresses replaced by free ports.  TOML runs through ``midway --config``, shell
lines as they are, Python as written (its asserts are the example's claims)."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .. import helpers
from ..helpers import ROOT, ProxyProcess, free_port, proxy_process, threaded, wait_until

pytestmark = pytest.mark.timeout(120)

DOC = ROOT / "docs" / "faults.md"
BLOCK = re.compile(r"^```(\w+) cookbook=([\w-]+)\n(.*?)^```", re.M | re.S)


def blocks() -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for lang, name, body in BLOCK.findall(DOC.read_text(encoding="utf-8")):
        assert name not in found, f"two cookbook blocks named {name}"
        found[name] = (lang, body)
    return found


SCENARIOS: dict[str, Callable[..., None]] = {}


def scenario(fn: Callable[..., None]) -> Callable[..., None]:
    SCENARIOS[fn.__name__.removeprefix("test_").replace("_", "-")] = fn
    return fn


def test_every_cookbook_block_is_tested() -> None:
    assert sorted(blocks()) == sorted(SCENARIOS)
    assert len(SCENARIOS) == 10


# -- servers -------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with self.request as sock:
            try:
                while data := sock.recv(65536):
                    sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class _Lines(socketserver.StreamRequestHandler):
    received: list[bytes]

    def handle(self) -> None:
        try:
            while line := self.rfile.readline():
                self.received.append(line)
                self.wfile.write(b"250 ok %d\r\n" % len(self.received))
        except OSError:
            pass


@contextmanager
def process(*args: str, port: int) -> Iterator[None]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _connects(port), timeout=15), args
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextmanager
def redis_server(tmp_path: Path) -> Iterator[int]:
    if not shutil.which("redis-server"):
        pytest.skip(helpers.needs("redis-server", apt="redis-server"))
    port = free_port()
    with process("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp_path), port=port):
        yield port


@contextmanager
def toml_proxy(name: str, upstream: int, tmp_path: Path) -> Iterator[ProxyProcess]:
    """The block's configuration with the proxy on a free port in front of ``upstream``."""
    lang, body = blocks()[name]
    assert lang == "toml"
    body = re.sub(r'^listen = ".*"$', 'listen = "127.0.0.1:0"', body, flags=re.M)
    body = re.sub(r'^upstreams = ".*"$', f'upstreams = "127.0.0.1:{upstream}"', body, flags=re.M)
    config = tmp_path / f"{name}.toml"
    config.write_text(body)
    with proxy_process("--config", str(config)) as proxy:
        yield proxy


def run_python(name: str, upstream: int) -> None:
    lang, body = blocks()[name]
    assert lang == "python"
    exec(compile(body, f"docs/faults.md:{name}", "exec"), {"UPSTREAM": f"127.0.0.1:{upstream}"})


def redis_command(sock: socket.socket, *words: bytes) -> bytes:
    sock.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w)
                                                   for w in words))
    return sock.recv(1000)


# -- the scenarios ---------------------------------------------------------------------


@scenario
def test_redis_exec_reset(tmp_path: Path) -> None:
    if not shutil.which("redis-cli"):
        pytest.skip(helpers.needs("redis-cli", apt="redis-tools"))
    with redis_server(tmp_path) as port, toml_proxy("redis-exec-reset", port, tmp_path) as proxy:
        session = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(proxy.port)],
            input="SET before 1\nMULTI\nSET inside 1\nEXEC\n",
            capture_output=True, text=True, timeout=20)
        assert session.stdout.split()[:3] == ["OK", "OK", "QUEUED"], session
        assert "reset" in (session.stdout + session.stderr).lower(), session
        check = subprocess.run(["redis-cli", "-p", str(port), "MGET", "before", "inside"],
                               capture_output=True, text=True, timeout=10, check=True)
        assert check.stdout.split() == ["1"]  # "inside" was never set: EXEC did not arrive


@scenario
def test_redis_multi_latency(tmp_path: Path) -> None:
    with redis_server(tmp_path) as port, toml_proxy("redis-multi-latency", port,
                                                    tmp_path) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            started = time.monotonic()
            assert redis_command(sock, b"PING") == b"+PONG\r\n"
            before = time.monotonic() - started
            started = time.monotonic()
            assert redis_command(sock, b"MULTI") == b"+OK\r\n"
            after = time.monotonic() - started
    assert before < 0.3 and after >= 0.5, (before, after)


@scenario
def test_third_command_reset(tmp_path: Path) -> None:
    received: list[bytes] = []
    handler = type("Lines", (_Lines,), {"received": received})
    with threaded(handler) as port, toml_proxy("third-command-reset", port, tmp_path) as proxy:
        replies, ending = [], "open"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            try:
                for command in (b"HELO a\r\n", b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n"):
                    sock.sendall(command)
                    reply = sock.recv(100)
                    if not reply:
                        ending = "eof"
                        break
                    replies.append(reply)
            except ConnectionResetError:
                ending = "reset"
    assert replies == [b"250 ok 1\r\n", b"250 ok 2\r\n"] and ending == "reset"
    assert received == [b"HELO a\r\n", b"MAIL FROM:<a@b>\r\n"]


@scenario
def test_slow_tls_handshake(tmp_path: Path) -> None:
    if not shutil.which("openssl"):
        pytest.skip(helpers.needs("openssl", apt="openssl"))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    def wrap(sock: socket.socket) -> socket.socket:
        sock.settimeout(10)
        return server_ctx.wrap_socket(sock, server_side=True)

    client_ctx = ssl.create_default_context(cafile=str(cert))
    with threaded(_Echo, wrap) as port, toml_proxy("slow-tls-handshake", port,
                                                   tmp_path) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            started = time.monotonic()
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                handshake = time.monotonic() - started
                started = time.monotonic()
                tls.sendall(b"ping")
                assert tls.recv(100) == b"ping"
                echo = time.monotonic() - started
    assert handshake >= 1.0 and echo < 0.5, (handshake, echo)


def probe(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(0.4)
            sock.sendall(b"ping")
            return "up" if sock.recv(10) == b"ping" else "down"
    except OSError:  # reset, or no answer in time
        return "down"


@scenario
def test_flapping_upstream(tmp_path: Path) -> None:
    with threaded(_Echo) as port, toml_proxy("flapping-upstream", port, tmp_path) as proxy:
        started = time.monotonic()
        states = []
        for at in (0.5, 1.5, 2.5, 3.5, 4.5):  # the middle of each second
            time.sleep(max(0.0, started + at - time.monotonic()))
            states.append(probe(proxy.port))
    assert states == ["up", "down", "up", "down", "up"]


@scenario
def test_every_third_connection() -> None:
    lang, body = blocks()["every-third-connection"]
    assert lang == "sh"
    args = shlex.split(body)
    assert args[0] == "midway"
    with threaded(_Echo) as port:
        args = [a.replace("127.0.0.1:8080", "127.0.0.1:0").replace("127.0.0.1:80",
                                                                     f"127.0.0.1:{port}")
                for a in args[1:]]
        with proxy_process(*args) as proxy:
            states = [probe(proxy.port) for _ in range(6)]
    assert states == ["up", "up", "down", "up", "up", "down"]


@scenario
def test_replayed_http_ci(tmp_path: Path) -> None:
    lang, body = blocks()["replayed-http-ci"]
    assert lang == "python"
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hello from the recording\n")
    http_port, port = free_port(), free_port()
    # Record, as the doc says, with the same client (urllib) the test uses.
    with process(sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                 "--directory", str(site), port=http_port), \
            proxy_process(f"127.0.0.1:{port}", f"127.0.0.1:{http_port}", "--pcap",
                          str(tmp_path / "session.pcap")) as proxy:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.read() == b"hello from the recording\n"
        proxy.signal()
        assert proxy.wait() == 0
    (tmp_path / "test_ci.py").write_text(body.replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_ci.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    if "fixture 'midway_replay' not found" in result.stdout:
        pytest.skip(helpers.needs("midway installed (its pytest plugin)", pip="-e ."))
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


@scenario
def test_slow_network() -> None:
    with threaded(_Echo) as port:
        run_python("slow-network", port)


@scenario
def test_cable_unplugged() -> None:
    with threaded(_Echo) as port:
        run_python("cable-unplugged", port)


@scenario
def test_corrupted_replies() -> None:
    with threaded(_Echo) as port:
        run_python("corrupted-replies", port)
