"""The PROXY protocol and SNI routing against real peers from Debian, on loopback:

- HAProxy ``send-proxy-v2`` (and ``send-proxy``, v1) in front of midway
  (``proxy_protocol_in = "v2"``, ``"v1"``, ``"any"``), a
  client from 127.0.0.7: midway's access log and the balancer's key see 127.0.0.7,
  and the backend, through midway's ``proxy_protocol_out = "v1"``, reads it in the
  v1 line;
- nginx ``stream`` with ``listen ... proxy_protocol`` behind midway
  (``proxy_protocol_out = "v2"``): nginx's access log shows the client, 127.0.0.7;
- HAProxy terminating TLS and sending v2 with AUTHORITY: midway routes by that
  name and sends v2 on to a second HAProxy (``accept-proxy``), which passes the
  client to a backend: only midway's header can have told it;
- ``curl --resolve`` to two SNI names through one midway port, reaching two TLS
  servers (certificates made by openssl at test time) without termination.

The peers are what these tests check, not midway's data path (which the other e2e
tests run in every mode): each runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import midway

from .. import helpers
from ..helpers import free_port, read_to_eof, run, serve
from .test_proxy_protocol_e2e import KeyRecorder, Records

pytestmark = pytest.mark.one_mode

CLIENT_HOST = "127.0.0.7"
"""A loopback address other than midway's and the peers': whoever reports it saw
the real client."""
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def need(tool: str, apt: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}")
                                  else None)
    if path is None:
        pytest.skip(helpers.needs(tool, apt=apt))
    return path


async def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Until something accepts on 127.0.0.1:port (a probe connection, closed)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


@contextlib.asynccontextmanager
async def process(*argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def from_client(port: int, data: bytes) -> bytes:
    """Connect from 127.0.0.7, send, half-close, read the answer to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(CLIENT_HOST, 0))
    writer.write(data)
    writer.write_eof()
    try:
        return await read_to_eof(reader)
    finally:
        writer.close()


def v1_backend() -> Any:
    """Reads the PROXY v1 line midway sends and answers with the client it names."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        rest = await read_to_eof(reader)
        fields = line.decode("ascii").split()
        writer.write(f"{fields[2]} {rest.decode()}".encode())
        await writer.drain()
        writer.close()
    return handler


@pytest.mark.parametrize(("send", "accept"), [("send-proxy-v2", "v2"), ("send-proxy", "v1"),
                                            ("send-proxy", "any")])
def test_haproxy_send_proxy_v2_then_midway_then_v1_to_the_backend(
        tmp_path: Path, send: str, accept: str) -> None:
    haproxy = need("haproxy", "haproxy")

    async def main() -> None:
        records = Records()
        front = free_port()
        async with serve(v1_backend()) as a, serve(v1_backend()) as b, \
                midway.Proxy("127.0.0.1:0", [f"127.0.0.1:{a}", f"127.0.0.1:{b}"],
                             observers=[records], proxy_protocol_in=accept,
                             proxy_protocol_trusted=["127.0.0.1/32"],
                             proxy_protocol_out="v1") as proxy:
            recorder = KeyRecorder(proxy.service.pool.balancer)
            proxy.service.pool.balancer = recorder  # type: ignore[assignment]
            config = tmp_path / "haproxy.cfg"
            config.write_text(f"""\
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend in
    bind 127.0.0.1:{front}
    default_backend midway
backend midway
    server m 127.0.0.1:{proxy.port} {send}
""")
            async with process(haproxy, "-db", "-f", str(config)):
                await wait_listening(front)
                answer = await from_client(front, b"hello")
                async with asyncio.timeout(5):
                    while not any(r.client.startswith(CLIENT_HOST) for r in records.records):
                        await asyncio.sleep(0.02)
        assert answer == f"{CLIENT_HOST} hello".encode()
        [record] = [r for r in records.records if r.client.startswith(f"{CLIENT_HOST}:")]
        assert record.reason == "eof" and record.listener == f"127.0.0.1:{front}"
        assert CLIENT_HOST in recorder.keys
    run(main(), timeout=60)


def test_nginx_stream_proxy_protocol_behind_midway_logs_the_client(tmp_path: Path) -> None:
    nginx = need("nginx", "nginx-light libnginx-mod-stream")
    if not NGINX_STREAM_MODULE.exists():
        pytest.skip(helpers.needs("nginx's stream module", apt="libnginx-mod-stream"))

    async def main() -> None:
        port = free_port()
        log = tmp_path / "access.log"
        async with serve() as echo:
            config = tmp_path / "nginx.conf"
            config.write_text(f"""\
load_module {NGINX_STREAM_MODULE};
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 64; }}
stream {{
    log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr';
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        proxy_pass 127.0.0.1:{echo};
        proxy_half_close on;  # the client half-closes and waits for the echo
        access_log {log} pp;
    }}
}}
""")
            async with process(nginx, "-e", str(tmp_path / "error.log"), "-p", str(tmp_path),
                               "-c", str(config)), \
                    midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}",
                                 proxy_protocol_out="v2") as proxy:
                await wait_listening(port)
                assert await from_client(proxy.port, b"through nginx") == b"through nginx"
                async with asyncio.timeout(10):
                    while CLIENT_HOST not in (log.read_text() if log.exists() else ""):
                        await asyncio.sleep(0.05)
        lines = [line.split() for line in log.read_text().splitlines()]
        assert [CLIENT_HOST, "127.0.0.1"] in [[f[0], f[2]] for f in lines]
    run(main(), timeout=60)


def _certificate(where: Path, name: str) -> tuple[Path, Path]:
    cert, key = where / f"{name}.pem", where / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30)
    return cert, key


def https_backend(body: bytes) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
        finally:
            writer.close()
    return handler


def test_curl_reaches_two_tls_backends_by_sni_through_one_port(tmp_path: Path) -> None:
    curl = need("curl", "curl")
    need("openssl", "openssl")
    names = ["alpha.example.test", "beta.example.test"]
    certs = {name: _certificate(tmp_path, name) for name in names}

    async def main() -> None:
        records = Records()
        servers = []
        for name in names:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*certs[name])
            servers.append(await asyncio.start_server(https_backend(name.encode()),
                                                      "127.0.0.1", 0, ssl=context))
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        try:
            async with midway.Proxy(
                    "127.0.0.1:0", observers=[records],
                    routes=[{"sni": name, "upstreams": f"127.0.0.1:{port}"}
                            for name, port in zip(names, ports, strict=True)]) as proxy:
                bodies = []
                for name in names:
                    proc = await asyncio.create_subprocess_exec(
                        curl, "-sS", "--max-time", "10", "--cacert", str(certs[name][0]),
                        "--resolve", f"{name}:{proxy.port}:127.0.0.1",
                        f"https://{name}:{proxy.port}/",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                    out, err = await asyncio.wait_for(proc.communicate(), 20)
                    assert proc.returncode == 0, err.decode()
                    bodies.append(out)
                async with asyncio.timeout(5):
                    while len(records.records) < 2:
                        await asyncio.sleep(0.02)
        finally:
            for server in servers:
                server.close()
        assert bodies == [name.encode() for name in names]
        assert sorted((r.route, r.sni) for r in records.records) == [(n, n) for n in names]
    run(main(), timeout=60)


def line_backend() -> Any:
    """Reads the PROXY v1 line, then one line of data; answers ``CLIENT LINE``."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
            line = await asyncio.wait_for(reader.readuntil(b"\n"), 10)
            writer.write(header.split()[2] + b" " + line)
            await writer.drain()
        finally:
            writer.close()
    return handler


def test_haproxy_terminates_tls_midway_routes_by_authority_and_haproxy_behind_reads_v2(
        tmp_path: Path) -> None:
    # client (127.0.0.7) -TLS-> HAProxy, which terminates and sends v2 with the
    # AUTHORITY TLV -> midway, which routes by it and sends v2 on -> HAProxy
    # `accept-proxy` -> send-proxy (v1) -> a backend that answers with the client.
    # Only midway's v2 header can have told the second HAProxy who the client is.
    haproxy = need("haproxy", "haproxy")
    need("openssl", "openssl")
    name = "api.example.test"
    cert, key = _certificate(tmp_path, name)
    crt = tmp_path / "site.crt"
    crt.write_bytes(cert.read_bytes() + key.read_bytes())

    async def main() -> None:
        records = Records()
        front, back = free_port(), free_port()
        async with serve(line_backend()) as app, serve() as wrong, \
                midway.Proxy("127.0.0.1:0", f"127.0.0.1:{wrong}", observers=[records],
                             proxy_protocol_in="v2", proxy_protocol_trusted=["127.0.0.1"],
                             proxy_protocol_out="v2",
                             routes=[{"name": "api", "sni": name,
                                      "upstreams": f"127.0.0.1:{back}"}]) as proxy:
            config = tmp_path / "haproxy.cfg"
            config.write_text(f"""\
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend tls
    bind 127.0.0.1:{front} ssl crt {crt}
    default_backend midway
backend midway
    server m 127.0.0.1:{proxy.port} send-proxy-v2 proxy-v2-options authority
frontend behind
    bind 127.0.0.1:{back} accept-proxy
    default_backend app
backend app
    server a 127.0.0.1:{app} send-proxy
""")
            async with process(haproxy, "-db", "-f", str(config)):
                await wait_listening(front)
                await wait_listening(back)
                context = ssl.create_default_context(cafile=str(cert))
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", front, ssl=context, server_hostname=name,
                    local_addr=(CLIENT_HOST, 0))
                try:
                    writer.write(b"hello\n")
                    answer = await asyncio.wait_for(reader.readuntil(b"\n"), 10)
                finally:
                    writer.close()
                async with asyncio.timeout(5):
                    while not any(r.client.startswith(CLIENT_HOST) for r in records.records):
                        await asyncio.sleep(0.02)
        assert answer == f"{CLIENT_HOST} hello\n".encode()
        [record] = [r for r in records.records if r.client.startswith(f"{CLIENT_HOST}:")]
        assert (record.route, record.sni, record.upstream) == ("api", name, f"127.0.0.1:{back}")
    run(main(), timeout=60)
